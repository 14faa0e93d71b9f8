"""Random 3D training patches from the preprocessed cache.

Each sample is keyed by `(epoch, index)` and drawn with `np.random.default_rng([seed, epoch, index])`,
so it is the same whatever the number of workers, their order, or a resumed run, and differs between
epochs. `EpochSampler` hands out those keys from the main process, whole batches at a time;
`PatchDataset` opens the cached arrays as memory maps inside each worker on first use and reads only
the region a patch needs.

    sampler = EpochSampler(steps_per_epoch=250, batch_size=2)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=8, persistent_workers=True)
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...  # batch["image"] (B, C, D, H, W) float32, batch["label"] (B, D, H, W) uint8
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from data.augment3d import (
    Augment3DConfig,
    apply_spatial_transform,
    augment_intensity,
    sample_spatial_transform,
)


def sample_patch_center(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    foreground: dict[int, np.ndarray],
    foreground_share: float,
    patch_size: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Draw a patch centre: a foreground voxel with probability `foreground_share`, otherwise a random one.

    A foreground centre is a random voxel of a class drawn uniformly among the classes present in
    the case, so rare classes are seen as often as large ones; the patch is centred on that voxel
    even near the border (the part outside the volume is padded). A random centre is uniform over the
    positions that keep the patch inside the volume along each axis where it fits (nnU-Net's rule,
    which wastes no patch on padding) and centres the volume along axes where it does not. Without
    `patch_size` a random centre is any voxel of the volume. A case with no foreground always gets a
    random centre.

    Args:
        rng: the sample's generator.
        shape: spatial shape `(Z, Y, X)` of the volume.
        foreground: class -> `(N, 3)` voxel indices `(z, y, x)`; N may be 0.
        foreground_share: chance of centring on foreground.
        patch_size: `(D, H, W)`, to keep random patches inside the volume.

    Returns:
        `(3,)` int64 voxel index `(z, y, x)`.
    """
    present = [locations for _, locations in sorted(foreground.items()) if len(locations) > 0]
    if present and rng.uniform() < foreground_share:
        locations = present[rng.integers(len(present))]
        return np.asarray(locations[rng.integers(len(locations))], dtype=np.int64)
    if patch_size is None:
        return np.array([rng.integers(size) for size in shape], dtype=np.int64)
    center = []
    for size, patch in zip(shape, patch_size):
        if patch <= size:
            # crop start (centre - patch // 2) uniform in [0, size - patch]
            center.append(rng.integers(size - patch + 1) + patch // 2)
        else:
            center.append(patch // 2 - (patch - size) // 2)
    return np.array(center, dtype=np.int64)


@dataclass
class _CachedCase:
    """A cached case opened in this process."""

    image: np.ndarray  # (C, Z, Y, X) float32 memmap
    label: np.ndarray  # (Z, Y, X) uint8 memmap
    foreground: dict[int, np.ndarray]  # class -> (N, 3) int32 voxel indices
    channel_min: np.ndarray  # (C,) float32: background intensity used for padding


def _open_cached_case(cache_dir: Path, case_id: str) -> _CachedCase:
    """Memory-map one case of a cache entry; nothing but the small foreground lists is read."""
    image = np.load(cache_dir / f"{case_id}_image.npy", mmap_mode="r", allow_pickle=False)
    label = np.load(cache_dir / f"{case_id}_label.npy", mmap_mode="r", allow_pickle=False)
    with np.load(cache_dir / f"{case_id}_foreground.npz", allow_pickle=False) as archive:
        foreground = {int(name.removeprefix("class_")): archive[name] for name in archive.files}
    properties = json.loads((cache_dir / f"{case_id}.json").read_text())
    channel_min = np.asarray(properties["channel_min"], dtype=np.float32).reshape(image.shape[0])
    return _CachedCase(image, label, foreground, channel_min)


class PatchDataset(Dataset):
    """Augmented random patches, indexed by `(epoch, index)` keys from `EpochSampler`, or by
    `(epoch, index, centre_on_foreground)` keys when the sampler decides the foreground per batch.

    Args:
        cache_dir: the cache entry folder holding `<case_id>_image.npy` etc.
        case_ids: cases to draw from, each with equal probability.
        patch_size: `(D, H, W)`.
        samples_per_epoch: number of keys per epoch (`len(dataset)`).
        foreground_share: chance of centring a patch on foreground, drawn per patch (keys without a
            `centre_on_foreground` flag).
        augment: augmentation config; `Augment3DConfig.none()` for plain crops.
        seed: base seed of every sample's generator.

    Items are `{"image": (C, D, H, W) float32, "label": (D, H, W) uint8}` tensors: class indices stay
    one byte per voxel through collation and the host-to-device copy (the losses take any integer type).
    """

    def __init__(
        self,
        cache_dir: Path,
        case_ids: list[str],
        patch_size: tuple[int, int, int],
        samples_per_epoch: int,
        foreground_share: float,
        augment: Augment3DConfig,
        seed: int,
    ):
        self.cache_dir = Path(cache_dir)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(patch_size)
        self.samples_per_epoch = samples_per_epoch
        self.foreground_share = foreground_share
        self.augment = augment
        self.seed = seed
        self._open_cases: dict[str, _CachedCase] = {}  # per process; filled on first use

    def __getstate__(self) -> dict:
        # Workers reopen the memmaps themselves: pickling one would copy the whole volume.
        state = self.__dict__.copy()
        state["_open_cases"] = {}
        return state

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _case(self, case_id: str) -> _CachedCase:
        if case_id not in self._open_cases:
            self._open_cases[case_id] = _open_cached_case(self.cache_dir, case_id)
        return self._open_cases[case_id]

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, bool]) -> dict[str, torch.Tensor]:
        if not isinstance(key, tuple) or len(key) not in (2, 3):
            raise TypeError(f"PatchDataset keys are (epoch, index) or (epoch, index, centre_on_foreground) tuples "
                            f"from EpochSampler, got {key!r}")
        epoch, index, *centre_on_foreground = key
        # A flag from the sampler is a draw at probability 1 or 0: the generator's stream is the same.
        foreground_share = float(centre_on_foreground[0]) if centre_on_foreground else self.foreground_share
        rng = np.random.default_rng([self.seed, epoch, index])
        case = self._case(self.case_ids[rng.integers(len(self.case_ids))])
        center = sample_patch_center(rng, case.label.shape, case.foreground, foreground_share, self.patch_size)
        params = sample_spatial_transform(rng, self.patch_size, self.augment)
        image, label = apply_spatial_transform(
            case.image,
            case.label,
            center,
            self.patch_size,
            params,
            case.channel_min,
            self.augment.image_order,
        )
        image = augment_intensity(image, rng, self.augment)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8)),
        }


