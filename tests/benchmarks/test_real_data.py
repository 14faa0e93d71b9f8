"""The side-by-side runner: budget arithmetic, the commands it builds (read back by each script's own
parser), the table, and one real run of our recipe on a tiny phantom. No MONAI needed."""

import json

import pytest

import train_atrium
import train_liver3d
from benchmarks import real_data, reference_monai
from data.synthetic.liver import ensure_liver_phantom
from engine.config import build_parser


def parse(script, command):
    """The flags of a built command as the script itself reads them."""
    config_class = {"train_liver3d.py": train_liver3d.Config, "train_atrium.py": train_atrium.Config,
                    real_data.REFERENCE_SCRIPT: reference_monai.Config}[script]
    assert command[0] == script
    return vars(build_parser(config_class, "").parse_args(command[1:]))


def test_steps_split_into_whole_epochs():
    assert real_data.split_steps(500, 20) == (20, 25)
    assert real_data.split_steps(495, 15) == (15, 33)
    assert real_data.split_steps(3, 20) == (3, 1)  # fewer steps than epochs: epochs of one step
    with pytest.raises(ValueError, match="choose --epochs 3 .* or --steps 500"):
        real_data.split_steps(501, 20)  # 501 = 3 x 167
    with pytest.raises(ValueError, match="at least 1"):
        real_data.split_steps(0, 20)


def test_window_sizes():
    assert real_data.parse_window("32", 3) == (32, 32, 32)
    assert real_data.parse_window("16,96,80", 3) == (16, 96, 80)
    assert real_data.parse_window("112", 2) == (112, 112)
    with pytest.raises(SystemExit, match="--patch-size is needed in 3D"):  # the recipe's own is planned for a GPU
        real_data.parse_window(None, 3)
    assert real_data.parse_window(None, 2) == train_atrium.Config.image_size


def test_3d_commands_give_every_run_the_same_budget(tmp_path):
    budget = real_data.Budget(steps=495, epochs=15, steps_per_epoch=33, batch_size=7, window=(16, 48, 80))
    parsed = {}
    for name, variant in real_data.VARIANTS[3].items():
        command = real_data.build_command(variant, budget, spatial_dims=3, data_dir="/data/Task28", seed=3,
                                          workers=2, cache_dir="/tmp/c", out=tmp_path / name, base_channels=13)
        parsed[name] = flags = parse(variant.script, command)
        assert (flags["data_dir"], flags["seed"], flags["workers"], flags["cache_dir"], flags["out"]) == (
            "/data/Task28", 3, 2, "/tmp/c", str(tmp_path / name))
        assert flags["batch_size"] == 7 and flags["patch_size"] == (16, 48, 80)
    for name in ("ours", "nnunet"):
        flags = parsed[name]
        assert flags["epochs"] * flags["steps_per_epoch"] == 495 and flags["val_every"] == flags["epochs"] == 15
        assert flags["base_channels"] == 13
    assert "optimizer" not in parsed["ours"] and "recipe" not in parsed["ours"]  # the recipe's defaults
    assert parsed["nnunet"]["recipe"] == "nnunet"
    resolved = real_data.recipe_settings(real_data.build_command(
        real_data.VARIANTS[3]["nnunet"], budget, spatial_dims=3, data_dir="/d", seed=3, workers=2, cache_dir="/c",
        out=tmp_path / "n", base_channels=13))
    nnunet = json.loads(resolved)[1]
    assert (nnunet["optimizer"], nnunet["lr"], nnunet["momentum"], nnunet["schedule"], nnunet["foreground_share"],
            nnunet["foreground_sampling"]) == ("sgd", 0.01, 0.99, "poly", 0.33, "per_batch")
    reference = parsed["monai"]
    assert reference["steps"] == 495 and "base_channels" not in reference and "spatial_dims" not in reference


