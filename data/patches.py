"""Random 3D training patches from the preprocessed cache.

Each sample is keyed by `(epoch, index)` and drawn with `np.random.default_rng([seed, epoch, index])`,
so it is the same whatever the number of workers, their order, or a resumed run, and differs between
epochs. `EpochSampler` (`data/samplers.py`) hands out those keys from the main process, whole batches at a time;
`PatchDataset` opens the cached arrays as memory maps inside each worker on first use and reads only
the region a patch needs.

    sampler = EpochSampler(steps_per_epoch=250, batch_size=2)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=8, persistent_workers=True)
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...  # batch["image"] (B, C, D, H, W) float32, batch["label"] (B, D, H, W) uint8
"""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.augment3d import (
    Augment3DConfig,
    apply_spatial_transform,
    augment_intensity,
    sample_spatial_transform,
)
from data.preprocess import PreprocessedCase, load_preprocessed_case


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
        *,
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
        self._open_cases: dict[str, PreprocessedCase] = {}  # per process; filled on first use

    def __getstate__(self) -> dict:
        # Workers reopen the memmaps themselves: pickling one would copy the whole volume.
        state = self.__dict__.copy()
        state["_open_cases"] = {}
        return state

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _case(self, case_id: str) -> PreprocessedCase:
        if case_id not in self._open_cases:  # memory-mapped: nothing but the small foreground lists is read
            self._open_cases[case_id] = load_preprocessed_case(self.cache_dir, case_id)
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
        # Each channel's background intensity, which pads a patch reaching outside the volume.
        channel_min = np.asarray(case.properties["channel_min"], dtype=np.float32).reshape(case.image.shape[0])
        image, label = apply_spatial_transform(
            case.image,
            case.label,
            center=center,
            patch_size=self.patch_size,
            params=params,
            channel_min=channel_min,
            image_order=self.augment.image_order,
        )
        image = augment_intensity(image, rng, self.augment)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8)),
        }
