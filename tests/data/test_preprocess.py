import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import data.preprocess as preprocess
from data.intensity import normalize_zscore
from data.msd import read_msd_dataset
from data.nifti import read_nifti
from data.preprocess import (
    PreprocessPlan,
    body_bounding_box,
    load_preprocessed_case,
    plan_preprocessing,
    preprocess_dataset,
    preprocess_image,
    save_prediction,
)

SHAPE = (23, 19, 17)  # file axes (i, j, k)
FLIPPED_OBLIQUE = np.array(
    [[-0.8, 0.05, 0.0, 40.0], [0.0, 0.0, 2.5, -12.0], [0.0, -0.8, 0.1, 30.0], [0.0, 0.0, 0.0, 1.0]]
)


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CT-like (i, j, k) image in HU: air, an ellipsoid body, a liver blob with a tumour inside."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, size) for size in SHAPE], indexing="ij")
    image = np.full(SHAPE, -1000.0, np.float32)
    body = (i / 0.8) ** 2 + (j / 0.8) ** 2 + (k / 0.9) ** 2 < 1
    image[body] = 40 + rng.normal(0, 10, body.sum())
    label = np.zeros(SHAPE, np.uint8)
    label[((i - 0.1) / 0.45) ** 2 + (j / 0.4) ** 2 + (k / 0.5) ** 2 < 1] = 1
    label[((i - 0.1) / 0.15) ** 2 + (j / 0.15) ** 2 + (k / 0.2) ** 2 < 1] = 2
    image[label == 1] = 100 + rng.normal(0, 20, (label == 1).sum())
    image[label == 2] = 60 + rng.normal(0, 5, (label == 2).sum())
    return image, label


def _write_dataset(root, case_ids=("liver_1", "liver_2"), affine=FLIPPED_OBLIQUE):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for seed, case_id in enumerate(case_ids):
        image, label = _phantom(seed)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{case_id}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{case_id}.nii.gz")
    metadata = {
        "name": "Task03_Liver",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer", "3": "vessel"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids],
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(metadata))
    return read_msd_dataset(root)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_ct_statistics_come_from_training_foreground(tmp_path):
    dataset = _write_dataset(tmp_path / "Task03_Liver", case_ids=("liver_1", "liver_2", "liver_3"))
    plan = plan_preprocessing(dataset, ["liver_1", "liver_3"], workers=1)

    # Hand-computed reference over every labelled voxel (fewer than the per-case sample size).
    values = np.concatenate([_phantom(seed)[0][_phantom(seed)[1] > 0] for seed in (0, 2)]).astype(np.float64)
    statistics = plan.channel_statistics[0]
    assert plan.channel_schemes == ["ct"]
    np.testing.assert_allclose(statistics["lower"], np.percentile(values, 0.5), rtol=1e-5)
    np.testing.assert_allclose(statistics["upper"], np.percentile(values, 99.5), rtol=1e-5)
    np.testing.assert_allclose(statistics["mean"], values.mean(), rtol=1e-5)
    np.testing.assert_allclose(statistics["std"], values.std(), rtol=1e-5)
    column_norms = np.linalg.norm(FLIPPED_OBLIQUE[:3, :3], axis=0)  # the same for all cases: their median
    np.testing.assert_allclose(sorted(plan.target_spacing), sorted(column_norms), rtol=1e-5)

    # With the source spacing as target nothing is resampled, so each voxel is exactly normalised.
    volume = read_nifti(dataset.cases[1].image_path)
    image, properties = preprocess_image(volume, plan)
    assert image.shape[1:] == tuple(properties["shape_after_crop"])
    crop = tuple(slice(start, stop) for start, stop in properties["crop_box"])
    clipped = np.clip(volume.array[0][crop], statistics["lower"], statistics["upper"])
    np.testing.assert_allclose(image[0], (clipped - statistics["mean"]) / statistics["std"], atol=1e-4)
    assert properties["channel_min"] == [pytest.approx(float(image[0].min()))]


def test_plan_round_trips_through_json_and_weights_only_checkpoint(tmp_path):
    plan = plan_preprocessing(_write_dataset(tmp_path / "task"), ["liver_1"], target_spacing=(2.0, 1.0, 1.0), workers=1)
    assert PreprocessPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    buffer = io.BytesIO()
    torch.save({"plan": plan.to_dict()}, buffer)
    buffer.seek(0)
    assert PreprocessPlan.from_dict(torch.load(buffer, weights_only=True)["plan"]) == plan
    other = PreprocessPlan.from_dict({**plan.to_dict(), "crop_margin": plan.crop_margin + 1})
    assert other.hash() != plan.hash()


