"""Steps shared by the 2D slice recipes (`train_atrium.py`, `train_lung.py`).

Each recipe keeps its own config and its epoch loop in sight; what they do the same way lives here:
reading and caching the volumes, the loss by name, the optimizer and schedule, volume-level
validation with its pictures, and the metrics files.
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from data.intensity import ct_window_statistics
from data.msd import DatasetError, read_msd_dataset
from data.preprocess import load_preprocessed_case, plan_preprocessing, preprocess_dataset, save_prediction
from data.splits import split_cases
from engine.logging import RunLogger
from engine.runtime import metric_key
from engine.slicewise import evaluate_slicewise, montage, save_montage
from losses import BCEDiceLoss, BCELoss, DiceCELoss, DiceLoss

LOSSES = ("dice", "bce", "bce_dice")


def prepare_volumes(data_dir: str | None, make_phantom: Callable[[Path], Path], cache_dir: str,
                    val_fraction: float, split_seed: int, fold: int | None, spacing: tuple[float, ...] | None,
                    hu_window: tuple[float, ...] | None, workers: int, logger: RunLogger):
    """Read the task folder (or generate the phantom), split by case, preprocess once into the cache.

    MRI channels are z-scored per volume; CT channels get the foundation's foreground statistics or,
    with `hu_window` (lower, upper), that fixed Hounsfield window mapped onto [-1, 1].

    Returns:
        dataset, plan, cache entry, training case ids, validation case ids.
    """
    cache_dir = Path(cache_dir)
    root = make_phantom(cache_dir / "synthetic") if data_dir is None else Path(data_dir)
    dataset = read_msd_dataset(root)
    case_ids = [case.case_id for case in dataset.cases]
    train_ids, val_ids = split_cases(case_ids, val_fraction, split_seed, fold)
    # Intensity statistics come from all labelled cases, as in train_liver3d.py, so folds share a cache.
    plan = plan_preprocessing(dataset, case_ids, target_spacing=spacing, workers=max(workers, 1))
    if hu_window is not None:
        if "ct" not in plan.channel_schemes:
            raise DatasetError(f"--hu-window needs a CT channel; {dataset.name} has {dataset.modality}.")
        statistics = [ct_window_statistics(*hu_window) if scheme == "ct" else values
                      for scheme, values in zip(plan.channel_schemes, plan.channel_statistics)]
        plan = dataclasses.replace(plan, channel_statistics=statistics)
    entry = preprocess_dataset(dataset, plan, cache_dir, case_ids, workers=max(workers, 1))
    logger.info(f"{dataset.name}: {len(train_ids)} training / {len(val_ids)} validation cases, "
                f"{len(dataset.modality)} channel(s) {dataset.modality}, classes {dataset.labels}, "
                f"spacing {plan.target_spacing} mm, cache {entry}")
    return dataset, plan, entry, train_ids, val_ids


def num_outputs(labels: dict[int, str]) -> int:
    """One sigmoid logit for a single foreground class (left atrium, tumour), else one per class."""
    return 1 if len(labels) == 2 else len(labels)


def build_loss(name: str, outputs: int) -> torch.nn.Module:
    """`dice` (soft Dice over the batch), `bce` (binary cross-entropy) or `bce_dice` (their sum; with
    several classes, cross-entropy + Dice)."""
    if name not in LOSSES:
        raise SystemExit(f"--loss {name}: choose one of {', '.join(LOSSES)}")
    if outputs == 1:
        # Batch Dice: a slice without the finding would otherwise score 0 however small its error.
        return {"dice": lambda: DiceLoss(batch_dice=True, activation="sigmoid"), "bce": BCELoss,
                "bce_dice": BCEDiceLoss}[name]()
    if name == "bce":
        raise SystemExit("--loss bce needs one foreground class; use dice or bce_dice for several.")
    return DiceLoss(batch_dice=True) if name == "dice" else DiceCELoss(batch_dice=True)


def validate_volumes(model, entry: Path, val_ids: list[str], labels: dict[int, str], outputs: int, axis: int,
                     image_size: tuple[int, int], fit: str, largest_component: bool, device: torch.device,
                     amp: bool, amp_dtype: torch.dtype, logger: RunLogger, epoch: int,
                     save_dir: Path | None = None) -> dict:
    """Volume-level validation: every slice predicted, stacked, 3D Dice per case and class.

    The first case's montage goes to TensorBoard; with `save_dir`, every prediction is written as
    NIfTI in its source geometry (it overlays the original scan in ITK-SNAP or 3D Slicer) and as a
    PNG montage.

    Returns:
        ``{"scores": flat metrics, "per_case": {case: {class: dice}}, "per_case_slice_averaged": ...}``;
        scores hold ``dice`` (mean 3D Dice of the foreground over cases; the mean over foreground
        classes when there are several), ``dice_<label>``, ``dice_mean`` and
        ``slice_averaged_dice`` (mean over slices, empty slices included: not a 3D figure).
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
    results = evaluate_slicewise(model, cases, outputs, axis, image_size, fit, device, amp, amp_dtype,
                                 largest_component=largest_component, on_prediction=on_prediction)
    per_class = {metric_key(labels[k]): v for k, v in results["mean"].items()}
    scores = {"dice": float(np.mean(list(per_class.values()))), **per_class,
              "dice_mean": float(np.mean(list(per_class.values()))),
              "slice_averaged_dice": float(np.mean(list(results["slice_averaged"].values())))}
    logger.scalars(scores, epoch, prefix="val/")
    logger.info("validation (3D Dice per case, mean): " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return {"scores": scores, "per_case": results["per_case"],
            "per_case_slice_averaged": results["per_case_slice_averaged"]}


def write_metrics(validation: dict, labels: dict[int, str], out: Path) -> None:
    """metrics.json (flat numeric keys) and dice_per_case.csv (3D Dice per class, then the
    slice-averaged Dice per class, of every validation case)."""
    (out / "metrics.json").write_text(json.dumps(validation["scores"], indent=2) + "\n")
    classes = [k for k in sorted(labels) if k > 0]
    names = [metric_key(labels[k]) for k in classes]
    rows = ["case," + ",".join(names) + "," + ",".join(f"slice_averaged_{name}" for name in names)]
    for case_id, dice in validation["per_case"].items():
        slice_averaged = validation["per_case_slice_averaged"][case_id]
        rows.append(case_id + "," + ",".join(f"{dice[k]:.6f}" for k in classes) + ","
                    + ",".join(f"{slice_averaged[k]:.6f}" for k in classes))
    (out / "dice_per_case.csv").write_text("\n".join(rows) + "\n")
