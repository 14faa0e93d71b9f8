import numpy as np
import pytest

from data.samplers import WeightedSliceSampler


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
    sampler = WeightedSliceSampler(np.array([False, True, False, True, False]), 10, 0.5, seed=0)
    np.testing.assert_allclose(sampler.probabilities, [1 / 6, 1 / 4, 1 / 6, 1 / 4, 1 / 6])


def test_none_draws_every_slice_equally():
    has_foreground = _has_foreground()
    slices = np.array([key[2] for key in WeightedSliceSampler(has_foreground, 6000, None, seed=1)])
    assert abs(has_foreground[slices].mean() - has_foreground.mean()) < 0.015


def test_keys_are_seeded_per_epoch():
    sampler = WeightedSliceSampler(_has_foreground(), 50, 0.5, seed=3)
    first = list(sampler)
    assert first == list(sampler)
    assert [key[:2] for key in first] == [(0, index) for index in range(50)]
    sampler.set_epoch(1)
    second = list(sampler)
    assert all(key[0] == 1 for key in second) and [k[2] for k in second] != [k[2] for k in first]
    assert first != list(WeightedSliceSampler(_has_foreground(), 50, 0.5, seed=4))


def test_replicas_split_one_draw_without_overlap():
    has_foreground = _has_foreground()
    whole = list(WeightedSliceSampler(has_foreground, 40, 0.5, seed=2))
    parts = [list(WeightedSliceSampler(has_foreground, 40, 0.5, seed=2, num_replicas=3, rank=rank))
             for rank in range(3)]
    assert all(len(part) == 14 for part in parts)  # ceil(40 / 3): every rank steps the same number of times
    merged = sorted(key for part in parts for key in part)
    assert merged[:40] == sorted(whole)
    assert len({key[1] for key in merged}) == len(merged)


@pytest.mark.parametrize("has_foreground", [np.zeros(10, dtype=bool), np.ones(10, dtype=bool)])
def test_without_foreground_or_background_slices_every_slice_is_equally_likely(has_foreground):
    # The share cannot be met: the draws spread evenly over the slices there are, none left out.
    sampler = WeightedSliceSampler(has_foreground, 2000, 0.5, seed=0)
    np.testing.assert_array_equal(sampler.probabilities, np.full(10, 0.1))
    counts = np.bincount([key[2] for key in sampler], minlength=10)
    assert counts.sum() == 2000 and len(counts) == 10
    assert counts.min() >= 150 and counts.max() <= 250  # 200 expected each, standard deviation ~13


def test_a_share_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=r"foreground_share must lie in \[0, 1\], got 1.5"):
        WeightedSliceSampler(np.zeros(10, dtype=bool), 30, 1.5, seed=0)