def test_ct_crop_keeps_largest_component_and_mri_crop_keeps_nonzero():
    plan = PreprocessPlan("t", {0: "background"}, (1.0, 1.0, 1.0), ["ct"], [None], [False], crop_margin=1)
    image = np.full((1, 17, 19, 23), -1000.0, np.float32)
    image[0, 4:12, 5:15, 6:20] = 30  # body
    image[0, 14:16, 1:3, 1:3] = 200  # separate scanner table fragment
    assert body_bounding_box(image, plan) == [(3, 13), (4, 16), (5, 21)]

    mri_plan = PreprocessPlan("t", {0: "background"}, (1.0, 1.0, 1.0), ["zscore"], [None], [True], crop_margin=2)
    mri = np.zeros((2, 17, 19, 23), np.float32)
    mri[1, 3:6, 0:4, 20:23] = 1.0
    assert body_bounding_box(mri, mri_plan) == [(1, 8), (0, 6), (18, 23)]


def test_zscore_uses_body_voxels_only():
    channel = np.zeros((7, 9, 11), np.float32)
    channel[2:5, 2:6, 3:8] = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    mask = channel != 0
    normalized = normalize_zscore(channel, mask)
    values = channel[mask]
    np.testing.assert_allclose(normalized[mask], (values - values.mean()) / values.std(), rtol=1e-5)
    assert np.all(normalized[~mask] == 0)
    whole = normalize_zscore(channel)
    np.testing.assert_allclose(whole, (channel - channel.mean()) / channel.std(), rtol=1e-5, atol=1e-6)


def _write_mri_dataset(root, images: list[np.ndarray]):
    """An MRI task of one case per (i, j, k) image, with a one-voxel label each."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([1.5, 1.0, 1.0, 1.0])
    for index, image in enumerate(images):
        label = np.zeros(image.shape, np.uint8)
        label[tuple(size // 2 for size in image.shape)] = 1
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"heart_{index}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"heart_{index}.nii.gz")
    metadata = {"name": "Task02_Heart", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "atrium"},
                "training": [{"image": f"./imagesTr/heart_{i}.nii.gz", "label": f"./labelsTr/heart_{i}.nii.gz"}
                             for i in range(len(images))], "test": []}
    (root / "dataset.json").write_text(json.dumps(metadata))
    return read_msd_dataset(root)


def _normalized_without_resampling(dataset, plan, case_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw, normalised) canonical (Z, Y, X) arrays of one case, on the same cropped grid."""
    volume = read_nifti(dataset.cases[case_index].image_path)
    image, properties = preprocess_image(volume, plan)
    crop = tuple(slice(start, stop) for start, stop in properties["crop_box"])
    return volume.array[0][crop], image[0]


