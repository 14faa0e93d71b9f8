"""Samplers that decide which samples an epoch draws, in the main process.

`EpochSampler` hands out the `(epoch, index)` keys of `data/patches.py`'s 3D patches, whole batches
at a time; under DDP each process takes every `num_replicas`-th batch.

`WeightedSliceSampler` draws slices with replacement so that a configured share of them hold
foreground (a lung tumour fills far under 1% of the voxels and appears in a few percent of the
slices: drawn uniformly, most batches would hold none). Each epoch's draw comes from
`np.random.default_rng([seed, epoch])`, so it is the same in every process; with `num_replicas > 1`
each process (DDP rank) takes every `num_replicas`-th key of that one draw, so the ranks share the
epoch without overlap and without talking to each other.

    sampler = WeightedSliceSampler(dataset.slice_has_foreground, num_samples=2000, foreground_share=0.5, seed=0)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler, num_workers=2, persistent_workers=True)
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...
"""

import math

import numpy as np
from torch.utils.data import Sampler


class _ShardedEpochSampler(Sampler):
    """An epoch of keys shared among ``num_replicas`` processes (DDP), this one being ``rank``; call
    `set_epoch` before each epoch, as with `DistributedSampler`."""

    def __init__(self, num_replicas: int, rank: int):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class _SeededDrawSampler(_ShardedEpochSampler):
    """One draw with replacement per epoch from ``self.probabilities`` (set by the subclass), seeded
    by (seed, epoch), yielding `(epoch, index, drawn)` keys; replica ``rank`` takes every
    ``num_replicas``-th key."""

    def __init__(self, num_samples: int, seed: int, num_replicas: int, rank: int):
        super().__init__(num_replicas, rank)
        self.num_samples = num_samples
        self.seed = seed

    def __iter__(self):
        epoch = self.epoch
        per_replica = len(self)
        rng = np.random.default_rng([self.seed, epoch])
        drawn = rng.choice(len(self.probabilities), size=per_replica * self.num_replicas, p=self.probabilities)
        indices = range(self.rank, per_replica * self.num_replicas, self.num_replicas)
        return iter([(epoch, index, int(drawn[index])) for index in indices])

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)


class WeightedSliceSampler(_SeededDrawSampler):
    """Yields `(epoch, index, slice)` keys: `index` numbers the sample within the epoch (it seeds the
    sample's augmentation), `slice` is the drawn slice.

    Args:
        slice_has_foreground: `(N,)` bool, one entry per slice of the dataset.
        num_samples: samples per epoch over all replicas.
        foreground_share: expected share of foreground slices among the draws; None draws every slice
            with equal probability. With no foreground (or no background) slices at all, all draws come
            from the slices there are.
        seed: seed of the draws (combined with the epoch).
        num_replicas, rank: DDP world size and this process's rank.
    """

    def __init__(self, slice_has_foreground: np.ndarray, *, num_samples: int, foreground_share: float | None,
                 seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(num_samples, seed, num_replicas, rank)
        self.slice_has_foreground = np.asarray(slice_has_foreground, dtype=bool)
        if foreground_share is not None and not 0.0 <= foreground_share <= 1.0:
            raise ValueError(f"foreground_share must lie in [0, 1], got {foreground_share}")
        self.foreground_share = foreground_share
        self.probabilities = self._slice_probabilities()

    def _slice_probabilities(self) -> np.ndarray:
        count = len(self.slice_has_foreground)
        foreground = int(self.slice_has_foreground.sum())
        if self.foreground_share is None or foreground in (0, count):
            return np.full(count, 1.0 / count)
        # The foreground slices share foreground_share equally, the others the rest.
        return np.where(self.slice_has_foreground, self.foreground_share / foreground,
                        (1.0 - self.foreground_share) / (count - foreground))


class WeightedClassSampler(_SeededDrawSampler):
    """Yields `(epoch, index, sample)` keys drawn with replacement so that each class makes up a
    configured share of the draws (RSNA has ~22% positive patients: drawn uniformly, the classifier
    sees few positives and leans towards "normal"). Draws and DDP sharding work as in
    `WeightedSliceSampler`: one draw per epoch from `np.random.default_rng([seed, epoch])`, each
    replica taking every `num_replicas`-th key.

    Args:
        labels: `(N,)` integer class of every sample.
        num_samples: samples per epoch over all replicas.
        class_shares: `{class: share}` of the draws, shares summing to 1; a class not present in
            `labels` gives its share to the others in proportion. None draws every sample with
            equal probability.
        seed: seed of the draws (combined with the epoch).
        num_replicas, rank: DDP world size and this process's rank.
    """

    def __init__(self, labels: np.ndarray, *, num_samples: int, class_shares: dict[int, float] | None,
                 seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(num_samples, seed, num_replicas, rank)
        self.labels = np.asarray(labels)
        if class_shares is not None and (min(class_shares.values()) < 0
                                         or not math.isclose(sum(class_shares.values()), 1.0)):
            raise ValueError(f"class shares must be non-negative and sum to 1, got {class_shares}")
        self.class_shares = class_shares
        self.probabilities = self._sample_probabilities()

    def _sample_probabilities(self) -> np.ndarray:
        if self.class_shares is None:
            return np.full(len(self.labels), 1.0 / len(self.labels))
        classes, counts = np.unique(self.labels, return_counts=True)
        shares = np.array([self.class_shares.get(int(c), 0.0) for c in classes])
        if shares.sum() == 0:
            raise ValueError(f"no class in {sorted(self.class_shares)} occurs among the labels {classes}")
        # Within a class every sample is equally likely.
        per_sample = shares / shares.sum() / counts
        return per_sample[np.searchsorted(classes, self.labels)]


class EpochSampler(_ShardedEpochSampler):
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
        super().__init__(num_replicas, rank)
        if foreground_per_batch is not None and not 0 <= foreground_per_batch <= batch_size:
            raise ValueError(f"foreground_per_batch must lie in 0..{batch_size}, got {foreground_per_batch}")
        self.batches_per_replica = math.ceil(steps_per_epoch / num_replicas)
        self.batch_size = batch_size
        self.foreground_per_batch = foreground_per_batch

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
