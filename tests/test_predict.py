"""predict.py end to end on tiny runs of each recipe: masks in the source geometry of oblique scans,
class volumes, probability averaging of several checkpoints, chest X-ray probabilities with CAMs,
and the errors a user meets."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import predict
import train_atrium
import train_liver3d
import train_lung
import train_pneumonia
from data.synthetic.msd_layout import write_msd_dataset, write_nifti
from engine.checkpoint import load_checkpoint, save_checkpoint
from models import UNet

LIVER = ["--synthetic-matrix", "24", "--synthetic-cases", "4", "--val-fraction", "0.25", "--patch-size", "16,24,24",
         "--batch-size", "2", "--base-channels", "4", "--depth", "3", "--steps-per-epoch", "2", "--epochs", "1",
         "--workers", "0", "--tta", "false"]
ATRIUM = ["--synthetic-matrix", "24", "--synthetic-cases", "4", "--val-fraction", "0.25", "--image-size", "24",
          "--base-channels", "4", "--depth", "3", "--samples-per-epoch", "8", "--batch-size", "4", "--epochs", "1",
          "--warmup-steps", "1", "--workers", "0"]
LUNG = ["--synthetic-matrix", "32", "--synthetic-cases", "4", "--val-fraction", "0.25", "--image-size", "16",
        "--base-channels", "4", "--depth", "3", "--samples-per-epoch", "8", "--batch-size", "4", "--epochs", "1",
        "--workers", "0"]
PNEUMONIA = ["--synthetic-patients", "12", "--synthetic-matrix", "48", "--image-size", "32", "--batch-size", "4",
             "--epochs", "1", "--warmup-steps", "1", "--cam-images", "1", "--val-fraction", "0.3", "--workers", "0"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train_tiny(recipe, flags, cache_dir, folder: Path) -> Path:
    """Train one tiny run of ``recipe`` and return its best checkpoint."""
    out = folder / "run"
    recipe.main([*flags, "--cache-dir", str(cache_dir), "--out", str(out)])
    return out / "best.pt"


@pytest.fixture(scope="module")
def liver_checkpoint(cache_dir, tmp_path_factory):
    return train_tiny(train_liver3d, LIVER, cache_dir, tmp_path_factory.mktemp("liver"))


@pytest.fixture(scope="module")
def atrium_checkpoint(cache_dir, tmp_path_factory):
    return train_tiny(train_atrium, ATRIUM, cache_dir, tmp_path_factory.mktemp("atrium"))


@pytest.fixture(scope="module")
def lung_checkpoint(cache_dir, tmp_path_factory):
    return train_tiny(train_lung, LUNG, cache_dir, tmp_path_factory.mktemp("lung"))


@pytest.fixture(scope="module")
def pneumonia_checkpoint(cache_dir, tmp_path_factory):
    return train_tiny(train_pneumonia, PNEUMONIA, cache_dir, tmp_path_factory.mktemp("pneumonia"))


def oblique_affine(spacing, degrees, origin) -> np.ndarray:
    """Voxel -> RAS+ mm: anisotropic spacing (a negative entry flips that axis), rotated about z then x."""
    z, x = np.deg2rad(degrees)
    about_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    affine = np.eye(4)
    affine[:3, :3] = about_x @ about_z @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def oblique_scan(cache_dir, phantom: str, crop, affine, path):
    """A phantom image cropped to odd sizes and written with another (oblique) affine."""
    source = sorted((cache_dir / "synthetic").glob(f"{phantom}*/imagesTr/*.nii.gz"))[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(np.asanyarray(nib.load(source).dataobj)[crop], affine, path)
    return path


def labels_of(checkpoint_path) -> set[int]:
    return {int(k) for k in load_checkpoint(checkpoint_path)["plan"]["labels"]}


def assert_same_geometry(mask_path, image_path):
    mask, image = nib.load(mask_path), nib.load(image_path)
    assert mask.shape == image.shape
    assert np.allclose(mask.affine, image.affine, atol=1e-5)
    assert np.allclose(mask.header.get_qform(), image.header.get_qform(), atol=1e-5)
    return np.asanyarray(mask.dataobj)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def constant_checkpoint(checkpoint_path, probabilities, path):
    """The checkpoint with its output layer made constant: every voxel gets `probabilities`."""
    state = load_checkpoint(checkpoint_path)
    state["model"]["head.weight"] = torch.zeros_like(state["model"]["head.weight"])
    state["model"]["head.bias"] = torch.log(torch.tensor(probabilities, dtype=torch.float32))
    save_checkpoint(state, path)
    return path


def test_liver3d_mask_keeps_the_oblique_source_geometry(liver_checkpoint, cache_dir, tmp_path):
    affine = oblique_affine((-15.5, -18.0, 2.7), (6, 4), (190.0, 180.0, -300.0))
    # A name ending in four digits (a year, a patient number) is the case's name, not a channel suffix.
    scan = oblique_scan(cache_dir, "LiverPhantom", np.s_[:23, 1:22, 3:36], affine, tmp_path / "in" / "ct_2023.nii.gz")
    rows = predict.main(["--checkpoint", str(liver_checkpoint), "--input", str(scan), "--output",
                         str(tmp_path / "out"), "--tta", "--keep-largest-component", "--device", "cpu"])
    assert [row["case"] for row in rows] == ["ct_2023"]
    mask = assert_same_geometry(tmp_path / "out" / "ct_2023.nii.gz", scan)
    assert set(np.unique(mask)) <= labels_of(liver_checkpoint)
    assert (tmp_path / "out" / "ct_2023.png").is_file()
    assert [row["case"] for row in read_csv(tmp_path / "out" / "volumes.csv")] == ["ct_2023"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["ct_2023.nii.gz", "ct_2023.png",
                                                                          "volumes.csv"]


def test_2d_mask_keeps_the_source_geometry_and_skips_other_files(atrium_checkpoint, cache_dir, tmp_path):
    folder = tmp_path / "in"
    affine = oblique_affine((8.0, -9.0, 12.5), (-5, 7), (10.0, -20.0, 15.0))
    oblique_scan(cache_dir, "Task02_Heart", np.s_[1:24, :21, :7], affine, folder / "heart_3.nii.gz")
    oblique_scan(cache_dir, "Task02_Heart", np.s_[:, :, :], np.diag([-8.3, -8.3, 13.0, 1]), folder / "heart_4.nii")
    (folder / "._heart_3.nii.gz").write_bytes(b"macOS resource fork")
    (folder / "notes.txt").write_text("not an image")
    rows = predict.main(["--checkpoint", str(atrium_checkpoint), "--input", str(folder), "--output",
                         str(tmp_path / "out"), "--keep-largest-component"])
    assert [row["case"] for row in rows] == ["heart_3", "heart_4"]
    for case, source in (("heart_3", "heart_3.nii.gz"), ("heart_4", "heart_4.nii")):
        mask = assert_same_geometry(tmp_path / "out" / source, folder / source)  # the input's own file name
        assert set(np.unique(mask)) <= labels_of(atrium_checkpoint)
        assert (tmp_path / "out" / f"{case}.png").is_file()
    assert [row["case"] for row in read_csv(tmp_path / "out" / "volumes.csv")] == ["heart_3", "heart_4"]


def test_lung_sigmoid_mask_keeps_the_oblique_geometry_and_scores_against_labels(lung_checkpoint, cache_dir,
                                                                                 tmp_path):
    affine = oblique_affine((0.9, -1.1, 2.5), (12, -8), (-30.0, 12.0, -150.0))
    image = oblique_scan(cache_dir, "Task06_Lung", np.s_[1:31, 2:29, :], affine, tmp_path / "in" / "lung_7.nii.gz")
    label_source = min((cache_dir / "synthetic").glob("Task06_Lung*/labelsTr/*.nii.gz"))
    labels = tmp_path / "labels" / "lung_7.nii.gz"
    labels.parent.mkdir()
    write_nifti(np.asanyarray(nib.load(label_source).dataobj)[1:31, 2:29, :], affine, labels)
    rows = predict.main(["--checkpoint", str(lung_checkpoint), "--input", str(image), "--output",
                         str(tmp_path / "out"), "--labels", str(labels.parent)])
    mask = assert_same_geometry(tmp_path / "out" / "lung_7.nii.gz", image)
    assert set(np.unique(mask)) <= {0, 1}  # one sigmoid logit: tumour or not
    assert [row["case"] for row in rows] == ["lung_7"]
    (row,) = read_csv(tmp_path / "out" / "volumes.csv")
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert set(row) == {"case", "tumour_ml"}
    assert float(row["tumour_ml"]) == pytest.approx(np.count_nonzero(mask == 1) * voxel_ml, abs=1e-5)
    scores = read_csv(tmp_path / "out" / "scores.csv")
    assert [row["case"] for row in scores] == ["lung_7", "mean"]
    assert 0 <= float(scores[0]["dice_tumour"]) <= 1


def test_pneumonia_folder_gives_probabilities_decisions_and_cams(pneumonia_checkpoint, cache_dir, tmp_path):
    films = sorted((cache_dir / "synthetic").glob("RSNAPhantom*/stage_2_train_images/*.dcm"))[:3]
    folder = tmp_path / "films"
    folder.mkdir()
    for film in films:
        (folder / film.name).write_bytes(film.read_bytes())
    (folder / "._ignored.dcm").write_bytes(b"macOS resource fork")
    predict.main(["--checkpoint", str(pneumonia_checkpoint), "--input", str(folder), "--output", str(tmp_path / "out")])
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    threshold = load_checkpoint(pneumonia_checkpoint)["threshold"]
    assert [row["file"] for row in rows] == [film.name for film in films]
    for row in rows:
        assert row["patient_id"] == row["file"].removesuffix(".dcm")  # the phantom's PatientID is the file name
        assert 0 <= float(row["probability"]) <= 1
        assert int(row["decision"]) == int(float(row["probability"]) >= threshold)
        assert (tmp_path / "out" / "cam" / row["file"].replace(".dcm", ".png")).is_file()


def test_checkpoints_saved_under_old_setting_names_predict_as_the_current_ones(liver_checkpoint,
                                                                              pneumonia_checkpoint, cache_dir,
                                                                              tmp_path):
    old_names = {"patch_size": "patch", "foreground_share": "fg_prob", "foreground_sampling": "fg_sampling",
                 "keep_largest_component": "keep_largest"}
    state = load_checkpoint(liver_checkpoint)
    state["config"] = {old_names.get(key, key): value for key, value in state["config"].items()}
    save_checkpoint(state, tmp_path / "old_liver.pt")
    scan = oblique_scan(cache_dir, "LiverPhantom", np.s_[:23, 1:22, 3:36], np.diag([-2.0, -2.0, 3.0, 1.0]),
                        tmp_path / "in" / "ct_1.nii.gz")
    for name, checkpoint in (("new", liver_checkpoint), ("old", tmp_path / "old_liver.pt")):
        predict.main(["--checkpoint", str(checkpoint), "--input", str(scan), "--output", str(tmp_path / name),
                      "--keep-largest-component", "--device", "cpu"])
    np.testing.assert_array_equal(nib.load(tmp_path / "old" / "ct_1.nii.gz").get_fdata(),
                                  nib.load(tmp_path / "new" / "ct_1.nii.gz").get_fdata())

    state = load_checkpoint(pneumonia_checkpoint)
    state["image_size"] = state["image_size"][0]  # one int for the square, as such checkpoints held it
    save_checkpoint(state, tmp_path / "old_pneumonia.pt")
    film = sorted((cache_dir / "synthetic").glob("RSNAPhantom*/stage_2_train_images/*.dcm"))[0]
    rows = {name: predict.main(["--checkpoint", str(checkpoint), "--input", str(film), "--output",
                                str(tmp_path / f"{name}_films")])
            for name, checkpoint in (("new", pneumonia_checkpoint), ("old", tmp_path / "old_pneumonia.pt"))}
    assert rows["old"] == rows["new"]


def test_two_checkpoints_average_their_probabilities(liver_checkpoint, cache_dir, tmp_path):
    # Alone, the first predicts cancer (2) everywhere and the second background; the mean of their
    # probabilities, (0.275, 0.45, 0.275), is liver (1). Taking either alone, or voting, cannot give 1.
    first = constant_checkpoint(liver_checkpoint, [0.05, 0.45, 0.50], tmp_path / "first.pt")
    second = constant_checkpoint(liver_checkpoint, [0.50, 0.45, 0.05], tmp_path / "second.pt")
    affine = oblique_affine((-16.0, -17.0, 3.1), (3, -2), (180.0, 190.0, -250.0))
    scan = oblique_scan(cache_dir, "LiverPhantom", np.s_[2:, :, :33], affine, tmp_path / "in" / "ct_2.nii.gz")
    predict.main(["--checkpoint", str(first), "--checkpoint", str(second), "--input", str(scan),
                  "--output", str(tmp_path / "out"), "--device", "cpu"])
    mask = assert_same_geometry(tmp_path / "out" / "ct_2.nii.gz", scan)
    assert set(np.unique(mask)) == {0, 1}  # liver inside the body crop, background outside it


def test_volumes_are_voxel_counts_times_the_source_voxel_volume(liver_checkpoint, cache_dir, tmp_path):
    liver = constant_checkpoint(liver_checkpoint, [0.2, 0.7, 0.1], tmp_path / "liver.pt")
    affine = oblique_affine((-15.0, -19.0, 2.6), (8, 5), (190.0, 180.0, -300.0))
    scan = oblique_scan(cache_dir, "LiverPhantom", np.s_[:, 2:, 5:38], affine, tmp_path / "in" / "ct_3.nii.gz")
    predict.main(["--checkpoint", str(liver), "--input", str(scan), "--output", str(tmp_path / "out")])
    written = nib.load(tmp_path / "out" / "ct_3.nii.gz")
    mask = np.asanyarray(written.dataobj)
    voxel_ml = abs(np.linalg.det(written.affine[:3, :3])) / 1000
    (row,) = read_csv(tmp_path / "out" / "volumes.csv")
    assert set(row) == {"case", "liver_ml", "cancer_ml"}
    assert np.count_nonzero(mask == 1) > 0
    assert float(row["liver_ml"]) == pytest.approx(np.count_nonzero(mask == 1) * voxel_ml, rel=1e-6)
    assert float(row["cancer_ml"]) == pytest.approx(np.count_nonzero(mask == 2) * voxel_ml, abs=1e-9)


def test_window_batch_size_sets_the_windows_per_forward_pass(liver_checkpoint, cache_dir, tmp_path, monkeypatch):
    forward = predict.ProbabilityAverage.forward
    windows_per_forward = []

    def counting_forward(self, image):
        windows_per_forward.append(image.shape[0])
        return forward(self, image)

    monkeypatch.setattr(predict.ProbabilityAverage, "forward", counting_forward)
    scan = oblique_scan(cache_dir, "LiverPhantom", np.s_[:, :, :], np.diag([-16.0, -16.0, 2.5, 1]),
                        tmp_path / "in" / "ct_5.nii.gz")
    arguments = ["--checkpoint", str(liver_checkpoint), "--input", str(scan), "--output", str(tmp_path / "out"),
                 "--device", "cpu"]
    predict.main([*arguments, "--window-batch-size", "3"])
    assert len(windows_per_forward) > 1 and max(windows_per_forward) == 3
    windows_per_forward.clear()
    predict.main(arguments)  # the CPU default
    assert max(windows_per_forward) == 2
    with pytest.raises(SystemExit):
        predict.main([*arguments, "--window-batch-size", "0"])


def test_probability_average_is_the_mean_of_softmax_and_of_mirrored_sigmoids():
    torch.manual_seed(0)
    image = torch.randn(2, 1, 9, 11)
    models = [UNet(spatial_dims=2, in_channels=1, num_classes=3, base_channels=4, depth=2).eval() for _ in range(2)]
    with torch.no_grad():
        averaged = torch.softmax(predict.ProbabilityAverage([(m, ()) for m in models], 3)(image), dim=1)
        expected = (torch.softmax(models[0](image), 1) + torch.softmax(models[1](image), 1)) / 2
        torch.testing.assert_close(averaged, expected, atol=1e-5, rtol=1e-4)

        model = UNet(spatial_dims=2, in_channels=1, num_classes=1, base_channels=4, depth=2).eval()
        mirrored = torch.sigmoid(predict.ProbabilityAverage([(model, (1,))], 1)(image))
        expected = (torch.sigmoid(model(image)) + torch.sigmoid(model(image.flip(3))).flip(3)) / 2
        torch.testing.assert_close(mirrored, expected, atol=1e-5, rtol=1e-4)


def test_errors_name_the_file_and_the_fix(liver_checkpoint, atrium_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="different tasks.*liver3d.*atrium"):
        predict.main(["--checkpoint", str(liver_checkpoint), "--checkpoint", str(atrium_checkpoint),
                      "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    state = load_checkpoint(liver_checkpoint)
    del state["task"]
    save_checkpoint(state, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="old.pt: the checkpoint has no task"):
        predict.main(["--checkpoint", str(tmp_path / "old.pt"), "--input", str(tmp_path), "--output", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "film.dcm").write_bytes(b"not a scan")
    with pytest.raises(SystemExit, match="film.dcm: not a NIfTI file"):
        predict.main(["--checkpoint", str(liver_checkpoint), "--input", str(tmp_path / "film.dcm"),
                      "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="empty: no NIfTI files"):
        predict.main(["--checkpoint", str(liver_checkpoint), "--input", str(tmp_path / "empty"),
                      "--output", str(tmp_path / "out")])
    state = load_checkpoint(liver_checkpoint)
    state["config"]["patch_size"] = (8, 8, 8)
    save_checkpoint(state, tmp_path / "other_patch.pt")
    with pytest.raises(SystemExit, match="other_patch.pt: patch"):
        predict.main(["--checkpoint", str(liver_checkpoint), "--checkpoint", str(tmp_path / "other_patch.pt"),
                      "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        predict.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--input", "--output", "--tta", "--keep-largest-component", "--window-batch-size",
                 "--device", "--amp"):
        assert flag in text
    assert "python predict.py --checkpoint" in text


def test_labels_score_each_case_on_the_source_grid(liver_checkpoint, cache_dir, tmp_path):
    liver = constant_checkpoint(liver_checkpoint, [0.2, 0.7, 0.1], tmp_path / "liver.pt")  # liver everywhere
    affine = oblique_affine((-15.0, -19.0, 2.6), (8, 5), (190.0, 180.0, -300.0))
    # nnU-Net's layout: the image ct_3_0000.nii.gz, its reference mask ct_3.nii.gz.
    scan = oblique_scan(cache_dir, "LiverPhantom", np.s_[:, 2:, 5:38], affine, tmp_path / "in" / "ct_3_0000.nii.gz")
    shape = nib.load(scan).shape
    reference = np.zeros(shape, np.uint8)
    reference[2:10, 3:9, 4:20] = 1  # 768 voxels of liver, no cancer
    (tmp_path / "labels").mkdir()
    (tmp_path / "wrong").mkdir()
    write_nifti(reference, affine, tmp_path / "labels" / "ct_3.nii.gz")
    predict.main(["--checkpoint", str(liver), "--input", str(scan), "--output", str(tmp_path / "out"),
                  "--labels", str(tmp_path / "labels")])
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert [row["case"] for row in rows] == ["ct_3_0000", "mean"]
    predicted = np.count_nonzero(np.asanyarray(nib.load(tmp_path / "out" / "ct_3_0000.nii.gz").dataobj) == 1)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert float(rows[0]["dice_liver"]) == pytest.approx(2 * 768 / (768 + predicted), rel=1e-5)
    assert float(rows[0]["volume_difference_ml_liver"]) == pytest.approx((predicted - 768) * voxel_ml, rel=1e-5)
    assert float(rows[0]["dice_cancer"]) == 1.0 and float(rows[0]["hd95_cancer"]) == 0.0  # absent from both
    assert float(rows[0]["hd95_liver"]) > 0 and 0 <= float(rows[0]["nsd_liver"]) < 1
    assert rows[1]["dice_liver"] == rows[0]["dice_liver"]  # the mean over one case

    write_nifti(reference[:, :-1], affine, tmp_path / "wrong" / "ct_3.nii.gz")
    with pytest.raises(SystemExit, match="not the reference mask of case ct_3_0000"):
        predict.main(["--checkpoint", str(liver), "--input", str(scan), "--output", str(tmp_path / "out2"),
                      "--labels", str(tmp_path / "wrong")])


def test_a_thick_slice_run_plans_its_network_and_predict_rebuilds_it(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        label = np.zeros((20, 18, 5), np.uint8)  # (i, j, k) = (x, y, z): 5 slices of 6 mm, 1.5 mm pixels
        label[5:14, 4:12, 1:4] = 1
        image = rng.normal(0, 1, label.shape).astype(np.float32) + 3 * label
        cases.append((f"heart_{i}", image, label, np.diag([-1.5, -1.5, 6.0, 1.0])))
    root = write_msd_dataset(tmp_path / "Task27", name="Thick", description="thick slices", modality={0: "MRI"},
                             labels={0: "background", 1: "ventricle"}, cases=cases)
    train_liver3d.main(["--data-dir", str(root), "--cache-dir", str(tmp_path / "cache"), "--out",
                        str(tmp_path / "run"), "--base-channels", "4", "--epochs", "1", "--steps-per-epoch", "1",
                        "--workers", "0", "--val-fraction", "0.34"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    # In plane 1.5 -> 3 -> 6 mm while the 5 slices of 6 mm stay; then, to a third downsampling of the
    # four asked for, every axis (now all 6 mm) halves once more while it keeps 2 voxels, and the patch
    # is the median shape rounded up to that: 5 -> 6 slices, 18 and 20 -> 24 pixels.
    assert config["patch_size"] == [6, 24, 24] and config["depth"] == 4
    assert config["strides"] == [[1, 2, 2], [1, 2, 2], [2, 2, 2]]
    assert config["kernel_sizes"] == [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert config["augment"]["rotation_in_plane_only"] is True
    checkpoint = tmp_path / "run" / "best.pt"
    assert json.loads(json.dumps(load_checkpoint(checkpoint)["config"])) == config

    affine = oblique_affine((1.5, -1.5, 6.0), (5, -3), (20.0, -10.0, 40.0))
    scan = tmp_path / "in" / "heart_9.nii.gz"
    scan.parent.mkdir()
    write_nifti(cases[0][1][1:, :17], affine, scan)
    predict.main(["--checkpoint", str(checkpoint), "--input", str(scan), "--output", str(tmp_path / "out")])
    mask = assert_same_geometry(tmp_path / "out" / "heart_9.nii.gz", scan)
    assert set(np.unique(mask)) <= {0, 1}


def test_a_checkpoint_from_before_planned_networks_builds_the_uniform_network(liver_checkpoint, cache_dir,
                                                                                tmp_path):
    state = load_checkpoint(liver_checkpoint)
    for key in ("strides", "kernel_sizes", "memory_format"):
        del state["config"][key]
    save_checkpoint(state, tmp_path / "old.pt")
    model = predict.build_segmentation_model(state, "old.pt", 3, predict.PreprocessPlan.from_dict(state["plan"]),
                                             device=torch.device("cpu"))
    assert model.strides == ((2, 2, 2),) * (state["config"]["depth"] - 1)
    affine = oblique_affine((-15.5, -18.0, 2.7), (6, 4), (190.0, 180.0, -300.0))
    scan = oblique_scan(cache_dir, "LiverPhantom", np.s_[:23, 1:22, 3:36], affine, tmp_path / "in" / "ct_5.nii.gz")
    predict.main(["--checkpoint", str(tmp_path / "old.pt"), "--input", str(scan), "--output", str(tmp_path / "out")])
    assert_same_geometry(tmp_path / "out" / "ct_5.nii.gz", scan)


@pytest.mark.parametrize("saved, flags, kept", [(True, [], True), (False, [], False),
                                                (True, ["--keep-largest-component", "false"], False),
                                                (False, ["--keep-largest-component"], True)])
def test_post_processing_follows_the_checkpoint_unless_a_flag_says_otherwise(liver_checkpoint, cache_dir, tmp_path,
                                                                            monkeypatch, saved, flags, kept):
    state = load_checkpoint(liver_checkpoint)
    state["config"]["keep_largest_component"] = saved
    save_checkpoint(state, tmp_path / "run.pt")
    calls = []
    monkeypatch.setattr(predict, "keep_largest_foreground", lambda prediction: calls.append(1) or prediction)
    scan = oblique_scan(cache_dir, "LiverPhantom", np.s_[:23, 1:22, 3:36], np.diag([-2.0, -2.0, 3.0, 1.0]),
                        tmp_path / "in" / "ct_1.nii.gz")
    predict.main(["--checkpoint", str(tmp_path / "run.pt"), "--input", str(scan), "--output", str(tmp_path / "out"),
                  "--device", "cpu", *flags])
    assert bool(calls) is kept