def test_mri_without_a_zero_background_is_zscored_over_the_whole_image(tmp_path):
    """Dark tissue that happens to be exactly 0 must stay below the tissue of raw 1..3, not jump to
    the mean: a non-zero mask covering the whole field of view is not a body mask."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 40, size=(13, 11, 9)).astype(np.float32) for _ in range(3)]
    dataset = _write_mri_dataset(tmp_path / "task", images)
    plan = plan_preprocessing(dataset, [case.case_id for case in dataset.cases], workers=1)
    assert plan.channel_schemes == ["zscore"] and plan.channel_use_nonzero_mask == [False]

    raw, normalized = _normalized_without_resampling(dataset, plan, case_index=0)
    assert (raw == 0).any() and (raw == 1).any()
    np.testing.assert_allclose(normalized, (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-5)
    assert normalized[raw == 0].max() < normalized[raw == 1].min()


def test_mri_with_a_zero_background_is_zscored_inside_the_filled_nonzero_mask(tmp_path):
    """A body that fills a quarter of the field of view on a background of exact zeros (nnU-Net's
    criterion: median share inside the non-zero box < 3/4): statistics come from the body, with the
    zero holes inside it filled, and the background becomes 0."""
    images = []
    for seed in range(3):
        image = np.zeros((17, 15, 13), np.float32)
        image[3:12, 2:10, 4:11] = 50 + np.random.default_rng(seed).normal(0, 5, (9, 8, 7))
        image[6:8, 5:7, 6:8] = 0  # an enclosed dark structure: part of the body
        images.append(image)
    dataset = _write_mri_dataset(tmp_path / "task", images)
    plan = plan_preprocessing(dataset, [case.case_id for case in dataset.cases], workers=1)
    assert plan.channel_use_nonzero_mask == [True]

    raw, normalized = _normalized_without_resampling(dataset, plan, case_index=1)
    body = ndimage.binary_fill_holes(raw != 0)
    assert (body & (raw == 0)).sum() == 8  # the hole is filled, and it is all of the mask's zeros
    values = raw[body]
    np.testing.assert_allclose(normalized[body], (values - values.mean()) / values.std(), rtol=1e-4, atol=1e-5)
    assert np.all(normalized[~body] == 0)
    assert normalized[body & (raw == 0)].max() < -5  # the hole is darker than the body, not its mean


def test_nonzero_mask_decision_is_part_of_the_plan_hash(tmp_path):
    plan = plan_preprocessing(_write_dataset(tmp_path / "task"), ["liver_1"], target_spacing=(2.0, 1.0, 1.0), workers=1)
    assert plan.channel_use_nonzero_mask == [False]  # CT never uses it
    other = PreprocessPlan.from_dict({**plan.to_dict(), "channel_use_nonzero_mask": [True]})
    assert other.hash() != plan.hash()
    # A plan of version 1, as older checkpoints carry it, normalised every z-scored channel in the mask.
    old = {key: value for key, value in plan.to_dict().items() if key != "channel_use_nonzero_mask"}
    old_mri = PreprocessPlan.from_dict({**old, "channel_schemes": ["zscore"], "channel_statistics": [None],
                                        "version": 1})
    assert old_mri.channel_use_nonzero_mask == [True]


def test_cache_entry_layout_and_contents(tmp_path):
    dataset = _write_dataset(tmp_path / "task")
    plan = plan_preprocessing(dataset, ["liver_1", "liver_2"], target_spacing=(1.5, 1.0, 1.0), workers=1)
    plan.max_foreground_locations = 50
    entry = preprocess_dataset(dataset, plan, tmp_path / "cache", ["liver_1", "liver_2"], workers=1)

    assert entry.name == f"Task03_Liver-{plan.hash()}"
    assert json.loads((entry / "manifest.json").read_text())["cases"] == ["liver_1", "liver_2"]
    assert PreprocessPlan.from_dict(json.loads((entry / "plan.json").read_text())) == plan
    assert not list(entry.glob("*.tmp-*"))
    case = load_preprocessed_case(entry, "liver_1")
    assert isinstance(case.image, np.memmap) and case.image.dtype == np.float32
    assert case.label.dtype == np.uint8 and case.image.shape[1:] == case.label.shape
    assert case.properties["shape"] == list(case.label.shape)
    assert sorted(case.foreground) == [1, 2, 3]
    assert case.foreground[3].shape == (0, 3)  # declared, absent from this case
    for value in (1, 2):
        locations = case.foreground[value]
        assert locations.dtype == np.int32 and 0 < len(locations) <= 50
        assert np.all(case.label[tuple(locations.T)] == value)
    assert len(case.foreground[1]) == 50  # the liver has more than 50 voxels, so it was subsampled


def test_complete_entry_is_reused_without_reading_nifti(tmp_path, monkeypatch):
    dataset = _write_dataset(tmp_path / "task")
    plan = plan_preprocessing(dataset, ["liver_1", "liver_2"], workers=1)
    entry = preprocess_dataset(dataset, plan, tmp_path / "cache", ["liver_1", "liver_2"], workers=1)

    def fail(*args, **kwargs):
        raise AssertionError("a complete cache entry must not read NIfTI files")

    monkeypatch.setattr(preprocess, "read_nifti", fail)
    monkeypatch.setattr(preprocess, "check_case", fail)
    assert preprocess_dataset(dataset, plan, tmp_path / "cache", ["liver_2"], workers=1) == entry


def test_interrupted_entry_resumes_and_redoes_unfinished_cases(tmp_path, monkeypatch):
    dataset = _write_dataset(tmp_path / "task")
    plan = plan_preprocessing(dataset, ["liver_1", "liver_2"], workers=1)
    entry = preprocess_dataset(dataset, plan, tmp_path / "cache", ["liver_1", "liver_2"], workers=1)
    expected_image = np.load(entry / "liver_2_image.npy")

    # Simulate a run killed while writing liver_2: no manifest, liver_2's arrays half written, no JSON.
    (entry / "manifest.json").unlink()
    (entry / "liver_2.json").unlink()
    (entry / "liver_2_image.npy").write_bytes((entry / "liver_2_image.npy").read_bytes()[:100])
    read_paths = []
    original_read = preprocess.read_nifti
    def recording_read(path, **kwargs):
        read_paths.append(path.name)
        return original_read(path, **kwargs)

    monkeypatch.setattr(preprocess, "read_nifti", recording_read)

    assert preprocess_dataset(dataset, plan, tmp_path / "cache", ["liver_1", "liver_2"], workers=1) == entry
    assert sorted(read_paths) == ["liver_2.nii.gz", "liver_2.nii.gz"]  # image and label of liver_2 only
    np.testing.assert_array_equal(load_preprocessed_case(entry, "liver_2").image, expected_image)
    assert json.loads((entry / "manifest.json").read_text())["cases"] == ["liver_1", "liver_2"]


@pytest.mark.parametrize(
    "target_spacing, min_dice",
    # Finer everywhere: nothing is lost, so the round trip must be exact. Coarser on two axes: a
    # 300-voxel liver loses its boundary detail, yet must come back in place.
    [((0.5, 0.5, 0.5), 1.0), ((1.1, 1.3, 0.6), 0.9)],
)
def test_prediction_is_written_back_in_source_geometry(tmp_path, target_spacing, min_dice):
    dataset = _write_dataset(tmp_path / "task", case_ids=("liver_1",))
    plan = plan_preprocessing(dataset, ["liver_1"], target_spacing=target_spacing, workers=1)
    entry = preprocess_dataset(dataset, plan, tmp_path / "cache", ["liver_1"], workers=1)
    case = load_preprocessed_case(entry, "liver_1")
    assert case.properties["shape"] != case.properties["shape_after_crop"]  # resampling was exercised

    save_prediction(np.asarray(case.label), case.properties, tmp_path / "prediction.nii.gz")

    source = nib.load(dataset.cases[0].label_path)
    written = nib.load(tmp_path / "prediction.nii.gz")
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    original, restored = np.asarray(source.dataobj), np.asarray(written.dataobj)
    assert _dice(restored > 0, original > 0) >= min_dice
    if min_dice == 1.0:
        np.testing.assert_array_equal(restored, original)


def test_parallel_planning_matches_serial(tmp_path):
    dataset = _write_dataset(tmp_path / "task")
    serial = plan_preprocessing(dataset, ["liver_1", "liver_2"], workers=1)
    parallel = plan_preprocessing(dataset, ["liver_1", "liver_2"], workers=2)
    assert parallel == serial


def _counting_nibabel_load(monkeypatch) -> list[str]:
    """Names of the NIfTI files opened from now on (headers included)."""
    opened = []
    load = nib.load

    def counting_load(path, *args, **kwargs):
        opened.append(Path(path).name)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(nib, "load", counting_load)
    return opened


def _refuse_nibabel_load(monkeypatch) -> None:
    def refuse(path, *args, **kwargs):
        raise AssertionError(f"{path} was opened, but the cache holds everything a start needs")

    monkeypatch.setattr(nib, "load", refuse)


def test_a_later_start_plans_and_preprocesses_without_opening_a_scan(tmp_path, monkeypatch):
    dataset = _write_dataset(tmp_path / "task", case_ids=("liver_1", "liver_2", "liver_3"))
    case_ids = ["liver_1", "liver_2", "liver_3"]
    plan = plan_preprocessing(dataset, case_ids, cache_dir=tmp_path / "cache", workers=1)
    entry = preprocess_dataset(dataset, plan, tmp_path / "cache", case_ids, workers=1)
    fingerprint_files = sorted(path.name for path in (tmp_path / "cache").glob("Task03_Liver-fingerprint-*/*"))
    assert fingerprint_files == ["liver_1.json", "liver_2.json", "liver_3.json"]  # no temporary left behind

    _refuse_nibabel_load(monkeypatch)
    again = read_msd_dataset(tmp_path / "task")
    assert plan_preprocessing(again, case_ids, cache_dir=tmp_path / "cache", workers=1) == plan
    assert preprocess_dataset(again, plan, tmp_path / "cache", case_ids, workers=1) == entry


def test_cached_fingerprints_give_the_plan_the_arrays_give(tmp_path):
    dataset = _write_dataset(tmp_path / "task", case_ids=("liver_1", "liver_2", "liver_3"))
    case_ids = ["liver_1", "liver_3"]
    cached = plan_preprocessing(dataset, case_ids, cache_dir=tmp_path / "cache", samples_per_case=300, workers=1)
    assert plan_preprocessing(dataset, case_ids, cache_dir=tmp_path / "cache", samples_per_case=300) == cached

    # The statistics of the float32 samples themselves, bit for bit: the plan's hash, and with it
    # every cache entry made before the fingerprints were cached, stays valid.
    fingerprints = [preprocess._case_fingerprint(case, [0], 300, 0) for case in dataset.cases if case.case_id in case_ids]
    expected = preprocess.ct_statistics(np.concatenate([item["samples"][0] for item in fingerprints]))
    assert cached.channel_statistics == [expected]
    # Other parameters are other fingerprints, kept apart.
    other = plan_preprocessing(dataset, case_ids, cache_dir=tmp_path / "cache", samples_per_case=200, workers=1)
    assert other.channel_statistics != cached.channel_statistics
    assert len(list((tmp_path / "cache").glob("Task03_Liver-fingerprint-*"))) == 2


def test_a_changed_scan_is_read_again_and_only_it(tmp_path, monkeypatch):
    dataset = _write_dataset(tmp_path / "task")
    case_ids = ["liver_1", "liver_2"]
    plan = plan_preprocessing(dataset, case_ids, cache_dir=tmp_path / "cache", workers=1)
    preprocess_dataset(dataset, plan, tmp_path / "cache", case_ids, workers=1)

    # liver_2 re-exported 30 HU brighter.
    image_path = tmp_path / "task" / "imagesTr" / "liver_2.nii.gz"
    image, _ = _phantom(1)
    nib.save(nib.Nifti1Image(image + 30, FLIPPED_OBLIQUE), image_path)
    os.utime(image_path, ns=(1_000_000_000, 1_000_000_000))  # a modification time surely its own
    opened = _counting_nibabel_load(monkeypatch)
    changed = plan_preprocessing(dataset, case_ids, cache_dir=tmp_path / "cache", workers=1)
    assert sorted(opened) == ["liver_2.nii.gz", "liver_2.nii.gz"]  # its image and label, for the fingerprint
    assert changed == plan_preprocessing(dataset, case_ids, workers=1)  # what a cache-less planning finds
    assert changed.channel_statistics != plan.channel_statistics

    # The entry of the old plan is brought up to date too, should a run still use that plan (a resume).
    opened.clear()
    entry = preprocess_dataset(dataset, plan, tmp_path / "cache", case_ids, workers=1)
    assert opened and set(opened) == {"liver_2.nii.gz"}
    assert load_preprocessed_case(entry, "liver_2").properties["source_files"]["image"][2] == 1_000_000_000
    opened.clear()
    preprocess_dataset(dataset, plan, tmp_path / "cache", case_ids, workers=1)
    assert opened == []


def test_a_fingerprint_key_is_one_line_and_any_numpy_value_is_stored_plainly(tmp_path, monkeypatch):
    fingerprint = preprocess._case_fingerprint

    def with_an_extra_key(*args):
        return {**fingerprint(*args), "nonzero_box_share": np.float32(0.75), "box": np.arange(3)}

    monkeypatch.setattr(preprocess, "_case_fingerprint", with_an_extra_key)
    dataset = _write_dataset(tmp_path / "task", case_ids=("liver_1",))
    plan_preprocessing(dataset, ["liver_1"], cache_dir=tmp_path / "cache", workers=1)
    (path,) = (tmp_path / "cache").glob("Task03_Liver-fingerprint-*/liver_1.json")
    stored = json.loads(path.read_text())["fingerprint"]
    assert stored["nonzero_box_share"] == 0.75 and stored["box"] == [0, 1, 2]
