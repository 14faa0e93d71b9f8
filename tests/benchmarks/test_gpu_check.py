"""`benchmarks/gpu_check.py`: the smoke run exercises every part on the CPU and reports it in the JSON
and the table; a part that fails or overruns its budget is flagged and the others still run."""

import dataclasses
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[2]
PARTS = ["environment", "liver_train", "liver_resume", "predict", "steps_3d", "steps_2d", "sliding_window", "loader"]


@pytest.mark.slow  # the check in a process of its own, each part forked from it
def test_smoke_run_measures_every_part_and_prints_one_table(tmp_path):
    completed = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)],
                               cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = results["parts"]
    assert list(parts) == PARTS and results["device"] == "cpu" and results["smoke"]
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(PARTS, "ok"), \
        {name: part.get("error") for name, part in parts.items()}

    assert {"torch", "cuda", "cudnn", "cpu_count", "available_cores", "shared_memory_gib"} <= set(parts["environment"])
    train, resume = parts["liver_train"], parts["liver_resume"]
    assert len(train["epochs"]) == 2 and len(resume["epochs"]) == 1  # the resume ran epoch 3 alone
    # The counting backend saw the compiled graphs: some in the first epoch, none later (validation included).
    assert train["graphs_first_epoch"] > 0 and train["graphs_after_first_epoch"] == 0
    assert resume["graphs_first_epoch"] > 0 and resume["graphs_after_first_epoch"] == 0
    assert parts["predict"]["dice"] == {"cpu fp32 vs CPU fp32": {"liver": 1.0, "cancer": 1.0}}  # the same mask
    for name in ("steps_3d", "steps_2d"):
        combinations = parts[name]["combinations"]
        assert set(combinations) == {f"{norm}/{layout}" for norm in ("instance_norm", "group_norm")
                                     for layout in ("contiguous", "channels_last")}
        assert all(figures["step_s"] > 0 and figures["forward_s"] > 0 and figures["finite"]
                   for figures in combinations.values())
        assert parts[name]["rule_pick"] == "group_norm/channels_last"  # the CPU's choice in engine/layout.py
    window = parts["sliding_window"]
    assert window["windows"] == 64 and len(window["call_s"]) == 2 and window["placement"] == []  # no choice on a CPU
    assert set(parts["loader"]["workers"]) == {"0", "1"}
    assert all(figures["patches_per_s"] > 0 for figures in parts["loader"]["workers"].values())

    table = (tmp_path / "gpu_check.md").read_text()
    assert table in completed.stdout  # printed as saved
    assert "| part | figure | measured | good | ok |" in table
    assert "| graphs compiled in the first epoch / after it (validation included) | 1 / 0 | > 0 / 0 | yes |" in table
    assert "| no |" not in table  # nothing judged failed on the CPU
    for name in PARTS:  # every part has its rows, each with five cells
        rows = [line for line in table.splitlines() if line.startswith(f"| {gpu_check.PARTS[name].title} |")]
        assert rows and all(line.count(" | ") == 4 for line in rows), name
        assert (tmp_path / "logs" / f"{name}.log").exists()


