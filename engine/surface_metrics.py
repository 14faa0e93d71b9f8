"""Boundary and volume metrics in millimetres for binary masks of one class (2D or 3D).

Dice rewards overlap but hardly notices a thin wrong rim or a stray island far from the organ;
the surface metrics below measure where the boundary lies, in mm, using the voxel ``spacing``
(one value per array axis, in the arrays' own axis order, e.g. ``(z, y, x)``).

Definitions, those of MONAI's ``compute_hausdorff_distance(percentile=95)`` and
``compute_surface_dice`` (with its default of counting boundary voxels), so our figures compare with
papers that report MONAI's or DeepMind's ``surface-distance`` values:

- surface voxels are the voxels of a mask with at least one of their ``2 * ndim`` face neighbours
  outside the mask (face connectivity, scipy's default erosion). The image border counts as outside,
  so an organ cut by the field of view has a surface where it is cut.
- HD95 is the larger of the two directed 95th percentiles (numpy's linear interpolation) of the
  surface distances, prediction -> reference and reference -> prediction: a prediction that is good
  one way but misses a part of the reference the other way is not averaged away.
- NSD counts surface voxels: every surface voxel weighs the same, where Nikolov et al. 2021
  (arXiv:1809.04430) and ``surface-distance`` weigh each surface element by its area.

Empty masks follow the Dice convention of ``engine.metrics.dice_per_class``, and no function returns NaN,
so means over cases stay defined:

- prediction and reference both empty: HD95 0.0 mm, NSD 1.0 (nothing to find, nothing found).
- exactly one empty: NSD 0.0, and HD95 is the diagonal of the image extent,
  ``sqrt(sum((shape * spacing) ** 2))`` mm. It is longer than any distance between two voxels of the
  image, so a missed or hallucinated structure always scores worse than any structure found in it.
  The penalty depends on the image size: compare such cases only within one data set.
- volumes of an empty mask are 0.0 ml.
"""

import numpy as np
import torch
from scipy import ndimage

from engine.metrics import to_numpy


def surface_distances(
    prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, spacing
) -> tuple[np.ndarray, np.ndarray]:
    """Distance in mm from each surface voxel of one mask to the nearest surface voxel of the other.

    Args:
        prediction: binary mask (*spatial), numpy or torch; nonzero is foreground.
        reference: binary mask (*spatial), same shape.
        spacing: voxel size in mm, one value per axis of the masks.

    Returns:
        (prediction_to_reference, reference_to_prediction): float64 arrays with one distance per
        surface voxel of the prediction (resp. reference), in C order of the voxel positions.

    Raises:
        ValueError: on mismatched shapes or spacing, or when either mask is empty (the distances
        are then undefined; see the module docstring for how the metrics score that case).
    """
    prediction, reference, spacing = _check_masks(prediction, reference, spacing)
    if not prediction.any() or not reference.any():
        raise ValueError("surface distances need a non-empty prediction and reference")
    # Every surface voxel, and hence every nearest partner, lies in the joint bounding box: cropping
    # to it changes no distance but saves most of the work on a CT of 512 x 512 x several hundred.
    crop = _joint_bounding_box(prediction, reference)
    prediction_surface = _surface(prediction[crop])
    reference_surface = _surface(reference[crop])
    # distance_transform_edt measures the distance to the nearest zero, hence the inverted surfaces.
    distance_to_reference = ndimage.distance_transform_edt(~reference_surface, sampling=spacing)
    distance_to_prediction = ndimage.distance_transform_edt(~prediction_surface, sampling=spacing)
    return distance_to_reference[prediction_surface], distance_to_prediction[reference_surface]


