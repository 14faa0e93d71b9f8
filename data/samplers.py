"""Samplers that decide which samples an epoch draws, in the main process.

Each epoch's draw comes from `np.random.default_rng([seed, epoch])`, so it is the same in every process;
with `num_replicas > 1` each process (DDP rank) takes every `num_replicas`-th key of that one draw, so
the ranks share the epoch without overlap and without talking to each other.
"""

import math

import numpy as np
from torch.utils.data import Sampler


class WeightedClassSampler(Sampler):
    """Yields `(epoch, index, sample)` keys drawn with replacement so that each class makes up a
    configured share of the draws (RSNA has ~22% positive patients: drawn uniformly, the classifier
    sees few positives and leans towards "normal"). `index` numbers the draw within the epoch (it
    seeds the sample's augmentation), `sample` is the drawn sample.

    Args:
        labels: `(N,)` integer class of every sample.
        num_samples: samples per epoch over all replicas.
        class_shares: `{class: share}` of the draws, shares summing to 1; a class not present in
            `labels` gives its share to the others in proportion. None draws every sample with
            equal probability.
        seed: seed of the draws (combined with the epoch).
        num_replicas, rank: DDP world size and this process's rank.
    """

    def __init__(self, labels: np.ndarray, num_samples: int, class_shares: dict[int, float] | None,
                 seed: int, num_replicas: int = 1, rank: int = 0):
        self.labels = np.asarray(labels)
        if class_shares is not None and (min(class_shares.values()) < 0
                                         or not math.isclose(sum(class_shares.values()), 1.0)):
            raise ValueError(f"class shares must be non-negative and sum to 1, got {class_shares}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.num_samples = num_samples
        self.class_shares = class_shares
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch
        per_replica = len(self)
        rng = np.random.default_rng([self.seed, epoch])
        samples = rng.choice(len(self.labels), size=per_replica * self.num_replicas, p=self.probabilities)
        indices = range(self.rank, per_replica * self.num_replicas, self.num_replicas)
        return iter([(epoch, index, int(samples[index])) for index in indices])

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)
