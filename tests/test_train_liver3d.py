"""End-to-end runs of the 3D recipe on tiny synthetic data: it learns, resumes exactly, repeats
exactly, and trains on another task layout unchanged."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_liver3d
from data.synthetic.msd_layout import write_msd_dataset
from engine.checkpoint import load_checkpoint, save_checkpoint
from models import UNet

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--synthetic-matrix", "24", "--synthetic-cases", "5", "--patch-size", "16,24,24", "--batch-size", "2",
        "--base-channels", "4", "--depth", "3", "--steps-per-epoch", "4", "--workers", "0",
        "--val-every", "1", "--lr", "0.01", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(out, cache_dir, *flags):
    return train_liver3d.main([*TINY, "--cache-dir", str(cache_dir), "--out", str(out), *flags])


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_resume_continues_the_same_loss_curve_and_runs_repeat(tmp_path, cache_dir, monkeypatch):
    full = run(tmp_path / "full", cache_dir, "--epochs", "3")

    # A second run of the same configuration dies right after writing last.pt of its second epoch.
    save_checkpoint = train_liver3d.save_checkpoint

    def save_then_die(state, path):
        save_checkpoint(state, path)
        if path.name == "last.pt" and state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_liver3d, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", cache_dir, "--epochs", "3")
    monkeypatch.undo()
    resumed = train_liver3d.main(["--resume", str(tmp_path / "cut" / "last.pt")])

    full_log, cut_log = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["epoch"] for r in cut_log] == [0, 2]  # the crash lost epoch 1's log line, not its weights
    assert cut_log[1]["loss"] == full_log[2]["loss"]
    assert resumed == full  # identical Dice: same seed, same numbers, interrupted or not
    assert set(full) == {"dice_liver", "dice_cancer", "dice_mean", "hd95_liver", "hd95_cancer", "nsd_liver",
                         "nsd_cancer"}
    assert all(np.isfinite(v) and (k.startswith("hd95") or 0 <= v <= 1) for k, v in full.items())


def test_periodic_validation_is_the_pseudo_dice_and_the_final_one_writes_the_results(tmp_path, cache_dir):
    out = tmp_path / "run"
    metrics = run(out, cache_dir, "--epochs", "2", "--val-patches-per-case", "3")
    log = read_log(out)
    # Every epoch (--val-every 1) logs the pseudo-Dice, never a whole-volume figure under its name.
    assert all({"pseudo_dice_liver", "pseudo_dice_cancer", "pseudo_dice_mean"} <= set(r) for r in log)
    assert not any(key.startswith(("dice_", "hd95_", "nsd_")) for r in log for key in r)
    assert load_checkpoint(out / "best.pt")["best_metric"] == max(r["pseudo_dice_mean"] for r in log)
    # The final validation: whole volumes, surface metrics, per-case table, predictions.
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert {"dice_liver", "hd95_liver", "nsd_liver", "dice_mean"} <= set(metrics)
    rows = (out / "dice_per_case.csv").read_text().splitlines()
    predictions = sorted(path.name for path in (out / "predictions").glob("*.nii.gz"))
    assert len(rows) == 1 + len(predictions) and len(predictions) >= 1
    assert rows[0].startswith("case,dice_liver,dice_cancer,hd95_liver")


def test_unusable_validation_settings_stop_before_training(tmp_path, cache_dir):
    with pytest.raises(SystemExit, match="val-patches-per-case 0"):
        run(tmp_path / "a", cache_dir, "--val-patches-per-case", "0")
    with pytest.raises(SystemExit, match="window-batch-size 0"):
        run(tmp_path / "b", cache_dir, "--window-batch-size", "0")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("patch", ["16,24", "16,24,24,8", "0,32,32", "-8"])
def test_a_patch_of_the_wrong_length_or_not_positive_stops_at_parsing(tmp_path, patch):
    # The task folder does not exist: the check must come before any data is read or folder written.
    with pytest.raises(SystemExit, match=f"^--patch-size {patch}: give 1 or 3 positive integers \\(z,y,x"):
        train_liver3d.main(["--data-dir", str(tmp_path / "missing"), "--patch-size", patch,
                            "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_saved_config_with_a_two_axis_patch_stops_at_parsing(tmp_path):
    config = dataclasses.asdict(train_liver3d.Config(data_dir=str(tmp_path / "missing"), out=str(tmp_path / "run")))
    config["patch_size"] = [16, 24]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="^--patch-size 16,24: give 1 or 3"):
        train_liver3d.main(["--config", str(tmp_path / "config.json")])


def test_a_second_start_and_a_resume_open_no_scan(tmp_path, cache_dir, monkeypatch):
    import nibabel

    first = run(tmp_path / "first", cache_dir, "--epochs", "1")

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"{path} was opened, but the cache holds everything a later start needs")

    monkeypatch.setattr(nibabel, "load", refuse)
    assert run(tmp_path / "second", cache_dir, "--epochs", "1") == first  # the same plan, the same run
    resumed = train_liver3d.main(["--resume", str(tmp_path / "first" / "last.pt"), "--epochs", "2"])
    assert [r["epoch"] for r in read_log(tmp_path / "first")] == [0, 1] and set(resumed) == set(first)


def test_existing_run_is_not_overwritten(tmp_path, cache_dir):
    run(tmp_path / "run", cache_dir, "--epochs", "1")
    with pytest.raises(SystemExit, match="already holds a run"):
        run(tmp_path / "run", cache_dir, "--epochs", "1")


def test_loss_falls(tmp_path, cache_dir):
    run(tmp_path / "run", cache_dir, "--epochs", "6", "--val-every", "6", "--steps-per-epoch", "6")
    losses = [r["loss"] for r in read_log(tmp_path / "run")]
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses


def test_outputs_in_source_geometry_and_bf16_autocast(tmp_path, cache_dir):
    import nibabel as nib

    # bf16 is forced: on a CPU without native bf16 kernels plain --amp stays in fp32.
    metrics = run(tmp_path / "run", cache_dir, "--epochs", "1", "--amp", "--amp-dtype", "bf16")
    assert np.isfinite(metrics["dice_mean"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["amp"] is True and config["patch_size"] == [16, 24, 24]
    images = sorted((cache_dir / "synthetic").glob("*/imagesTr/*.nii.gz"))
    predictions = sorted((tmp_path / "run" / "predictions").glob("*.nii.gz"))
    assert predictions
    for prediction in predictions:
        source = nib.load(next(p for p in images if p.name == prediction.name))
        written = nib.load(prediction)
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)


def test_another_task_with_two_channels_and_one_foreground_class(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(4):
        label = np.zeros((19, 17, 13), np.uint8)
        label[5:13, 4:12, 3:9] = 1
        image = rng.normal(0, 1, (19, 17, 13, 2)).astype(np.float32) + 100 + 3 * label[..., None]
        affine = np.diag([1.2, 1.2, 2.0, 1.0])
        cases.append((f"prostate_{i}", image, label, affine))
    root = write_msd_dataset(tmp_path / "Task05", name="Prostate", description="two MRI channels",
                             modality={0: "T2", 1: "ADC"}, labels={0: "background", 1: "gland"}, cases=cases,
                             tensor_image_size="4D")
    metrics = train_liver3d.main([
        "--data-dir", str(root), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
        "--patch-size", "8,16,16", "--base-channels", "4", "--depth", "2", "--epochs", "1",
        "--steps-per-epoch", "2", "--workers", "0", "--val-fraction", "0.25"])
    assert set(metrics) == {"dice_gland", "dice_mean", "hd95_gland", "nsd_gland"}


def test_every_flag_is_explained_in_help():
    import dataclasses

    from engine.config import build_parser, field_comments

    comments = field_comments(train_liver3d.Config)
    assert all(comments.get(f.name) for f in dataclasses.fields(train_liver3d.Config))
    help_text = build_parser(train_liver3d.Config, "").format_help()
    for flag in ["--data-dir", "--out", "--patch-size", "--batch-size", "--epochs", "--steps-per-epoch", "--lr",
                 "--amp", "--compile", "--workers", "--device", "--seed", "--val-every", "--spacing",
                 "--foreground-share", "--base-channels", "--cache-dir"]:
        assert flag in help_text


def test_benchmark_times_steps_across_epochs_and_writes_no_checkpoint(tmp_path, cache_dir):
    results = run(tmp_path / "bench", cache_dir, "--benchmark", "6")  # 6 steps > 4 per epoch
    assert results["steps"] == 6 and results["steps_per_s"] > 0 and results["samples_per_s"] > 0
    assert 0 <= results["data_wait_fraction"] <= 1 and results["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text()) == results
    assert not list((tmp_path / "bench").glob("*.pt"))


@pytest.mark.slow  # a training process killed, then a second one resuming
def test_a_run_killed_at_a_random_moment_resumes_to_the_same_result(tmp_path, cache_dir):
    # SIGKILL gives the process no chance to clean up: whatever last.pt holds must be whole, and the
    # resumed run must end where an uninterrupted one does.
    run(tmp_path / "full", cache_dir, "--epochs", "4")
    command = [sys.executable, "train_liver3d.py", *TINY, "--cache-dir", str(cache_dir), "--epochs", "4"]
    process = subprocess.Popen([*command, "--out", str(tmp_path / "cut")], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    log = tmp_path / "cut" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 2) and process.poll() is None:
        assert time.monotonic() < deadline, "the run wrote no epoch in two minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # somewhere in the third epoch, or later if it was fast
    process.wait()
    subprocess.run([sys.executable, "train_liver3d.py", "--resume", str(tmp_path / "cut" / "last.pt")], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text()) == full
    losses = {r["epoch"]: r["loss"] for r in read_log(tmp_path / "cut")}
    assert losses[3] == read_log(tmp_path / "full")[3]["loss"]


def test_a_checkpoint_from_before_planned_networks_resumes_with_its_uniform_network(tmp_path, cache_dir):
    # The tiny phantom's ~16 mm pixels and 3 mm slices would plan z-only levels; the old network halved
    # every axis, and its weights must load.
    run(tmp_path / "run", cache_dir, "--epochs", "1")
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    for key in ("strides", "kernel_sizes", "memory_format"):
        del state["config"][key]
    save_checkpoint(state, tmp_path / "run" / "last.pt")
    train_liver3d.main(["--resume", str(tmp_path / "run" / "last.pt"), "--epochs", "2"])
    assert [r["epoch"] for r in read_log(tmp_path / "run")] == [0, 1]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["strides"] == ((2, 2, 2),) * 2


@pytest.mark.slow  # traces the model
def test_compiled_training_traces_no_graph_after_its_first_epoch(tmp_path, cache_dir, count_compiled_graphs):
    # Validation (no grad, eval mode, the last window batch of 1, mirrored windows) runs the plain
    # model; through the compiled one it traced a graph for each change.
    counts = count_compiled_graphs(train_liver3d, "train_one_epoch", "validate_patches", "validate")
    run(tmp_path / "run", cache_dir, "--compile", "--epochs", "2", "--steps-per-epoch", "2")
    traced = counts["train_one_epoch"][0]
    assert traced > 0 and counts == {"train_one_epoch": [traced] * 2, "validate_patches": [traced] * 2,
                                     "validate": [traced]}


@pytest.mark.slow
def test_torchrun_three_cpu_processes_step_together_and_rank_zero_alone_writes(tmp_path, cache_dir):
    # 4 batches an epoch over 3 processes: each takes 2 whole batches, so all step and stay in lockstep.
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
               "tests/torchrun_recipe.py", "train_liver3d", *TINY, "--device", "cpu", "--epochs", "2",
               "--cache-dir", str(cache_dir), "--out", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_WEIGHTS_DIR": str(tmp_path)}
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600,
                              check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1] and all(r["steps"] == 2 for r in log)  # one process logged
    assert finished.stdout.count("epoch 2/2: loss") == 1
    for epoch in range(2):  # every rank ends every epoch with the same weights
        weights = [torch.load(tmp_path / f"rank{rank}_epoch{epoch}.pt") for rank in range(3)]
        assert all(torch.equal(weights[0][name], other[name]) for other in weights[1:] for name in weights[0])
    checkpoint = load_checkpoint(out / "last.pt")
    assert all(torch.equal(value, weights[0]["module." + name]) for name, value in checkpoint["model"].items())
    assert not any(key.startswith("module.") for key in checkpoint["model"])  # the plain model, no DDP wrapper
    config = checkpoint["config"]
    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, base_channels=config["base_channels"],
                 depth=config["depth"], max_channels=config["max_channels"], norm="group_norm",
                 upsample=config["upsample"], deep_supervision=config["deep_supervision"],
                 strides=config["strides"], kernel_sizes=config["kernel_sizes"])
    model.load_state_dict(checkpoint["model"])  # strict: every key of a plain UNet, none of DDP's
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["dice_liver"] <= 1 and (out / "best.pt").is_file()
    # Both processes scored their share of the validation patches each epoch (a rank that skipped the
    # all-reduce would have left the other waiting); rank 0 then validated the whole volumes alone.
    assert all(0 <= r["pseudo_dice_mean"] <= 1 for r in read_log(out))
    assert finished.stdout.count("pseudo-Dice over") == 2
    assert (out / "dice_per_case.csv").is_file() and list((out / "predictions").glob("*.nii.gz"))
    # Ranks 1 and 2 waited for those results before leaving the process group.
    assert [(tmp_path / f"rank{rank}_found_metrics").read_text() for rank in (1, 2)] == ["True", "True"]


def test_final_validation_mirrors_only_along_the_axes_training_flipped(tmp_path, monkeypatch):
    # Trained with left-right flips only: mirroring along z or y at validation would show the model
    # images it never saw in training.
    import torch

    from data.augment3d import Augment3DConfig
    from engine.logging import RunLogger

    calls = []

    def recording_evaluate(model, cases, **settings):
        calls.append(settings)
        return {"per_case": {}, "mean": {1: 0.5}, "surface_per_case": {},
                "surface_mean": {1: {"hd95_mm": 1.0, "nsd": 0.5}}}

    monkeypatch.setattr(train_liver3d, "evaluate", recording_evaluate)
    labels = {0: "background", 1: "liver"}
    settings = dict(labels=labels, spacing=(1.0, 1.0, 1.0), device=torch.device("cpu"), amp_dtype=None,
                    logger=RunLogger(tmp_path, active=False), epoch=0, save_dir=tmp_path / "predictions")
    for augment, tta in [(Augment3DConfig(mirror_axes=(2,)), True), (Augment3DConfig(p_mirror=0.0), True),
                         (Augment3DConfig(), False), (Augment3DConfig(), True)]:
        config = train_liver3d.Config(tta=tta, augment=augment)
        train_liver3d.validate(None, tmp_path, ["liver_0"], config=config, **settings)
    assert [call["mirror_axes"] for call in calls] == [(2,), (), (), (0, 1, 2)]


class Silent:
    def info(self, message):
        pass


def test_the_phantoms_pinned_network_is_what_the_planner_gives_at_the_default_matrix():
    from data.synthetic.liver import SLICE_THICKNESSES_MM
    from models.planning import plan_topology

    profile = train_liver3d.SYNTHETIC_PROFILE
    # Extremes of the default phantom's median spacing: 330-420 mm fields of view on 128 pixels.
    for thickness in SLICE_THICKNESSES_MM:
        for pixel in (330 / 128, 420 / 128):
            topology = plan_topology((thickness, pixel, pixel), profile["patch_size"], depth=profile["depth"])
            assert set(topology.strides) == set(profile["strides"])
            assert set(topology.kernel_sizes) == set(profile["kernel_sizes"])


def test_real_data_defaults_are_the_measured_recipe_and_the_phantom_keeps_its_own():
    from engine.config import parse_config

    def settings(*argv):
        config, _ = parse_config(train_liver3d.Config, list(argv), "", train_liver3d.SYNTHETIC_PROFILE,
                                 recipes=train_liver3d.RECIPES)
        return (config.optimizer, config.lr, config.weight_decay, config.schedule, config.warmup_steps,
                config.foreground_share, config.foreground_sampling)

    # Measured on real MRI (README, Real data): AdamW with warm-up and cosine, foreground forced per batch.
    # The learning rate is planned from the budget once the steps are known (None until then).
    assert settings("--data-dir", "/data/Task28") == ("adamw", None, 1e-4, "cosine", 50, 0.33, "per_batch")
    assert settings("--data-dir", "/data/Task28", "--recipe", "nnunet") == (
        "sgd", 0.01, 3e-5, "poly", 0, 0.33, "per_batch")
    assert settings("--data-dir", "/data/Task28", "--recipe", "nnunet", "--lr", "0.02")[:2] == ("sgd", 0.02)
    # The phantom's figures were measured with patches drawn one by one; its profile says so.
    assert settings()[-2:] == (0.8, "per_sample")


def plan(spacing, shape, **fields):
    config = train_liver3d.Config(**fields)
    return train_liver3d.plan_network(config, spacing, shape, Silent())


def test_unset_geometry_is_planned_and_thick_slices_rotate_in_plane_only():
    config = plan((10.0, 1.5625, 1.5625), (9.5, 241.0, 211.0))
    assert config.patch_size == (10, 256, 224) and config.depth == 7
    assert config.strides[:3] == ((1, 2, 2), (1, 2, 2), (2, 2, 2))
    assert config.kernel_sizes[:3] == ((1, 3, 3), (1, 3, 3), (3, 3, 3))
    assert config.augment.rotation_in_plane_only
    isotropic = plan((1.0, 1.0, 1.0), (300.0, 300.0, 300.0))
    assert isotropic.patch_size == (128, 128, 128) and isotropic.depth == 6
    assert isotropic.strides == ((2, 2, 2),) * 5 and not isotropic.augment.rotation_in_plane_only


def test_explicit_geometry_wins_over_the_plan():
    config = plan((10.0, 1.5, 1.5), (10.0, 240.0, 210.0), patch_size=(96,), strides=((2, 2, 2),), depth=3)
    assert config.patch_size == (96, 96, 96) and config.strides == ((2, 2, 2),) * 2 and config.depth == 3
    assert config.kernel_sizes == ((1, 3, 3), (1, 3, 3), (3, 3, 3))  # still planned from the spacing
    assert not config.augment.rotation_in_plane_only  # z is halved from the first level
    assert plan((1.0, 1.0, 1.0), (64.0, 64.0, 64.0), kernel_sizes=((1, 3, 3), (3, 3, 3))).depth == 2
    with pytest.raises(SystemExit, match="2 strides make 3 levels, not 4.*--depth"):
        plan((1.0, 1.0, 1.0), (64.0, 64.0, 64.0), strides=((2, 2, 2), (2, 2, 2)), depth=4)


def write_pieces_task(root: Path, second_piece_in: set[str]) -> Path:
    """Four cases; each label is one box, plus a second box apart from it in ``second_piece_in``."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(4):
        label = np.zeros((12, 16, 16), np.uint8)
        label[2:8, 2:8, 2:8] = 1
        if f"kidney_{i}" in second_piece_in:
            label[2:8, 10:15, 10:15] = 1
        image = rng.normal(0, 1, (12, 16, 16)).astype(np.float32) + 3 * label
        cases.append((f"kidney_{i}", image, label, np.eye(4)))
    return write_msd_dataset(root, name="Kidney", description="boxes", modality={0: "MRI"},
                             labels={0: "background", 1: "kidney"}, cases=cases)