def hausdorff_distance_95(
    prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, spacing
) -> float:
    """95th percentile Hausdorff distance (HD95) in mm between two binary masks.

    Definition used: the larger of the two directed 95th percentiles (numpy's default linear
    interpolation) of the surface distances, prediction -> reference and reference -> prediction, as
    MONAI's ``compute_hausdorff_distance(percentile=95)`` and DeepMind's ``surface-distance``.
    ``medpy.metric.binary.hd95`` pools both directions before taking one percentile instead, which
    gives a smaller value when one direction holds most of the large distances.

    Args:
        prediction: binary mask (*spatial), numpy or torch.
        reference: binary mask (*spatial), same shape.
        spacing: voxel size in mm, one value per axis.

    Returns:
        HD95 in mm: 0.0 when both masks are empty, the image diagonal when exactly one is.
    """
    prediction, reference, spacing = _check_masks(prediction, reference, spacing)
    hd95, _ = _surface_scores(prediction, reference, spacing, tolerance_mm=0.0)
    return hd95


def normalized_surface_dice(
    prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, spacing, tolerance_mm: float
) -> float:
    """Normalized surface Dice (NSD, surface Dice at a tolerance) between two binary masks.

    NSD = (surface voxels of the prediction within ``tolerance_mm`` of the reference surface
    + surface voxels of the reference within ``tolerance_mm`` of the prediction surface)
    / (all surface voxels of both), as MONAI's ``compute_surface_dice`` with its default
    ``use_subvoxels=False``. Counting voxels approximates Nikolov et al. 2021 (arXiv:1809.04430), who
    weight each surface element by its area: values can differ somewhat from theirs, most with
    strongly anisotropic spacing.

    Args:
        prediction: binary mask (*spatial), numpy or torch.
        reference: binary mask (*spatial), same shape.
        spacing: voxel size in mm, one value per axis.
        tolerance_mm: boundary error accepted as correct, e.g. the inter-rater variation of the
            structure; a distance equal to it counts as within.

    Returns:
        NSD in [0, 1]: 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    prediction, reference, spacing = _check_masks(prediction, reference, spacing)
    _, nsd = _surface_scores(prediction, reference, spacing, tolerance_mm)
    return nsd


def volume_ml(mask: np.ndarray | torch.Tensor, spacing) -> float:
    """Volume of a binary mask in millilitres: voxel count x voxel volume (mm^3) / 1000."""
    mask = to_numpy(mask).astype(bool, copy=False)
    spacing = _check_spacing(spacing, mask.ndim)
    return float(np.count_nonzero(mask) * np.prod(spacing) / 1000)


def volume_difference_ml(
    prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, spacing
) -> float:
    """Predicted minus reference volume in millilitres: positive when the prediction is too large."""
    prediction, reference, spacing = _check_masks(prediction, reference, spacing)
    return volume_ml(prediction, spacing) - volume_ml(reference, spacing)


def surface_metrics_per_class(
    prediction_labels: np.ndarray | torch.Tensor,
    reference_labels: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing,
    tolerance_mm: float = 2.0,
) -> dict[int, dict[str, float]]:
    """Surface and volume metrics of each foreground class 1 .. num_classes - 1 between two label maps.

    Args:
        prediction_labels: integer class indices (*spatial), numpy or torch.
        reference_labels: integer class indices (*spatial), same shape.
        num_classes: K, background included; values must lie in [0, K).
        spacing: voxel size in mm, one value per axis.
        tolerance_mm: NSD tolerance; the 2 mm default suits organs on CT at ~1 mm in-plane spacing.

    Returns:
        {class index: {"hd95_mm", "nsd", "volume_difference_ml" (predicted - reference),
        "volume_ml" (predicted), "reference_volume_ml"}}, never NaN (see the module docstring).
    """
    prediction_labels = to_numpy(prediction_labels)
    reference_labels = to_numpy(reference_labels)
    if prediction_labels.shape != reference_labels.shape:
        raise ValueError(
            f"prediction shape {prediction_labels.shape} differs from reference shape {reference_labels.shape}"
        )
    for name, labels in (("prediction", prediction_labels), ("reference", reference_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes}): {labels.min()}..{labels.max()}")
    spacing = _check_spacing(spacing, prediction_labels.ndim)

    metrics = {}
    for k in range(1, num_classes):
        prediction = prediction_labels == k
        reference = reference_labels == k
        hd95, nsd = _surface_scores(prediction, reference, spacing, tolerance_mm)
        predicted_ml = volume_ml(prediction, spacing)
        reference_ml = volume_ml(reference, spacing)
        metrics[k] = {
            "hd95_mm": hd95,
            "nsd": nsd,
            "volume_difference_ml": predicted_ml - reference_ml,
            "volume_ml": predicted_ml,
            "reference_volume_ml": reference_ml,
        }
    return metrics



def mean_surface_metrics(per_case: dict[str, dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """Mean of each metric over cases: ``{case: {class: {metric: value}}}`` -> ``{class: {metric: mean}}``.
    Every value is finite by the conventions above, so the means are too."""
    cases = list(per_case.values())
    return {k: {metric: float(np.mean([case[k][metric] for case in cases])) for metric in cases[0][k]}
            for k in cases[0]}

def _surface_scores(
    prediction: np.ndarray, reference: np.ndarray, spacing: np.ndarray, tolerance_mm: float
) -> tuple[float, float]:
    """(HD95 in mm, NSD) of two checked boolean masks from one pair of distance transforms, with the
    empty-mask conventions of the module docstring kept in this one place."""
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be a finite distance >= 0, got {tolerance_mm}")
    prediction_empty = not prediction.any()
    reference_empty = not reference.any()
    if prediction_empty and reference_empty:
        return 0.0, 1.0
    if prediction_empty or reference_empty:
        return _image_diagonal_mm(prediction.shape, spacing), 0.0
    prediction_to_reference, reference_to_prediction = surface_distances(prediction, reference, spacing)
    hd95 = max(float(np.percentile(prediction_to_reference, 95)), float(np.percentile(reference_to_prediction, 95)))
    distances = np.concatenate([prediction_to_reference, reference_to_prediction])
    nsd = float(np.count_nonzero(distances <= tolerance_mm) / distances.size)
    return hd95, nsd


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of a boolean mask with a face neighbour outside it or the image."""
    face_connectivity = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=face_connectivity, border_value=0)


