import numpy as np
import pytest

from models.planning import (DEFAULT_MEMORY_BUDGET, UNetTopology, activation_memory, plan_patch, plan_topology,
                             resolve_topology)

ISOTROPIC = (1.0, 1.0, 1.0)
THICK_SLICES = (10.0, 1.5, 1.5)  # ACDC: nominal 10 mm slices of 1.5 mm pixels


def test_thick_slices_first_pool_and_convolve_in_plane_only():
    topology = plan_topology(THICK_SLICES, (10, 256, 224))
    # 1.5 -> 3 -> 6 mm in plane; at 6 mm the 10 mm slices are within a factor 2 and join in. z then
    # has 5 voxels, too few to halve again; y and x go on until 4 (y) and 7 (x) voxels remain.
    assert topology.strides == ((1, 2, 2), (1, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 1))
    assert topology.kernel_sizes == ((1, 3, 3), (1, 3, 3)) + ((3, 3, 3),) * 5
    assert topology.depth == 7 and topology.downsampling == (2, 64, 32)


def test_isotropic_halves_every_axis_with_3x3x3_kernels():
    topology = plan_topology(ISOTROPIC, (128, 128, 128))
    assert topology.strides == ((2, 2, 2),) * 5  # 128 -> 4 voxels
    assert topology.kernel_sizes == ((3, 3, 3),) * 6
    assert topology.downsampling == (32, 32, 32)


def test_odd_sizes_halve_rounding_up_until_fewer_than_8_voxels():
    # 33 -> 17 -> 9 -> 5, 34 -> 17 -> 9 -> 5, 35 -> 18 -> 9 -> 5.
    assert plan_topology((0.8, 0.8, 0.8), (33, 34, 35)).strides == ((2, 2, 2),) * 3
    # 9 -> 5 (z stops), 37 -> 19 -> 10 -> 5, 23 -> 12 -> 6 (x stops).
    topology = plan_topology(ISOTROPIC, (9, 37, 23))
    assert topology.strides == ((2, 2, 2), (1, 2, 2), (1, 2, 1))
    assert topology.kernel_sizes == ((3, 3, 3),) * 4


def test_small_axes_stop_pooling_while_larger_ones_go_on():
    topology = plan_topology(ISOTROPIC, (8, 64, 64))
    assert topology.strides == ((2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2))
    # Once 3, a kernel stays 3 although z, kept at 2 mm, is soon far finer than y and x.
    assert topology.kernel_sizes == ((3, 3, 3),) * 5


def test_a_coarse_axis_at_exactly_twice_the_finest_waits_one_level():
    # 3 mm slices of 1.5 mm pixels: after one in-plane halving every axis is 3 mm.
    topology = plan_topology((3.0, 1.5, 1.5), (32, 64, 64))
    assert topology.strides[:2] == ((1, 2, 2), (2, 2, 2))
    assert topology.kernel_sizes[:2] == ((1, 3, 3), (3, 3, 3))


def test_2d_with_a_finer_x_axis():
    topology = plan_topology((2.0, 0.7), (64, 64))
    # x: 0.7 -> 1.4 mm, then both halve until y, the last axis with 8 voxels, halves alone.
    assert topology.strides == ((1, 2), (2, 2), (2, 2), (2, 2), (2, 1))
    assert topology.kernel_sizes == ((1, 3),) + ((3, 3),) * 5


def test_a_given_depth_truncates_or_goes_on_by_the_spacing_rule():
    assert plan_topology(ISOTROPIC, (128, 128, 128), depth=3).strides == ((2, 2, 2),) * 2
    # (8, 8, 8) allows one halving; three were asked for: all axes, as the spacing rule has it.
    assert plan_topology(ISOTROPIC, (8, 8, 8), depth=4).strides == ((2, 2, 2),) * 3
    assert plan_topology(THICK_SLICES, (4, 6, 6), depth=3).strides == ((1, 2, 2), (1, 2, 2))


def test_a_tiny_patch_still_gets_one_downsampling():
    assert plan_topology(ISOTROPIC, (3, 5, 4)) == UNetTopology(strides=((2, 2, 2),), kernel_sizes=((3, 3, 3),) * 2)


def test_explicit_strides_and_kernels_win_and_a_single_entry_repeats():
    topology = resolve_topology(THICK_SLICES, (10, 256, 224), strides=((2, 2, 2),), depth=4)
    assert topology.strides == ((2, 2, 2),) * 3
    assert topology.kernel_sizes == ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))  # planned, 4 levels
    topology = resolve_topology(ISOTROPIC, (64, 64, 64), strides=((1, 2, 2), (2, 2, 2)), kernel_sizes=((3, 3, 3),))
    assert topology.depth == 3 and topology.kernel_sizes == ((3, 3, 3),) * 3
    with pytest.raises(ValueError, match="2 strides make 3 levels, not 5"):
        resolve_topology(ISOTROPIC, (64, 64, 64), strides=((1, 2, 2), (2, 2, 2)), depth=5)
    with pytest.raises(ValueError, match="odd"):
        resolve_topology(ISOTROPIC, (64, 64, 64), kernel_sizes=((2, 3, 3),))
    with pytest.raises(ValueError, match="3 positive values"):
        resolve_topology(ISOTROPIC, (64, 64, 64), strides=((2, 2),))


