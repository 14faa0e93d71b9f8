"""Validation on whole volumes: sliding-window prediction of each case, then Dice per case and class."""

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from engine.inference import default_window_batch_size, sliding_window_inference
from engine.metrics import dice_per_class
from engine.surface_metrics import mean_surface_metrics, surface_metrics_per_class


def predict_volume(model, image: np.ndarray, *, patch_size: tuple[int, ...], num_classes: int,
                   device: torch.device, amp_dtype: torch.dtype | None, overlap: float = 0.5,
                   batch_size: int | None = None, mirror_axes: tuple[int, ...] = ()) -> np.ndarray:
    """Label map of one preprocessed volume.

    Args:
        image: (C, *spatial) float32 on the preprocessed grid (e.g. a memory map, read once).
        amp_dtype: autocast dtype, None for full precision.
        batch_size: windows per forward pass; None for `default_window_batch_size`.
    Returns:
        (*spatial) uint8 class indices (for a single-logit model: probability > 0.5).
    """
    def predict(windows: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(windows)

    if batch_size is None:
        batch_size = default_window_batch_size(device, patch_size)
    try:
        probabilities = sliding_window_inference(image, predict, patch_size=patch_size, num_classes=num_classes,
                                                 overlap=overlap, batch_size=batch_size, device=device,
                                                 mirror_axes=mirror_axes)
        if num_classes == 1:
            return (probabilities[0] > 0.5).to(torch.uint8).cpu().numpy()
        return probabilities.argmax(0).to(torch.uint8).cpu().numpy()
    except torch.OutOfMemoryError as error:
        raise SystemExit(f"Out of {device} memory predicting a volume of {tuple(image.shape)} in batches of "
                         f"{batch_size} windows of {tuple(patch_size)}: lower the window batch size "
                         f"(--window-batch-size), or turn on --amp. ({error})") from error


@torch.inference_mode()
def evaluate(model, cases: Iterable[tuple[str, np.ndarray, np.ndarray]], *, num_classes: int,
             patch_size: tuple[int, ...], device: torch.device, amp_dtype: torch.dtype | None,
             overlap: float = 0.5, batch_size: int | None = None, mirror_axes: tuple[int, ...] = (),
             postprocess: Callable | None = None, on_prediction: Callable | None = None,
             spacing: Sequence[float] | None = None, tolerance_mm: float = 2.0, progress: bool = True) -> dict:
    """Predict every validation case whole and score it.

    Args:
        cases: (case_id, image (C, *spatial), label (*spatial)) on the preprocessed grid.
        num_classes: number of model outputs (background included).
        batch_size: windows per forward pass; None for `default_window_batch_size`.
        mirror_axes: spatial axes to mirror for test-time augmentation (`trained_flips` gives the
            axes the model was trained to flip).
        postprocess: applied to each predicted label map before scoring, e.g. ``keep_largest_foreground``.
        on_prediction: called as ``on_prediction(case_id, image, label, prediction)``, e.g. to save
            the prediction or draw an overlay.
        spacing: voxel size in mm of the preprocessed grid; given, each case is also scored with
            HD95, normalised surface Dice at ``tolerance_mm`` and volumes (`engine/surface_metrics.py`).
    Returns:
        ``{"per_case": {case_id: {class: dice}}, "mean": {class: dice}}``, with ``spacing`` also
        ``"surface_per_case": {case_id: {class: {metric: value}}}`` and ``"surface_mean": {class:
        {metric: mean}}``. Dice follows ``dice_per_class``: a class absent from reference and
        prediction scores 1, absent from the reference only 0, so the means never hold NaN.
    """
    model.eval()
    per_case, surface = {}, {}
    for case_id, image, label in tqdm(list(cases), desc="validate", leave=False, disable=not progress):
        prediction = predict_volume(model, image, patch_size=patch_size, num_classes=num_classes, device=device,
                                    amp_dtype=amp_dtype, overlap=overlap, batch_size=batch_size,
                                    mirror_axes=mirror_axes)
        if postprocess is not None:
            prediction = postprocess(prediction)
        label = np.asarray(label)
        per_case[case_id] = dice_per_class(prediction, label, max(num_classes, 2))
        if spacing is not None:
            surface[case_id] = surface_metrics_per_class(prediction, label, max(num_classes, 2), spacing, tolerance_mm)
        if on_prediction is not None:
            on_prediction(case_id, image, label, prediction)
    classes = sorted({k for scores in per_case.values() for k in scores})
    mean = {k: float(np.mean([scores[k] for scores in per_case.values()])) for k in classes}
    results = {"per_case": per_case, "mean": mean}
    if spacing is not None:
        results.update(surface_per_case=surface, surface_mean=mean_surface_metrics(surface))
    return results