def _joint_bounding_box(prediction: np.ndarray, reference: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of both (non-empty) masks plus a 1-voxel margin, clipped to the image.

    The margin keeps the background next to each mask inside the crop, so the erosion that finds the
    surface sees the same neighbourhood as on the whole image; where the box reaches the image border
    the erosion's zero border stands in for the outside, as it does on the whole image.
    """
    (box,) = ndimage.find_objects((prediction | reference).astype(np.uint8))
    return tuple(slice(max(s.start - 1, 0), min(s.stop + 1, size)) for s, size in zip(box, prediction.shape))


def _image_diagonal_mm(shape: tuple[int, ...], spacing: np.ndarray) -> float:
    """Diagonal of the image extent (shape x spacing) in mm: the HD95 penalty for a one-sided empty mask."""
    return float(np.sqrt(np.sum((np.asarray(shape) * spacing) ** 2)))


def _check_masks(
    prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, spacing
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both masks as boolean numpy arrays of one shape, and the spacing as float64 (ndim,)."""
    prediction = to_numpy(prediction).astype(bool, copy=False)
    reference = to_numpy(reference).astype(bool, copy=False)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    return prediction, reference, _check_spacing(spacing, prediction.ndim)


def _check_spacing(spacing, ndim: int) -> np.ndarray:
    """The spacing as float64 (ndim,), after checking it holds one positive size per axis."""
    spacing = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if spacing.shape != (ndim,):
        raise ValueError(f"spacing {spacing.tolist()} has {spacing.size} values for a {ndim}D mask; give one per axis")
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing {spacing.tolist()} must hold finite voxel sizes > 0 mm")
    return spacing
