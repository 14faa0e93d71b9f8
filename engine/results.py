"""The files a segmentation run's final validation leaves in its run folder: ``metrics.json`` and
``dice_per_case.csv``."""

import json
from pathlib import Path

from engine.metrics import metric_key


def write_metrics(validation: dict, labels: dict[int, str], out: Path) -> None:
    """metrics.json (flat numeric keys) and dice_per_case.csv: for every validation case the Dice of
    each foreground class, its slice-averaged Dice (2D models, whose validation holds
    ``per_case_slice_averaged``), HD95 in mm and normalised surface Dice.

    Args:
        validation: ``{"scores": flat metrics, "per_case": {case: {class: dice}}, "surface_per_case":
            {case: {class: {"hd95_mm": ..., "nsd": ...}}}}``, optionally with
            ``"per_case_slice_averaged": {case: {class: dice}}``.
        labels: class index -> name, background included.
        out: the run folder.
    """
    (out / "metrics.json").write_text(json.dumps(validation["scores"], indent=2) + "\n")
    classes = [k for k in sorted(labels) if k > 0]
    slice_averaged = validation.get("per_case_slice_averaged")
    dice_columns = [metric_key(labels[k]) for k in classes]
    columns = dice_columns + ([f"slice_averaged_{name}" for name in dice_columns] if slice_averaged else [])
    columns += [metric_key(labels[k], metric) for metric in ("hd95", "nsd") for k in classes]
    rows = ["case," + ",".join(columns)]
    for case_id, dice in validation["per_case"].items():
        surface = validation["surface_per_case"][case_id]
        values = [dice[k] for k in classes]
        values += [slice_averaged[case_id][k] for k in classes] if slice_averaged else []
        values += [surface[k][key] for key in ("hd95_mm", "nsd") for k in classes]
        rows.append(case_id + "," + ",".join(f"{value:.6f}" for value in values))
    (out / "dice_per_case.csv").write_text("\n".join(rows) + "\n")
