"""Train/validation splits by patient, never by case, slice or patch, so no patient is in both.

A patient may own several cases (ACDC's end-diastolic and end-systolic frames, `acdc_<patient>_f<frame>`):
a regular expression over the case ids names each case's patient, and whole patients are split. Or the
split is read from nnU-Net's `splits_final.json`, to compare with its folds case for case.
"""

import json
import math
import re
from pathlib import Path

import numpy as np

# Group 1 is the patient: `<patient>_f<frame>` and `<patient>_frame<N>` (cardiac phases, ACDC);
# ids it does not match (`liver_7`) are each their own patient.
PATIENT_PATTERN = r"(.+?)_f(?:rame)?\d+"


def patient_of(case_id: str, patient_pattern: str = PATIENT_PATTERN) -> str:
    """The patient of a case: group 1 of ``patient_pattern`` matched against the whole id, or the id
    itself where it does not match (an empty pattern makes every case its own patient)."""
    match = re.fullmatch(patient_pattern, case_id) if patient_pattern else None
    return match.group(1) if match else case_id


def split_cases(case_ids: list[str], val_fraction: float, seed: int, fold: int | None = None,
                num_folds: int = 5, *, patient_pattern: str = PATIENT_PATTERN,
                splits_file: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Split case ids into (train, validation), whole patients on each side.

    With ``splits_file`` (nnU-Net's ``splits_final.json``) its fold ``fold`` is taken as written.
    Otherwise the patients (``patient_of``) are sorted, shuffled once with ``seed``, and either cut
    into ``num_folds`` parts of which part ``fold`` is the validation set (cross-validation, as
    nnU-Net does), or, without ``fold``, a seeded ``val_fraction`` of them, at least one, is held
    out. The result does not depend on the order in which the files were listed, and where every
    case is its own patient it is the split of the cases themselves.

    Returns:
        (training case ids, validation case ids), each sorted.
    """
    if splits_file is not None:
        return read_nnunet_split(splits_file, fold, case_ids)
    _check_pattern(patient_pattern)
    cases_of = {}
    for case_id in sorted(case_ids):
        cases_of.setdefault(patient_of(case_id, patient_pattern), []).append(case_id)
    patients = sorted(cases_of)
    if len(patients) < 2:
        raise ValueError(f"need at least 2 patients to hold one out for validation, found {len(patients)} "
                         f"({len(case_ids)} cases)")
    order = np.random.default_rng(seed).permutation(len(patients))
    shuffled = [patients[i] for i in order]
    if fold is not None:
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in 0..{num_folds - 1}, got {fold}")
        held_out = shuffled[fold::num_folds]
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        held_out = shuffled[:max(1, math.ceil(val_fraction * len(patients)))]
    validation = sorted(case_id for patient in held_out for case_id in cases_of[patient])
    held_out_cases = set(validation)
    return [case_id for case_id in sorted(case_ids) if case_id not in held_out_cases], validation


def count_patients(case_ids: list[str], patient_pattern: str = PATIENT_PATTERN) -> int:
    """How many patients own these cases."""
    return len({patient_of(case_id, patient_pattern) for case_id in case_ids})


def read_nnunet_split(path: str | Path, fold: int | None, case_ids: list[str]) -> tuple[list[str], list[str]]:
    """Fold ``fold`` of nnU-Net's ``splits_final.json``: a list of ``{"train": [...], "val": [...]}``,
    one per fold. Cases of the data set that the fold does not list are left out, as in nnU-Net.

    Returns:
        (training case ids, validation case ids), each sorted.
    """
    path = Path(path)
    try:
        folds = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read the splits file ({error.strerror}). Pass the path of "
                         "nnU-Net's splits_final.json.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None
    if not isinstance(folds, list) or not all(
        isinstance(entry, dict) and all(isinstance(entry.get(side), list) for side in ("train", "val"))
        for entry in folds
    ) or not folds:
        raise ValueError(f'{path}: must hold a list of {{"train": [case ids], "val": [case ids]}} objects, '
                         "one per fold, as nnU-Net's splits_final.json.")
    if fold is None or not 0 <= fold < len(folds):
        raise ValueError(f"{path}: holds folds 0..{len(folds) - 1}; choose one with --fold.")
    train, validation = (sorted(map(str, folds[fold][side])) for side in ("train", "val"))
    unknown = sorted(set(train + validation) - set(case_ids))
    if unknown:
        raise ValueError(f"{path}: fold {fold} lists cases this data set does not have: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}. Use the splits file written for this data set.")
    both = sorted(set(train) & set(validation))
    if both:
        raise ValueError(f"{path}: fold {fold} lists cases in both train and val: {both[:5]}. Fix the file.")
    if not train or not validation:
        raise ValueError(f"{path}: fold {fold} needs at least one training and one validation case.")
    return train, validation


def _check_pattern(patient_pattern: str) -> None:
    """A clear error for a pattern that is not a regular expression with a group for the patient."""
    if not patient_pattern:
        return
    try:
        groups = re.compile(patient_pattern).groups
    except re.error as error:
        raise ValueError(f"patient pattern {patient_pattern!r} is not a regular expression ({error}).") from None
    if groups < 1:
        raise ValueError(f"patient pattern {patient_pattern!r} needs a group, (...), around the patient's part "
                         f"of the case id, like {PATIENT_PATTERN!r}.")
