"""RSNA layout: labels per patient, clear errors on bad rows, a leak-free stratified split, the cache."""

import numpy as np
import pytest

from data.augment2d import Augment2DConfig
from data.rsna import ChestXrayDataset, cache_images, read_rsna_dataset, read_rsna_labels, scale_boxes, \
    split_patients
from data.synthetic.rsna import ensure_rsna_phantom

HEADER = "patientId,x,y,width,height,Target\n"


def write_csv(path, text):
    path.write_text(text)
    return path


def test_multi_box_patient_has_one_label_and_all_boxes(tmp_path):
    labels = write_csv(tmp_path / "labels.csv", HEADER + "b,,,,,0\na,10,20,30,40,1\na,50.5,60,7,8,1\nc,,,,,0\n")
    classes = write_csv(tmp_path / "classes.csv", "patientId,class\na,Lung Opacity\na,Lung Opacity\n"
                                                  "b,Normal\nc,No Lung Opacity / Not Normal\n")
    patients = read_rsna_labels(labels, classes)
    assert [p.patient_id for p in patients] == ["a", "b", "c"]
    assert [p.label for p in patients] == [1, 0, 0]
    assert patients[0].boxes == [(10.0, 20.0, 30.0, 40.0), (50.5, 60.0, 7.0, 8.0)]
    assert patients[1].boxes == [] and patients[2].detailed_class == "No Lung Opacity / Not Normal"


@pytest.mark.parametrize("rows, message", [
    ("a,10,20,30,40,1\na,10,20,30,40,1\n", "patient a: duplicate row"),
    ("a,,,,,0\na,,,,,0\n", "patient a: duplicate row"),
    ("a,,,,,0\na,10,20,30,40,1\n", "patient a: contradictory rows"),
    ("a,,,,,1\n", "patient a: Target 1 row without a box"),
    ("a,1,2,3,4,0\n", "patient a: Target 0 row with a box"),
    ("a,,,,,2\n", "patient a: Target must be 0 or 1"),
])
def test_bad_label_rows_name_the_patient(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        read_rsna_labels(write_csv(tmp_path / "labels.csv", HEADER + rows))


@pytest.mark.parametrize("text, message", [
    ("patientId,x,y,width,height\na,,,,\n", r"labels.csv: missing column\(s\) Target"),
    ("", "missing column.*found an empty file"),
    (HEADER, "no patients"),
])
def test_a_malformed_label_file_is_named_with_what_it_lacks(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_rsna_labels(write_csv(tmp_path / "labels.csv", text))


def test_a_class_file_without_its_class_column_is_named(tmp_path):
    labels = write_csv(tmp_path / "labels.csv", HEADER + "a,,,,,0\n")
    classes = write_csv(tmp_path / "classes.csv", "patientId,kind\na,Normal\n")
    with pytest.raises(ValueError, match=r"classes.csv: missing column\(s\) class"):
        read_rsna_labels(labels, classes)


def test_detailed_class_must_agree_with_the_label(tmp_path):
    labels = write_csv(tmp_path / "labels.csv", HEADER + "a,,,,,0\n")
    classes = write_csv(tmp_path / "classes.csv", "patientId,class\na,Lung Opacity\n")
    with pytest.raises(ValueError, match="patient a: class 'Lung Opacity' contradicts Target 0"):
        read_rsna_labels(labels, classes)
    classes = write_csv(tmp_path / "classes.csv", "patientId,class\na,Normal\na,No Lung Opacity / Not Normal\n")
    with pytest.raises(ValueError, match="patient a: contradictory classes"):
        read_rsna_labels(labels, classes)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return ensure_rsna_phantom(tmp_path_factory.mktemp("synthetic"), num_patients=45, matrix=48)


def test_missing_image_names_the_patient(phantom, tmp_path):
    import shutil

    root = tmp_path / "rsna"
    shutil.copytree(phantom, root)
    patient = read_rsna_dataset(root)[3].patient_id
    (root / "stage_2_train_images" / f"{patient}.dcm").unlink()
    with pytest.raises(FileNotFoundError, match=f"patient {patient}"):
        read_rsna_dataset(root)


def test_split_by_patient_is_stratified_and_leak_free(phantom):
    patients = read_rsna_dataset(phantom)
    train, val = split_patients(patients, 0.3, seed=7)
    assert sorted(train + val) == list(range(len(patients)))
    assert not {patients[i].patient_id for i in train} & {patients[i].patient_id for i in val}
    for name in {p.detailed_class for p in patients}:
        members = [i for i, p in enumerate(patients) if p.detailed_class == name]
        in_val = sum(i in val for i in members)
        assert in_val == int(np.ceil(0.3 * len(members))) if len(members) > 1 else in_val == 0
    assert split_patients(patients, 0.3, seed=7) == (train, val)  # seeded
    assert split_patients(patients, 0.3, seed=8) != (train, val)


def test_cache_holds_resized_images_and_is_reused(phantom, tmp_path):
    patients = read_rsna_dataset(phantom)
    images, shapes = cache_images(phantom, patients, (33, 33), tmp_path, workers=1)
    assert images.shape == (len(patients), 33, 33) and images.dtype == np.uint8
    assert (shapes == 48).all() and images.max() == 255
    entries = list(tmp_path.iterdir())
    again, _ = cache_images(phantom, patients, (33, 33), tmp_path, workers=1)
    assert list(tmp_path.iterdir()) == entries and isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, images)
    assert scale_boxes([(12, 24, 6, 3)], (48, 96), (24, 24)) == [(3.0, 12.0, 1.5, 1.5)]
    assert scale_boxes([(12, 24, 6, 3)], (48, 96), (24, 48)) == [(6.0, 12.0, 3.0, 1.5)]  # H, W
    wide, _ = cache_images(phantom, patients, (17, 29), tmp_path, workers=1)
    assert wide.shape == (len(patients), 17, 29)


def test_dataset_items_are_normalised_and_augmentation_reproducible():
    images = np.random.default_rng(0).integers(0, 256, (5, 19, 19), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 1])
    plain = ChestXrayDataset(images, labels, [1, 3], mean=100.0, std=50.0)
    item = plain[1]
    assert item["image"].shape == (1, 19, 19) and item["label"] == 1 and item["index"] == 3
    np.testing.assert_allclose(item["image"][0].numpy(), (images[3] - 100.0) / 50.0, rtol=1e-6)
    augmented = ChestXrayDataset(images, labels, [1, 3], mean=100.0, std=50.0, augment=Augment2DConfig(),
                                 crop_min_area=0.8, seed=3)
    first, again, other = augmented[(2, 5, 0)], augmented[(2, 5, 0)], augmented[(2, 6, 0)]
    assert first["index"] == 1 and first["image"].shape == (1, 19, 19)
    assert np.array_equal(first["image"], again["image"]) and not np.array_equal(first["image"], other["image"])


def test_dataset_pickles_the_cache_path_not_the_images(phantom, tmp_path):
    import pickle

    patients = read_rsna_dataset(phantom)
    images, _ = cache_images(phantom, patients, (16, 16), tmp_path)
    dataset = ChestXrayDataset(images, [p.label for p in patients], [0, 2], mean=120.0, std=40.0)
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < images.nbytes
    np.testing.assert_array_equal(copy[1]["image"], dataset[1]["image"])