@pytest.mark.parametrize("second_piece_in, planned", [(set(), True), ({"kidney_3"}, True), ({"kidney_1"}, False)])
def test_largest_piece_post_processing_is_planned_from_the_training_labels_alone(tmp_path, second_piece_in, planned):
    root = write_pieces_task(tmp_path / "task", second_piece_in)
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["kidney_0", "kidney_1", "kidney_2"], "val": ["kidney_3"]}]))
    config = train_liver3d.Config(data_dir=str(root), cache_dir=str(tmp_path / "cache"), splits_file=str(splits),
                                  fold=0, workers=0)
    _, _, entry, train_ids, _ = train_liver3d.prepare_data(config, Silent())
    assert train_liver3d.plan_postprocessing(config, entry, train_ids, Silent()).keep_largest_component is planned
    # A given setting wins, and a second start reads the shares cached in the entry.
    explicit = dataclasses.replace(config, keep_largest_component=not planned)
    assert train_liver3d.plan_postprocessing(explicit, entry, train_ids, Silent()).keep_largest_component is not planned
    assert set(json.loads((entry / "largest_foreground_share.json").read_text())) == set(train_ids)


def test_the_planned_post_processing_and_learning_rate_are_saved_with_the_run(tmp_path, monkeypatch):
    root = write_pieces_task(tmp_path / "task", set())  # one piece each: planned on
    monkeypatch.setattr(train_liver3d, "ADAMW_LR_STEPS", 1)  # 4 steps then plan ADAMW_LR x sqrt(1 / 4)
    train_liver3d.main(["--data-dir", str(root), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                        "--patch-size", "8,16,16", "--base-channels", "4", "--depth", "2", "--epochs", "2",
                        "--steps-per-epoch", "2", "--workers", "0", "--val-fraction", "0.25"])
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    for config in (json.loads((tmp_path / "run" / "config.json").read_text()), checkpoint["config"]):
        assert config["keep_largest_component"] is True
        assert config["lr"] == pytest.approx(train_liver3d.ADAMW_LR / 2)
    assert checkpoint["scheduler"]["base_lrs"] == [pytest.approx(train_liver3d.ADAMW_LR / 2)]  # what it trained with


