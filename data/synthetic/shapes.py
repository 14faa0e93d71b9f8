"""Solid shapes drawn on a millimetre grid, for the phantoms of data/synthetic/.

A `Grid` holds the (i, j, k) voxel centres in patient millimetres, one 1D array per axis, so a
shape is evaluated only inside its bounding box: a thin vessel in a large CT costs what its box costs.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Grid:
    """Voxel centres along i, j, k in millimetres (patient X, Y, Z)."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def centred(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> "Grid":
        return cls(tuple((np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(axis) for axis in self.axes)

    def box(self, low: np.ndarray, high: np.ndarray) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        """Index box covering [low, high] mm and its broadcastable coordinates (X, Y, Z)."""
        box, coordinates = [], []
        for dim, axis in enumerate(self.axes):
            start = int(np.searchsorted(axis, low[dim], side="left"))
            stop = int(np.searchsorted(axis, high[dim], side="right"))
            box.append(slice(start, max(start, stop)))
            shape = [1, 1, 1]
            shape[dim] = -1
            coordinates.append(axis[start:max(start, stop)].reshape(shape))
        return tuple(box), coordinates


def paint_ellipsoid(volume: np.ndarray, grid: Grid, value, *, center, semi_axes, angle: float = 0.0) -> np.ndarray:
    """Set voxels of an ellipsoid (semi-axes in mm along X, Y, Z, turned by `angle` radians about Z)
    to `value`; returns the (full-size) boolean mask painted."""
    center, semi_axes = np.asarray(center, float), np.asarray(semi_axes, float)
    reach = semi_axes.max()
    box, (x, y, z) = grid.box(center - reach, center + reach)
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    cosine, sine = np.cos(angle), np.sin(angle)
    u, v = cosine * dx + sine * dy, -sine * dx + cosine * dy
    inside = (u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2 + (dz / semi_axes[2]) ** 2 <= 1.0
    mask = np.zeros(volume.shape, dtype=bool)
    mask[box] = inside
    volume[mask] = value
    return mask


def paint_tube(volume: np.ndarray, grid: Grid, value, *, start, end, radius: float) -> np.ndarray:
    """Set voxels within `radius` mm of the segment start-end (mm) to `value`; returns the mask."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    box, (x, y, z) = grid.box(np.minimum(start, end) - radius, np.maximum(start, end) + radius)
    direction = end - start
    length_squared = max(float(direction @ direction), 1e-9)
    offsets = (x - start[0], y - start[1], z - start[2])
    t = np.clip((offsets[0] * direction[0] + offsets[1] * direction[1] + offsets[2] * direction[2])
                / length_squared, 0.0, 1.0)
    distance_squared = sum((offset - t * d) ** 2 for offset, d in zip(offsets, direction))
    mask = np.zeros(volume.shape, dtype=bool)
    mask[box] = distance_squared <= radius ** 2
    volume[mask] = value
    return mask


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int = 5) -> np.ndarray:
    """Unit-SD random field varying over about a fifth of the volume (a coil's bias field, a
    texture), drawn on a coarse grid and upsampled with cubic splines."""
    field = rng.standard_normal((coarse, coarse, coarse))
    field = ndimage.zoom(field, [n / coarse for n in shape], order=3, mode="nearest")
    field = field[: shape[0], : shape[1], : shape[2]]
    return ((field - field.mean()) / max(field.std(), 1e-6)).astype(np.float32)
