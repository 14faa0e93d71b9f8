"""Resampling volumes to a target spacing while keeping their physical extent.

Grid-mode zoom aligns voxel edges, not centres, so `new_shape * new_spacing == shape * spacing`
up to rounding of the shape. Strongly anisotropic scans (thick slices) are resampled in-plane with
a cubic spline and across slices with nearest neighbour, as nnU-Net does: a cubic spline across
5 mm slices invents structure between them and rings at organ borders.
"""

import numpy as np
from scipy import ndimage

ANISOTROPY_RATIO = 3.0  # max/min spacing above which the coarse axis is resampled separately


def resampled_shape(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], target_spacing: tuple[float, float, float]
) -> tuple[int, int, int]:
    """Shape (Z, Y, X) covering the same extent at `target_spacing` (at least one voxel per axis)."""
    return tuple(max(1, round(size * old / new)) for size, old, new in zip(shape, spacing, target_spacing))


def separate_axis(
    spacing: tuple[float, float, float], target_spacing: tuple[float, float, float], ratio: float = ANISOTROPY_RATIO
) -> int | None:
    """The coarse axis to resample on its own, or None when both spacings are near isotropic.

    As in nnU-Net, the source spacing decides first: its thick-slice axis is the one whose samples
    lie too far apart for a spline.
    """
    for candidate in (spacing, target_spacing):
        if max(candidate) / min(candidate) > ratio:
            return int(np.argmax(candidate))
    return None


def _zoom(volume: np.ndarray, new_shape: tuple[int, ...], order: int) -> np.ndarray:
    factors = [new / old for new, old in zip(new_shape, volume.shape)]
    return ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True, output=np.float32)


def _resample_channel(volume: np.ndarray, new_shape: tuple[int, int, int], axis: int | None, order: int) -> np.ndarray:
    if axis is None:
        return _zoom(volume, new_shape, order)
    # Along `axis` the in-plane pass keeps the size, so the spline passes through the slices unchanged.
    in_plane_shape = tuple(volume.shape[dim] if dim == axis else new_shape[dim] for dim in range(3))
    in_plane = _zoom(volume, in_plane_shape, order)
    return _zoom(in_plane, new_shape, order=0)


def resample_image(image: np.ndarray, new_shape: tuple[int, int, int], axis: int | None) -> np.ndarray:
    """Cubic-spline resampling of each channel.

    Args:
        image: (C, Z, Y, X) float.
        new_shape: (Z', Y', X').
        axis: coarse axis resampled with nearest neighbour (see `separate_axis`), or None.

    Returns:
        (C, Z', Y', X') float32.
    """
    if image.shape[1:] == tuple(new_shape):
        return image.astype(np.float32, copy=True)
    return np.stack([_resample_channel(channel, new_shape, axis, order=3) for channel in image])


def resample_label(label: np.ndarray, new_shape: tuple[int, int, int], axis: int | None) -> np.ndarray:
    """Class-safe resampling: linear interpolation of each class's one-hot mask, then argmax.

    Interpolating class indices directly would create a class 1 between background 0 and class 2;
    the per-class masks only ever produce classes that were there.

    Args:
        label: (Z, Y, X) uint8 class indices.
        new_shape: (Z', Y', X').
        axis: coarse axis resampled with nearest neighbour, or None.

    Returns:
        (Z', Y', X') uint8 holding a subset of the input's classes.
    """
    if label.shape == tuple(new_shape):
        return label.copy()
    classes = np.unique(label)
    best_score = np.full(new_shape, -1.0, dtype=np.float32)
    resampled = np.zeros(new_shape, dtype=np.uint8)
    # A running argmax keeps memory at two volumes whatever the number of classes.
    for value in classes:
        score = _resample_channel((label == value).astype(np.float32), new_shape, axis, order=1)
        better = score > best_score
        best_score[better] = score[better]
        resampled[better] = value
    return resampled
