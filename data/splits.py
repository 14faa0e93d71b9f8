"""Train/validation splits by case (patient), never by slice or patch, so no patient is in both."""

import math

import numpy as np


def split_cases(case_ids: list[str], val_fraction: float, seed: int, fold: int | None = None,
                num_folds: int = 5) -> tuple[list[str], list[str]]:
    """Split case ids into (train, validation).

    With ``fold`` set, the cases are shuffled once with ``seed`` and cut into ``num_folds`` parts;
    part ``fold`` is the validation set (cross-validation, as nnU-Net does). Otherwise a seeded
    ``val_fraction`` of the cases, at least one, is held out. The result does not depend on the
    order in which the files were listed.
    """
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 cases to hold one out for validation, found {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    if fold is not None:
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in 0..{num_folds - 1}, got {fold}")
        validation = shuffled[fold::num_folds]
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        validation = shuffled[:max(1, math.ceil(val_fraction * len(ids)))]
    held_out = set(validation)
    return [i for i in ids if i not in held_out], sorted(validation)
