"""WeightedClassSampler: drawn class shares, reproducible epochs, disjoint DDP shards."""

import numpy as np
import pytest

from data.samplers import WeightedClassSampler


def test_classes_are_drawn_at_the_configured_share():
    labels = np.array([1] * 22 + [0] * 78)
    sampler = WeightedClassSampler(labels, num_samples=4001, class_shares={0: 0.4, 1: 0.6}, seed=0)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 4001
    drawn = np.array([sample for _, _, sample in keys])
    assert abs(labels[drawn].mean() - 0.6) < 0.03
    assert len(set(drawn[labels[drawn] == 1])) == 22  # with replacement, every positive turns up
    uniform = WeightedClassSampler(labels, num_samples=4001, class_shares=None, seed=0)
    assert abs(labels[[s for _, _, s in uniform]].mean() - 0.22) < 0.03


def test_epochs_differ_and_repeat():
    labels = np.array([0, 1, 0, 0, 1, 0, 0])
    sampler = WeightedClassSampler(labels, num_samples=50, class_shares={0: 0.5, 1: 0.5}, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert [key[:2] for key in first] == [(1, i) for i in range(50)]
    assert list(sampler) == first
    sampler.set_epoch(2)
    assert [s for _, _, s in sampler] != [s for _, _, s in first]


def test_replicas_split_one_draw_without_overlap():
    labels = np.arange(31) % 3 == 0
    full = list(WeightedClassSampler(labels, num_samples=20, class_shares={0: 0.5, 1: 0.5}, seed=1))
    shards = [list(WeightedClassSampler(labels, num_samples=20, class_shares={0: 0.5, 1: 0.5}, seed=1, num_replicas=3,
                                        rank=r))
              for r in range(3)]
    assert all(len(shard) == 7 for shard in shards)
    merged = sorted(key for shard in shards for key in shard)
    assert merged[:20] == full and len({key[1] for key in merged}) == 21


def test_bad_shares_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        WeightedClassSampler(np.array([0, 1]), num_samples=4, class_shares={0: 0.5, 1: 0.6}, seed=0)
    with pytest.raises(ValueError, match="no class"):
        WeightedClassSampler(np.array([0, 0]), num_samples=4, class_shares={1: 1.0}, seed=0)
