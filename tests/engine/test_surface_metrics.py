import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from engine.surface_metrics import (
    hausdorff_distance_95,
    normalized_surface_dice,
    surface_distances,
    surface_metrics_per_class,
    volume_difference_ml,
    volume_ml,
)

SPACING = (2.5, 0.8, 0.8)  # thick CT slices: (z, y, x) in mm


def shifted_cubes(shift: int, axis: int, shape=(21, 23, 25), side: int = 7):
    """Reference: cube [2, 2 + side)^3; prediction: the same cube shifted by `shift` voxels along `axis`.

    Every prediction surface voxel has its translate on the reference surface, so no distance exceeds
    shift * spacing[axis]; the leading face of each cube (side^2 of its side^3 - (side - 2)^3 surface
    voxels, 22 %) lies exactly that far from the other cube, so the 95th percentile equals it.
    """
    reference = np.zeros(shape, dtype=np.uint8)
    reference[2 : 2 + side, 2 : 2 + side, 2 : 2 + side] = 1
    prediction = np.roll(reference, shift, axis=axis)
    return prediction, reference


def brute_force_surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with any of their 2 * ndim face neighbours outside the mask or the image."""
    padded = np.pad(mask, 1)  # outside the image counts as background
    interior = np.ones_like(mask)
    for offset in itertools.product((-1, 0, 1), repeat=mask.ndim):
        if np.count_nonzero(offset) == 1:  # a face neighbour: one step along one axis
            interior &= padded[tuple(slice(1 + o, 1 + o + n) for o, n in zip(offset, mask.shape))]
    return mask & ~interior


def brute_force_distances(source: np.ndarray, target: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm from each surface voxel of `source` to every surface voxel of `target`, minimised."""
    source_points = np.argwhere(brute_force_surface(source)) * np.asarray(spacing)
    target_points = np.argwhere(brute_force_surface(target)) * np.asarray(spacing)
    return cdist(source_points, target_points).min(axis=1)


def ellipsoid(shape, centre, radius_mm: float, spacing) -> np.ndarray:
    """Voxels (2D or 3D) within radius_mm of the centre (in voxels, may be fractional or outside)."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius_mm**2


def box(shape, start, stop) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return mask


def monai_reference_cases() -> dict[str, tuple[np.ndarray, np.ndarray, tuple, float]]:
    """{name: (prediction, reference, spacing, tolerance_mm)} scored by MONAI in MONAI_VALUES."""
    anisotropic = (2.0, 0.8, 0.8)
    return {
        "overlapping spheres": (ellipsoid((15, 41, 43), (7, 20, 21), 9.0, anisotropic),
                                ellipsoid((15, 41, 43), (7.4, 21.3, 20.2), 10.1, anisotropic), anisotropic, 2.0),
        "spheres far apart": (ellipsoid((17, 45, 43), (8, 20, 21), 8.0, anisotropic),
                              ellipsoid((17, 45, 43), (9, 25, 22), 11.0, anisotropic), anisotropic, 2.0),
        "off-centre cube vs sphere": (box((19, 23, 25), (3, 5, 4), (12, 15, 13)),
                                      ellipsoid((19, 23, 25), (9, 11, 12), 6.0, (1.5, 1.0, 1.2)), (1.5, 1.0, 1.2), 1.5),
        "spheres cut by the image border": (ellipsoid((13, 29, 31), (6, 2, 28), 9.0, anisotropic),
                                            ellipsoid((13, 29, 31), (3, 1, 30), 11.5, anisotropic), anisotropic, 2.0),
        "2D disc vs rectangle": (ellipsoid((37, 41), (17, 20), 11.0, (0.7, 1.3)), box((37, 41), (5, 9), (27, 28)),
                                 (0.7, 1.3), 1.0),
    }


# (HD95 mm, NSD) from MONAI 1.6.1, computed once with this script from the repository root (MONAI is
# no dependency of the tests; benchmarks/requirements-bench.txt installs it):
#
#   import torch
#   from monai.metrics import compute_hausdorff_distance, compute_surface_dice
#   from tests.engine.test_surface_metrics import monai_reference_cases
#   for name, (prediction, reference, spacing, tolerance_mm) in monai_reference_cases().items():
#       y_pred, y = (torch.from_numpy(mask)[None, None].float() for mask in (prediction, reference))
#       hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
#       nsd = compute_surface_dice(y_pred, y, [tolerance_mm], include_background=True, spacing=spacing)
#       print(f'"{name}": ({hd95.item():.6f}, {nsd.item():.6f}),')
#
# MONAI leaves empty masks undefined (HD95 NaN when either mask is empty, NSD NaN when both are, 0.0
# when one is); we keep the conventions of the module docstring, which agree on the one-sided NSD.
MONAI_VALUES = {
    "overlapping spheres": (2.400000, 0.870745),
    "spheres far apart": (6.926466, 0.378676),
    "off-centre cube vs sphere": (6.876772, 0.319876),
    "spheres cut by the image border": (5.184593, 0.551464),
    "2D disc vs rectangle": (4.801042, 0.246575),
}


def random_blobs(shape, seed: int):
    """Two overlapping smooth random masks of irregular shape, touching the image border."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    other = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    return field + 0.7 * other > 0.02, field > 0.0