class EpochSampler(Sampler):
    """Yields this process's keys of an epoch of `steps_per_epoch` batches of `batch_size`
    patches; call `set_epoch` before each epoch and batch with the same `batch_size`.

    Batch k of the epoch holds the indices k * batch_size ... (k + 1) * batch_size - 1; one process
    yields them all, `(epoch, 0)` to `(epoch, steps_per_epoch * batch_size - 1)`. With
    `num_replicas > 1` (DDP) rank r takes the batches r, r + num_replicas, ..., and every rank takes
    ceil(steps_per_epoch / num_replicas) of them: all ranks step the same number of times on full
    batches (a rank that ran out first would leave the others waiting in the gradient all-reduce).
    The rounding up adds at most num_replicas - 1 batches of fresh indices; no index comes twice.
    It runs in the main process, so a new epoch reaches persistent workers through the keys alone.

    Args:
        steps_per_epoch: batches per epoch over all processes.
        batch_size: patches per batch (per process).
        foreground_per_batch: None lets every patch draw its centre for itself (`PatchDataset`'s
            `foreground_share`), keys `(epoch, index)`. A number n forces it per batch, as nnU-Net does: keys
            `(epoch, index, centre_on_foreground)` with the flag set on the last n patches of every
            batch and clear on the others, which are centred at random.
        num_replicas, rank: DDP world size and this process's rank.
    """

    def __init__(self, steps_per_epoch: int, batch_size: int, *, foreground_per_batch: int | None = None,
                 num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        if foreground_per_batch is not None and not 0 <= foreground_per_batch <= batch_size:
            raise ValueError(f"foreground_per_batch must lie in 0..{batch_size}, got {foreground_per_batch}")
        self.batches_per_replica = math.ceil(steps_per_epoch / num_replicas)
        self.batch_size = batch_size
        self.foreground_per_batch = foreground_per_batch
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch, batch_size = self.epoch, self.batch_size
        batches = range(self.rank, self.batches_per_replica * self.num_replicas, self.num_replicas)
        indices = [index for batch in batches for index in range(batch * batch_size, (batch + 1) * batch_size)]
        if self.foreground_per_batch is None:
            return iter([(epoch, index) for index in indices])
        first_forced = batch_size - self.foreground_per_batch
        return iter([(epoch, index, index % batch_size >= first_forced) for index in indices])

    def __len__(self) -> int:
        return self.batches_per_replica * self.batch_size
