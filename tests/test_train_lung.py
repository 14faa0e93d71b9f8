"""End-to-end runs of the lung tumour recipe: the tiny phantom, and a real-layout MSD folder built here."""

import nibabel as nib
import numpy as np
import pytest

import train_lung
from data.synthetic.msd_layout import write_msd_dataset


def test_tiny_phantom_run_scores_every_validation_case(tmp_path):
    metrics = train_lung.main([
        "--synthetic-matrix", "32", "--synthetic-cases", "6", "--image-size", "16", "--base-channels", "4",
        "--depth", "3", "--samples-per-epoch", "8", "--batch-size", "4", "--workers", "0", "--epochs", "1",
        "--val-fraction", "0.5", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    assert set(metrics) == {"dice", "dice_tumour", "dice_mean", "slice_averaged_dice", "hd95_tumour", "nsd_tumour"}
    assert all(np.isfinite(v) and (k == "hd95_tumour" or 0 <= v <= 1) for k, v in metrics.items())
    assert len((tmp_path / "run" / "dice_per_case.csv").read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize("image_size, given", [("24,24,24", "24,24,24"), ("0", "0,0"), ("24,-1", "24,-1")])
def test_an_image_size_of_the_wrong_length_or_not_positive_stops_at_parsing(tmp_path, image_size, given):
    # The task folder does not exist: the check must come before any data is read or folder written.
    with pytest.raises(SystemExit, match=f"^--image-size {given}: give 1 or 2 positive integers \\(H,W"):
        train_lung.main(["--data-dir", str(tmp_path / "missing"), "--image-size", image_size, "--out",
                         str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_data_dir_with_a_fixed_hounsfield_window_and_other_losses(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for index in range(4):
        label = np.zeros((23, 21, 9), np.uint8)
        label[8 + index:14 + index, 7:13, 3:6] = 1
        image = np.where(rng.uniform(size=label.shape) < 0.5, -850, 30).astype(np.int16)
        image[label > 0] = 40
        image[:2] = -1000  # air beside the body
        affine = np.diag([-0.8, -0.8, 2.5, 1.0])
        cases.append((f"lung_{index}", image, label, affine))
    root = write_msd_dataset(tmp_path / "Task06_Lung", name="Task06_Lung", description="CT", modality={0: "CT"},
                             labels={0: "background", 1: "tumour"}, cases=cases)
    for loss in ("dice", "bce_dice"):
        out = tmp_path / loss
        metrics = train_lung.main([
            "--data-dir", str(root), "--hu-window=-1000,400", "--loss", loss, "--image-size", "16",
            "--base-channels", "4", "--depth", "2", "--samples-per-epoch", "4", "--batch-size", "2",
            "--epochs", "1", "--workers", "0", "--val-fraction", "0.25", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out)])
        assert 0 <= metrics["dice"] <= 1
        prediction = next((out / "predictions").glob("*.nii.gz"))
        source = nib.load(root / "imagesTr" / prediction.name)
        assert nib.load(prediction).shape == source.shape
        np.testing.assert_allclose(nib.load(prediction).affine, source.affine, atol=1e-5)
    plan = next((tmp_path / "cache").glob("Task06_Lung-*/plan.json")).read_text()
    assert '"lower": -1000.0' in plan and '"upper": 400.0' in plan
