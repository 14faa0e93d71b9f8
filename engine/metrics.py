"""Segmentation metrics on label maps (class indices), and the flat keys they are reported under."""

import numpy as np
import torch


def dice_per_class(
    prediction: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, num_classes: int
) -> dict[int, float]:
    """Dice of each foreground class 1 .. num_classes - 1 between two label maps.

    A class absent from both reference and prediction scores 1.0 (nothing to find, nothing found);
    absent from the reference but predicted scores 0.0. The result is never NaN, so means over cases
    stay defined.

    Args:
        prediction: integer class indices (*spatial), numpy or torch.
        reference: integer class indices (*spatial), same shape.
        num_classes: K, background included; values must lie in [0, K).

    Returns:
        {class index: Dice in [0, 1]} for classes 1 .. K - 1.
    """
    prediction = to_numpy(prediction)
    reference = to_numpy(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    prediction = prediction.astype(np.int64, copy=False).ravel()
    reference = reference.astype(np.int64, copy=False).ravel()
    for name, labels in (("prediction", prediction), ("reference", reference)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes}): {labels.min()}..{labels.max()}")

    # One pass over the voxels: confusion[r, p] counts voxels of reference class r predicted as p.
    confusion = np.bincount(reference * num_classes + prediction, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    dice = {}
    for k in range(1, num_classes):
        true_positives = confusion[k, k]
        reference_volume = confusion[k, :].sum()
        predicted_volume = confusion[:, k].sum()
        if reference_volume + predicted_volume == 0:
            dice[k] = 1.0
        else:
            dice[k] = float(2 * true_positives / (reference_volume + predicted_volume))
    return dice


def to_numpy(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """A label map from numpy or torch (any device) as a numpy array."""
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def metric_key(label_name: str, metric: str = "dice") -> str:
    """``<metric>_<label>`` (e.g. ``dice_liver``, ``hd95_liver``) with the label in lower case and
    spaces as underscores."""
    return f"{metric}_" + label_name.strip().lower().replace(" ", "_")


def surface_scores(surface_mean: dict[int, dict[str, float]], labels: dict[int, str]) -> dict[str, float]:
    """Flat ``hd95_<label>`` (mm) and ``nsd_<label>`` keys from ``evaluate(...)["surface_mean"]``."""
    return {metric_key(labels[k], name): values[key] for k, values in surface_mean.items()
            for name, key in (("hd95", "hd95_mm"), ("nsd", "nsd"))}


def slice_averaged_dice(prediction: np.ndarray, reference: np.ndarray, axis: int, num_classes: int) -> dict[int, float]:
    """Mean over the slices along `axis` of each slice's 2D Dice per foreground class (empty slices
    left empty score 1, as in `dice_per_class`)."""
    scores = [dice_per_class(np.take(prediction, index, axis=axis), np.take(reference, index, axis=axis), num_classes)
              for index in range(prediction.shape[axis])]
    return {k: float(np.mean([score[k] for score in scores])) for k in scores[0]}
