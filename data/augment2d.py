"""2D data augmentation of an image, and optionally its mask, in one resampling.

Axis order: images `(C, H, W)`, masks `(H, W)`. Every spatial change (fitting the input to the output
size, rotation, scaling, translation, elastic deformation, flips) is composed into ONE coordinate map
from output pixels to input pixels, so the image is interpolated exactly once (spline order 1) and the
mask once with order 0: a mask pixel always takes one input pixel's class, so classes never mix.
Intensity changes (gamma, brightness, contrast, noise) follow and touch the image only.

Image-only use (e.g. chest X-rays) passes `mask=None`. Every function is a pure function of
(arrays, rng, parameters), so a sample is reproducible from its seed.

    params = sample_spatial_transform_2d(rng, (256, 256), config)
    coordinates = make_coordinate_map_2d((256, 256), image.shape[1:], params, fit="resize")
    image, mask = warp_2d(image, mask, coordinates, fill=image.min(axis=(1, 2)))
    image = augment_intensity_2d(image, rng, config)
"""

import math
from dataclasses import dataclass, fields

import numpy as np
import scipy.ndimage

from data.augment3d import adjust_contrast, adjust_gamma, control_points, gaussian_kernels, sample_gamma, sample_nearest


@dataclass
class Augment2DConfig:
    """Probabilities and ranges of every 2D augmentation."""

    # spatial
    p_rotation: float = 0.5  # chance per sample of an in-plane rotation
    rotation_range_deg: float = 15.0  # angle uniform in +-this many degrees
    p_scale: float = 0.3  # chance per sample of isotropic scaling
    scale_range: tuple[float, float] = (0.85, 1.2)  # > 1 samples a larger region: structures shrink
    p_translate: float = 0.3  # chance per sample of shifting the field of view
    translate_fraction: float = 0.1  # largest shift per axis, as a fraction of the output size
    p_elastic: float = 0.2  # chance per sample of a smooth elastic deformation
    elastic_sigma_range: tuple[float, float] = (8.0, 12.0)  # smoothness of the field, in output pixels
    elastic_max_magnitude: float = 4.0  # largest displacement, in output pixels (drawn in [0, this])
    flip_axes: tuple[int, ...] = ()  # spatial axes (0 = rows, 1 = columns) that may flip; none where
    # anatomy has a side (the left atrium is on the left), columns for left-right symmetric anatomy
    p_flip: float = 0.5  # chance per allowed axis of flipping it
    image_order: int = 1  # spline order for images: 1 (fast) or 3; masks always use 0
    # intensity, on normalised images
    p_gamma: float = 0.3  # chance of a gamma change (range and mean/std kept)
    gamma_range: tuple[float, float] = (0.7, 1.5)  # gamma exponent
    p_brightness: float = 0.15  # chance of multiplying intensities
    brightness_range: tuple[float, float] = (0.85, 1.15)  # multiplier, per channel
    p_contrast: float = 0.15  # chance of stretching intensities about the mean
    contrast_range: tuple[float, float] = (0.75, 1.25)  # factor, per channel; range kept
    p_noise: float = 0.15  # chance of additive Gaussian noise
    noise_std_range: tuple[float, float] = (0.0, 0.1)  # noise standard deviation, uniform in range

    @classmethod
    def none(cls) -> "Augment2DConfig":
        """A config that changes nothing: for validation, inference and tests."""
        disabled = {field.name: 0.0 for field in fields(cls) if field.name.startswith("p_")}
        return cls(flip_axes=(), **disabled)


@dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise
class SpatialTransform2D:
    """One drawn spatial transform; identity values mean "not applied"."""

    angle: float = 0.0  # radians, in the (row, column) plane
    scale: float = 1.0  # isotropic; output offsets are multiplied by it
    translation: tuple[float, float] = (0.0, 0.0)  # output pixels (rows, columns)
    flip: tuple[bool, bool] = (False, False)  # flip the output along rows, columns
    elastic_sigma: float = 0.0  # output pixels; smoothness of the displacement field
    elastic_magnitude: float = 0.0  # output pixels; largest displacement per component (0: none)
    elastic_noise: np.ndarray | None = None  # (2, a, b) control-point weights of the field