@pytest.mark.parametrize("shift, axis", [(2, 0), (9, 0), (3, 1), (2, 2)])
def test_shifted_cube_hd95_is_the_shift_in_mm(shift, axis):
    prediction, reference = shifted_cubes(shift, axis)
    expected = shift * SPACING[axis]
    assert hausdorff_distance_95(prediction, reference, SPACING) == pytest.approx(expected)
    assert hausdorff_distance_95(reference, prediction, SPACING) == pytest.approx(expected)
    assert normalized_surface_dice(prediction, reference, SPACING, tolerance_mm=expected + 0.01) == 1.0
    assert normalized_surface_dice(prediction, reference, SPACING, tolerance_mm=expected - 0.01) < 1.0


@pytest.mark.parametrize("name", sorted(MONAI_VALUES))
def test_hd95_and_nsd_match_monai(name):
    """Face-connected surfaces, HD95 as the larger directed percentile, NSD counting surface voxels.
    MONAI measures distances in float32, hence the tolerance of a few float32 steps."""
    prediction, reference, spacing, tolerance_mm = monai_reference_cases()[name]
    monai_hd95, monai_nsd = MONAI_VALUES[name]
    for first, second in ((prediction, reference), (reference, prediction)):  # both are symmetric
        assert hausdorff_distance_95(first, second, spacing) == pytest.approx(monai_hd95, abs=1e-5)
        assert normalized_surface_dice(first, second, spacing, tolerance_mm) == pytest.approx(monai_nsd, abs=1e-6)
    metrics = surface_metrics_per_class(prediction.astype(np.int64), reference.astype(np.int64), num_classes=2,
                                        spacing=spacing, tolerance_mm=tolerance_mm)
    assert metrics[1]["hd95_mm"] == pytest.approx(monai_hd95, abs=1e-5)
    assert metrics[1]["nsd"] == pytest.approx(monai_nsd, abs=1e-6)


def test_hd95_is_the_larger_directed_percentile():
    """A prediction that covers the reference and adds a far island: every reference surface voxel is
    found (directed 95th percentile 0) while the island's voxels, 30 % of the prediction's surface,
    lie far away; pooling both directions would dilute them below the 95th percentile."""
    reference = box((17, 19, 21), (2, 2, 2), (9, 9, 9))
    prediction = reference | box((17, 19, 21), (13, 14, 15), (16, 17, 18))
    prediction_to_reference, reference_to_prediction = surface_distances(prediction, reference, SPACING)
    assert np.percentile(reference_to_prediction, 95) == 0.0
    expected = np.percentile(prediction_to_reference, 95)
    assert expected > np.percentile(np.concatenate([prediction_to_reference, reference_to_prediction]), 95)
    assert hausdorff_distance_95(prediction, reference, SPACING) == pytest.approx(expected)


