import math

import numpy as np
import pytest
from torch.utils.data import DataLoader

from data.samplers import EpochSampler, WeightedSliceSampler


def _has_foreground(count=1003, share=0.03, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=count) < share


@pytest.mark.parametrize("share", [0.5, 0.2, 0.9])
def test_configured_share_of_foreground_slices(share):
    has_foreground = _has_foreground()
    sampler = WeightedSliceSampler(has_foreground, num_samples=4000, foreground_share=share, seed=1)
    slices = np.array([key[2] for key in sampler])
    assert abs(has_foreground[slices].mean() - share) < 0.03
    assert len(np.unique(slices)) < len(slices)  # with replacement


def test_foreground_slices_share_the_configured_probability_equally():
    sampler = WeightedSliceSampler(np.array([False, True, False, True, False]), num_samples=10, foreground_share=0.5,
                                   seed=0)
    np.testing.assert_allclose(sampler.probabilities, [1 / 6, 1 / 4, 1 / 6, 1 / 4, 1 / 6])


def test_none_draws_every_slice_equally():
    has_foreground = _has_foreground()
    slices = np.array([key[2] for key in WeightedSliceSampler(has_foreground, num_samples=6000, foreground_share=None,
                                                              seed=1)])
    assert abs(has_foreground[slices].mean() - has_foreground.mean()) < 0.015


def test_keys_are_seeded_per_epoch():
    sampler = WeightedSliceSampler(_has_foreground(), num_samples=50, foreground_share=0.5, seed=3)
    first = list(sampler)
    assert first == list(sampler)
    assert [key[:2] for key in first] == [(0, index) for index in range(50)]
    sampler.set_epoch(1)
    second = list(sampler)
    assert all(key[0] == 1 for key in second) and [k[2] for k in second] != [k[2] for k in first]
    assert first != list(WeightedSliceSampler(_has_foreground(), num_samples=50, foreground_share=0.5, seed=4))


def test_replicas_split_one_draw_without_overlap():
    has_foreground = _has_foreground()
    whole = list(WeightedSliceSampler(has_foreground, num_samples=40, foreground_share=0.5, seed=2))
    parts = [list(WeightedSliceSampler(has_foreground, num_samples=40, foreground_share=0.5, seed=2, num_replicas=3,
                                       rank=rank))
             for rank in range(3)]
    assert all(len(part) == 14 for part in parts)  # ceil(40 / 3): every rank steps the same number of times
    merged = sorted(key for part in parts for key in part)
    assert merged[:40] == sorted(whole)
    assert len({key[1] for key in merged}) == len(merged)


@pytest.mark.parametrize("has_foreground", [np.zeros(10, dtype=bool), np.ones(10, dtype=bool)])
def test_without_foreground_or_background_slices_every_slice_is_equally_likely(has_foreground):
    # The share cannot be met: the draws spread evenly over the slices there are, none left out.
    sampler = WeightedSliceSampler(has_foreground, num_samples=2000, foreground_share=0.5, seed=0)
    np.testing.assert_array_equal(sampler.probabilities, np.full(10, 0.1))
    counts = np.bincount([key[2] for key in sampler], minlength=10)
    assert counts.sum() == 2000 and len(counts) == 10
    assert counts.min() >= 150 and counts.max() <= 250  # 200 expected each, standard deviation ~13


def test_a_share_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=r"foreground_share must lie in \[0, 1\], got 1.5"):
        WeightedSliceSampler(np.zeros(10, dtype=bool), num_samples=30, foreground_share=1.5, seed=0)


def test_epoch_sampler_yields_keys_of_the_current_epoch():
    sampler = EpochSampler(2, 2)
    assert len(sampler) == 4 and list(sampler) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    sampler.set_epoch(5)
    assert list(sampler) == [(5, 0), (5, 1), (5, 2), (5, 3)]


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("steps_per_epoch, batch_size", [(250, 2), (7, 3), (3, 5)])
def test_every_rank_gets_the_same_number_of_full_batches(world_size, steps_per_epoch, batch_size):
    shards = [list(EpochSampler(steps_per_epoch, batch_size, num_replicas=world_size, rank=rank))
              for rank in range(world_size)]
    batches_per_rank = math.ceil(steps_per_epoch / world_size)  # 500 patches on 3 GPUs: 84 batches each
    assert all(len(shard) == batches_per_rank * batch_size for shard in shards)
    keys = [key for shard in shards for key in shard]
    assert len(set(keys)) == len(keys)  # no patch twice in an epoch
    assert set(EpochSampler(steps_per_epoch, batch_size)) <= set(keys)  # every patch one process would draw
    for rank, shard in enumerate(shards):  # each batch is one whole batch of the single-process epoch
        loader = DataLoader(shard, batch_size=batch_size)
        assert len(loader) == batches_per_rank
        for step, batch in enumerate(loader):
            indices = batch[1].tolist()
            first = (step * world_size + rank) * batch_size
            assert indices == list(range(first, first + batch_size))


def test_ranks_split_an_epoch_without_overlap():
    shards = [list(EpochSampler(5, 2, num_replicas=3, rank=rank)) for rank in range(3)]
    assert shards == [[(0, 0), (0, 1), (0, 6), (0, 7)], [(0, 2), (0, 3), (0, 8), (0, 9)],
                      [(0, 4), (0, 5), (0, 10), (0, 11)]]  # batch 5 is one beyond the epoch's 5
    with pytest.raises(ValueError, match="rank 3"):
        EpochSampler(10, 2, num_replicas=3, rank=3)


@pytest.mark.parametrize("batch_size, foreground_share, forced", [(2, 0.33, 1), (5, 0.33, 2), (3, 1.0, 3), (4, 0.1, 0)])
def test_per_batch_foreground_centres_the_last_patches_of_every_batch(batch_size, foreground_share, forced):
    assert round(batch_size * foreground_share) == forced
    for rank in range(2):
        sampler = EpochSampler(9, batch_size, foreground_per_batch=forced, num_replicas=2, rank=rank)
        keys = list(sampler)
        batches = [keys[start:start + batch_size] for start in range(0, len(keys), batch_size)]
        assert all([flag for _, _, flag in batch] == [False] * (batch_size - forced) + [True] * forced
                   for batch in batches)
        assert [key[:2] for key in keys] == list(EpochSampler(9, batch_size, num_replicas=2, rank=rank))
