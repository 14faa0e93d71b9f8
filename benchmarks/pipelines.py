"""Our data path and the interpolation floors, as patch sources for `benchmarks/run.py`.

`ours_3d` is the training data path itself: `data.patches.PatchDataset` reading a cache entry written
in the preprocessing format, so the figures include the memory-mapped reads, the label-aware centre,
the one-resampling spatial transform and the intensity changes exactly as `train_liver3d.py` runs them.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from benchmarks.common import FOREGROUND_PROBABILITY, AugmentationSpec, BenchmarkVolume, PatchSource
from data.augment2d import Augment2DConfig, augment_2d
from data.augment3d import Augment3DConfig, SpatialTransformParams, make_coordinate_map
from data.patches import PatchDataset


def augment_config_3d(spec: AugmentationSpec) -> Augment3DConfig:
    """Our 3D settings for a spec: every listed augmentation with probability 1, the rest off."""
    config = Augment3DConfig.none()
    if spec.rotation_deg > 0:
        config = replace(config, p_rotation=1.0, rotation_range_deg=spec.rotation_deg)
    if spec.scale_range is not None:
        config = replace(config, p_scale=1.0, scale_range=spec.scale_range)
    if spec.elastic:
        config = replace(config, p_elastic=1.0, elastic_sigma_range=spec.elastic_sigma_range,
                         elastic_max_magnitude=spec.elastic_max_displacement)
    return replace(config, mirror_axes=spec.flip_axes, p_mirror=0.5, p_gamma=1.0, gamma_range=spec.gamma_range,
                   gamma_retain_stats=True, p_noise=1.0, noise_variance_range=spec.noise_variance_range)


def write_cache_entry(volume: BenchmarkVolume, folder: Path, case_id: str = "case") -> Path:
    """Write the volume in the preprocessing cache format that `PatchDataset` memory-maps."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{case_id}_image.npy", volume.image)
    np.save(folder / f"{case_id}_label.npy", volume.label)
    np.savez(folder / f"{case_id}_foreground.npz",
             **{f"class_{k}": locations.astype(np.int32) for k, locations in volume.foreground.items()})
    (folder / f"{case_id}.json").write_text(json.dumps({"channel_min": [float(volume.image[0].min())]}))
    return folder


def ours_3d(cache_entry: Path, spec: AugmentationSpec, patch_size: tuple[int, int, int], seed: int) -> PatchSource:
    """`PatchDataset` items in sequence: one fresh random patch per call."""
    dataset = PatchDataset(cache_entry, ["case"], patch_size=patch_size, samples_per_epoch=2**31 - 1,
                           foreground_share=FOREGROUND_PROBABILITY, augment=augment_config_3d(spec), seed=seed)
    keys = iter(range(2**31 - 1))

    def next_patch() -> tuple[torch.Tensor, torch.Tensor]:
        item = dataset[(0, next(keys))]
        return item["image"], item["label"]

    return next_patch


def _floor_coordinates(volume: BenchmarkVolume, patch_size: tuple[int, int, int]) -> np.ndarray:
    """A rotated and scaled (no elastic) coordinate map about the volume centre, computed once."""
    params = SpatialTransformParams(angles=(0.2, -0.15, 0.1), scale=1.1)
    return make_coordinate_map(patch_size, np.asarray(volume.label.shape) / 2, params)


def scipy_floor(volume: BenchmarkVolume, patch_size: tuple[int, int, int]) -> PatchSource:
    """Only the interpolation: `scipy.ndimage.map_coordinates` of image (order 1) and label (order 0)
    onto a precomputed patch grid. No sampling, coordinate map or intensity work: the floor any
    one-resampling NumPy/SciPy pipeline pays."""
    coordinates = _floor_coordinates(volume, patch_size)

    def next_patch() -> tuple[torch.Tensor, torch.Tensor]:
        image = scipy.ndimage.map_coordinates(volume.image[0], coordinates, order=1, output=np.float32)
        label = scipy.ndimage.map_coordinates(volume.label, coordinates, order=0, output=np.uint8)
        return torch.from_numpy(image[None]), torch.from_numpy(label)

    return next_patch


def torch_floor(volume: BenchmarkVolume, patch_size: tuple[int, int, int]) -> PatchSource:
    """The same resampling with `torch.nn.functional.grid_sample` (trilinear image, nearest label)."""
    coordinates = _floor_coordinates(volume, patch_size)
    shape = np.asarray(volume.label.shape, dtype=np.float32)
    # grid_sample wants (x, y, z) in [-1, 1] with align_corners=True mapping -1 and 1 to the end voxels.
    normalized = 2 * coordinates / (shape - 1)[:, None, None, None] - 1
    grid = torch.from_numpy(np.ascontiguousarray(normalized[::-1].transpose(1, 2, 3, 0)))[None]
    image = torch.from_numpy(volume.image)[None]  # (1, 1, Z, Y, X)
    label = torch.from_numpy(volume.label)[None, None].float()

    def next_patch() -> tuple[torch.Tensor, torch.Tensor]:
        patch_image = F.grid_sample(image, grid, mode="bilinear", align_corners=True)[0]
        patch_label = F.grid_sample(label, grid, mode="nearest", align_corners=True)[0, 0].to(torch.uint8)
        return patch_image.contiguous(), patch_label.contiguous()

    return next_patch


def augment_config_2d(spec: AugmentationSpec) -> Augment2DConfig:
    """Our 2D settings for the 2D row: affine (our default shift of up to 10%), elastic, flips, gamma and
    noise, all with probability 1."""
    noise_std = (float(np.sqrt(spec.noise_variance_range[0])), float(np.sqrt(spec.noise_variance_range[1])))
    return replace(Augment2DConfig.none(), p_rotation=1.0, rotation_range_deg=spec.rotation_deg, p_scale=1.0,
                   scale_range=spec.scale_range, p_translate=1.0, p_elastic=1.0,
                   elastic_sigma_range=spec.elastic_sigma_range, elastic_max_magnitude=spec.elastic_max_displacement,
                   flip_axes=(0, 1), p_flip=0.5, p_gamma=1.0, gamma_range=spec.gamma_range, p_noise=1.0,
                   noise_std_range=noise_std)


def ours_2d(image: np.ndarray, mask: np.ndarray, spec: AugmentationSpec, seed: int) -> PatchSource:
    """`data.augment2d.augment_2d` on one (H, W) slice and its mask, as the 2D recipes call it."""
    config = augment_config_2d(spec)
    rng = np.random.default_rng(seed)
    image = image[None].astype(np.float32)

    def next_sample() -> tuple[torch.Tensor, torch.Tensor]:
        warped, warped_mask = augment_2d(image, mask, rng, config, output_size=image.shape[1:])
        return torch.from_numpy(warped), torch.from_numpy(warped_mask)

    return next_sample