def sample_spatial_transform_2d(
    rng: np.random.Generator, output_size: tuple[int, int], config: Augment2DConfig
) -> SpatialTransform2D:
    """Draw rotation, scaling, translation, elastic deformation and flips for one sample.

    Args:
        rng: the sample's generator.
        output_size: `(H, W)` of the augmented sample.
        config: probabilities and ranges.
    """
    angle = 0.0
    if rng.uniform() < config.p_rotation:
        limit = math.radians(config.rotation_range_deg)
        angle = float(rng.uniform(-limit, limit))
    scale = float(rng.uniform(*config.scale_range)) if rng.uniform() < config.p_scale else 1.0
    translation = (0.0, 0.0)
    if rng.uniform() < config.p_translate:
        limits = np.asarray(output_size, dtype=np.float64) * config.translate_fraction
        translation = tuple(float(value) for value in rng.uniform(-limits, limits))
    elastic_sigma, elastic_magnitude, elastic_noise = 0.0, 0.0, None
    if rng.uniform() < config.p_elastic:
        elastic_sigma = float(rng.uniform(*config.elastic_sigma_range))
        elastic_magnitude = float(rng.uniform(0.0, config.elastic_max_magnitude))
        control_shape = [len(control_points(size, elastic_sigma)) for size in output_size]
        elastic_noise = rng.standard_normal((2, *control_shape)).astype(np.float32)
    flip = tuple(bool(axis in config.flip_axes and rng.uniform() < config.p_flip) for axis in range(2))
    return SpatialTransform2D(angle, scale, translation, flip, elastic_sigma, elastic_magnitude, elastic_noise)


def _elastic_displacement(output_size: tuple[int, int], params: SpatialTransform2D) -> np.ndarray:
    """Smooth random displacement `(2, H, W)` float32 whose components peak at the magnitude."""
    kernels = gaussian_kernels(output_size, params.elastic_sigma)
    displacement = np.empty((2, *output_size), dtype=np.float32)
    for component in range(2):
        field = kernels[0] @ params.elastic_noise[component] @ kernels[1].T  # separable Gaussian blur
        displacement[component] = field * (params.elastic_magnitude / max(float(np.abs(field).max()), 1e-6))
    return displacement


def fit_scale(input_size: tuple[int, int], output_size: tuple[int, int], fit: str) -> float:
    """Input pixels per output pixel. "resize": the whole input fits the output, aspect kept (the
    short side is padded), so anatomy is never stretched; "crop": 1, the output is a window at full
    resolution (cropped or padded)."""
    if fit == "crop":
        return 1.0
    if fit == "resize":
        return max(size_in / size_out for size_in, size_out in zip(input_size, output_size))
    raise ValueError(f"fit must be 'resize' or 'crop', got {fit!r}")


def make_coordinate_map_2d(
    output_size: tuple[int, int],
    input_size: tuple[int, int],
    params: SpatialTransform2D,
    fit: str = "resize",
    center: tuple[float, float] | None = None,
) -> np.ndarray:
    """Input pixel coordinates sampled by every output pixel.

    Output pixel offsets from the output centre are flipped, elastically displaced, shifted, rotated
    and scaled, multiplied by `fit_scale` and added to `center`. With identity params and fit
    "resize" this is exactly `torch.nn.functional.interpolate(align_corners=False)` of the input
    padded to a square; with fit "crop" and an integer-aligned centre it is a plain crop.

    Args:
        output_size: `(H, W)`.
        input_size: `(H_in, W_in)` of the image the coordinates index.
        params: from `sample_spatial_transform_2d`.
        fit: "resize" or "crop" (see `fit_scale`).
        center: input coordinates `(row, column)` under the output centre; default the input centre.

    Returns:
        `(2, H, W)` float32 coordinates `(row, column)` into the input.
    """
    if center is None:
        center = tuple((size - 1) / 2 for size in input_size)
    offsets = []
    for axis, size in enumerate(output_size):
        offset = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2)
        offsets.append(offset[::-1] if params.flip[axis] else offset)
    grid = np.stack(np.meshgrid(offsets[0], offsets[1], indexing="ij"))  # (2, H, W)
    if params.elastic_magnitude > 0.0:
        grid += _elastic_displacement(output_size, params)
    grid[0] += np.float32(params.translation[0])
    grid[1] += np.float32(params.translation[1])
    cosine, sine = math.cos(params.angle), math.sin(params.angle)
    factor = params.scale * fit_scale(input_size, output_size, fit)
    rows = factor * (cosine * grid[0] - sine * grid[1]) + center[0]
    columns = factor * (sine * grid[0] + cosine * grid[1]) + center[1]
    return np.stack([rows, columns]).astype(np.float32)


