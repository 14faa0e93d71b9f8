"""The libraries our patch augmentation replaces, set up to do the same augmentation.

Each function builds one peer pipeline and returns a `PatchSource`: a zero-argument callable giving
one freshly augmented patch, image `(1, D, H, W)` float32 and label `(D, H, W)` uint8, both contiguous
torch tensors. Every library is imported inside its function, so a missing one raises ImportError
there and only that row of the comparison is skipped.

The fairness rules, the same for every row:

- Label-aware sampling, a third of the patches centred on a foreground voxel of a class drawn
  uniformly among the classes present: the library's own sampler where it has one, else
  `common.sample_center`. The transform libraries without a sampler (batchgenerators v1/v2, used as
  nnU-Net uses them) get a region enlarged by half the patch (when the spec resamples) so rotation and
  scaling have context, and their spatial transform cuts the centred patch out of it.
- Every augmentation of the spec on every patch (probability 1; each flip 0.5 per axis); the image
  interpolated linearly, the label by nearest neighbour, in one resampling where the library offers it.
- The elastic field as batchgeneratorsv2 draws it: smoothness sigma 9-13 voxels, largest displacement
  up to 7.5 voxels. Each function says how that (and the rest of the spec) maps to its parameters.
- One thread: SimpleITK (TorchIO) and OpenCV (Albumentations) keep their own thread pools, which
  ignore OMP_NUM_THREADS and torch.set_num_threads, so their functions set them to one thread.
- Seeded once from `seed`, fresh randomness on every call. MONAI and Albumentations keep their own
  generators; TorchIO and batchgenerators draw from the global ones (torch, numpy, random), which
  their functions seed when they build the pipeline.

Axes: our arrays are `(z, y, x)`; TorchIO calls its axes `(W, H, D)` and batchgenerators `(x, y, z)`.
Every range here is the same on all three axes, so which name an axis gets changes nothing.
"""

import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch

from benchmarks.common import AugmentationSpec, BenchmarkVolume, PatchSource, crop_around, sample_center

CONTEXT_FACTOR = 1.5  # nnU-Net's enlarged "initial patch size" for rotation/scaling context
LABEL_WEIGHTS = {0: 2.0, 1: 0.5, 2: 0.5}  # background 2/3, each foreground class 1/6 (classes 1, 2)


# --------------------------------------------------------------------------------------------------
# shared helpers


