import json

import pytest

from data.splits import PATIENT_PATTERN, count_patients, patient_of, split_cases

CASES = [f"liver_{i}" for i in range(23)]

# Validation sets of the split by case as it was before patients were grouped, for ids
# case_000, case_001, ... (given here as their numbers): with every case its own patient the split
# must stay exactly this, since published figures were measured on it.
# ((number of cases, seed, val_fraction, fold), validation case numbers)
CASE_SPLITS = [
    ((23, 12345, 0.2, None), [0, 6, 11, 19, 20]),
    ((23, 0, 0.2, None), [4, 10, 11, 18, 20]),
    ((23, 7, 0.5, None), [0, 3, 4, 7, 8, 10, 12, 14, 15, 17, 18, 19]),
    ((23, 12345, 0.01, None), [19]),
    ((160, 12345, 0.2, None), [0, 2, 6, 15, 26, 29, 31, 32, 44, 46, 47, 58, 60, 62, 63, 70, 73, 78, 92, 105, 108,
                               110, 112, 113, 115, 117, 118, 121, 144, 151, 153, 158]),
    ((9, 3, 0.34, None), [0, 1, 2, 7]),
    ((23, 12345, 0.2, 0), [2, 3, 12, 18, 19]),
    ((23, 12345, 0.2, 1), [0, 4, 8, 15, 21]),
    ((23, 12345, 0.2, 2), [1, 6, 10, 13, 22]),
    ((23, 12345, 0.2, 3), [5, 14, 17, 20]),
    ((23, 12345, 0.2, 4), [7, 9, 11, 16]),
    ((11, 5, 0.2, 2), [0, 1]),
    ((160, 0, 0.2, 4), [2, 9, 12, 13, 14, 15, 18, 23, 24, 25, 31, 36, 41, 42, 48, 49, 53, 63, 70, 75, 78, 85, 89, 95,
                        99, 100, 102, 105, 128, 130, 140, 159]),
]


def acdc_like(num_patients: int) -> list[str]:
    return [f"acdc_{patient:03d}_f{frame:02d}" for patient in range(1, num_patients + 1) for frame in (1, 2)]


def acdc_patients(case_ids: list[str]) -> set[str]:
    return {case_id.rsplit("_", 1)[0] for case_id in case_ids}


@pytest.mark.parametrize("arguments, expected", CASE_SPLITS)
@pytest.mark.parametrize("patient_pattern", [PATIENT_PATTERN, ""])
def test_one_case_per_patient_splits_exactly_as_by_case(arguments, expected, patient_pattern):
    num_cases, seed, val_fraction, fold = arguments
    ids = [f"case_{i:03d}" for i in range(num_cases)]
    train, validation = split_cases(ids, val_fraction, seed, fold, patient_pattern=patient_pattern)
    assert validation == [ids[i] for i in expected]
    assert train == [case_id for case_id in ids if case_id not in validation]


def test_no_case_in_both_splits_and_order_does_not_matter():
    train, val = split_cases(CASES, 0.2, seed=5)
    assert len(val) == 5 and not set(train) & set(val) and set(train) | set(val) == set(CASES)
    assert split_cases(list(reversed(CASES)), 0.2, seed=5) == (train, val)
    assert split_cases(CASES, 0.2, seed=6)[1] != val


def test_folds_partition_the_cases():
    validations = [split_cases(CASES, 0.2, seed=12345, fold=k)[1] for k in range(5)]
    assert sorted(c for v in validations for c in v) == sorted(CASES)
    assert all(4 <= len(v) <= 5 for v in validations)


def test_patients_are_found_in_frame_ids_and_other_ids_are_left_alone():
    assert patient_of("acdc_017_f02") == "acdc_017"
    assert patient_of("patient017_frame12") == "patient017"
    for case_id in ("liver_7", "patient_1001", "la_003", "heart_001", "fifth_f"):
        assert patient_of(case_id) == case_id
    assert patient_of("acdc_017_f02", "") == "acdc_017_f02"
    assert count_patients(acdc_like(7)) == 7


@pytest.mark.parametrize("seed", [0, 5, 12345])
def test_two_frames_of_a_patient_never_straddle_the_split(seed):
    ids = acdc_like(80)
    train, validation = split_cases(ids, 0.2, seed)
    assert not acdc_patients(train) & acdc_patients(validation)
    assert len(validation) == 32 and len(acdc_patients(validation)) == 16  # 20 % of the 80 patients
    validations = [split_cases(ids, 0.2, seed, fold=k)[1] for k in range(5)]
    assert sorted(c for v in validations for c in v) == sorted(ids)
    for k, validation in enumerate(validations):
        train = sorted(set(ids) - set(validation))
        assert not acdc_patients(train) & acdc_patients(validation), k


def test_nnunet_splits_file_wins(tmp_path):
    ids = acdc_like(4)
    folds = [{"train": ids[:6], "val": ids[6:]}, {"train": ids[2:], "val": ids[:2]}]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(folds))
    assert split_cases(ids, 0.2, seed=0, fold=1, splits_file=path) == (ids[2:], ids[:2])
    assert split_cases(ids, 0.2, seed=0, fold=0, splits_file=str(path)) == (ids[:6], ids[6:])


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="at least 2 patients"):
        split_cases(["only"], 0.2, seed=0)
    with pytest.raises(ValueError, match="at least 2 patients"):
        split_cases(["acdc_001_f01", "acdc_001_f02"], 0.2, seed=0)
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        split_cases(CASES, 0.2, seed=0, fold=5)
    with pytest.raises(ValueError, match="needs a group"):
        split_cases(CASES, 0.2, seed=0, patient_pattern=r"liver_\d")
    with pytest.raises(ValueError, match="not a regular expression"):
        split_cases(CASES, 0.2, seed=0, patient_pattern="(liver")

    path = tmp_path / "splits_final.json"
    with pytest.raises(ValueError, match="splits_final.json: cannot read"):
        split_cases(CASES, 0.2, seed=0, fold=0, splits_file=path)
    path.write_text(json.dumps({"train": CASES}))
    with pytest.raises(ValueError, match="splits_final.json: must hold a list"):
        split_cases(CASES, 0.2, seed=0, fold=0, splits_file=path)
    path.write_text(json.dumps([{"train": CASES[:20], "val": CASES[20:]}]))
    with pytest.raises(ValueError, match="holds folds 0..0; choose one with --fold"):
        split_cases(CASES, 0.2, seed=0, fold=None, splits_file=path)
    with pytest.raises(ValueError, match=r"does not have: \['liver_9'\]"):
        split_cases([case for case in CASES if case != "liver_9"], 0.2, seed=0, fold=0, splits_file=path)
    path.write_text(json.dumps([{"train": CASES[:21], "val": CASES[20:]}]))
    with pytest.raises(ValueError, match=r"in both train and val: \['liver_20'\]"):
        split_cases(CASES, 0.2, seed=0, fold=0, splits_file=path)