def warp_2d(
    image: np.ndarray,
    mask: np.ndarray | None,
    coordinates: np.ndarray,
    fill: np.ndarray,
    image_order: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sample an image (and its mask) at `coordinates`.

    Pixels mapped outside the input take the channel's `fill` value (its background intensity) in the
    image and class 0 in the mask.

    Args:
        image: `(C, H_in, W_in)` float, e.g. a slice read from a memmap.
        mask: `(H_in, W_in)` integer class indices, or None for image-only augmentation.
        coordinates: `(2, H, W)` from `make_coordinate_map_2d`.
        fill: `(C,)` fill value per channel.
        image_order: spline order for the image; the mask always uses 0 (nearest).

    Returns:
        image `(C, H, W)` float32 and mask `(H, W)` of the mask's dtype (or None).
    """
    image = np.asarray(image, dtype=np.float32)
    fill = np.broadcast_to(np.asarray(fill, dtype=np.float32), (image.shape[0],))
    warped = np.empty((image.shape[0], *coordinates.shape[1:]), dtype=np.float32)
    for channel in range(image.shape[0]):
        scipy.ndimage.map_coordinates(image[channel], coordinates, output=warped[channel], order=image_order,
                                      mode="constant", cval=float(fill[channel]))
    if mask is None:
        return warped, None
    return warped, sample_nearest(np.asarray(mask), coordinates)


def augment_intensity_2d(image: np.ndarray, rng: np.random.Generator, config: Augment2DConfig) -> np.ndarray:
    """Gamma, brightness, contrast, then noise, each with its probability.

    Args:
        image: `(C, H, W)` float32 normalised image; not modified.

    Returns:
        `(C, H, W)` float32.
    """
    image = np.array(image, dtype=np.float32)
    if rng.uniform() < config.p_gamma:
        for channel in range(image.shape[0]):
            gamma = sample_gamma(rng, config.gamma_range)
            adjust_gamma(image[channel], gamma, retain_stats=True, out=image[channel])
    if rng.uniform() < config.p_brightness:
        multiplier = rng.uniform(*config.brightness_range, size=image.shape[0]).astype(np.float32)
        image *= multiplier[:, None, None]
    if rng.uniform() < config.p_contrast:
        for channel in range(image.shape[0]):
            image[channel] = adjust_contrast(image[channel], rng.uniform(*config.contrast_range))
    if rng.uniform() < config.p_noise:
        std = rng.uniform(*config.noise_std_range)
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(std)
    return image


def augment_2d(
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    config: Augment2DConfig,
    *,
    output_size: tuple[int, int],
    fit: str = "resize",
    center: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Spatial then intensity augmentation of one sample, fitted to `output_size`.

    Args:
        image: `(C, H_in, W_in)`; its per-channel minimum fills pixels from outside the input.
        mask: `(H_in, W_in)` class indices or None.
        center: input coordinates under the output centre (fit "crop"); default the input centre.

    Returns:
        image `(C, H, W)` float32 and mask `(H, W)` (or None).
    """
    image = np.asarray(image, dtype=np.float32)
    params = sample_spatial_transform_2d(rng, output_size, config)
    coordinates = make_coordinate_map_2d(output_size, image.shape[1:], params, fit, center)
    image, mask = warp_2d(image, mask, coordinates, image.min(axis=(1, 2)), config.image_order)
    return augment_intensity_2d(image, rng, config), mask