def test_identical_masks_score_hd95_zero_and_nsd_one():
    z, y, x = np.ogrid[:15, :31, :33]
    sphere = ((z - 7) * 2.5) ** 2 + ((y - 15) * 0.8) ** 2 + ((x - 16) * 0.8) ** 2 <= 9.0**2
    assert hausdorff_distance_95(sphere, sphere, SPACING) == 0.0
    assert normalized_surface_dice(sphere, sphere, SPACING, tolerance_mm=0.0) == 1.0


def test_masks_further_apart_than_the_tolerance_score_nsd_zero():
    # Shift 9 > side 7: the facing surfaces are (9 - 7 + 1) * 2.5 = 7.5 mm apart.
    prediction, reference = shifted_cubes(9, axis=0)
    assert normalized_surface_dice(prediction, reference, SPACING, tolerance_mm=7.4) == 0.0
    assert normalized_surface_dice(prediction, reference, SPACING, tolerance_mm=7.5) > 0.0


def test_nsd_counts_surface_voxels_of_a_missed_island():
    # The prediction finds cube A (side 5) exactly and misses cube C (side 4) 30 mm away.
    reference = np.zeros((17, 19, 21), dtype=bool)
    reference[1:6, 2:7, 3:8] = True
    prediction = reference.copy()
    reference[13:17, 12:16, 15:19] = True
    surface_a, surface_c = 5**3 - 3**3, 4**3 - 2**3  # 98 and 56 voxels
    expected = 2 * surface_a / (2 * surface_a + surface_c)
    assert normalized_surface_dice(prediction, reference, SPACING, tolerance_mm=2.0) == pytest.approx(expected)


@pytest.mark.parametrize("shape, spacing, pad", [((9, 11, 13), SPACING, 0), ((9, 11, 13), SPACING, 4),
                                                 ((27, 31), (0.7, 1.3), 0), ((27, 31), (0.7, 1.3), 5)])
def test_matches_brute_force_on_random_blobs(shape, spacing, pad):
    """Against surfaces found by explicit neighbour checks and all pairwise distances; the padded
    variants move the masks off the image border, which the bounding-box crop must not notice."""
    prediction, reference = (np.pad(mask, pad) for mask in random_blobs(shape, seed=len(shape)))
    prediction_to_reference, reference_to_prediction = surface_distances(prediction, reference, spacing)
    np.testing.assert_allclose(prediction_to_reference, brute_force_distances(prediction, reference, spacing))
    np.testing.assert_allclose(reference_to_prediction, brute_force_distances(reference, prediction, spacing))

    directed = [brute_force_distances(prediction, reference, spacing),
                brute_force_distances(reference, prediction, spacing)]
    expected_hd95 = max(np.percentile(distances, 95) for distances in directed)
    assert 0 < expected_hd95  # the blobs differ, so the test can fail
    assert hausdorff_distance_95(prediction, reference, spacing) == pytest.approx(expected_hd95)
    pooled = np.concatenate(directed)
    expected_nsd = np.mean(pooled <= 1.5)
    assert 0 < expected_nsd < 1
    assert normalized_surface_dice(prediction, reference, spacing, tolerance_mm=1.5) == pytest.approx(expected_nsd)


def test_2d_shifted_square():
    reference = np.zeros((19, 23), dtype=bool)
    reference[3:11, 4:13] = True
    prediction = np.roll(reference, 4, axis=1)
    spacing = (0.7, 1.3)
    assert hausdorff_distance_95(prediction, reference, spacing) == pytest.approx(4 * 1.3)
    assert normalized_surface_dice(prediction, reference, spacing, tolerance_mm=5.3) == 1.0


def test_volumes_in_ml():
    reference = np.zeros((7, 9, 11), dtype=np.uint8)
    reference[1:4, 2:6, 3:8] = 1  # 3 * 4 * 5 = 60 voxels of 2.5 * 0.8 * 0.8 = 1.6 mm^3: 0.096 ml
    prediction = np.zeros_like(reference)
    prediction[1:2, 2:6, 3:8] = 1  # 20 voxels: 0.032 ml
    assert volume_ml(reference, SPACING) == pytest.approx(0.096)
    assert volume_difference_ml(prediction, reference, SPACING) == pytest.approx(0.032 - 0.096)
    assert volume_difference_ml(reference, prediction, SPACING) == pytest.approx(0.096 - 0.032)