@pytest.mark.slow  # each part in a forked process
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="parts run in forked processes")
def test_a_part_that_fails_or_overruns_is_flagged_and_the_others_still_run(tmp_path, monkeypatch):
    def overrun(context):
        context.row("measured before the budget ran out", "1 s")
        time.sleep(60)

    def fail(context):
        raise RuntimeError("broken on purpose")

    def fine(context):
        context.row("a figure", "42")

    monkeypatch.setattr(gpu_check, "PARTS", {"dependent": gpu_check.Part("dependent part", fine, needs_checkpoint=True),
                                             "broken": gpu_check.Part("broken part", fail),
                                             "fine": gpu_check.Part("fine part", fine),
                                             "slow": gpu_check.Part("slow part", overrun),
                                             "late": gpu_check.Part("late part", fine)})
    budgets = dict.fromkeys(gpu_check.PARTS, 30) | {"slow": 3}
    monkeypatch.setattr(gpu_check, "SMOKE", dataclasses.replace(gpu_check.SMOKE, budgets_s=budgets))
    monkeypatch.setattr(gpu_check, "PART_MINIMUM_S", 1)
    started = time.monotonic()
    results = gpu_check.main(["--smoke", "--out", str(tmp_path), "--time-limit", "4"])
    assert time.monotonic() - started < 30  # the sleeping part was stopped at its budget
    parts = results["parts"]
    assert parts["dependent"]["status"] == "skipped" and "liver_train did not write it" in parts["dependent"]["error"]
    assert parts["broken"]["status"] == "failed" and "broken on purpose" in parts["broken"]["error"]
    assert "RuntimeError: broken on purpose" in parts["broken"]["log_tail"]
    assert parts["fine"]["status"] == "ok"
    assert parts["slow"]["status"] == "timed out" and parts["slow"]["rows"][0]["measured"] == "1 s"
    # Under a second of the 4 s --time-limit is left after the slow part's 3: the last is not started.
    assert parts["late"]["status"] == "skipped" and "left of the time limit" in parts["late"]["error"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| slow part | measured before the budget ran out | 1 s |  | - |" in table
    # Its budget is 3 s, or what is left of the 4 s limit when the forked parts before it were slow.
    assert re.search(r"\| slow part \| status \| timed out: stopped after its budget of [1-3] s \| ok \| no \|", table)
    assert "| broken part | status | failed: RuntimeError: broken on purpose | ok | no |" in table
    assert "| fine part | a figure | 42 |  | - |" in table
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["fine"]["rows"][0]["measured"] == "42"


@pytest.mark.slow  # each part in a forked process
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="parts run in forked processes")
def test_sigterm_stops_the_running_part_and_writes_what_was_measured(tmp_path, monkeypatch):
    def terminate_the_check(context):
        context.result["pid"] = os.getpid()
        context.row("measured before the signal", "7 s")
        os.kill(os.getppid(), signal.SIGTERM)  # as a job's time limit would
        time.sleep(60)

    def fine(context):
        context.row("a figure", "42")

    monkeypatch.setattr(gpu_check, "PARTS", {"fine": gpu_check.Part("fine part", fine),
                                             "stopped": gpu_check.Part("stopped part", terminate_the_check),
                                             "never": gpu_check.Part("never part", fine)})
    budgets = dict.fromkeys(gpu_check.PARTS, 30)
    monkeypatch.setattr(gpu_check, "SMOKE", dataclasses.replace(gpu_check.SMOKE, budgets_s=budgets))
    handler = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--smoke", "--out", str(tmp_path)])
    assert time.monotonic() - started < 30 and signal.getsignal(signal.SIGTERM) == handler
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["fine", "stopped"] and parts["fine"]["status"] == "ok"
    assert parts["stopped"]["status"] == "interrupted" and parts["stopped"]["rows"][0]["measured"] == "7 s"
    with pytest.raises(ProcessLookupError):  # the part's process was stopped, not left sleeping
        os.kill(parts["stopped"]["pid"], 0)
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| stopped part | status | interrupted: Ctrl-C or SIGTERM | ok | no |" in table


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="parts run in forked processes")
def test_a_sigterm_whose_interrupt_was_lost_still_ends_the_wait_for_a_part():
    # A SIGTERM landing in fork's at-fork callbacks raises where Python can only print and ignore the
    # KeyboardInterrupt; the handler's flag must still stop the wait long before the part's budget.
    import threading

    part = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    part.start()
    gpu_check.terminated.clear()
    threading.Timer(0.5, gpu_check.terminated.set).start()  # the flag alone, as when the raise was lost
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            gpu_check.wait_for_part(part, budget_s=60)
        assert time.monotonic() - started < 10
    finally:
        gpu_check.terminated.clear()
        part.kill()
        part.join()
