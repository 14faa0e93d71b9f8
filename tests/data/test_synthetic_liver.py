import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data.synthetic import liver
from data.synthetic.liver import ensure_liver_phantom, make_liver_case, write_liver_phantom
from data.synthetic.msd_layout import ensure_dataset, write_msd_dataset

MATRIX = 27  # odd, and small enough that three cases take well under a second


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_liver_phantom(tmp_path_factory.mktemp("phantom"), num_cases=3, matrix=MATRIX,
                               seed=5)


def load_case(root, entry):
    image = nib.load(root / entry["image"])
    label = nib.load(root / entry["label"])
    return image, label


def training_cases(root):
    description = json.loads((root / "dataset.json").read_text())
    return [load_case(root, entry) for entry in description["training"]]


def test_dataset_json_follows_msd(phantom):
    description = json.loads((phantom / "dataset.json").read_text())
    assert set(description) == {"name", "description", "reference", "licence", "tensorImageSize",
                                "modality", "labels", "numTraining", "numTest", "training", "test"}
    assert description["modality"] == {"0": "CT"}
    assert description["labels"] == {"0": "background", "1": "liver", "2": "cancer"}
    assert description["tensorImageSize"] == "3D"
    assert description["numTraining"] == 3 and description["numTest"] == 0
    assert description["training"][1] == {"image": "./imagesTr/liver_1.nii.gz",
                                          "label": "./labelsTr/liver_1.nii.gz"}
    assert sorted(os.listdir(phantom / "imagesTr")) == [f"liver_{k}.nii.gz" for k in range(3)]
    assert sorted(os.listdir(phantom / "labelsTr")) == [f"liver_{k}.nii.gz" for k in range(3)]


def test_image_and_label_share_geometry(phantom):
    for image, label in training_cases(phantom):
        assert image.shape == label.shape and image.ndim == 3
        np.testing.assert_array_equal(image.affine, label.affine)
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        np.testing.assert_allclose(image.header.get_best_affine(), image.header.get_qform(),
                                   atol=1e-3)
        # Voxel sizes in the header are the affine's column lengths.
        np.testing.assert_allclose(image.header.get_zooms(),
                                   np.linalg.norm(image.affine[:3, :3], axis=0), rtol=1e-5)


def test_geometry_is_realistic_and_varied(phantom):
    orientations, oblique = set(), False
    for image, _ in training_cases(phantom):
        canonical = nib.as_closest_canonical(image)
        spacing = canonical.header.get_zooms()
        assert canonical.shape[:2] == (MATRIX, MATRIX)
        assert 330 <= spacing[0] * MATRIX <= 420 and spacing[0] == pytest.approx(spacing[1])
        assert spacing[2] in liver.SLICE_THICKNESSES_MM
        assert 175 <= spacing[2] * canonical.shape[2] <= 245
        orientations.add(nib.aff2axcodes(image.affine))
        directions = image.affine[:3, :3] / np.linalg.norm(image.affine[:3, :3], axis=0)
        oblique |= bool(np.abs(directions).max(axis=0).min() < 0.9999)
        assert np.abs(image.affine[:3, 3]).max() > 50  # scanner origins are never at a corner
    # Cases 0-2 are stored axial (L, P, S), oblique (also nearest L, P, S) and permuted.
    assert orientations == {("L", "P", "S"), ("S", "P", "L")} and oblique


def test_labels_and_anatomy(phantom):
    for image, label in training_cases(phantom):
        array = np.asanyarray(image.dataobj)
        classes = np.asanyarray(label.dataobj)
        assert set(np.unique(classes)) == {0, 1, 2}
        # In world (RAS+) coordinates the liver lies to the patient's right of the body centre.
        body = np.argwhere(array > -500)
        liver_voxels = np.argwhere(classes == 1)
        body_world = nib.affines.apply_affine(image.affine, body.mean(0))
        liver_world = nib.affines.apply_affine(image.affine, liver_voxels.mean(0))
        assert liver_world[0] > body_world[0] + 20
        volume_ml = (classes >= 1).sum() * np.prod(image.header.get_zooms()) / 1000
        assert 1000 < volume_ml < 2500


def test_tumours_lie_in_the_liver(phantom):
    for image, label in training_cases(phantom):
        classes = np.asanyarray(label.dataobj)
        spacing = image.header.get_zooms()
        components, count = ndimage.label(classes == 2)
        for index in range(1, count + 1):
            component = components == index
            touching = ndimage.binary_dilation(component) & ~component
            assert (classes[touching] == 1).any()
        # No tumour voxel is farther than a large tumour's radius from the liver.
        distance_mm = ndimage.distance_transform_edt(classes != 1, sampling=spacing)
        assert distance_mm[classes == 2].max() < 30