def test_empty_mask_conventions():
    shape = (7, 9, 11)
    empty = np.zeros(shape, dtype=bool)
    voxel = empty.copy()
    voxel[3, 4, 5] = True
    diagonal = np.sqrt((7 * 2.5) ** 2 + (9 * 0.8) ** 2 + (11 * 0.8) ** 2)

    assert hausdorff_distance_95(empty, empty, SPACING) == 0.0
    assert normalized_surface_dice(empty, empty, SPACING, tolerance_mm=2.0) == 1.0
    for prediction, reference in ((empty, voxel), (voxel, empty)):  # missed, then hallucinated
        assert hausdorff_distance_95(prediction, reference, SPACING) == pytest.approx(diagonal)
        assert normalized_surface_dice(prediction, reference, SPACING, tolerance_mm=2.0) == 0.0
        with pytest.raises(ValueError, match="non-empty"):
            surface_distances(prediction, reference, SPACING)
    assert volume_ml(empty, SPACING) == 0.0
    assert volume_difference_ml(empty, voxel, SPACING) == pytest.approx(-1.6 / 1000)


def test_per_class_metrics_on_label_maps():
    prediction, reference = shifted_cubes(2, axis=0)
    reference[15:18, 15:18, 15:18] = 2  # class 2: found exactly
    prediction[15:18, 15:18, 15:18] = 2
    reference[0, 0, 0:4] = 3  # class 3: missed; class 4 absent from both
    metrics = surface_metrics_per_class(torch.from_numpy(prediction), torch.from_numpy(reference).long(),
                                        num_classes=5, spacing=SPACING, tolerance_mm=2.0)
    assert sorted(metrics) == [1, 2, 3, 4]
    assert metrics[1]["hd95_mm"] == pytest.approx(5.0)
    assert 0 < metrics[1]["nsd"] < 1
    assert metrics[1]["volume_ml"] == metrics[1]["reference_volume_ml"] == pytest.approx(343 * 1.6 / 1000)
    assert metrics[1]["volume_difference_ml"] == pytest.approx(0.0)
    assert metrics[2] == {"hd95_mm": 0.0, "nsd": 1.0, "volume_difference_ml": 0.0,
                          "volume_ml": pytest.approx(27 * 1.6 / 1000),
                          "reference_volume_ml": pytest.approx(27 * 1.6 / 1000)}
    diagonal = np.sqrt((21 * 2.5) ** 2 + (23 * 0.8) ** 2 + (25 * 0.8) ** 2)
    assert metrics[3]["hd95_mm"] == pytest.approx(diagonal)
    assert metrics[3]["nsd"] == 0.0
    assert metrics[3]["volume_difference_ml"] == pytest.approx(-4 * 1.6 / 1000)
    assert metrics[4] == {"hd95_mm": 0.0, "nsd": 1.0, "volume_difference_ml": 0.0,
                          "volume_ml": 0.0, "reference_volume_ml": 0.0}
    assert not np.isnan([value for scores in metrics.values() for value in scores.values()]).any()


def test_rejects_invalid_inputs():
    masks = np.ones((3, 4, 5), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        hausdorff_distance_95(masks, np.ones((3, 5, 4), dtype=bool), SPACING)
    with pytest.raises(ValueError, match="shape"):
        surface_metrics_per_class(np.zeros((3, 4)), np.zeros((4, 3)), num_classes=2, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="one per axis"):
        normalized_surface_dice(masks, masks, (1.0, 1.0), tolerance_mm=1.0)
    with pytest.raises(ValueError, match="one per axis"):
        volume_ml(masks, 1.0)
    with pytest.raises(ValueError, match="> 0"):
        surface_distances(masks, masks, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        normalized_surface_dice(masks, masks, SPACING, tolerance_mm=-1.0)
    with pytest.raises(ValueError, match="outside"):
        surface_metrics_per_class(np.full((3, 4), 2), np.zeros((3, 4)), num_classes=2, spacing=(1.0, 1.0))
