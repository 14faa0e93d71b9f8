"""Pictures of label maps over their images: one slice with outlines, a montage of slices, a PNG."""

from pathlib import Path

import numpy as np
from PIL import Image


def overlay_slice(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """An RGB picture of one 2D slice: the image in grey, reference outlines in green, prediction
    outlines in red (class boundaries of either label map).

    Args:
        image: (H, W) intensities, any range.
        reference, prediction: (H, W) integer label maps.
    Returns:
        (H, W, 3) uint8.
    """
    low, high = np.percentile(image, [1, 99])
    grey = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
    rgb[_outline(reference)] = (0, 255, 0)
    rgb[_outline(prediction)] = (255, 0, 0)
    return rgb


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another class, restricted to foreground."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def foreground_slice_index(labels: np.ndarray) -> int:
    """The axial index (axis 0) with the most foreground, or the middle slice if there is none."""
    counts = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    return int(counts.argmax()) if counts.any() else labels.shape[0] // 2


def montage(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, *, axis: int, num_slices: int = 8,
            columns: int = 4) -> np.ndarray:
    """Slices of a case side by side: image in grey, reference outlines green, prediction red.

    Slices are spread evenly over those holding reference or predicted foreground (over the whole
    volume when there is none), so the picture shows where the model is right and wrong.

    Args:
        image: (C, Z, Y, X); the first channel is drawn.
        label, prediction: (Z, Y, X) label maps.

    Returns:
        (rows * H, columns * W, 3) uint8.
    """
    occupied = np.flatnonzero(np.logical_or(label > 0, prediction > 0).any(
        axis=tuple(a for a in range(3) if a != axis)))
    candidates = occupied if len(occupied) else np.arange(label.shape[axis])
    chosen = candidates[np.unique(np.linspace(0, len(candidates) - 1, num_slices).round().astype(int))]
    tiles = [overlay_slice(np.take(image[0], index, axis=axis), np.take(label, index, axis=axis),
                           np.take(prediction, index, axis=axis)) for index in chosen]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    height, width = tiles[0].shape[:2]
    canvas = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for number, tile in enumerate(tiles):
        row, column = divmod(number, columns)
        canvas[row * height:(row + 1) * height, column * width:(column + 1) * width] = tile
    return canvas


def save_montage(picture: np.ndarray, path: str | Path) -> None:
    """Write an (H, W, 3) uint8 picture as PNG."""
    Image.fromarray(picture).save(path)