def test_the_learning_rate_is_planned_from_the_optimizer_and_the_budget():
    def planned(total_steps, **fields):
        config = train_liver3d.Config(data_dir="/data/Task28", **fields)
        return train_liver3d.plan_learning_rate(config, total_steps, Silent()).lr

    # AdamW: 3e-3 up to 500 steps (measured there), 1 / sqrt(steps) beyond, never below 3e-4.
    assert planned(100) == planned(500) == 3e-3
    assert planned(2000) == 1.5e-3  # exactly the value the README's 2,000-step runs were trained with
    assert planned(8000) == pytest.approx(0.75e-3)
    assert planned(250_000) == 3e-4
    assert planned(2000, optimizer="sgd") == 0.01  # nnU-Net's, whatever the budget
    assert planned(2000, lr=0.02) == 0.02  # a given rate wins


def test_the_loss_takes_dice_over_the_batch_or_per_patch_as_configured(tmp_path, cache_dir, monkeypatch):
    made, dice_ce_loss = [], train_liver3d.DiceCELoss

    def recording_loss(**settings):
        made.append(settings["batch_dice"])
        return dice_ce_loss(**settings)

    monkeypatch.setattr(train_liver3d, "DiceCELoss", recording_loss)
    for flags in [(), ("--batch-dice", "false")]:
        run(tmp_path / str(len(made)), cache_dir, "--benchmark", "1", *flags)
    assert made == [True, False]  # nnU-Net's batch Dice by default; per patch (MONAI's) on request


def test_a_small_patch_is_planned_four_downsamplings_deep_unless_the_recipe_is_nnunets():
    from engine.config import parse_config

    # LA2018 at 1.25 mm with the 32^3 patch of the README's CPU runs (measured there: depth 5 ends higher).
    config = plan((1.25, 1.25, 1.25), (44.0, 72.0, 96.0), patch_size=(32, 32, 32))
    assert config.depth == 5 and config.strides == ((2, 2, 2),) * 4
    nnunet, _ = parse_config(train_liver3d.Config, ["--data-dir", "/data/Task28", "--recipe", "nnunet"], "",
                             train_liver3d.SYNTHETIC_PROFILE, recipes=train_liver3d.RECIPES)
    config = plan((1.25, 1.25, 1.25), (44.0, 72.0, 96.0), patch_size=(32, 32, 32),
                  min_downsamplings=nnunet.min_downsamplings)
    assert config.depth == 4 and config.strides == ((2, 2, 2),) * 3  # nnU-Net's rule: no axis below 4 voxels
