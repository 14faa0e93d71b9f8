"""2D training slices cut from the preprocessed (memory-mapped) volumes.

A slice is one index along a chosen spatial axis of a cached case: axis 0 (z) gives axial slices of an
axial acquisition. The slice is fitted to `image_size` either by resizing the whole slice (aspect kept,
the short side padded) or by a full-resolution crop (padded where the slice is smaller), and augmented
in the same single resampling (`data/augment2d.py`).

Samples are keyed by `(epoch, index, slice)` from `data/samplers.py`'s `WeightedSliceSampler`; the
augmentation is drawn from `np.random.default_rng([seed, epoch, index])`, so every sample is the same
whatever the number of workers, their order, or a resumed run. Workers open the cached arrays as
memory maps on first use and read only the slices they need.

    dataset = SliceDataset(entry, train_ids, axis=0, image_size=(256, 256), fit="resize",
                           augment=Augment2DConfig(), seed=0)
    sampler = WeightedSliceSampler(dataset.slice_has_foreground, num_samples=2000, foreground_share=0.5, seed=0)
    # batch["image"] (B, C, H, W) float32, batch["label"] (B, H, W) uint8
"""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.augment2d import Augment2DConfig, augment_intensity_2d, make_coordinate_map_2d, \
    sample_spatial_transform_2d, warp_2d
from data.patches import sample_patch_center
from data.preprocess import PreprocessedCase, load_preprocessed_case


def take_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice of a `(C, Z, Y, X)` image or `(Z, Y, X)` label along spatial axis `axis` (0 = z):
    `(C, H, W)` or `(H, W)`, read as a contiguous array (only that slice leaves a memmap)."""
    channel_axes = array.ndim - 3
    return np.ascontiguousarray(np.take(array, index, axis=axis + channel_axes))


def foreground_per_slice(label: np.ndarray, axis: int) -> np.ndarray:
    """`(S,)` bool: whether each slice along `axis` holds any foreground voxel."""
    other_axes = tuple(a for a in range(label.ndim) if a != axis)
    return np.asarray(label).any(axis=other_axes)


class SliceDataset(Dataset):
    """Augmented 2D slices of cached cases, indexed by `(epoch, index, slice)` keys.

    Args:
        cache_dir: the cache entry folder (from `data/preprocess.py`).
        case_ids: cases whose every slice along `axis` is a sample.
        axis: spatial axis the slices are cut along (0 = z, 1 = y, 2 = x).
        image_size: `(H, W)` of every sample.
        fit: "resize" (the whole slice, aspect kept) or "crop" (a full-resolution window).
        augment: augmentation config; `Augment2DConfig.none()` for plain fitting.
        seed: base seed of every sample's generator.
        crop_foreground_share: fit "crop" only: chance of centring the window on a foreground pixel of
            the slice (otherwise a window inside the slice), so small lesions near the border are seen.
            Not the recipes' ``foreground_share``: that one (`WeightedSliceSampler`) picks which slices
            are drawn; this one places the window within a drawn slice.

    Attributes:
        slices: `(N, 2)` int64 (position in case_ids, slice index).
        slice_has_foreground: `(N,)` bool, for `WeightedSliceSampler`.

    Items are `{"image": (C, H, W) float32, "label": (H, W) uint8}` tensors.
    """

    def __init__(self, cache_dir: Path, case_ids: list[str], *, axis: int, image_size: tuple[int, int], fit: str,
                 augment: Augment2DConfig, seed: int, crop_foreground_share: float = 0.5):
        self.cache_dir = Path(cache_dir)
        self.case_ids = list(case_ids)
        self.axis = axis
        self.image_size = tuple(image_size)
        self.fit = fit
        self.augment = augment
        self.seed = seed
        self.crop_foreground_share = crop_foreground_share
        self._open_cases: dict[str, PreprocessedCase] = {}  # per process; filled on first use
        slices, has_foreground = [], []
        for position, case_id in enumerate(self.case_ids):
            per_slice = foreground_per_slice(self._case(case_id).label, axis)
            slices.append(np.stack([np.full(len(per_slice), position), np.arange(len(per_slice))], axis=1))
            has_foreground.append(per_slice)
        self.slices = np.concatenate(slices).astype(np.int64)
        self.slice_has_foreground = np.concatenate(has_foreground)
        self._open_cases = {}

    def __getstate__(self) -> dict:
        # Workers reopen the memmaps themselves: pickling one would copy the whole volume.
        state = self.__dict__.copy()
        state["_open_cases"] = {}
        return state

    def __len__(self) -> int:
        return len(self.slices)

    def _case(self, case_id: str) -> PreprocessedCase:
        if case_id not in self._open_cases:
            self._open_cases[case_id] = load_preprocessed_case(self.cache_dir, case_id)
        return self._open_cases[case_id]

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        if not isinstance(key, tuple) or len(key) != 3:
            raise TypeError(f"SliceDataset keys are (epoch, index, slice) tuples from WeightedSliceSampler, got {key!r}")
        epoch, index, slice_number = key
        rng = np.random.default_rng([self.seed, epoch, index])
        position, slice_index = self.slices[slice_number]
        case = self._case(self.case_ids[position])
        image = take_slice(case.image, self.axis, slice_index)  # (C, H_in, W_in)
        label = take_slice(case.label, self.axis, slice_index)  # (H_in, W_in)
        center = None
        if self.fit == "crop":
            foreground = {1: np.argwhere(label > 0)}
            middle = sample_patch_center(rng, label.shape, foreground, self.crop_foreground_share, self.image_size)
            # The window starts at middle - size // 2, so unaugmented windows fall on whole pixels.
            center = tuple(m - size // 2 + (size - 1) / 2 for m, size in zip(middle, self.image_size))
        params = sample_spatial_transform_2d(rng, self.image_size, self.augment)
        coordinates = make_coordinate_map_2d(self.image_size, label.shape, params, self.fit, center)
        fill = np.asarray(case.properties["channel_min"], dtype=np.float32)
        image, label = warp_2d(image, label, coordinates, fill, self.augment.image_order)
        image = augment_intensity_2d(image, rng, self.augment)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.uint8, copy=False))}
