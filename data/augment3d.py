"""3D data augmentation: one spatial resampling per patch, then intensity changes.

Axis order everywhere is `(C, D, H, W)` = `(channel, z, y, x)` for images and `(D, H, W)` for labels.

Spatial augmentation (rotation, isotropic scaling, elastic deformation, mirroring) is composed into
ONE coordinate map from patch voxels to volume voxels, so every patch is interpolated exactly once:
the image with spline order 1 (or 3), the label with order 0 so classes never mix. Only the bounding
box of the mapped coordinates is read from the (memory-mapped) volume. When no rotation, scaling or
elastic deformation is drawn the patch is cut out by slicing, which needs no interpolation at all.

Intensity augmentation follows nnU-Net's order and defaults and works on normalised images. Every
function is a pure function of (arrays, rng, parameters), so a sample is reproducible from its seed.
"""

import math
from dataclasses import dataclass, fields

import numpy as np
import scipy.ndimage
import torch


@dataclass
class Augment3DConfig:
    """Probabilities and ranges of every 3D augmentation (nnU-Net 3d_fullres defaults)."""

    # spatial
    p_rotation: float = 0.2  # chance per patch of rotating about all three axes
    rotation_range_deg: float = 30.0  # each angle uniform in +-this many degrees
    rotation_in_plane_only: bool = False  # rotate about z only, for patches much thinner in z
    p_scale: float = 0.2  # chance per patch of isotropic scaling
    scale_range: tuple[float, float] = (0.7, 1.4)  # > 1 samples a larger region: structures shrink
    p_elastic: float = 0.0  # nnU-Net 3d_fullres leaves elastic deformation off: slow, little gain
    elastic_sigma_range: tuple[float, float] = (9.0, 13.0)  # smoothness of the field, in voxels
    elastic_max_magnitude: float = 7.5  # largest displacement, in voxels (drawn in [0, this])
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes (z, y, x) that may be flipped
    p_mirror: float = 0.5  # chance per axis of flipping it
    image_order: int = 1  # spline order for images: 1 (fast) or 3; labels always use 0
    # intensity, on normalised images
    p_noise: float = 0.1  # chance of additive Gaussian noise
    noise_variance_range: tuple[float, float] = (0.0, 0.1)  # noise variance, uniform in range
    p_blur: float = 0.2  # chance of Gaussian blur
    blur_sigma_range: tuple[float, float] = (0.5, 1.0)  # blur sigma in voxels, per channel and axis
    p_brightness: float = 0.15  # chance of multiplying intensities
    brightness_range: tuple[float, float] = (0.75, 1.25)  # multiplier, per channel
    p_contrast: float = 0.15  # chance of stretching intensities about the mean
    contrast_range: tuple[float, float] = (0.75, 1.25)  # factor, per channel; range kept
    p_lowres: float = 0.25  # chance of simulating a coarser acquisition
    lowres_zoom_range: tuple[float, float] = (0.5, 1.0)  # downsampling factor, per channel and axis
    p_inverted_gamma: float = 0.1  # chance of gamma on the inverted image (darkens bright parts)
    p_gamma: float = 0.3  # chance of gamma on the image
    gamma_range: tuple[float, float] = (0.7, 1.5)  # gamma exponent
    gamma_retain_stats: bool = True  # restore each channel's mean and std after gamma, as nnU-Net

    @classmethod
    def none(cls) -> "Augment3DConfig":
        """A config that changes nothing: for validation, inference and tests."""
        disabled = {field.name: 0.0 for field in fields(cls) if field.name.startswith("p_")}
        return cls(mirror_axes=(), **disabled)


@dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise
class SpatialTransformParams:
    """One drawn spatial transform; identity values mean "not applied"."""

    angles: tuple[float, float, float] = (0.0, 0.0, 0.0)  # radians about the z, y, x axes
    scale: float = 1.0  # isotropic; patch offsets are multiplied by it
    mirror: tuple[bool, bool, bool] = (False, False, False)  # flip the patch along z, y, x
    elastic_sigma: float = 0.0  # voxels; smoothness of the displacement field
    elastic_magnitude: float = 0.0  # voxels; largest displacement per component (0: none)
    elastic_noise: np.ndarray | None = None  # (3, a, b, c) control-point weights of the field

    @property
    def needs_interpolation(self) -> bool:
        """Whether the patch must be resampled rather than sliced out."""
        return any(self.angles) or self.scale != 1.0 or self.elastic_magnitude > 0.0


