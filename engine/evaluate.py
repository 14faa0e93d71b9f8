"""Validation on whole volumes: each case predicted whole, then Dice (and HD95, NSD) per case and class.

A 3D model predicts a volume with a sliding window (`evaluate`). A 2D model is judged on what a
clinician would use, the stacked 3D segmentation (`evaluate_slicewise`): Dice is computed per case
on the whole volume (`engine/metrics.py`'s convention: a class absent from reference and prediction
scores 1, so no NaN). The slice-averaged Dice (the mean over every slice of its 2D Dice, empty
slices included) is reported beside it and labelled as such: it is higher wherever most slices are
empty and correctly left empty, so it must not be compared with 3D figures.

`validate_volumes` is the validation of the 2D recipes (`train_atrium.py`, `train_lung.py`) over the
cached validation cases: flat scores logged, montages drawn, predictions written in source geometry.
"""

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.preprocess import load_preprocessed_case, save_prediction
from engine.inference import default_window_batch_size, sliding_window_inference
from engine.logging import RunLogger
from engine.metrics import dice_per_class, metric_key, slice_averaged_dice, surface_scores
from engine.pictures import montage, save_montage
from engine.postprocess import keep_largest_component_per_class
from engine.slicewise import predict_volume_slicewise
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


@torch.inference_mode()
def evaluate_slicewise(model, cases: Iterable[tuple[str, np.ndarray, np.ndarray]], *, num_classes: int, axis: int,
                       image_size: tuple[int, int], fit: str, device: torch.device,
                       amp_dtype: torch.dtype | None, keep_largest_component: bool = False, batch_size: int = 16,
                       on_prediction: Callable | None = None, spacing: Sequence[float] | None = None,
                       tolerance_mm: float = 2.0, progress: bool = True) -> dict:
    """Predict every validation case slice by slice and score the stacked volumes.

    Args:
        cases: (case_id, image (C, Z, Y, X), label (Z, Y, X)) on the preprocessed grid.
        num_classes: model outputs (1 = one sigmoid logit for a binary task).
        keep_largest_component: post-process with `keep_largest_component_per_class`.
        on_prediction: called as ``on_prediction(case_id, image, label, prediction)``.
        spacing: voxel size (z, y, x) in mm; given, the stacked volumes are also scored with HD95,
            normalised surface Dice at ``tolerance_mm`` and volumes (`engine/surface_metrics.py`).

    Returns:
        ``{"per_case": {case_id: {class: 3D dice}}, "mean": {class: mean 3D dice},
        "per_case_slice_averaged": {case_id: {class: slice-averaged dice}},
        "slice_averaged": {class: its mean over cases}}``, with ``spacing`` also
        ``"surface_per_case"`` and ``"surface_mean"`` as in `engine.evaluate.evaluate`.
    """
    model.eval()
    label_classes = max(num_classes, 2)
    per_case, slice_averaged, surface = {}, {}, {}
    for case_id, image, label in tqdm(list(cases), desc="validate", leave=False, disable=not progress):
        prediction = predict_volume_slicewise(model, image, axis=axis, image_size=image_size, fit=fit,
                                              num_classes=num_classes, device=device, amp_dtype=amp_dtype,
                                              batch_size=batch_size)
        if keep_largest_component:
            prediction = keep_largest_component_per_class(prediction, label_classes)
        label = np.asarray(label)
        per_case[case_id] = dice_per_class(prediction, label, label_classes)
        slice_averaged[case_id] = slice_averaged_dice(prediction, label, axis, label_classes)
        if spacing is not None:
            surface[case_id] = surface_metrics_per_class(prediction, label, label_classes, spacing, tolerance_mm)
        if on_prediction is not None:
            on_prediction(case_id, image, label, prediction)
    classes = sorted(next(iter(per_case.values())))
    results = {
        "per_case": per_case,
        "mean": {k: float(np.mean([scores[k] for scores in per_case.values()])) for k in classes},
        "per_case_slice_averaged": slice_averaged,
        "slice_averaged": {k: float(np.mean([scores[k] for scores in slice_averaged.values()])) for k in classes},
    }
    if spacing is not None:
        results.update(surface_per_case=surface, surface_mean=mean_surface_metrics(surface))
    return results


def validate_volumes(model, entry: Path, val_ids: list[str], *, labels: dict[int, str], outputs: int, axis: int,
                     image_size: tuple[int, int], fit: str, keep_largest_component: bool, spacing: tuple[float, ...],
                     tolerance_mm: float, device: torch.device, amp_dtype: torch.dtype | None,
                     logger: RunLogger, epoch: int, save_dir: Path | None = None) -> dict:
    """Volume-level validation: every slice predicted, stacked, 3D Dice, HD95 and normalised surface
    Dice (at ``tolerance_mm``, on the grid of ``spacing`` mm) per case and class.

    The first case's montage goes to TensorBoard; with `save_dir`, every prediction is written as
    NIfTI in its source geometry (it overlays the original scan in ITK-SNAP or 3D Slicer) and as a
    PNG montage.

    Returns:
        ``{"scores": flat metrics, "per_case": {case: {class: dice}}, "per_case_slice_averaged": ...}``;
        scores hold ``dice`` (mean 3D Dice of the foreground over cases; the mean over foreground
        classes when there are several), ``dice_<label>``, ``dice_mean``, ``slice_averaged_dice``
        (mean over slices, empty slices included: not a 3D figure), ``hd95_<label>`` (mm) and
        ``nsd_<label>``.
    """
    def on_prediction(case_id, image, label, prediction):
        if case_id == val_ids[0] or save_dir is not None:
            picture = montage(image, label, prediction, axis=axis)
            if case_id == val_ids[0]:
                logger.image(f"val/{case_id}", picture, epoch)
            if save_dir is not None:
                save_montage(picture, save_dir / f"{case_id}.png")
                save_prediction(prediction, load_preprocessed_case(entry, case_id).properties,
                                save_dir / f"{case_id}.nii.gz")

    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    cases = ((case_id, np.asarray(case.image), np.asarray(case.label)) for case_id in val_ids
             for case in [load_preprocessed_case(entry, case_id)])
    results = evaluate_slicewise(model, cases, num_classes=outputs, axis=axis, image_size=image_size, fit=fit,
                                 device=device, amp_dtype=amp_dtype, keep_largest_component=keep_largest_component,
                                 on_prediction=on_prediction, spacing=spacing, tolerance_mm=tolerance_mm)
    per_class = {metric_key(labels[k]): v for k, v in results["mean"].items()}
    scores = {"dice": float(np.mean(list(per_class.values()))), **per_class,
              "dice_mean": float(np.mean(list(per_class.values()))),
              "slice_averaged_dice": float(np.mean(list(results["slice_averaged"].values()))),
              **surface_scores(results["surface_mean"], labels)}
    logger.scalars(scores, epoch, prefix="val/")
    logger.info("validation (3D Dice per case, mean): " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return {"scores": scores, "per_case": results["per_case"],
            "per_case_slice_averaged": results["per_case_slice_averaged"],
            "surface_per_case": results["surface_per_case"]}
