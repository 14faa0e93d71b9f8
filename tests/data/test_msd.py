import json

import nibabel as nib
import numpy as np
import pytest

from data.msd import DatasetError, check_case, read_msd_dataset
from data.nifti import NiftiError

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
SHAPE = (23, 19, 17)


def _label(values=(0, 1, 2)) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    for index, value in enumerate(values[1:]):
        label[5 + 4 * index : 8 + 4 * index, 4:9, 3:7] = value
    return label


def _write_case(root, case_id, label=None, label_affine=AFFINE, label_shape=SHAPE):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / f"{case_id}.nii.gz")
    label = _label() if label is None else label
    if label.shape != label_shape:
        label = np.zeros(label_shape, np.uint8)
    nib.save(nib.Nifti1Image(label, label_affine), root / "labelsTr" / f"{case_id}.nii.gz")


def _write_json(root, case_ids, **overrides):
    metadata = {
        "name": "Task03_Liver",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids],
        "test": ["./imagesTs/liver_9.nii.gz"],
    }
    metadata.update(overrides)
    (root / "dataset.json").write_text(json.dumps(metadata))


def test_reads_dataset_json_with_string_keys(tmp_path):
    for case_id in ("liver_3", "liver_1"):
        _write_case(tmp_path, case_id)
    _write_json(tmp_path, ["liver_3", "liver_1"])

    dataset = read_msd_dataset(tmp_path)

    assert dataset.name == "Task03_Liver"
    assert dataset.modality == {0: "CT"}
    assert dataset.labels == {0: "background", 1: "liver", 2: "cancer"}
    assert [case.case_id for case in dataset.cases] == ["liver_1", "liver_3"]
    assert dataset.cases[0].image_path == tmp_path / "imagesTr" / "liver_1.nii.gz"
    assert dataset.test_images == [tmp_path / "imagesTs" / "liver_9.nii.gz"]


def test_scans_folders_without_dataset_json_and_ignores_macos_files(tmp_path):
    _write_case(tmp_path, "case_a", label=_label((0, 2)))
    _write_case(tmp_path, "case_b", label=_label((0, 1, 2, 4)))
    (tmp_path / "imagesTr" / "case_a.nii.gz").rename(tmp_path / "imagesTr" / "case_a_0000.nii.gz")
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder / "._case_a.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")

    dataset = read_msd_dataset(tmp_path, modality="MRI")

    assert [case.case_id for case in dataset.cases] == ["case_a", "case_b"]
    assert dataset.labels == {0: "background", 1: "class_1", 2: "class_2", 4: "class_4"}
    assert dataset.modality == {0: "MRI"}
    assert dataset.name == tmp_path.name


def test_four_digit_case_names_are_kept(tmp_path):
    """Only nnU-Net's channel suffix `_0000` of an image whose label lacks it is stripped: ids ending
    in four digits (patients, years) are case names, and must not collide."""
    for case_id in ("patient_1001", "patient_1002", "ct_2023"):
        _write_case(tmp_path, case_id)
    assert [case.case_id for case in read_msd_dataset(tmp_path).cases] == ["ct_2023", "patient_1001", "patient_1002"]
    _write_json(tmp_path, ["patient_1001", "patient_1002", "ct_2023"])
    assert [case.case_id for case in read_msd_dataset(tmp_path).cases] == ["ct_2023", "patient_1001", "patient_1002"]


def test_dataset_json_takes_the_case_id_from_the_label(tmp_path):
    _write_case(tmp_path, "liver_1")
    _write_case(tmp_path, "liver_2")
    (tmp_path / "imagesTr" / "liver_1.nii.gz").rename(tmp_path / "imagesTr" / "liver_1_0000.nii.gz")
    training = [{"image": "./imagesTr/liver_1_0000.nii.gz", "label": "./labelsTr/liver_1.nii.gz"},
                {"image": "./imagesTr/liver_2.nii.gz", "label": "./labelsTr/liver_2.nii.gz"}]
    _write_json(tmp_path, [], training=training)
    assert [case.case_id for case in read_msd_dataset(tmp_path).cases] == ["liver_1", "liver_2"]