def sample_spatial_transform(
    rng: np.random.Generator, patch_size: tuple[int, int, int], config: Augment3DConfig
) -> SpatialTransformParams:
    """Draw rotation, scaling, elastic deformation and mirroring for one patch.

    Args:
        rng: the sample's generator.
        patch_size: `(D, H, W)` of the patch.
        config: probabilities and ranges.
    """
    angles = (0.0, 0.0, 0.0)
    if rng.uniform() < config.p_rotation:
        limit = math.radians(config.rotation_range_deg)
        drawn = rng.uniform(-limit, limit, size=3)
        if config.rotation_in_plane_only:
            drawn[1:] = 0.0
        angles = tuple(float(angle) for angle in drawn)
    scale = 1.0
    if rng.uniform() < config.p_scale:
        scale = float(rng.uniform(*config.scale_range))
    elastic_sigma, elastic_magnitude, elastic_noise = 0.0, 0.0, None
    if rng.uniform() < config.p_elastic:
        elastic_sigma = float(rng.uniform(*config.elastic_sigma_range))
        elastic_magnitude = float(rng.uniform(0.0, config.elastic_max_magnitude))
        control_shape = [len(control_points(size, elastic_sigma)) for size in patch_size]
        elastic_noise = rng.standard_normal((3, *control_shape)).astype(np.float32)
    mirror = tuple(bool(axis in config.mirror_axes and rng.uniform() < config.p_mirror) for axis in range(3))
    return SpatialTransformParams(angles, scale, mirror, elastic_sigma, elastic_magnitude, elastic_noise)


def control_points(size: int, sigma: float) -> np.ndarray:
    """Positions of an elastic field's control points along an axis of ``size`` voxels (2D and 3D)."""
    # Gaussian bumps one sigma apart sum to a field that is smooth on the scale sigma with little
    # ripple; reaching 2 sigma past both ends keeps the field as strong at the border as inside.
    return np.arange(-2.0 * sigma, size - 1 + 2.0 * sigma + 1e-6, sigma)


def gaussian_kernels(shape: tuple[int, ...], sigma: float) -> list[np.ndarray]:
    """One float32 ``(size, control points)`` Gaussian matrix per axis of ``shape``: random weights on
    the control grid multiplied by them along every axis give a field smooth on the scale ``sigma``."""
    kernels = []
    for size in shape:
        distance = np.arange(size)[:, None] - control_points(size, sigma)[None, :]
        kernels.append(np.exp(-0.5 * (distance / sigma) ** 2).astype(np.float32))
    return kernels


def _elastic_displacement(patch_size: tuple[int, int, int], params: SpatialTransformParams) -> np.ndarray:
    """Smooth random displacement `(3, D, H, W)` float32 whose components peak at the magnitude."""
    # A Gaussian-smoothed random field is separable: weights on a coarse control grid blurred onto
    # the patch grid by one matrix per axis. Three small matrix products replace a 3D filter of the
    # whole patch, which at sigma ~11 would cost more than the interpolation itself.
    kernels = gaussian_kernels(patch_size, params.elastic_sigma)
    displacement = np.empty((3, *patch_size), dtype=np.float32)
    for component in range(3):
        field = _apply_separable(params.elastic_noise[component], kernels)
        displacement[component] = field * (params.elastic_magnitude / np.abs(field).max())
    return displacement