def test_hounsfield_units(phantom):
    for image, label in training_cases(phantom):
        canonical = np.asanyarray(nib.as_closest_canonical(image).dataobj).astype(float)
        classes = np.asanyarray(label.dataobj)
        array = np.asanyarray(image.dataobj).astype(float)
        assert 80 < array[classes == 1].mean() < 145
        # The corners of the field of view are air outside the body: -1000 HU plus noise.
        air = canonical[:3, :3, :]
        assert abs(np.median(air) + 1000) < 5
        assert 10 <= air.std() < 25
        assert array.min() >= -1024


def test_make_liver_case_returns_file_order_arrays():
    image, label, affine = make_liver_case(np.random.default_rng(1), matrix=25,
                                           orientation="permuted")
    assert image.dtype == np.int16 and label.dtype == np.uint8 and affine.shape == (4, 4)
    assert image.shape == label.shape and image.shape[1:] == (25, 25)
    # (k, j, i) storage: the first file axis runs along the patient's long axis.
    assert nib.aff2axcodes(affine)[0] == "S"


def test_generation_is_deterministic(tmp_path):
    first = write_liver_phantom(tmp_path / "a", num_cases=2, matrix=25, seed=11)
    second = write_liver_phantom(tmp_path / "b", num_cases=2, matrix=25, seed=11)
    other = write_liver_phantom(tmp_path / "c", num_cases=1, matrix=25, seed=12)
    for folder in ("imagesTr", "labelsTr"):
        for case in ("liver_0.nii.gz", "liver_1.nii.gz"):
            a, b = nib.load(first / folder / case), nib.load(second / folder / case)
            np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)
    a = nib.load(first / "imagesTr" / "liver_0.nii.gz")
    c = nib.load(other / "imagesTr" / "liver_0.nii.gz")
    assert a.shape != c.shape or not np.array_equal(a.get_fdata(), c.get_fdata())


def test_ensure_liver_phantom_reuses_complete_folder(tmp_path):
    path = ensure_liver_phantom(tmp_path, num_cases=1, matrix=25, seed=3)
    stamp = (path / "dataset.json").stat().st_mtime_ns
    assert ensure_liver_phantom(tmp_path, num_cases=1, matrix=25, seed=3) == path
    assert (path / "dataset.json").stat().st_mtime_ns == stamp
    assert os.listdir(tmp_path) == [path.name]  # no temporary folder left behind
    assert ensure_liver_phantom(tmp_path, num_cases=1, matrix=25, seed=4) != path


def test_leftovers_of_an_interrupted_run_are_not_reused(tmp_path):
    path = ensure_liver_phantom(tmp_path / "probe", num_cases=1, matrix=25, seed=3)
    cache = tmp_path / "cache"
    (cache / f".{path.name}.tmp-crashed" / "imagesTr").mkdir(parents=True)
    (cache / path.name / "imagesTr").mkdir(parents=True)  # final name, but no dataset.json
    rebuilt = ensure_liver_phantom(cache, num_cases=1, matrix=25, seed=3)
    assert rebuilt == cache / path.name
    assert json.loads((rebuilt / "dataset.json").read_text())["numTraining"] == 1
    assert (rebuilt / "labelsTr" / "liver_0.nii.gz").is_file()


def test_failed_generation_leaves_nothing(tmp_path):
    def crash(root, size):
        (root / "imagesTr").mkdir()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ensure_dataset(tmp_path, "Broken", crash, size=3)
    assert os.listdir(tmp_path) == []


def test_write_msd_dataset_multichannel_with_test_cases(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    image = rng.standard_normal((7, 6, 5, 2)).astype(np.float32)
    label = rng.integers(0, 3, size=(7, 6, 5)).astype(np.uint8)
    root = write_msd_dataset(tmp_path / "Task02", name="Phantom", description="two channels",
                             modality={0: "cine", 1: "T2"}, labels={0: "background", 1: "a"},
                             cases=[("case_0", image, label, affine)], tensor_image_size="4D",
                             test_cases=[("case_1", image, None, affine)])
    description = json.loads((root / "dataset.json").read_text())
    assert description["modality"] == {"0": "cine", "1": "T2"}
    assert description["test"] == ["./imagesTs/case_1.nii.gz"]
    written = nib.load(root / "imagesTr" / "case_0.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), image)
    np.testing.assert_array_equal(written.affine, affine)
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(root / "labelsTr" / "case_0.nii.gz").dataobj), label)
    with pytest.raises(ValueError, match="channels"):
        write_msd_dataset(tmp_path / "bad", name="Phantom", description="", modality={0: "CT"}, labels={0: "bg"},
                          cases=[("case_0", image, label, affine)], tensor_image_size="4D")
