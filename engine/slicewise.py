"""Volume-level evaluation of a 2D model: predict every slice, stack, score the volume in 3D.

A 2D network is judged on what a clinician would use, the stacked 3D segmentation: Dice is computed
per case on the whole volume (`engine/metrics.py`'s convention: a class absent from reference and
prediction scores 1, so no NaN). The slice-averaged Dice (the mean over every slice of its 2D Dice,
empty slices included) is reported beside it and labelled as such: it is higher wherever most slices
are empty and correctly left empty, so it must not be compared with 3D figures.

Slices are fitted to the network exactly as in training (`data/augment2d.py`'s coordinate map):
"resize" resamples the whole slice to the network's size and the probabilities back to the slice's
grid; "crop" tiles the full-resolution slice with a sliding window.

`validate_volumes` is the validation of the 2D recipes (`train_atrium.py`, `train_lung.py`) over the
cached validation cases: flat scores logged, montages drawn, predictions written in source geometry.
"""

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from data.augment2d import SpatialTransform2D, fit_scale, make_coordinate_map_2d
from data.preprocess import load_preprocessed_case, save_prediction
from engine.inference import copy_to_device, sliding_window_inference
from engine.logging import RunLogger, overlay_slice
from engine.metrics import dice_per_class
from engine.postprocess import keep_largest_component_per_class
from engine.runtime import metric_key, surface_scores
from engine.surface_metrics import mean_surface_metrics, surface_metrics_per_class


def _normalised_grid(coordinates: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
    """(2, H, W) pixel coordinates (row, column) -> (1, H, W, 2) grid_sample grid (x, y) in [-1, 1]."""
    rows = 2 * coordinates[0] / max(input_size[0] - 1, 1) - 1
    columns = 2 * coordinates[1] / max(input_size[1] - 1, 1) - 1
    return torch.from_numpy(np.stack([columns, rows], axis=-1)[None].astype(np.float32))


def _resize_probabilities(predict: Callable, slices: torch.Tensor, image_size: tuple[int, int],
                          num_classes: int, fill: torch.Tensor) -> torch.Tensor:
    """Probabilities (S, K, H_in, W_in) of slices (S, C, H_in, W_in) fitted by resizing (aspect kept)."""
    input_size = tuple(slices.shape[2:])
    forward = _normalised_grid(make_coordinate_map_2d(image_size, input_size, SpatialTransform2D(), "resize"),
                               input_size).to(slices.device).expand(len(slices), -1, -1, -1)
    fill = fill.view(1, -1, 1, 1)
    # Outside the slice the network saw each channel's background value in training, not zeros.
    fitted = F.grid_sample(slices - fill, forward, mode="bilinear", padding_mode="zeros", align_corners=True) + fill
    logits = predict(fitted).float()
    probabilities = torch.sigmoid(logits) if num_classes == 1 else torch.softmax(logits, dim=1)
    # Back to the slice grid: each slice pixel sits at (p - centre) / scale + output centre.
    factor = fit_scale(input_size, image_size, "resize")
    back = [((np.arange(size_in) - (size_in - 1) / 2) / factor + (size_out - 1) / 2).astype(np.float32)
            for size_in, size_out in zip(input_size, image_size)]
    inverse = _normalised_grid(np.stack(np.meshgrid(*back, indexing="ij")), image_size)
    inverse = inverse.to(slices.device).expand(len(slices), -1, -1, -1)
    return F.grid_sample(probabilities, inverse, mode="bilinear", padding_mode="border", align_corners=True)


def num_outputs(labels: dict[int, str]) -> int:
    """Logits of a 2D recipe's U-Net: one sigmoid logit for a single foreground class (left atrium,
    tumour), else one per class, background included."""
    return 1 if len(labels) == 2 else len(labels)


@torch.inference_mode()
def predict_volume_slicewise(model, image: np.ndarray, *, axis: int, image_size: tuple[int, int], fit: str,
                             num_classes: int, device: torch.device, amp_dtype: torch.dtype | None,
                             batch_size: int = 16) -> np.ndarray:
    """Label map of a preprocessed volume, predicted one slice at a time along `axis`.

    Args:
        image: (C, Z, Y, X) float32 on the preprocessed grid.
        axis: spatial axis of the slices (0 = z).
        num_classes: model outputs; 1 means one sigmoid logit (foreground where > 0.5).

    Returns:
        (Z, Y, X) uint8 class indices.
    """
    def predict(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(batch)

    volume = torch.from_numpy(np.moveaxis(np.asarray(image, dtype=np.float32), axis + 1, 0).copy())  # (S, C, H, W)
    fill = volume.transpose(0, 1).flatten(1).amin(1).to(device)  # (C,) each channel's background value
    predicted = []
    for first in range(0, len(volume), batch_size):
        slices = copy_to_device(volume[first:first + batch_size], device)
        if fit == "resize":
            probabilities = _resize_probabilities(predict, slices, image_size, num_classes, fill)
        else:
            probabilities = torch.stack([sliding_window_inference(one, predict, patch_size=image_size,
                                                                  num_classes=num_classes, overlap=0.25,
                                                                  batch_size=batch_size)
                                         for one in slices])
        if num_classes == 1:
            predicted.append((probabilities[:, 0] > 0.5).to(torch.uint8).cpu())
        else:
            predicted.append(probabilities.argmax(1).to(torch.uint8).cpu())
    return np.moveaxis(torch.cat(predicted).numpy(), 0, axis)


def slice_averaged_dice(prediction: np.ndarray, reference: np.ndarray, axis: int, num_classes: int) -> dict[int, float]:
    """Mean over the slices along `axis` of each slice's 2D Dice per foreground class (empty slices
    left empty score 1, as in `dice_per_class`)."""
    scores = [dice_per_class(np.take(prediction, index, axis=axis), np.take(reference, index, axis=axis), num_classes)
              for index in range(prediction.shape[axis])]
    return {k: float(np.mean([score[k] for score in scores])) for k in scores[0]}


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
            picture = montage(image, label, prediction, axis)
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


def montage(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, axis: int, num_slices: int = 8,
            columns: int = 4) -> np.ndarray:
    """Slices of a case side by side: image in grey, reference outlines green, prediction red.

    Slices are spread evenly over those holding reference or predicted foreground (over the whole
    volume when there is none), so the picture shows where the model is right and wrong.

    Args:
        image: (C, Z, Y, X); the first channel is drawn.
        label, prediction: (Z, Y, X) label maps.

    Returns:
        (rows * H, columns * W, 3) uint8.
    """
    occupied = np.flatnonzero(np.logical_or(label > 0, prediction > 0).any(
        axis=tuple(a for a in range(3) if a != axis)))
    candidates = occupied if len(occupied) else np.arange(label.shape[axis])
    chosen = candidates[np.unique(np.linspace(0, len(candidates) - 1, num_slices).round().astype(int))]
    tiles = [overlay_slice(np.take(image[0], index, axis=axis), np.take(label, index, axis=axis),
                           np.take(prediction, index, axis=axis)) for index in chosen]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    height, width = tiles[0].shape[:2]
    canvas = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for number, tile in enumerate(tiles):
        row, column = divmod(number, columns)
        canvas[row * height:(row + 1) * height, column * width:(column + 1) * width] = tile
    return canvas


def save_montage(picture: np.ndarray, path: str | Path) -> None:
    """Write an (H, W, 3) uint8 picture as PNG."""
    Image.fromarray(picture).save(path)