def test_channel_files_and_double_images_are_named(tmp_path):
    _write_case(tmp_path, "case_7")
    (tmp_path / "imagesTr" / "case_7.nii.gz").rename(tmp_path / "imagesTr" / "case_7_0000.nii.gz")
    (tmp_path / "imagesTr" / "case_7_0001.nii.gz").write_bytes((tmp_path / "imagesTr" / "case_7_0000.nii.gz").read_bytes())
    with pytest.raises(DatasetError, match=r"case_7_0001\.nii\.gz: one file per channel"):
        read_msd_dataset(tmp_path)
    (tmp_path / "imagesTr" / "case_7_0001.nii.gz").rename(tmp_path / "imagesTr" / "case_7.nii.gz")
    with pytest.raises(DatasetError, match=r"case_7_0000\.nii\.gz: case 'case_7' already has the image case_7\.nii\.gz"):
        read_msd_dataset(tmp_path)


def test_missing_label_file_is_named(tmp_path):
    _write_case(tmp_path, "liver_1")
    _write_json(tmp_path, ["liver_1", "liver_2"])
    with pytest.raises(DatasetError, match=r"imagesTr/liver_2\.nii\.gz: training image listed in .* does not exist"):
        read_msd_dataset(tmp_path)


def test_malformed_dataset_json_names_file_and_key(tmp_path):
    _write_case(tmp_path, "liver_1")
    (tmp_path / "dataset.json").write_text('{"name": "x", "labels": {')
    with pytest.raises(DatasetError, match=r"dataset\.json: not valid JSON"):
        read_msd_dataset(tmp_path)
    _write_json(tmp_path, ["liver_1"], labels={"zero": "background"})
    with pytest.raises(DatasetError, match=r'dataset\.json: key "labels" must map integer indices'):
        read_msd_dataset(tmp_path)
    _write_json(tmp_path, ["liver_1"], training=[{"image": "./imagesTr/liver_1.nii.gz"}])
    with pytest.raises(DatasetError, match=r'dataset\.json: every entry of key "training" needs "image" and "label"'):
        read_msd_dataset(tmp_path)


def test_check_case_accepts_consistent_case(tmp_path):
    _write_case(tmp_path, "liver_1")
    _write_json(tmp_path, ["liver_1"])
    dataset = read_msd_dataset(tmp_path)
    info = check_case(dataset.cases[0], dataset.labels)
    assert info.shape == (17, 19, 23)
    np.testing.assert_allclose(info.spacing, (2.5, 0.8, 0.8))
    assert info.label_values == (0, 1, 2)
    assert info.num_channels == 1


@pytest.mark.parametrize(
    "case_kwargs, message",
    [
        ({"label_shape": (23, 19, 15)}, r"labelsTr/bad\.nii\.gz: label shape \(23, 19, 15\) differs from image shape"),
        ({"label_affine": AFFINE + np.diag([0.0, 0.0, 0.01, 0.0])},
         r"labelsTr/bad\.nii\.gz: affine .* differs from the affine .* by more than 0\.001 mm"),
        ({"label": _label((0, 1, 7))}, r"labelsTr/bad\.nii\.gz: label values \[7\] are not declared classes"),
    ],
    ids=["shape", "affine", "undeclared_value"],
)
def test_check_case_errors_name_the_label_file(tmp_path, case_kwargs, message):
    _write_case(tmp_path, "bad", **case_kwargs)
    _write_json(tmp_path, ["bad"])
    dataset = read_msd_dataset(tmp_path)
    with pytest.raises(DatasetError, match=message):
        check_case(dataset.cases[0], dataset.labels)


def test_affine_difference_within_tolerance_is_accepted(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 1e-4
    _write_case(tmp_path, "close", label_affine=shifted)
    _write_json(tmp_path, ["close"])
    dataset = read_msd_dataset(tmp_path)
    assert check_case(dataset.cases[0], dataset.labels).label_values == (0, 1, 2)


def test_truncated_label_is_named(tmp_path):
    _write_case(tmp_path, "liver_1")
    _write_json(tmp_path, ["liver_1"])
    label_path = tmp_path / "labelsTr" / "liver_1.nii.gz"
    label_path.write_bytes(label_path.read_bytes()[:-40])
    dataset = read_msd_dataset(tmp_path)
    with pytest.raises(NiftiError, match=r"labelsTr/liver_1\.nii\.gz: cannot read NIfTI \(file truncated or corrupt"):
        check_case(dataset.cases[0], dataset.labels)


def test_an_empty_task_folder_is_named(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble, not a case
    with pytest.raises(DatasetError, match="no training cases.*imagesTr/ holds no"):
        read_msd_dataset(tmp_path)
