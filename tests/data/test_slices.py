import pickle

import numpy as np
import pytest
import torch

from data.augment2d import Augment2DConfig
from data.msd import read_msd_dataset
from data.preprocess import load_preprocessed_case, plan_preprocessing, preprocess_dataset
from data.samplers import WeightedSliceSampler
from data.slices import SliceDataset, foreground_per_slice, take_slice
from data.splits import split_cases
from data.synthetic.msd_layout import write_msd_dataset

CASE_IDS = [f"case_{i}" for i in range(5)]


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """A cache entry of five small MRI-like volumes (i, j, k) = (21, 19, 11), spacing 1 x 1 x 2 mm."""
    root = tmp_path_factory.mktemp("msd")
    rng = np.random.default_rng(0)
    cases = []
    for index, case_id in enumerate(CASE_IDS):
        label = np.zeros((21, 19, 11), np.uint8)
        label[4 + index:12 + index, 5:11, 3:7] = 1
        image = (rng.uniform(50, 60, label.shape) + 100 * label).astype(np.float32)
        cases.append((case_id, image, label, np.diag([1.0, 1.0, 2.0, 1.0])))
    write_msd_dataset(root / "Task", name="Task", description="slices", modality={0: "MRI"},
                      labels={0: "background", 1: "structure"}, cases=cases)
    dataset = read_msd_dataset(root / "Task")
    plan = plan_preprocessing(dataset, CASE_IDS, workers=1)
    return preprocess_dataset(dataset, plan, tmp_path_factory.mktemp("cache"), CASE_IDS, workers=1)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_plain_slices_are_the_cached_slices_along_any_axis(entry, axis):
    case = load_preprocessed_case(entry, "case_1")
    size = tuple(s for a, s in enumerate(case.label.shape) if a != axis)
    dataset = SliceDataset(entry, ["case_0", "case_1"], axis=axis, image_size=size, fit="resize",
                           augment=Augment2DConfig.none(), seed=0)
    assert len(dataset) == load_preprocessed_case(entry, "case_0").label.shape[axis] + case.label.shape[axis]
    number = len(dataset) - 2  # a slice of case_1
    position, index = dataset.slices[number]
    assert position == 1
    sample = dataset[(0, 0, number)]
    assert sample["image"].shape == (1, *size) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == size and sample["label"].dtype == torch.uint8
    np.testing.assert_allclose(sample["image"].numpy(), take_slice(case.image, axis, index), atol=1e-5)
    np.testing.assert_array_equal(sample["label"].numpy(), take_slice(case.label, axis, index))
    np.testing.assert_array_equal(dataset.slice_has_foreground[len(dataset) - case.label.shape[axis]:],
                                  foreground_per_slice(case.label, axis))


@pytest.mark.parametrize("fit", ["resize", "crop"])
def test_slices_are_fitted_to_the_image_size(entry, fit):
    dataset = SliceDataset(entry, CASE_IDS, axis=0, image_size=(16, 24), fit=fit, augment=Augment2DConfig(), seed=0)
    for number in range(0, len(dataset), 7):
        sample = dataset[(0, number, number)]
        assert sample["image"].shape == (1, 16, 24) and sample["label"].shape == (16, 24)
        assert set(np.unique(sample["label"].numpy())) <= {0, 1}


def test_crop_windows_find_the_foreground_of_a_slice(entry):
    dataset = SliceDataset(entry, CASE_IDS, axis=0, image_size=(8, 8), fit="crop", augment=Augment2DConfig.none(),
                           seed=0, crop_foreground_share=1.0)
    numbers = np.flatnonzero(dataset.slice_has_foreground)
    assert all(dataset[(0, i, int(n))]["label"].sum() > 0 for i, n in enumerate(numbers))


def test_same_key_same_sample_new_epoch_new_sample_and_pickling(entry):
    dataset = SliceDataset(entry, CASE_IDS, axis=0, image_size=(20, 20), fit="resize",
                           augment=Augment2DConfig(p_rotation=1.0), seed=3)
    first = dataset[(0, 5, 7)]
    restored = pickle.loads(pickle.dumps(dataset))
    assert restored._open_cases == {}
    np.testing.assert_array_equal(restored[(0, 5, 7)]["image"], first["image"])
    assert not torch.equal(dataset[(1, 5, 7)]["image"], first["image"])
    with pytest.raises(TypeError):
        dataset[3]


def test_samples_do_not_depend_on_which_worker_draws_them(entry):
    # Workers receive a pickled copy of the dataset and some of the keys, in any order.
    dataset = SliceDataset(entry, CASE_IDS, axis=0, image_size=(16, 16), fit="resize", augment=Augment2DConfig(),
                           seed=1)
    keys = list(WeightedSliceSampler(dataset.slice_has_foreground, num_samples=12, foreground_share=0.5, seed=1))
    serial = [dataset[key]["image"] for key in keys]
    workers = [pickle.loads(pickle.dumps(dataset)) for _ in range(3)]
    shuffled = {key: workers[number % 3][key]["image"] for number, key in reversed(list(enumerate(keys)))}
    for key, image in zip(keys, serial):
        torch.testing.assert_close(shuffled[key], image, rtol=0, atol=0)


def test_training_slices_come_from_training_cases_only(entry):
    train_ids, val_ids = split_cases(CASE_IDS, 0.4, seed=12345)
    assert not set(train_ids) & set(val_ids) and set(train_ids) | set(val_ids) == set(CASE_IDS)
    dataset = SliceDataset(entry, train_ids, axis=0, image_size=(16, 16), fit="resize", augment=Augment2DConfig.none(),
                           seed=0)
    used = {dataset.case_ids[position] for position in np.unique(dataset.slices[:, 0])}
    assert used == set(train_ids)
