"""The volumes the 2D recipes cut their slices from: a task folder in the Decathlon layout read, split
by patient and preprocessed once into the cache."""

import dataclasses
from pathlib import Path

from data.intensity import ct_window_statistics
from data.msd import DatasetError, MSDDataset, read_msd_dataset
from data.preprocess import PreprocessPlan, plan_preprocessing, preprocess_dataset
from data.splits import count_patients, split_cases
from engine.checkpoint import load_checkpoint
from engine.logging import RunLogger


def prepare_volumes(data_dir: str | Path, cache_dir: str | Path, logger: RunLogger, *, val_fraction: float,
                    split_seed: int, fold: int | None, patient_pattern: str, splits_file: str | None,
                    spacing: tuple[float, ...] | None = None, hu_window: tuple[float, ...] | None = None,
                    workers: int | None = None, resume: str | None = None
                    ) -> tuple[MSDDataset, PreprocessPlan, Path, list[str], list[str]]:
    """Read the task folder ``data_dir``, split by patient (`data/splits.py`: cases grouped by
    ``patient_pattern``, or fold ``fold`` of ``splits_file``), preprocess once into ``cache_dir``.

    MRI channels are z-scored per volume; CT channels get the foreground's intensity statistics or,
    with `hu_window` (lower, upper), that fixed Hounsfield window mapped onto [-1, 1]. A later start
    plans from the cached fingerprints and opens no scan unless one changed; a resumed run (`resume`,
    its checkpoint) keeps the plan its weights were trained with. `workers` none: preprocessing's own
    default (a full-resolution CT takes a few GB per process).

    Returns:
        dataset, plan, cache entry, training case ids, validation case ids.
    """
    cache_dir = Path(cache_dir)
    dataset = read_msd_dataset(Path(data_dir))
    case_ids = [case.case_id for case in dataset.cases]
    try:
        train_ids, val_ids = split_cases(case_ids, val_fraction, split_seed, fold, patient_pattern=patient_pattern,
                                         splits_file=splits_file)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    # Intensity statistics come from all labelled cases, as in train_liver3d.py, so folds share a cache.
    if resume:  # the plan the weights were trained with, its HU window included
        plan = PreprocessPlan.from_dict(load_checkpoint(resume)["plan"])
    else:
        plan = plan_preprocessing(dataset, case_ids, cache_dir=cache_dir, target_spacing=spacing, workers=workers)
        if hu_window is not None:
            if "ct" not in plan.channel_schemes:
                raise DatasetError(f"--hu-window needs a CT channel; {dataset.name} has {dataset.modality}.")
            statistics = [ct_window_statistics(*hu_window) if scheme == "ct" else values
                          for scheme, values in zip(plan.channel_schemes, plan.channel_statistics)]
            plan = dataclasses.replace(plan, channel_statistics=statistics)
    entry = preprocess_dataset(dataset, plan, cache_dir, case_ids, workers=workers)
    logger.info(f"{dataset.name}: {len(train_ids)} training / {len(val_ids)} validation cases "
                f"({count_patients(train_ids, patient_pattern)} / {count_patients(val_ids, patient_pattern)} patients), "
                f"{len(dataset.modality)} channel(s) {dataset.modality}, classes {dataset.labels}, "
                f"spacing {plan.target_spacing} mm, cache {entry}")
    return dataset, plan, entry, train_ids, val_ids