def test_activation_memory_by_hand():
    # Two levels at batch 3: full resolution 2 channels x 4^3 voxels x (4 encoder + 7 decoder tensors),
    # bottleneck 4 channels x 2^3 voxels x 4 tensors; 4 bytes each.
    topology = UNetTopology(strides=((2, 2, 2),), kernel_sizes=((3, 3, 3),) * 2)
    expected = 4 * 3 * (2 * 64 * 11 + 4 * 8 * 4)
    assert activation_memory((4, 4, 4), topology, batch_size=3, base_channels=2, max_channels=320) == expected


def test_1mm_isotropic_large_dataset_gets_128_cubed_at_batch_2():
    patch, topology = plan_patch(ISOTROPIC, (300, 412.5, 390), batch_size=2, base_channels=32, max_channels=320)
    assert patch == (128, 128, 128)
    assert topology == plan_topology(ISOTROPIC, patch) and topology.depth == 6
    assert 7e9 < DEFAULT_MEMORY_BUDGET < 9e9  # the ~8 GB the comment states
    # Twice the batch: the same budget buys a smaller patch.
    smaller, _ = plan_patch(ISOTROPIC, (300, 412.5, 390), batch_size=4, base_channels=32, max_channels=320)
    assert np.prod(smaller) < 128**3


def test_a_small_median_shape_is_covered_and_rounded_up_to_the_downsampling():
    # 19 -> 10 -> 5 (factor 4: 20); 30 -> 15 -> 8 -> 4 (factor 8: 32); 41 -> 21 -> 11 -> 6 (factor 8: 48).
    patch, topology = plan_patch(ISOTROPIC, (19, 30, 41), batch_size=2, base_channels=32, max_channels=320)
    assert patch == (20, 32, 48) and topology.downsampling == (4, 8, 8)


def test_thick_slices_keep_every_slice_and_shrink_in_plane_first():
    patch, topology = plan_patch(THICK_SLICES, (10, 250, 215), batch_size=2, base_channels=32, max_channels=320)
    assert patch == (10, 256, 224) and topology.strides[0] == (1, 2, 2)
    # With a smaller budget the in-plane axes (375 mm) shrink before the slices (100 mm).
    patch, _ = plan_patch(THICK_SLICES, (10, 250, 215), batch_size=2, base_channels=32, max_channels=320,
                          memory_budget=DEFAULT_MEMORY_BUDGET // 8)
    assert patch[0] == 10 and patch[1] < 256 and patch[2] < 224


@pytest.mark.parametrize("seed", range(5))
def test_planned_patches_are_divisible_within_budget_and_no_larger_than_needed(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        spacing = tuple(rng.choice([0.6, 0.8, 1.0, 1.5, 3.0, 5.0, 10.0], size=3))
        median = tuple(rng.uniform(3, 500, size=3))
        patch, topology = plan_patch(spacing, median, batch_size=2, base_channels=32, max_channels=320)
        assert topology == plan_topology(spacing, patch)
        assert all(size % factor == 0 for size, factor in zip(patch, topology.downsampling))
        assert all(size < round(m) + factor for size, m, factor in zip(patch, median, topology.downsampling))
        memory = activation_memory(patch, topology, batch_size=2, base_channels=32, max_channels=320)
        assert memory <= DEFAULT_MEMORY_BUDGET


def test_a_given_depth_or_strides_shape_the_planned_patch():
    patch, topology = plan_patch(ISOTROPIC, (300, 300, 300), batch_size=2, base_channels=32, max_channels=320,
                                 depth=4)
    assert topology.depth == 4 and all(size % 8 == 0 for size in patch)
    patch, topology = plan_patch(ISOTROPIC, (7, 30, 30), batch_size=2, base_channels=32, max_channels=320,
                                 strides=((1, 2, 2), (1, 2, 2)))
    assert patch == (7, 32, 32) and topology.downsampling == (1, 4, 4)


def test_a_recipe_can_ask_a_small_patch_for_more_downsamplings_down_to_2_voxels():
    # nnU-Net's rule stops a 32^3 patch at 4^3 after three halvings; asked for four, it goes on to 2^3.
    assert plan_topology(ISOTROPIC, (32, 32, 32)).strides == ((2, 2, 2),) * 3
    assert plan_topology(ISOTROPIC, (32, 32, 32), min_downsamplings=4).strides == ((2, 2, 2),) * 4
    # Only while an axis keeps 2 voxels: 12 -> 6 (nnU-Net stops) -> 3, and no further.
    assert plan_topology(ISOTROPIC, (12, 12, 12), min_downsamplings=4).strides == ((2, 2, 2),) * 2
    # A network that downsamples often enough already is planned as nnU-Net plans it (ACDC's patch).
    for spacing, patch in [(THICK_SLICES, (10, 64, 64)), (ISOTROPIC, (128, 128, 128)), (ISOTROPIC, (3, 5, 4))]:
        assert plan_topology(spacing, patch, min_downsamplings=4) == plan_topology(spacing, patch)
    # The planned patch is divisible by the deeper network's downsampling.
    patch, topology = plan_patch(ISOTROPIC, (30, 30, 30), batch_size=2, base_channels=32, max_channels=320,
                                 min_downsamplings=4)
    assert patch == (32, 32, 32) and topology.downsampling == (16, 16, 16)
