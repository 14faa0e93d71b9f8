"""Smoke test of `benchmarks/run.py --quick`: it runs and reports; no timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # the benchmarks in a process of their own
def test_quick_benchmark_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = completed.stdout
    assert "| ours (data.patches.PatchDataset) |" in report and "| target | measured | wanted | met |" in report
    results = json.loads(out.read_text())
    for column in ("16 full", "24 full", "16 light", "24 light"):
        ours = results["3d"][column]["ours (data.patches.PatchDataset)"]
        assert ours["median"] > 0 and ours["min"] <= ours["median"] <= ours["max"]
    assert results["3d"]["16 full"]["floor: scipy map_coordinates, order 1 + 0"]["median"] > 0
    assert results["sliding_window"]["windows"] > 0 and results["engine_step"]["bare loop"]["median"] > 0
    # Every peer either ran or is named as skipped.
    peers = ["TorchIO, Queue", "TorchIO, sample", "MONAI, RandCrop", "batchgenerators (", "batchgeneratorsv2", "Albumentations"]
    for peer in peers:
        assert peer in report


@pytest.mark.slow  # the benchmarks in a process, the training script in another
def test_end_to_end_part_times_the_training_script_with_extra_flags(tmp_path):
    out = tmp_path / "results.json"
    flags = "--synthetic-matrix 24 --synthetic-cases 4 --patch-size 16,24,24 --base-channels 4 --depth 3"
    completed = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--sections", "end_to_end", "--end-to-end-steps", "2",
         "--end-to-end-workers", "0", f"--end-to-end-args={flags}", "--out", str(out), "--cache-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(out.read_text())["end_to_end"]["0"]
    assert figures["steps"] == 2 and figures["samples_per_s"] > 0 and 0 <= figures["data_wait_fraction"] <= 1
    assert f"`train_liver3d.py --benchmark 2 {flags}`" in completed.stdout
