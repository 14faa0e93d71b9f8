import pytest

from data.splits import split_cases

CASES = [f"liver_{i}" for i in range(23)]


def test_no_case_in_both_splits_and_order_does_not_matter():
    train, val = split_cases(CASES, 0.2, seed=5)
    assert len(val) == 5 and not set(train) & set(val) and set(train) | set(val) == set(CASES)
    assert split_cases(list(reversed(CASES)), 0.2, seed=5) == (train, val)
    assert split_cases(CASES, 0.2, seed=6)[1] != val


def test_folds_partition_the_cases():
    validations = [split_cases(CASES, 0.2, seed=12345, fold=k)[1] for k in range(5)]
    assert sorted(c for v in validations for c in v) == sorted(CASES)
    assert all(4 <= len(v) <= 5 for v in validations)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="at least 2 cases"):
        split_cases(["only"], 0.2, seed=0)
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        split_cases(CASES, 0.2, seed=0, fold=5)
