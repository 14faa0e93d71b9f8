"""End-to-end runs of the pneumonia recipe on a tiny synthetic RSNA folder: metrics, CAM overlays,
a self-contained checkpoint, exact resume, and the pos_weight / Grad-CAM options."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_pneumonia
from engine.checkpoint import load_checkpoint

TINY = ["--synthetic-patients", "36", "--synthetic-matrix", "48", "--image-size", "32", "--batch-size", "6",
        "--workers", "0", "--warmup-steps", "2", "--cam-images", "3", "--val-fraction", "0.3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(out, cache_dir, *flags):
    return train_pneumonia.main([*TINY, "--cache-dir", str(cache_dir), "--out", str(out), *flags])


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_run_writes_metrics_cams_and_a_self_contained_checkpoint(tmp_path, cache_dir):
    metrics = run(tmp_path / "run", cache_dir, "--epochs", "2")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written == metrics
    for key in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "accuracy_youden",
                "sensitivity_youden", "specificity_youden", "precision_youden", "f1_youden",
                "threshold_youden", "cam_in_box", "cam_peak_in_box", "box_area_fraction", "cam_in_box_detected",
                "cam_peak_in_box_detected", "box_area_fraction_detected"):
        assert isinstance(written[key], float) and np.isfinite(written[key]), key
    assert 0 < written["box_area_fraction"] < 1 and 0 < written["box_area_fraction_detected"] < 1
    assert len(list((tmp_path / "run" / "cam").glob("*.png"))) == 3
    checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    assert checkpoint["image_size"] == (32, 32) and checkpoint["task"] == "pneumonia"
    assert checkpoint["normalization"]["std"] > 0 and 0 <= checkpoint["threshold"] <= 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["weights"] == "none"
    with pytest.raises(SystemExit, match="already holds a run"):
        run(tmp_path / "run", cache_dir, "--epochs", "1")


def test_resume_continues_the_same_loss_curve(tmp_path, cache_dir, monkeypatch):
    full = run(tmp_path / "full", cache_dir, "--epochs", "3")

    # A second run of the same configuration dies right after writing last.pt of its second epoch.
    save_checkpoint = train_pneumonia.save_checkpoint

    def save_then_die(state, path):
        save_checkpoint(state, path)
        if path.name == "last.pt" and state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_pneumonia, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", cache_dir, "--epochs", "3")
    monkeypatch.undo()
    resumed = train_pneumonia.main(["--resume", str(tmp_path / "cut" / "last.pt")])

    full_log, cut_log = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["epoch"] for r in cut_log] == [0, 2]
    assert cut_log[1]["loss"] == full_log[2]["loss"]
    assert resumed == full


def test_pos_weight_grad_cam_and_flips_run(tmp_path, cache_dir):
    metrics = run(tmp_path / "run", cache_dir, "--epochs", "1", "--balance", "pos_weight", "--cam", "gradcam",
                  "--hflip")
    assert np.isfinite(metrics["auc"]) and 0 <= metrics["cam_in_box"] <= 1
    with pytest.raises(SystemExit, match="choose sampler, pos_weight or none"):
        run(tmp_path / "other", cache_dir, "--balance", "oversample")


def test_a_picture_that_cannot_be_drawn_costs_no_results(tmp_path, cache_dir, monkeypatch, capsys):
    """PIL refuses some pictures (a box scaled below one pixel, before the overlay learned to draw
    those); the run must still write its metrics and checkpoints, and name the film it skipped."""
    def refuse(path, *args, **kwargs):
        raise ValueError("x1 must be greater than or equal to x0")

    monkeypatch.setattr(train_pneumonia, "save_cam_overlay", refuse)
    metrics = run(tmp_path / "run", cache_dir, "--epochs", "1")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written == metrics and np.isfinite(written["auc"]) and "cam_in_box" in written
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "best.pt").is_file()
    assert not list((tmp_path / "run").glob("cam/*.png"))
    console = capsys.readouterr().out
    assert console.count("warning: no CAM overlay for film ") == 3  # --cam-images 3
    assert "x1 must be greater than or equal to x0" in console


def test_no_detected_positive_leaves_out_the_detected_scores(tmp_path, cache_dir, monkeypatch):
    """A Youden threshold above every probability detects no positive: the run reports the CAM scores
    over all positive films and leaves out the ``_detected`` ones, which have no films to average."""
    classification_metrics = train_pneumonia.classification_metrics

    def unreachable_threshold(probabilities, labels):
        return {**classification_metrics(probabilities, labels), "threshold_youden": 2.0}

    monkeypatch.setattr(train_pneumonia, "classification_metrics", unreachable_threshold)
    metrics = run(tmp_path / "run", cache_dir, "--epochs", "1")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert "cam_in_box" in metrics and not any(key.endswith("_detected") for key in metrics)
    assert len(list((tmp_path / "run" / "cam").glob("*.png"))) == 3


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        train_pneumonia.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data-dir", "--weights", "--balance", "--positive-share", "--hflip", "--freeze-backbone",
                 "--backbone-lr-factor", "--image-size", "--val-fraction", "--cam", "--resume", "--config"):
        assert flag in text


def test_benchmark_mode(tmp_path, cache_dir):
    results = run(tmp_path / "bench", cache_dir, "--benchmark", "2")
    assert results["steps"] == 2 and results["samples_per_s"] > 0
    assert not list((tmp_path / "bench").glob("*.pt"))


@pytest.mark.slow  # traces the model
def test_compiled_training_traces_no_graph_after_its_first_epoch(tmp_path, cache_dir, count_compiled_graphs):
    # The validation loader ends on a partial batch; validation and the CAMs run the plain model.
    counts = count_compiled_graphs(train_pneumonia, "train_one_epoch", "validate")
    run(tmp_path / "run", cache_dir, "--compile", "--epochs", "2")
    traced = counts["train_one_epoch"][0]
    assert traced > 0 and counts == {"train_one_epoch": [traced] * 2, "validate": [traced] * 2}


@pytest.mark.slow  # two torchrun processes
def test_torchrun_two_cpu_processes_train_with_batch_norm_and_rank_zero_alone_writes(tmp_path, cache_dir):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/torchrun_recipe.py", "train_pneumonia", *TINY, "--device", "cpu",
               "--epochs", "1", "--cache-dir", str(cache_dir), "--out", str(out)]
    finished = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    assert np.isfinite(json.loads((out / "metrics.json").read_text())["auc"])
    assert (tmp_path / "rank1_found_metrics").read_text() == "True"  # rank 1 left after rank 0 wrote them
