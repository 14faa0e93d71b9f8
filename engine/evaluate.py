"""Validation on whole volumes: sliding-window prediction of each case, then Dice per case and class."""

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from engine.inference import sliding_window_inference
from engine.metrics import dice_per_class
from engine.surface_metrics import mean_surface_metrics, surface_metrics_per_class


def predict_volume(model, image: np.ndarray, *, roi_size: tuple[int, ...], num_classes: int,
                   device: torch.device, amp_dtype: torch.dtype | None, overlap: float = 0.5,
                   batch_size: int = 2, mirror_axes: tuple[int, ...] = ()) -> np.ndarray:
    """Label map of one preprocessed volume.

    Args:
        image: (C, *spatial) float32 on the preprocessed grid.
        amp_dtype: autocast dtype, None for full precision.
    Returns:
        (*spatial) uint8 class indices (for a single-logit model: probability > 0.5).
    """
    def predict(windows: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(windows)

    probabilities = sliding_window_inference(
        torch.tensor(np.asarray(image, dtype=np.float32)), predict, roi_size, num_classes,
        overlap=overlap, batch_size=batch_size, device=device,
        accumulate_device=_accumulation_device(image.shape[1:], num_classes, device),
        mirror_axes=mirror_axes)
    if num_classes == 1:
        return (probabilities[0] > 0.5).to(torch.uint8).cpu().numpy()
    return probabilities.argmax(0).to(torch.uint8).cpu().numpy()


def _accumulation_device(spatial_shape, num_classes: int, device: torch.device) -> torch.device:
    """Accumulate on the GPU when the float32 buffers (probabilities + weights) take under a
    quarter of its free memory, else in host memory: a 512x512x900 CT with 3 classes is ~4 GB."""
    if device.type != "cuda":
        return device
    needed = 4 * (num_classes + 1) * int(np.prod(spatial_shape))
    free, _ = torch.cuda.mem_get_info(device)
    return device if needed < free / 4 else torch.device("cpu")


@torch.inference_mode()
def evaluate(model, cases: Iterable[tuple[str, np.ndarray, np.ndarray]], *, num_classes: int,
             roi_size: tuple[int, ...], device: torch.device, amp_dtype: torch.dtype | None,
             overlap: float = 0.5, batch_size: int = 2, mirror_axes: tuple[int, ...] = (),
             postprocess: Callable | None = None, on_prediction: Callable | None = None,
             spacing: Sequence[float] | None = None, tolerance_mm: float = 2.0, progress: bool = True) -> dict:
    """Predict every validation case whole and score it.

    Args:
        cases: (case_id, image (C, *spatial), label (*spatial)) on the preprocessed grid.
        num_classes: number of model outputs (background included).
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
        prediction = predict_volume(model, image, roi_size=roi_size, num_classes=num_classes, device=device,
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