def _seed_global_generators(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators, which TorchIO and batchgenerators draw from.

    Seeded once, when the pipeline is built: saving and restoring numpy's global state around every
    call would cost ~0.2 ms, a sizeable share of a 'light' patch. So a row's draws repeat exactly only
    when rows are built and run one at a time; the draws are fresh on every call either way.
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _output(image, label) -> tuple[torch.Tensor, torch.Tensor]:
    """Image `(1, D, H, W)` float32 and label `(D, H, W)` uint8, contiguous plain torch tensors."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if isinstance(label, np.ndarray):
        label = torch.from_numpy(np.ascontiguousarray(label))
    image = image.as_subclass(torch.Tensor).to(torch.float32)  # as_subclass drops MONAI's MetaTensor
    label = label.as_subclass(torch.Tensor).to(torch.uint8)  # resampled labels come back as floats
    return image.contiguous(), label.contiguous()


def _context_size(spec: AugmentationSpec, patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """Region cut before resampling: patch * 1.5 when the spec resamples, else the patch itself."""
    if not spec.spatial:
        return tuple(patch_size)
    return tuple(math.ceil(size * CONTEXT_FACTOR) for size in patch_size)


def _smoothed_uniform_alpha(spec: AugmentationSpec) -> float:
    """Largest alpha for fields made as Gaussian-smoothed U(-1, 1) noise times alpha (bg v1, MONAI).

    Smoothing white noise of std 1/sqrt(3) with a 3D Gaussian of sigma s leaves a field of std
    (1/sqrt(3)) * (2 sqrt(pi) s)^(-3/2) (0.0024 at s = 11); its largest value over a 64^3-128^3 patch
    is about 3 std (measured: 2.8-3.1 at s = 11). So alpha = 7.5 / (3 * std(11)) ~ 1050 makes the
    largest displacement ~7.5 voxels at the middle sigma; drawing alpha in U(0, that) matches our and
    batchgeneratorsv2's magnitude drawn in U(0, 7.5). (Smaller sigma gives larger fields at equal alpha:
    ~10 voxels at s = 9, ~5.5 at s = 13; that is how these libraries define alpha.)
    """
    sigma = sum(spec.elastic_sigma_range) / 2
    field_std = (1 / math.sqrt(3)) * (2 * math.sqrt(math.pi) * sigma) ** -1.5
    return spec.elastic_max_displacement / (3 * field_std)


# --------------------------------------------------------------------------------------------------
# TorchIO


def _torchio_subject(volume: BenchmarkVolume):
    import torchio as tio

    affine = np.eye(4)  # 1 mm isotropic: millimetres are voxels
    return tio.Subject(
        image=tio.ScalarImage(tensor=torch.from_numpy(volume.image), affine=affine),
        label=tio.LabelMap(tensor=torch.from_numpy(volume.label[None]), affine=affine),
    )


def _torchio_transform(spec: AugmentationSpec, shape: tuple[int, int, int]):
    """The spec as TorchIO transforms for an image of `shape` voxels (1 mm spacing).

    - rotation +-15 deg about each axis -> RandomAffine degrees=15
    - isotropic scale 0.85-1.25 -> scales=(1/1.25, 1/0.85), isotropic=True: TorchIO's scale > 1 zooms
      in (structures grow), ours > 1 samples a larger region (structures shrink), so it is inverted
    - elastic -> RandomElasticDeformation: cubic B-spline on a control grid spaced ~11 mm (the middle
      sigma) over the image, num_control_points = size / 11 + 3 per axis (ITK's mesh is n - 3 cells),
      max_displacement 7.5 mm = 7.5 voxels (each control point uniform in +-7.5; TorchIO draws no
      overall magnitude). 7.5 > spacing / 2, so TorchIO warns once that folding "may occur".
    - affine + elastic -> RandomAffineElasticDeformation: one SimpleITK resampling for both
    - image linear, label nearest; outside filled with the image minimum / label 0
    - flips -> RandomFlip(axes, flip_probability=0.5), each axis on its own
    - noise variance 0-0.1 -> RandomNoise(std=(0, sqrt(0.1))): std uniform, not variance uniform
    - gamma 0.7-1.5 -> RandomGamma(log_gamma=(log 0.7, log 1.5)); TorchIO raises the z-scored values
      themselves to gamma, as sign(x)|x|^gamma, where we rescale to [0, 1] first and keep mean/std
    """
    import torchio as tio

    transforms = []
    if spec.spatial:
        affine_kwargs = {
            "degrees": spec.rotation_deg,
            "scales": (1 / spec.scale_range[1], 1 / spec.scale_range[0]) if spec.scale_range else 0,
            "isotropic": spec.scale_range is not None,
            "default_pad_value": "minimum",
            "image_interpolation": "linear",
            "label_interpolation": "nearest",
        }
        if spec.elastic:
            sigma = sum(spec.elastic_sigma_range) / 2
            elastic_kwargs = {
                "num_control_points": tuple(max(5, round(size / sigma) + 3) for size in shape),
                "max_displacement": spec.elastic_max_displacement,
                "image_interpolation": "linear",
                "label_interpolation": "nearest",
            }
            transforms.append(
                tio.RandomAffineElasticDeformation(affine_kwargs=affine_kwargs, elastic_kwargs=elastic_kwargs)
            )
        else:
            transforms.append(tio.RandomAffine(**affine_kwargs))
    if spec.flip_axes:
        transforms.append(tio.RandomFlip(axes=spec.flip_axes, flip_probability=0.5))
    transforms.append(tio.RandomNoise(std=(0.0, math.sqrt(spec.noise_variance_range[1]))))
    transforms.append(tio.RandomGamma(log_gamma=tuple(math.log(g) for g in spec.gamma_range)))
    return tio.Compose(transforms)


def _single_threaded_simpleitk() -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # ITK ignores OMP_NUM_THREADS


def torchio_queue(
    volume: BenchmarkVolume, spec: AugmentationSpec, patch_size: tuple[int, int, int], seed: int
) -> PatchSource:
    """TorchIO as its docs train: a Queue augments the WHOLE volume, then samples 8 patches from it.

    Each whole-volume transform is shared by the 8 patches sampled from it (that is what the Queue
    does), so its cost is spread over 8 patches but the patches are not independently augmented.
    Sampling: LabelSampler with label_probabilities {0: 2, 1: 0.5, 2: 0.5} (2/3 centred on background,
    1/6 on each foreground class; TorchIO keeps every patch inside the volume). The transforms and
    their parameters are those of `_torchio_transform`, sized for the volume.
    """
    import torchio as tio

    _single_threaded_simpleitk()
    _seed_global_generators(seed)  # TorchIO draws from torch's global generator
    transform = _torchio_transform(spec, volume.label.shape)
    dataset = tio.SubjectsDataset([_torchio_subject(volume)], transform=transform)
    sampler = tio.LabelSampler(patch_size, label_name="label", label_probabilities=LABEL_WEIGHTS)
    queue = tio.Queue(
        dataset,
        max_length=8,
        samples_per_volume=8,
        sampler=sampler,
        num_workers=0,
        shuffle_subjects=False,
        shuffle_patches=True,
    )

    def patches() -> Iterator:
        while True:  # one Queue epoch is len(queue) = 8 patches; the Queue reloads the subject itself
            for index in range(len(queue)):
                yield queue[index]

    stream = patches()

    def source() -> tuple[torch.Tensor, torch.Tensor]:
        patch = next(stream)
        return _output(patch["image"].data, patch["label"].data[0])

    return source


def torchio_patch_then_transform(
    volume: BenchmarkVolume, spec: AugmentationSpec, patch_size: tuple[int, int, int], seed: int
) -> PatchSource:
    """TorchIO sampling one patch (LabelSampler) from the untransformed volume, then augmenting it.

    The patch is cut at `patch_size` and transformed as is (no context margin: rotation and scaling
    pull in the image minimum / label 0 at the corners). The sampler is one endless generator, so its
    probability map over the volume is built once. Transforms as `_torchio_transform`, sized for the
    patch (num_control_points = 64 / 11 + 3 = 9 per axis at 64^3).
    """
    import torchio as tio

    _single_threaded_simpleitk()
    _seed_global_generators(seed)  # TorchIO draws from torch's global generator
    transform = _torchio_transform(spec, patch_size)
    sampler = tio.LabelSampler(patch_size, label_name="label", label_probabilities=LABEL_WEIGHTS)
    patches = sampler(_torchio_subject(volume))

    def source() -> tuple[torch.Tensor, torch.Tensor]:
        patch = transform(next(patches))
        return _output(patch["image"].data, patch["label"].data[0])

    return source


# --------------------------------------------------------------------------------------------------
# MONAI


def monai_dictionary(
    volume: BenchmarkVolume, spec: AugmentationSpec, patch_size: tuple[int, int, int], seed: int
) -> PatchSource:
    """MONAI dictionary transforms: class-balanced crop of a larger region, then one resampling.

    - sampling: RandCropByLabelClassesd(ratios=[2, 0.5, 0.5]): 2/3 centred on background, 1/6 on each
      foreground class, the same as TorchIO's LabelSampler. (RandCropByPosNegLabeld(pos=1, neg=2) has
      the same cost but picks any foreground voxel, so the tumour would get only its share of voxels.)
      The class indices come from ClassesToIndicesd run once, as a CacheDataset would cache them.
      The crop is 1.5x the patch when the spec resamples (as batchgenerators), moved inward where
      needed to stay in the volume, and the spatial transform takes the patch from its centre.
    - rotation, scaling, elastic -> Rand3DElasticd with rotate_range/scale_range: the affine is folded
      into the elastic grid, one resampling (the faster of MONAI's two usual forms; RandAffined then
      Rand3DElasticd resamples twice). rotate_range=(15 deg in radians,) * 3;
      scale_range=((0.85 - 1, 1.25 - 1),) * 3: MONAI adds 1 and, like us, > 1 samples a larger region;
      it has no isotropic option, so the three axes scale independently.
    - elastic: sigma_range=(9, 13) (Gaussian-smoothed U(-1, 1) noise, as batchgenerators v1),
      magnitude_range=(0, ~1050) for a largest displacement of ~7.5 voxels (see _smoothed_uniform_alpha)
    - image bilinear (padding 'border': MONAI pads with 0, 'border', or 'reflection', and 0 is mid-grey
      here), label nearest (padding 0)
    - flips: RandFlipd(prob=0.5) per axis; noise: RandGaussianNoised(std=sqrt(0.1), sample_std=True):
      std uniform in [0, sqrt(0.1)]; gamma: RandAdjustContrastd(gamma=(0.7, 1.5), retain_stats=True):
      rescale to [0, 1], power, rescale, restore mean/std as ours (gamma uniform in the range)
    - MetaTensor tracking left on (MONAI's default)
    """
    import monai.transforms as mt

    keys = ("image", "label")
    indices_key = "label_cls_indices"
    base = {"image": torch.from_numpy(volume.image), "label": torch.from_numpy(volume.label[None])}
    base = mt.ClassesToIndicesd("label", indices_postfix="_cls_indices", num_classes=3)(base)
    transforms = [
        mt.RandCropByLabelClassesd(
            keys,
            label_key="label",
            spatial_size=_context_size(spec, patch_size),
            ratios=[LABEL_WEIGHTS[k] for k in range(3)],
            num_classes=3,
            num_samples=1,
            indices_key=indices_key,
            allow_smaller=True,  # a 1.5x region may exceed the volume's 128 slices
        )
    ]
    if spec.spatial:
        scale = spec.scale_range or (1.0, 1.0)
        transforms.append(
            mt.Rand3DElasticd(
                keys,
                sigma_range=spec.elastic_sigma_range,
                magnitude_range=(0.0, _smoothed_uniform_alpha(spec) if spec.elastic else 0.0),
                spatial_size=patch_size,
                prob=1.0,
                rotate_range=(math.radians(spec.rotation_deg),) * 3,
                scale_range=((scale[0] - 1.0, scale[1] - 1.0),) * 3,
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),
            )
        )
    transforms += [mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in spec.flip_axes]
    transforms.append(
        mt.RandGaussianNoised("image", prob=1.0, std=math.sqrt(spec.noise_variance_range[1]), sample_std=True)
    )
    transforms.append(mt.RandAdjustContrastd("image", prob=1.0, gamma=spec.gamma_range, retain_stats=True))
    pipeline = mt.Compose(transforms).set_random_state(seed=seed)

    def source() -> tuple[torch.Tensor, torch.Tensor]:
        sample = pipeline(dict(base))[0]  # num_samples=1: a list of one dict
        return _output(sample["image"], sample["label"][0])

    return source


# --------------------------------------------------------------------------------------------------
# batchgenerators (v1, numpy) and batchgeneratorsv2 (torch), as nnU-Net uses them


def batchgenerators_v1(
    volume: BenchmarkVolume, spec: AugmentationSpec, patch_size: tuple[int, int, int], seed: int
) -> PatchSource:
    """batchgenerators v1 (numpy, nnU-Net v1): region around a label-aware centre, then transforms.

    - sampling: common.sample_center; crop_around cuts 1.5x the patch (the patch itself for 'light'),
      padded with the image minimum / label 0; SpatialTransform(random_crop=False) resamples the
      centred patch (skipped for 'light': the region already is the patch)
    - rotation -> angle_x/y/z = +-15 deg in radians, p_rot_per_sample=1, p_rot_per_axis=1
    - scale -> scale=(0.85, 1.25), one factor for all axes (v1 draws half the samples below 1 and
      half above, as we do); v1's scale > 1 samples a larger region, as ours
    - elastic -> sigma=(9, 13), alpha=(0, ~1050). v1's alpha is not a displacement: the field is
      gaussian_filter(U(-1, 1) noise, sigma) * alpha, whose largest value is ~3 std of the smoothed
      noise, so alpha ~1050 gives ~7.5 voxels at sigma 11 (see _smoothed_uniform_alpha)
    - image order 1, constant border at the volume minimum; label order 0, constant 0
    - noise -> GaussianNoiseTransform(noise_variance=(0, sqrt(0.1))): despite its name v1 uses the
      drawn value as the std (np.random.normal's scale), so the std is uniform in [0, sqrt(0.1)]
    - gamma -> GammaTransform((0.7, 1.5), retain_stats=True, per_channel=True): rescale to [0, 1],
      power, rescale, restore mean/std, half the draws below 1 (as ours)
    - flips -> MirrorTransform(axes): each axis with probability 0.5
    """
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import GammaTransform
    from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

    rng = np.random.default_rng(seed)  # patch centres
    _seed_global_generators(seed)  # v1 draws from numpy's and Python's global generators
    fill = float(volume.image.min())
    context = _context_size(spec, patch_size)
    transforms = []
    if spec.spatial:
        angle = (-math.radians(spec.rotation_deg), math.radians(spec.rotation_deg))
        transforms.append(
            SpatialTransform(
                patch_size,
                do_elastic_deform=spec.elastic,
                alpha=(0.0, _smoothed_uniform_alpha(spec)),
                sigma=spec.elastic_sigma_range,
                do_rotation=spec.rotation_deg > 0,
                angle_x=angle,
                angle_y=angle,
                angle_z=angle,
                do_scale=spec.scale_range is not None,
                scale=spec.scale_range or (1.0, 1.0),
                border_mode_data="constant",
                border_cval_data=fill,
                order_data=1,
                border_mode_seg="constant",
                border_cval_seg=0,
                order_seg=0,
                random_crop=False,
            )
        )
    transforms.append(GaussianNoiseTransform(noise_variance=(0.0, math.sqrt(spec.noise_variance_range[1]))))
    transforms.append(
        GammaTransform(spec.gamma_range, invert_image=False, per_channel=True, retain_stats=True)
    )
    if spec.flip_axes:
        transforms.append(MirrorTransform(axes=spec.flip_axes))
    pipeline = Compose(transforms)

    def source() -> tuple[torch.Tensor, torch.Tensor]:
        center = sample_center(rng, volume, patch_size)
        image = crop_around(volume.image, center, context, fill)[None]  # (B=1, C=1, ...)
        label = crop_around(volume.label[None], center, context, 0)[None]
        batch = pipeline(data=image, seg=label)
        return _output(batch["data"][0], batch["seg"][0, 0])

    return source


def batchgenerators_v2(
    volume: BenchmarkVolume, spec: AugmentationSpec, patch_size: tuple[int, int, int], seed: int
) -> PatchSource:
    """batchgeneratorsv2 (torch, nnU-Net v2): region around a label-aware centre, then transforms.

    - sampling and context: as batchgenerators_v1 (common.sample_center, crop_around 1.5x), then
      SpatialTransform(random_crop=False) resamples the centred patch with torch grid_sample
      (left out for 'light', where the region already is the patch)
    - rotation -> rotation=(-15, 15) deg in radians, p_rotation=1, p_rot_per_axis=1
    - scale -> scaling=(0.85, 1.25), p_scaling=1, p_synchronize_scaling_across_axes=1 (isotropic);
      > 1 samples a larger region, as ours
    - elastic -> the spec's own terms: sigma 9-13 voxels and magnitude U(0, 7.5) voxels (the field's
      largest displacement), both drawn per displacement component as v2 does. v2 takes sigma as a
      fraction of the patch edge (elastic_deform_scale), hence U(9, 13) / patch edge
    - image bilinear, padded with the volume minimum ('constant'); label 'nearest', padded with 0
    - noise -> GaussianNoiseTransform: v2 uses the drawn "variance" as the std (as v1), so it gets a
      callable returning sqrt(U(0, 0.1)): variance uniform in [0, 0.1] exactly as ours
    - gamma -> GammaTransform(BGContrast((0.7, 1.5)), p_retain_stats=1): as nnU-Net v2 and ours
    - flips -> MirrorTransform(allowed_axes): each axis with probability 0.5
    - order as nnU-Net v2: spatial, noise, gamma, mirror
    """
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    rng = np.random.default_rng(seed)  # patch centres
    _seed_global_generators(seed)  # v2 draws from numpy's and torch's global generators
    fill = float(volume.image.min())
    context = _context_size(spec, patch_size)

    def elastic_scale(image, dim, patch_size) -> float:  # v2's sigma, as a fraction of the patch edge
        return np.random.uniform(*spec.elastic_sigma_range) / patch_size[dim]

    transforms = []
    if spec.spatial:
        rotation = math.radians(spec.rotation_deg)
        transforms.append(
            SpatialTransform(
                patch_size,
                patch_center_dist_from_border=0,
                random_crop=False,
                p_elastic_deform=1.0 if spec.elastic else 0.0,
                elastic_deform_scale=elastic_scale,
                elastic_deform_magnitude=(0.0, spec.elastic_max_displacement),
                p_rotation=1.0 if spec.rotation_deg > 0 else 0.0,
                rotation=(-rotation, rotation),
                p_rot_per_axis=1.0,
                p_scaling=1.0 if spec.scale_range else 0.0,
                scaling=spec.scale_range or (1.0, 1.0),
                p_synchronize_scaling_across_axes=1.0,
                mode_seg="nearest",
                border_mode_seg="zeros",
                mode_image="bilinear",
                padding_mode_image="constant",
                padding_value_image=fill,
            )
        )
    low, high = spec.noise_variance_range
    transforms.append(
        GaussianNoiseTransform(
            noise_variance=lambda *_: math.sqrt(np.random.uniform(low, high)),
            p_per_channel=1.0,
            synchronize_channels=True,
        )
    )
    transforms.append(
        GammaTransform(
            gamma=BGContrast(spec.gamma_range),
            p_invert_image=0.0,
            synchronize_channels=False,
            p_per_channel=1.0,
            p_retain_stats=1.0,
        )
    )
    if spec.flip_axes:
        transforms.append(MirrorTransform(allowed_axes=spec.flip_axes))
    pipeline = ComposeTransforms(transforms)

    def source() -> tuple[torch.Tensor, torch.Tensor]:
        center = sample_center(rng, volume, patch_size)
        image = torch.from_numpy(crop_around(volume.image, center, context, fill))  # (C=1, ...)
        label = torch.from_numpy(crop_around(volume.label[None], center, context, 0))
        sample = pipeline(image=image, segmentation=label)
        return _output(sample["image"], sample["segmentation"][0])

    return source


# --------------------------------------------------------------------------------------------------
# Albumentations (2D)


def albumentations_2d(
    image: np.ndarray, mask: np.ndarray, seed: int
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Albumentations on one 2D slice: affine, elastic, flips, gamma, noise, all but flips always.

    Args:
        image: `(H, W)` float32, z-scored.
        mask: `(H, W)` uint8.
        seed: seeds the Compose's own generators.

    Returns:
        A callable giving image `(1, H, W)` float32 and mask `(H, W)` uint8, contiguous tensors.

    Albumentations expects float images in [0, 1] (RandomGamma is np.power, NaN on negative values;
    GaussNoise clips to [0, 1]), so the slice is rescaled to [0, 1] once and each output mapped back.

    - Affine: rotate=(-15, 15) deg, scale=(1/1.25, 1/0.85) (Albumentations' scale > 1 zooms in, ours
      > 1 samples a larger region, so inverted), translate_percent=(-0.1, 0.1) (our 2D default's
      translate fraction), image linear, mask nearest, constant border 0 (= the slice minimum)
    - ElasticTransform: sigma=10 px, alpha=360: the field is cv2.GaussianBlur(N(0, 1) noise scaled to
      max 1) * alpha, whose largest value away from the rim is ~0.021 (measured), so ~7.5 px there;
      the blur replicates the border, so the outermost ~20 px move up to ~4x more. Alpha and sigma
      are fixed (no per-sample draw). A second resampling after Affine: Albumentations cannot fold
      the two.
    - HorizontalFlip, VerticalFlip p=0.5
    - RandomGamma(gamma_limit=(70, 150)): gamma uniform in 0.7-1.5 on the [0, 1] image (range kept,
      mean/std not restored)
    - GaussNoise(std_range=(0, sqrt(0.1) / span)): std in units of the [0, 1] image, i.e. up to
      sqrt(0.1) on the z-scored slice (std uniform, not variance); clipped to [0, 1] by Albumentations
    """
    import albumentations as A
    import cv2

    cv2.setNumThreads(1)  # OpenCV's own pool ignores OMP_NUM_THREADS
    low = float(image.min())
    span = max(float(image.max()) - low, 1e-6)
    unit = np.ascontiguousarray((image - low) / span, dtype=np.float32)
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    # Image linear, mask nearest, outside = 0 (the slice minimum), always applied.
    resampling = {"interpolation": cv2.INTER_LINEAR, "mask_interpolation": cv2.INTER_NEAREST,
                  "border_mode": cv2.BORDER_CONSTANT, "fill": 0.0, "fill_mask": 0, "p": 1.0}
    pipeline = A.Compose(
        [
            A.Affine(rotate=(-15.0, 15.0), scale=(1 / 1.25, 1 / 0.85), translate_percent=(-0.1, 0.1), **resampling),
            A.ElasticTransform(alpha=360.0, sigma=10.0, **resampling),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomGamma(gamma_limit=(70, 150), p=1.0),
            A.GaussNoise(std_range=(0.0, math.sqrt(0.1) / span), p=1.0),
        ],
        seed=seed,
    )

    def source() -> tuple[torch.Tensor, torch.Tensor]:
        out = pipeline(image=unit, mask=mask)
        return _output((out["image"] * np.float32(span) + np.float32(low))[None], out["mask"])

    return source
