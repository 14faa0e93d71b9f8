"""What every benchmarked pipeline shares: the input volume, the augmentation settings, the timer.

The input is one synthetic abdominal CT of 256 x 256 x 128 voxels (x, y, z), drawn by the liver
phantom generator, read back through our NIfTI reader and normalised as training does (foreground
percentile clip + z-score), held in memory as image (1, Z, Y, X) float32 and label (Z, Y, X) uint8
with classes 0 background, 1 liver, 2 tumour.

A pipeline is a zero-argument callable returning one augmented patch: image (1, D, H, W) float32 and
label (D, H, W) integer, both contiguous torch tensors, freshly random on every call.
"""

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.intensity import ct_statistics, normalize_ct, sample_foreground
from data.nifti import read_nifti
from data.patches import sample_patch_center
from data.synthetic.liver import ensure_liver_phantom

PatchSource = Callable[[], tuple[torch.Tensor, torch.Tensor]]
VOLUME_SHAPE = (128, 256, 256)  # (z, y, x)
FOREGROUND_PROBABILITY = 1 / 3  # label-aware sampling: a third of patches centred on a random class


@dataclass(frozen=True)
class AugmentationSpec:
    """One row of the comparison: what every pipeline applies to every patch.

    Each library expresses these with its own parameters; the translations sit next to each pipeline.
    """

    name: str
    rotation_deg: float = 0.0  # each of the three angles uniform in +-this; 0 = no rotation
    scale_range: tuple[float, float] | None = None  # isotropic scale factor; None = no scaling
    elastic: bool = False  # smooth random displacement field
    elastic_sigma_range: tuple[float, float] = (9.0, 13.0)  # field smoothness, voxels (batchgeneratorsv2)
    elastic_max_displacement: float = 7.5  # voxels, largest displacement of a component
    flip_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes each flipped with probability 0.5
    gamma_range: tuple[float, float] = (0.7, 1.5)  # gamma exponent
    noise_variance_range: tuple[float, float] = (0.0, 0.1)  # additive Gaussian noise variance

    @property
    def spatial(self) -> bool:
        """Whether the patch must be resampled (else it is cut out and flipped)."""
        return self.rotation_deg > 0 or self.scale_range is not None or self.elastic


FULL = AugmentationSpec("full", rotation_deg=15.0, scale_range=(0.85, 1.25), elastic=True)
LIGHT = AugmentationSpec("light")


@dataclass
class BenchmarkVolume:
    """The in-memory CT every pipeline samples from."""

    image: np.ndarray  # (1, Z, Y, X) float32, normalised
    label: np.ndarray  # (Z, Y, X) uint8
    foreground: dict[int, np.ndarray]  # class -> (N, 3) int64 voxel indices (z, y, x)


def make_volume(cache_root: Path, shape: tuple[int, int, int] = VOLUME_SHAPE) -> BenchmarkVolume:
    """Draw one phantom CT (cached under ``cache_root``) and cut/pad it to ``shape`` about the liver."""
    root = ensure_liver_phantom(cache_root, num_cases=1, matrix=max(shape[1:]), seed=0)
    image_path = next((root / "imagesTr").glob("[!._]*.nii.gz"))
    image = read_nifti(image_path).array
    label = read_nifti(root / "labelsTr" / image_path.name, is_label=True).array
    rng = np.random.default_rng(0)
    image = normalize_ct(image[0], ct_statistics(sample_foreground(image[0], label, 100_000, rng)))[None]
    liver = np.argwhere(label > 0)
    center = (liver.min(0) + liver.max(0)) // 2
    out_image = np.full((1, *shape), image.min(), dtype=np.float32)
    out_label = np.zeros(shape, dtype=np.uint8)
    source, target = [], []
    for axis, size in enumerate(shape):
        start = int(center[axis]) - size // 2
        low, high = max(start, 0), min(start + size, label.shape[axis])
        source.append(slice(low, high))
        target.append(slice(low - start, high - start))
    out_image[(slice(None), *target)] = image[(slice(None), *source)]
    out_label[tuple(target)] = label[tuple(source)]
    foreground = {int(k): np.argwhere(out_label == k) for k in np.unique(out_label) if k > 0}
    return BenchmarkVolume(out_image, out_label, foreground)


def sample_center(rng: np.random.Generator, volume: BenchmarkVolume, patch_size: tuple[int, ...]) -> np.ndarray:
    """A label-aware patch centre (z, y, x), as every pipeline without its own sampler draws it."""
    return sample_patch_center(rng, volume.label.shape, volume.foreground, FOREGROUND_PROBABILITY, patch_size)


def crop_around(array: np.ndarray, center: np.ndarray, size: tuple[int, ...], fill: float) -> np.ndarray:
    """The ``size`` region of ``array`` (..., Z, Y, X) centred on ``center``, padded with ``fill``."""
    spatial = array.shape[-3:]
    out = np.full((*array.shape[:-3], *size), fill, dtype=array.dtype)
    source, target = [], []
    for axis, length in enumerate(size):
        start = int(center[axis]) - length // 2
        low, high = max(start, 0), min(start + length, spatial[axis])
        high = max(high, low)
        source.append(slice(low, high))
        target.append(slice(low - start, high - start))
    out[(..., *target)] = array[(..., *source)]
    return out


def time_block(source: PatchSource, count: int) -> float:
    """Patches per second over ``count`` consecutive calls of ``source``."""
    started = time.perf_counter()
    for _ in range(count):
        source()
    return count / (time.perf_counter() - started)


def summarize(values: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def format_rate(summary: dict[str, float] | None) -> str:
    """'12.3 (11.9-12.8)' for a table cell; '-' for a skipped measurement."""
    if summary is None:
        return "-"
    digits = max(0, 2 - math.floor(math.log10(max(summary["median"], 1e-9))))
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}-{summary['max']:.{digits}f})"