def test_2d_commands_count_an_epoch_in_slices(tmp_path):
    budget = real_data.Budget(steps=495, epochs=15, steps_per_epoch=33, batch_size=7, window=(112, 80))
    parsed = {}
    for name, variant in real_data.VARIANTS[2].items():
        command = real_data.build_command(variant, budget, spatial_dims=2, data_dir="/d", seed=0, workers=0,
                                          cache_dir="/c", out=tmp_path / name, base_channels=None)
        parsed[name] = parse(variant.script, command)
        assert parsed[name]["image_size"] == (112, 80) and parsed[name]["batch_size"] == 7
    for name in ("ours", "nnunet"):
        flags = parsed[name]
        # The atrium loader drops the last incomplete batch: steps per epoch = samples // batch.
        assert flags["epochs"] * (flags["samples_per_epoch"] // flags["batch_size"]) == 495
        assert flags["samples_per_epoch"] % flags["batch_size"] == 0 and flags["val_every"] == 15
        assert "base_channels" not in flags
    assert parsed["nnunet"]["foreground_share"] == 0.33 and parsed["nnunet"]["optimizer"] == "sgd"
    assert parsed["monai"]["spatial_dims"] == 2 and parsed["monai"]["steps"] == 495


def test_table_has_a_row_per_run_and_names_failures():
    runs = [
        {"run": "ours", "seed": 0, "command": ["train_liver3d.py", "--data-dir", "/d x"], "wall_time_s": 587.4,
         "environment": {"OMP_NUM_THREADS": "1"}, "returncode": 0, "metrics": {"dice_liver": 0.91234, "dice_cancer": 0.5, "dice_mean": 0.70617,
                                      "hd95_liver": 3.1}},
        {"run": "monai", "seed": 1, "command": ["benchmarks/reference_monai.py"], "wall_time_s": 41.6,
         "returncode": 1},
        {"run": "monai", "seed": 2, "command": ["benchmarks/reference_monai.py"], "wall_time_s": 61.0,
         "returncode": 0, "metrics": {"dice_liver": 0.8, "dice_cancer": 0.4, "dice_mean": 0.6},
         "largest_piece": False, "largest_piece_metrics": {"dice_liver": 0.9, "dice_cancer": 0.4, "dice_mean": 0.65}},
    ]
    runs[0]["largest_piece"] = True
    assert real_data.format_table(runs).splitlines() == [
        "| run | seed | dice_liver | dice_cancer | dice_mean | largest piece kept | wall time | command |",
        "|---|---|---|---|---|---|---|---|",
        "| ours | 0 | 0.9123 | 0.5000 | 0.7062 | yes | 9 min 47 s | `OMP_NUM_THREADS=1 python train_liver3d.py --data-dir '/d x'` |",
        "| monai | 1 | failed (exit status 1) | - | - | - | 42 s | `python benchmarks/reference_monai.py` |",
        "| monai | 2 | 0.8000 | 0.4000 | 0.6000 | no | 1 min 1 s | `python benchmarks/reference_monai.py` |",
        "| monai, largest piece kept | 2 | 0.9000 | 0.4000 | 0.6500 | yes | (the run above) | - |",
    ]


def test_post_processing_is_read_from_the_run_folder(tmp_path):
    recipe, reference, failed = (tmp_path / name for name in ("recipe", "reference", "failed"))
    for folder in (recipe, reference, failed):
        folder.mkdir()
    (recipe / "config.json").write_text(json.dumps({"keep_largest_component": True, "lr": 0.001}))
    (reference / "summary.json").write_text(json.dumps({"largest_piece_kept": {"dice_mean": 0.7}, "steps": 2}))
    assert real_data.post_processing(recipe) == {"largest_piece": True}
    assert real_data.post_processing(reference) == {"largest_piece": False,
                                                    "largest_piece_metrics": {"dice_mean": 0.7}}
    assert real_data.post_processing(failed) == {}


def test_flags_the_runner_refuses(capsys):
    with pytest.raises(SystemExit):
        real_data.parse_args(["--data-dir", "/d", "--only", "ours,nnUNet"])
    assert "unknown runs ['nnUNet']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        real_data.parse_args(["--data-dir", "/d", "--2d", "--patch-size", "32"])
    assert "--image-size for --2d" in capsys.readouterr().err


def test_runner_runs_our_recipe_and_reports_it(tmp_path, capsys):
    data_dir = ensure_liver_phantom(tmp_path / "synthetic", num_cases=4, matrix=24)
    out = tmp_path / "runs"
    runs = real_data.main(["--data-dir", str(data_dir), "--steps", "3", "--epochs", "5", "--patch-size", "32",
                           "--batch-size", "1", "--base-channels", "4", "--only", "ours", "--workers", "0", "--threads", "1",
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert [(run["run"], run["seed"], run["returncode"]) for run in runs] == [("ours", 0, 0)]
    assert runs[0]["environment"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    recorded = json.loads((out / "ours-seed0" / "metrics.json").read_text())
    assert runs[0]["metrics"] == recorded and {"dice_liver", "dice_cancer", "dice_mean"} <= set(recorded)
    log = [json.loads(line) for line in (out / "ours-seed0" / "log.jsonl").read_text().splitlines()]
    assert [record["steps"] for record in log] == [1, 1, 1]  # 3 steps = 3 epochs of 1
    # Validated once: the pseudo-Dice after the last step, the whole volumes (metrics.json) after training.
    assert "pseudo_dice_mean" in log[-1] and all("pseudo_dice_mean" not in record for record in log[:-1])
    report = json.loads((out / "real_data.json").read_text())
    assert report["budget"] == {"steps": 3, "epochs": 3, "steps_per_epoch": 1, "batch_size": 1, "window": [32, 32, 32]}
    validated = [row.split(",")[0] for row in (out / "ours-seed0" / "dice_per_case.csv").read_text().splitlines()[1:]]
    assert report["validation_cases"] == validated  # the split reported is the one the recipe validated on
    assert report["table"] in capsys.readouterr().out
    assert f"| ours | 0 | {recorded['dice_liver']:.4f} |" in report["table"]
    kept = json.loads((out / "ours-seed0" / "config.json").read_text())["keep_largest_component"]
    assert runs[0]["largest_piece"] is kept and f"| {'yes' if kept else 'no'} |" in report["table"]


def test_a_variant_that_resolves_to_an_earlier_run_is_not_run_again(tmp_path, monkeypatch, capsys):
    default_optimizer = train_liver3d.Config.optimizer
    monkeypatch.setitem(real_data.VARIANTS, 3, {
        "ours": real_data.Variant("train_liver3d.py"),
        "nnunet": real_data.Variant("train_liver3d.py", ("--optimizer", default_optimizer)),  # the default again
        "monai": real_data.Variant("train_liver3d.py", ("--lr", "0.009")),
    })
    monkeypatch.setattr(real_data, "prepare_cache", lambda *args, **kwargs: (["a", "b"], ["c"]))
    started = []

    def run_one(name, seed, command, *, environment, log_path):
        started.append((name, seed))
        return {"run": name, "seed": seed, "command": command, "environment": environment, "wall_time_s": 61.0,
                "returncode": 0, "log": str(log_path), "metrics": {"dice_x": 0.25 * len(started), "dice_mean": 0.5}}

    monkeypatch.setattr(real_data, "run_one", run_one)
    runs = real_data.main(["--data-dir", "/d", "--steps", "4", "--seeds", "0,1", "--patch-size", "32", "--out",
                           str(tmp_path)])
    assert started == [("ours", 0), ("monai", 0), ("ours", 1), ("monai", 1)]  # seeds are runs of their own
    nnunet = runs[1]
    assert (nnunet["run"], nnunet["seed"], nnunet["same_as"], nnunet["metrics"]) == ("nnunet", 0, "ours",
                                                                                     runs[0]["metrics"])
    assert nnunet["command"][-2:] == ["--optimizer", default_optimizer]
    assert "| nnunet (= ours) | 0 | 0.2500 | 0.5000 | - | 1 min 1 s |" in capsys.readouterr().out


def test_recipe_settings_are_the_recipes_resolved_config():
    command = ["train_liver3d.py", "--data-dir", "/d", "--out", "/runs/a", "--lr", "0.01"]
    same = ["train_liver3d.py", "--data-dir", "/d", "--out", "/runs/b", "--lr", "1e-2"]  # only the folder differs
    assert real_data.recipe_settings(command) == real_data.recipe_settings(same)
    assert real_data.recipe_settings(command) != real_data.recipe_settings([*command, "--lr", "0.02"])
    assert real_data.recipe_settings([real_data.REFERENCE_SCRIPT, "--data-dir", "/d"]) is None