def _apply_separable(volume: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
    """Apply one matrix per axis: `(a, b, c)` -> `(D, H, W)` with matrices `(D, a)`, `(H, b)`, `(W, c)`."""
    out = np.tensordot(matrices[0], volume, axes=(1, 0))  # (D, b, c)
    out = np.matmul(matrices[1], out)  # (D, H, c)
    return np.matmul(out, matrices[2].T)  # (D, H, W)


def _rotation_matrix(angles: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation acting on (z, y, x) vectors: about z, then y, then x."""
    cz, sz = math.cos(angles[0]), math.sin(angles[0])
    cy, sy = math.cos(angles[1]), math.sin(angles[1])
    cx, sx = math.cos(angles[2]), math.sin(angles[2])
    about_z = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])  # turns the (y, x) plane
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])  # turns the (z, x) plane
    about_x = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])  # turns the (z, y) plane
    return about_z @ about_y @ about_x


def make_coordinate_map(
    patch_size: tuple[int, int, int], center: np.ndarray, params: SpatialTransformParams
) -> np.ndarray:
    """Volume voxel coordinates sampled by every patch voxel.

    Patch voxel `i` along an axis sits at offset `i - size // 2` from the centre, so identity params
    give exactly the crop `volume[center - size // 2 : center - size // 2 + size]`; mirroring reverses
    the offsets. The offsets are elastically displaced, then rotated and scaled about the centre.

    Args:
        patch_size: `(D, H, W)`.
        center: `(3,)` volume coordinates `(z, y, x)` of the patch centre.
        params: from `sample_spatial_transform`.

    Returns:
        `(3, D, H, W)` float32 coordinates `(z, y, x)` into the volume.
    """
    offsets = []
    for axis, size in enumerate(patch_size):
        offset = np.arange(size, dtype=np.float32) - size // 2
        offsets.append(offset[::-1] if params.mirror[axis] else offset)
    broadcast = [offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :]]
    matrix = (params.scale * _rotation_matrix(params.angles)).astype(np.float32)
    coordinates = np.empty((3, *patch_size), dtype=np.float32)
    if params.elastic_magnitude > 0.0:
        displaced = _elastic_displacement(patch_size, params)
        for axis in range(3):
            displaced[axis] += broadcast[axis]
        for axis in range(3):
            coordinates[axis] = np.tensordot(matrix[axis], displaced, axes=(0, 0)) + np.float32(center[axis])
    else:
        # Without a displacement field each coordinate is a sum of three 1D ramps: no 3D products.
        for axis in range(3):
            ramp = matrix[axis, 0] * broadcast[0] + matrix[axis, 1] * broadcast[1]
            coordinates[axis] = ramp + (matrix[axis, 2] * broadcast[2] + np.float32(center[axis]))
    return coordinates


def apply_spatial_transform(
    image: np.ndarray,
    label: np.ndarray,
    *,
    center: np.ndarray,
    patch_size: tuple[int, int, int],
    params: SpatialTransformParams,
    channel_min: np.ndarray,
    image_order: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one spatially augmented patch out of a (memory-mapped) volume.

    Only the bounding box of the needed voxels is read. Voxels outside the volume take the
    channel's minimum (the background intensity) in the image and class 0 in the label.

    Args:
        image: `(C, Z, Y, X)` float32, e.g. a memmap.
        label: `(Z, Y, X)` uint8, e.g. a memmap.
        center: `(3,)` patch centre in volume voxels; integer for the sliced (uninterpolated) path.
        patch_size: `(D, H, W)`.
        params: from `sample_spatial_transform`.
        channel_min: `(C,)` fill value per channel.
        image_order: spline order for the image (1 or 3).

    Returns:
        image `(C, D, H, W)` float32 and label `(D, H, W)` uint8, both C-contiguous.
    """
    if not params.needs_interpolation:
        integer_center = np.rint(center).astype(np.int64)
        return _slice_patch(image, label, center=integer_center, patch_size=patch_size, mirror=params.mirror,
                            channel_min=channel_min)
    coordinates = make_coordinate_map(patch_size, center, params)
    # Splines of order 3 reach one voxel further on each side than linear interpolation.
    margin = 1 if image_order <= 1 else 3
    lower, upper = [], []
    for axis in range(3):
        lower.append(max(math.floor(coordinates[axis].min()) - margin, 0))
        upper.append(min(math.ceil(coordinates[axis].max()) + 1 + margin, label.shape[axis]))
    patch_image = np.empty((image.shape[0], *patch_size), dtype=np.float32)
    if any(low >= high for low, high in zip(lower, upper)):
        patch_image[:] = np.asarray(channel_min, dtype=np.float32)[:, None, None, None]
        return patch_image, np.zeros(patch_size, dtype=np.uint8)
    box = tuple(slice(low, high) for low, high in zip(lower, upper))
    for axis in range(3):
        coordinates[axis] -= lower[axis]
    # A contiguous copy of the box makes the scattered reads of map_coordinates ~20% faster.
    image_box = np.ascontiguousarray(image[(slice(None), *box)], dtype=np.float32)
    label_box = np.ascontiguousarray(label[box], dtype=np.uint8)
    for channel in range(image.shape[0]):
        scipy.ndimage.map_coordinates(
            image_box[channel],
            coordinates,
            output=patch_image[channel],
            order=image_order,
            mode="constant",
            cval=float(channel_min[channel]),
        )
    return patch_image, sample_nearest(label_box, coordinates)


def sample_nearest(label: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
    """Nearest-neighbour samples of `label` at `coordinates`; class 0 outside the array.

    Equals `scipy.ndimage.map_coordinates(label, coordinates, order=0, mode="constant")` at about half
    its cost: labels need no spline machinery, only rounded indices and one gather.

    Args:
        label: `(Z, Y, X)` (or `(H, W)`) integer array.
        coordinates: `(3, D, H, W)` (or `(2, H', W')`) float voxel coordinates into `label`.

    Returns:
        `(D, H, W)` (or `(H', W')`) of the label's dtype.
    """
    flat_index = np.zeros(coordinates.shape[1:], dtype=np.intp)
    inside = np.ones(coordinates.shape[1:], dtype=bool)
    for axis, size in enumerate(label.shape):
        inside &= (coordinates[axis] >= 0) & (coordinates[axis] <= size - 1)  # scipy's "constant" bounds
        index = np.floor(coordinates[axis] + np.float32(0.5)).astype(np.intp)
        np.clip(index, 0, size - 1, out=index)
        flat_index *= size
        flat_index += index
    samples = np.ascontiguousarray(label).ravel().take(flat_index)
    samples[~inside] = 0
    return samples


def _slice_patch(
    image: np.ndarray,
    label: np.ndarray,
    *,
    center: np.ndarray,
    patch_size: tuple[int, int, int],
    mirror: tuple[bool, bool, bool],
    channel_min: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop (padding outside the volume) and flip: the patch without any interpolation."""
    start = center - np.asarray(patch_size) // 2
    source, target = [], []
    for axis, size in enumerate(patch_size):
        low = max(int(start[axis]), 0)
        high = min(int(start[axis]) + size, label.shape[axis])
        high = max(high, low)
        source.append(slice(low, high))
        target.append(slice(low - int(start[axis]), high - int(start[axis])))
    flip_axes = tuple(axis for axis in range(3) if mirror[axis])
    if all(region.stop - region.start == size for region, size in zip(source, patch_size)):
        # Inside the volume: one copy straight from the (flipped) view, no padding buffer.
        image_view = np.flip(image[(slice(None), *source)], tuple(axis + 1 for axis in flip_axes))
        label_view = np.flip(label[tuple(source)], flip_axes)
        return np.array(image_view, dtype=np.float32, order="C"), np.array(label_view, dtype=np.uint8, order="C")
    patch_image = np.empty((image.shape[0], *patch_size), dtype=np.float32)
    patch_image[:] = np.asarray(channel_min, dtype=np.float32)[:, None, None, None]
    patch_label = np.zeros(patch_size, dtype=np.uint8)
    patch_image[(slice(None), *target)] = image[(slice(None), *source)]
    patch_label[tuple(target)] = label[tuple(source)]
    if flip_axes:
        patch_image = np.ascontiguousarray(np.flip(patch_image, axis=tuple(axis + 1 for axis in flip_axes)))
        patch_label = np.ascontiguousarray(np.flip(patch_label, axis=flip_axes))
    return patch_image, patch_label


def augment_intensity(image: np.ndarray, rng: np.random.Generator, config: Augment3DConfig) -> np.ndarray:
    """Noise, blur, brightness, contrast, low resolution, inverted gamma, gamma (nnU-Net's order).

    Args:
        image: `(C, D, H, W)` float32 normalised patch; not modified.
        rng: the sample's generator.
        config: probabilities and ranges.

    Returns:
        `(C, D, H, W)` float32.
    """
    image = image.copy()
    if rng.uniform() < config.p_noise:
        variance = rng.uniform(*config.noise_variance_range)
        noise = standard_normal(rng, image.shape)
        noise *= np.float32(math.sqrt(variance))
        image += noise
    if rng.uniform() < config.p_blur:
        for channel in range(image.shape[0]):
            sigma = rng.uniform(*config.blur_sigma_range, size=3)
            image[channel] = scipy.ndimage.gaussian_filter(image[channel], sigma)
    if rng.uniform() < config.p_brightness:
        multiplier = rng.uniform(*config.brightness_range, size=image.shape[0]).astype(np.float32)
        image *= multiplier[:, None, None, None]
    if rng.uniform() < config.p_contrast:
        for channel in range(image.shape[0]):
            image[channel] = adjust_contrast(image[channel], rng.uniform(*config.contrast_range))
    if rng.uniform() < config.p_lowres:
        for channel in range(image.shape[0]):
            zoom = rng.uniform(*config.lowres_zoom_range, size=3)
            image[channel] = simulate_low_resolution(image[channel], zoom)
    if rng.uniform() < config.p_inverted_gamma:
        for channel in range(image.shape[0]):
            gamma = sample_gamma(rng, config.gamma_range)
            np.negative(image[channel], out=image[channel])
            adjust_gamma(image[channel], gamma, config.gamma_retain_stats, out=image[channel])
            np.negative(image[channel], out=image[channel])
    if rng.uniform() < config.p_gamma:
        for channel in range(image.shape[0]):
            gamma = sample_gamma(rng, config.gamma_range)
            adjust_gamma(image[channel], gamma, config.gamma_retain_stats, out=image[channel])
    return image


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 N(0, 1) samples of `shape`, from a torch generator seeded by `rng`.

    torch's vectorised sampler fills a patch about twice as fast as NumPy's ziggurat, and noise is the
    largest single cost of a patch without spatial augmentation. Seeding from `rng` keeps the sample a
    pure function of its seed, independent of torch's global generator.
    """
    generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
    return torch.randn(shape, generator=generator).numpy()


def sample_gamma(rng: np.random.Generator, gamma_range: tuple[float, float]) -> float:
    """A gamma exponent from ``gamma_range``, below 1 (brighter) in half the draws when the range allows (2D and 3D)."""
    # Half the draws darken (gamma < 1 brightens, > 1 darkens): sampling the range uniformly
    # would favour gamma > 1 three to one with the default (0.7, 1.5).
    if gamma_range[0] < 1.0 and rng.uniform() < 0.5:
        return float(rng.uniform(gamma_range[0], 1.0))
    return float(rng.uniform(max(gamma_range[0], 1.0), gamma_range[1]))


def adjust_contrast(channel: np.ndarray, factor: float) -> np.ndarray:
    """Stretch one channel `(D, H, W)` about its mean, clipped to its original range."""
    mean = channel.mean()
    stretched = (channel - mean) * np.float32(factor) + mean
    return np.clip(stretched, channel.min(), channel.max())


def adjust_gamma(
    channel: np.ndarray, gamma: float, retain_stats: bool, out: np.ndarray | None = None
) -> np.ndarray:
    """Gamma on one channel `(D, H, W)` rescaled to [0, 1] and back, keeping range or mean/std.

    Without `retain_stats` the result spans the same [min, max]; with it, the same mean and std.
    `out` may be `channel` itself, for an in-place change.
    """
    low, high = channel.min(), channel.max()
    span = max(high - low, np.float32(1e-7))
    if retain_stats:
        mean, std = _mean_and_std(channel)
    result = np.subtract(channel, low, out=out)
    result /= span
    # x ** gamma as exp(gamma * log x): the same values to a few ulp, in 55-70% of np.power's time.
    with np.errstate(divide="ignore"):  # log(0) = -inf, and exp(-inf) = 0 as it should
        np.log(result, out=result)
    result *= np.float32(gamma)
    np.exp(result, out=result)
    if retain_stats:
        # Rescaling by span and low, then standardising, is one affine map of `result`.
        new_mean, new_std = _mean_and_std(result)
        scale = span * std / (span * new_std + np.float32(1e-7))
        result *= scale
        result += mean - new_mean * scale
    else:
        result *= span
        result += low
    return result


def _mean_and_std(array: np.ndarray) -> tuple[np.float32, np.float32]:
    """Mean and population standard deviation, the mean computed once."""
    mean = array.mean()
    deviation = array - mean
    np.square(deviation, out=deviation)
    return mean, np.sqrt(deviation.mean())


def simulate_low_resolution(channel: np.ndarray, zoom: np.ndarray) -> np.ndarray:
    """Downsample one channel `(D, H, W)` by `zoom` (nearest), then upsample back (cubic spline)."""
    # At least one voxel per axis survives, however thin the patch.
    zoom = np.maximum(zoom, 1.0 / np.asarray(channel.shape))
    small = scipy.ndimage.zoom(channel, zoom, order=0)
    # Cubic spline resizing is separable: one exact matrix per axis, applied as three matrix
    # products, gives scipy.ndimage.zoom(order=3) at a fiftieth of its cost on a 128^3 patch.
    matrices = [_cubic_resize_matrix(small.shape[axis], channel.shape[axis]) for axis in range(3)]
    return _apply_separable(small, matrices)


def _cubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`(out_size, in_size)` matrix equal to scipy.ndimage.zoom(order=3) of a 1D signal."""
    identity = np.eye(in_size, dtype=np.float64)
    return scipy.ndimage.zoom(identity, (out_size / in_size, 1.0), order=3).astype(np.float32)
