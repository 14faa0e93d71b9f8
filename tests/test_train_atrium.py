"""End-to-end runs of the left atrium recipe on a tiny phantom: outputs, geometry, resume (opening no
scan), refusal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import train_atrium

TINY = ["--synthetic-matrix", "24", "--synthetic-cases", "5", "--image-size", "24", "--base-channels", "4",
        "--depth", "3", "--samples-per-epoch", "8", "--batch-size", "4", "--workers", "0", "--val-every", "1",
        "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(out, cache_dir, *flags):
    return train_atrium.main([*TINY, "--cache-dir", str(cache_dir), "--out", str(out), *flags])


def test_run_folder_metrics_and_predictions_in_source_geometry(tmp_path, cache_dir):
    metrics = run(tmp_path / "run", cache_dir, "--epochs", "2")
    assert set(metrics) == {"dice", "dice_left_atrium", "dice_mean", "slice_averaged_dice", "hd95_left_atrium",
                            "nsd_left_atrium"}
    assert all(np.isfinite(v) and 0 <= v <= 1 for k, v in metrics.items() if not k.startswith("hd95"))
    assert np.isfinite(metrics["hd95_left_atrium"]) and metrics["hd95_left_atrium"] >= 0
    out = tmp_path / "run"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert {"config.json", "last.pt", "best.pt", "log.jsonl", "dice_per_case.csv"} <= {p.name for p in out.iterdir()}
    rows = (out / "dice_per_case.csv").read_text().splitlines()
    assert rows[0] == "case,dice_left_atrium,slice_averaged_dice_left_atrium,hd95_left_atrium,nsd_left_atrium"
    assert len(rows) == 2
    images = {p.name: p for p in (cache_dir / "synthetic").glob("*/imagesTr/*.nii.gz")}
    predictions = sorted((out / "predictions").glob("*.nii.gz"))
    assert len(predictions) == 1 and (out / "predictions" / predictions[0].name.replace(".nii.gz", ".png")).is_file()
    source, written = nib.load(images[predictions[0].name]), nib.load(predictions[0])
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    # The phantom's cases share one spacing, so nothing is resampled: the Dice of the written prediction
    # against the source label, counted by hand, is the figure reported, in metrics.json and in the CSV.
    predicted = np.asarray(written.dataobj) > 0
    reference = np.asarray(nib.load(str(images[predictions[0].name]).replace("imagesTr", "labelsTr")).dataobj) > 0
    assert reference.any()
    dice = 2 * (predicted & reference).sum() / (predicted.sum() + reference.sum())
    assert metrics["dice"] == pytest.approx(dice, rel=1e-6)
    assert float(rows[1].split(",")[1]) == pytest.approx(dice, abs=1e-6)
    assert list(out.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("image_size, given", [("24,24,24", "24,24,24"), ("0", "0,0"), ("24,-1", "24,-1")])
def test_an_image_size_of_the_wrong_length_or_not_positive_stops_at_parsing(tmp_path, image_size, given):
    # The task folder does not exist: the check must come before any data is read or folder written.
    with pytest.raises(SystemExit, match=f"^--image-size {given}: give 1 or 2 positive integers \\(H,W"):
        train_atrium.main(["--data-dir", str(tmp_path / "missing"), "--image-size", image_size, "--out",
                           str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_resume_finishes_the_same_run_and_existing_runs_are_kept(tmp_path, cache_dir, monkeypatch):
    full = run(tmp_path / "full", cache_dir, "--epochs", "2")
    save_checkpoint = train_atrium.save_checkpoint

    def save_then_die(state, path):
        save_checkpoint(state, path)
        if path.name == "last.pt" and state["epoch"] == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_atrium, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", cache_dir, "--epochs", "2")
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="already holds a run"):
        run(tmp_path / "cut", cache_dir, "--epochs", "2")

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"{path} was opened, but the cache holds everything a resumed run needs")

    monkeypatch.setattr(nib, "load", refuse)
    assert train_atrium.main(["--resume", str(tmp_path / "cut" / "last.pt")]) == full


@pytest.mark.slow  # traces the model
def test_compiled_training_traces_no_graph_after_its_first_epoch(tmp_path, cache_dir, count_compiled_graphs):
    counts = count_compiled_graphs(train_atrium, "train_one_epoch", "validate_volumes")
    run(tmp_path / "run", cache_dir, "--compile", "--epochs", "2")
    traced = counts["train_one_epoch"][0]
    assert traced > 0 and counts == {"train_one_epoch": [traced] * 2, "validate_volumes": [traced] * 2}


@pytest.mark.slow  # two torchrun processes
def test_torchrun_two_cpu_processes_share_the_epoch_and_rank_zero_alone_writes(tmp_path, cache_dir):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/torchrun_recipe.py", "train_atrium", *TINY, "--device", "cpu",
               "--epochs", "2", "--cache-dir", str(cache_dir), "--out", str(out)]
    finished = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]  # one process logged
    assert all(r["steps"] == 1 for r in log)  # 8 slices per epoch = 2 processes x 1 batch of 4
    assert 0 <= json.loads((out / "metrics.json").read_text())["dice"] <= 1
    assert (tmp_path / "rank1_found_metrics").read_text() == "True"  # rank 1 left after rank 0 wrote them


def test_several_classes_train_with_cross_entropy_plus_dice_by_default():
    from engine.config import parse_config
    from losses import DiceCELoss, DiceLoss, build_loss

    config, _ = parse_config(train_atrium.Config, ["--data-dir", "/data/Task27_ACDC"], "", train_atrium.SYNTHETIC_PROFILE)
    assert type(build_loss(config.loss, 4)) is DiceCELoss  # Dice alone stalled ACDC's myocardium
    assert type(build_loss(config.loss, 1)) is DiceLoss  # the atrium: as measured before
