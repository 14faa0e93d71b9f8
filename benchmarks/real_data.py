"""Our recipe, our recipe with nnU-Net's optimisation, and the MONAI reference, side by side on real data.

    python benchmarks/real_data.py --data-dir ../shared/data/Task28_LA2018 --steps 500 --patch-size 32 --batch-size 8
    python benchmarks/real_data.py --data-dir ../shared/data/Task28_LA2018 --steps 500 --seeds 0,1 --only ours,monai
    python benchmarks/real_data.py --data-dir ../shared/data/Task28_LA2018 --2d --steps 500 --image-size 256

Every run trains on the same split (the recipe's default), the same patch (3D) or image size (2D), batch
size and number of optimizer steps, and is validated once, after the last step, on the same cases. A
budget of N steps is run by the recipes as epochs x steps per epoch (`--epochs`, default 20: 500 steps =
20 x 25), with `--val-every` = epochs, and by the reference as N steps. Each run is its own process
(so the wall times are separate and include the process start and the whole validation); the cache is
filled once beforehand, so no run's time includes the preprocessing. Prints one Markdown table (Dice
per class, mean Dice, whether only the largest foreground piece was kept, wall time, the exact command;
the reference's predictions are scored both as they are and with that filter) and writes it as JSON to `OUT/real_data.json`;
each run's folder is `OUT/<run>-seed<seed>` and its console output `OUT/logs/<run>-seed<seed>.log`.

The MONAI reference (`benchmarks/reference_monai.py`) needs MONAI (`benchmarks/requirements-bench.txt`);
`--only ours,nnunet` runs without it.
"""

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_atrium
import train_liver3d
from engine.config import parse_config


@dataclass(frozen=True)
class Variant:
    script: str  # run from the repository root
    flags: tuple[str, ...] = ()  # what makes the variant, added to the budget, data and seed flags every run gets


# The runs compared: the flags that make each one, in one place. nnU-Net's optimisation is SGD at lr 0.01
# with Nesterov momentum 0.99 and the poly schedule, a third of the samples on foreground (in 3D
# train_liver3d.py's `--recipe nnunet`, which also keeps nnU-Net's depth rule; in 2D, a third of the
# slices showing it).
NNUNET_2D = ("--optimizer", "sgd", "--lr", "0.01", "--momentum", "0.99", "--schedule", "poly")
VARIANTS = {
    3: {
        "ours": Variant("train_liver3d.py"),  # the recipe's defaults
        "nnunet": Variant("train_liver3d.py", ("--recipe", "nnunet")),
        "monai": Variant("benchmarks/reference_monai.py"),
    },
    2: {
        "ours": Variant("train_atrium.py"),
        "nnunet": Variant("train_atrium.py", (*NNUNET_2D, "--foreground-share", "0.33")),
        "monai": Variant("benchmarks/reference_monai.py", ("--spatial-dims", "2")),
    },
}
REFERENCE_SCRIPT = "benchmarks/reference_monai.py"
RECIPES = {"train_liver3d.py": train_liver3d, "train_atrium.py": train_atrium}


@dataclass(frozen=True)
class Budget:
    """What every run of one comparison trains with."""

    steps: int  # optimizer steps
    epochs: int  # the recipes' epochs (validation after the last only)
    steps_per_epoch: int  # steps = epochs x steps_per_epoch
    batch_size: int  # patches (3D) or slices (2D) per step
    window: tuple[int, ...]  # patch z,y,x (3D) or image size H,W (2D)


def split_steps(steps: int, epochs: int) -> tuple[int, int]:
    """(epochs, steps per epoch) whose product is exactly ``steps``: ``epochs`` of them, or ``steps``
    epochs of one step when there are fewer steps than epochs."""
    if steps < 1 or epochs < 1:
        raise ValueError(f"--steps {steps} --epochs {epochs}: both must be at least 1")
    epochs = min(epochs, steps)
    if steps % epochs:
        divisors = [d for d in range(1, steps + 1) if steps % d == 0]
        nearest = min(divisors, key=lambda d: abs(d - epochs))
        raise ValueError(f"--steps {steps} is not a whole number of epochs of --epochs {epochs}; "
                         f"choose --epochs {nearest} (a divisor of {steps}) or --steps {steps // epochs * epochs}")
    return epochs, steps // epochs


def parse_window(text: str | None, spatial_dims: int) -> tuple[int, ...]:
    """'32' -> (32, 32, 32) in 3D; '16,96,96' as given; None -> the recipe's default."""
    if text is None:
        if spatial_dims == 3:  # the recipe plans a GPU-sized patch; the reference needs one given
            raise SystemExit("--patch-size is needed in 3D (e.g. --patch-size 32): every run trains on that patch")
        return tuple(train_atrium.Config.image_size)
    sizes = tuple(int(size) for size in text.split(","))
    return sizes * spatial_dims if len(sizes) == 1 else sizes


def budget_flags(script: str, budget: Budget, *, spatial_dims: int) -> list[str]:
    """The flags that give ``script`` the budget: steps, batch and window, validation after the last step."""
    window = ",".join(str(size) for size in budget.window)
    if script == REFERENCE_SCRIPT:
        window_flag = "--patch-size" if spatial_dims == 3 else "--image-size"
        return ["--steps", str(budget.steps), "--batch-size", str(budget.batch_size), window_flag, window]
    epochs = ["--epochs", str(budget.epochs), "--val-every", str(budget.epochs), "--batch-size", str(budget.batch_size)]
    if script == "train_liver3d.py":
        return [*epochs, "--steps-per-epoch", str(budget.steps_per_epoch), "--patch-size", window]
    # train_atrium.py counts an epoch in slices and drops no slice: samples = steps x batch.
    return [*epochs, "--samples-per-epoch", str(budget.steps_per_epoch * budget.batch_size), "--image-size", window]


def build_command(variant: Variant, budget: Budget, *, spatial_dims: int, data_dir: str, seed: int, workers: int,
                  cache_dir: str, out: Path, base_channels: int | None,
                  spacing: str | None = None) -> list[str]:
    """The command line of one run (without the Python interpreter), from the repository root.
    ``base_channels`` goes to our U-Net only: the reference's network is fixed (BasicUNet 16-256)."""
    command = [variant.script, "--data-dir", data_dir, *budget_flags(variant.script, budget, spatial_dims=spatial_dims),
               "--seed", str(seed), "--workers", str(workers), "--cache-dir", cache_dir, "--out", str(out)]
    if base_channels is not None and variant.script != REFERENCE_SCRIPT:
        command += ["--base-channels", str(base_channels)]
    if spacing is not None:
        command += ["--spacing", spacing]
    return command + list(variant.flags)


def recipe_settings(command: list[str]) -> str | None:
    """Everything a recipe run trains with but its run folder, as the recipe itself resolves the flags
    over its defaults (JSON text), so that two variants that come to the same run are seen as one;
    None for the reference."""
    recipe = RECIPES.get(command[0])
    if recipe is None:
        return None
    config, _ = parse_config(recipe.Config, command[1:], recipe.__doc__, recipe.SYNTHETIC_PROFILE,
                             recipes=getattr(recipe, "RECIPES", None))
    settings = dataclasses.asdict(config)
    del settings["out"]
    return json.dumps([command[0], settings], sort_keys=True)


def format_duration(seconds: float) -> str:
    """'9 min 47 s', or '42 s' under a minute."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def format_table(runs: list[dict]) -> str:
    """One Markdown row per run: its name, seed, the Dice of each class, the mean Dice, whether only the
    largest foreground piece was kept, the wall time and the command. A run without metrics says that it
    failed and with which exit status; a variant that came to the same settings as an earlier run is
    named ``nnunet (= ours)`` and shows its results. The reference adds a row of the same predictions
    with the largest piece kept (``monai, largest piece kept``)."""
    classes = []
    for run in runs:
        classes += [key for key in run.get("metrics", {})
                    if key.startswith("dice_") and key != "dice_mean" and key not in classes]
    lines = ["| run | seed | " + " | ".join(classes + ["dice_mean", "largest piece kept", "wall time", "command"])
             + " |", "|---" * (len(classes) + 6) + "|"]

    def scores(metrics: dict) -> list[str]:
        return [f"{metrics[key]:.4f}" if key in metrics else "-" for key in classes + ["dice_mean"]]

    for run in runs:
        metrics = run.get("metrics")
        if metrics is None:
            row = [f"failed (exit status {run['returncode']})"] + ["-"] * (len(classes) + 1)
        else:
            kept = {True: "yes", False: "no"}.get(run.get("largest_piece"), "-")
            row = [*scores(metrics), kept]
        command = "`" + shell_line(run["command"], run.get("environment", {})) + "`"
        name = f"{run['run']} (= {run['same_as']})" if "same_as" in run else run["run"]
        lines.append(f"| {name} | {run['seed']} | " + " | ".join(
            [*row, format_duration(run["wall_time_s"]), command]) + " |")
        if "largest_piece_metrics" in run:
            lines.append(f"| {run['run']}, largest piece kept | {run['seed']} | " + " | ".join(
                [*scores(run["largest_piece_metrics"]), "yes", "(the run above)", "-"]) + " |")
    return "\n".join(lines)


def thread_environment(threads: int | None) -> dict[str, str]:
    """The variables that set the CPU threads of a run (torch reads them at start), or none."""
    if threads is None:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def shell_line(command: list[str], environment: dict[str, str]) -> str:
    """The command as one types it: 'OMP_NUM_THREADS=1 python train_liver3d.py ...'."""
    return " ".join([*(f"{name}={value}" for name, value in environment.items()), "python", shlex.join(command)])


def run_one(name: str, seed: int, command: list[str], *, environment: dict[str, str], log_path: Path) -> dict:
    """Run one command to its end, with ``environment`` added to ours and its console output into
    ``log_path``; its metrics from the ``metrics.json`` in its ``--out`` folder."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        completed = subprocess.run([sys.executable, *command], cwd=REPO, env=os.environ | environment, stdout=log,
                                   stderr=subprocess.STDOUT, check=False)
    wall_time = time.perf_counter() - started
    result = {"run": name, "seed": seed, "command": command, "environment": environment, "wall_time_s": wall_time,
              "returncode": completed.returncode, "log": str(log_path)}
    folder = Path(command[command.index("--out") + 1])
    if completed.returncode == 0 and (folder / "metrics.json").is_file():
        result["metrics"] = json.loads((folder / "metrics.json").read_text())
        result.update(post_processing(folder))
    return result


def post_processing(folder: Path) -> dict:
    """How a finished run's metrics were post-processed, from its folder: ``largest_piece`` (True when
    only the largest foreground piece was kept: a recipe's planned ``keep_largest_component`` in its
    config.json; False for the reference) and, for the reference, ``largest_piece_metrics``: its Dice
    with that filter (summary.json), the figure to compare with a recipe run that kept the largest piece."""
    found = {}
    if (folder / "config.json").is_file():
        found["largest_piece"] = bool(json.loads((folder / "config.json").read_text()).get("keep_largest_component"))
    if (folder / "summary.json").is_file():
        kept = json.loads((folder / "summary.json").read_text()).get("largest_piece_kept")
        if kept is not None:
            found.update(largest_piece=False, largest_piece_metrics=kept)
    return found


class ConsoleLogger:
    """What the recipes' data preparation reports, on stderr (stdout holds the table)."""

    def info(self, message: str) -> None:
        print(message, file=sys.stderr)


def prepare_cache(data_dir: str, *, cache_dir: str, spatial_dims: int, workers: int,
                  spacing: str | None = None) -> tuple[list[str], list[str]]:
    """Fill the recipes' cache once, by the recipe's own function, so no timed run preprocesses;
    returns the (training, validation) case ids every run uses."""
    from benchmarks.reference_monai import Config, prepare_data  # MONAI is imported only to train

    config = Config(data_dir=data_dir, cache_dir=cache_dir, spatial_dims=spatial_dims, workers=workers,
                    spacing=tuple(float(size) for size in spacing.split(",")) if spacing else None)
    *_, train_ids, val_ids = prepare_data(config, ConsoleLogger())
    return train_ids, val_ids


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="MSD task folder, e.g. ../shared/data/Task28_LA2018")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps of every run (default: 500)")
    parser.add_argument("--epochs", type=int, default=20,
                        help="the recipes run the steps as this many epochs, validating after the last (default: 20)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each run once per seed (default: 0)")
    parser.add_argument("--2d", dest="spatial_dims", action="store_const", const=2, default=3,
                        help="train_atrium.py and the 2D reference instead of train_liver3d.py and the 3D one")
    parser.add_argument("--patch-size", help="3D patch z,y,x or one int for a cube (default: train_liver3d.py's)")
    parser.add_argument("--image-size", help="2D image size H,W or one int (default: train_atrium.py's)")
    parser.add_argument("--spacing", help="target spacing z,y,x in mm of every run (default: the recipe's, the median)")
    parser.add_argument("--batch-size", type=int, help="patches or slices per step (default: the recipe's)")
    parser.add_argument("--base-channels", type=int,
                        help="our U-Net's width at full resolution (default: the recipe's); the reference is fixed")
    parser.add_argument("--only", default="ours,nnunet,monai", help="comma-separated runs (default: all three)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader processes of every run (default: 1)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads of every run (OMP_NUM_THREADS); 1 when other jobs share the cores: "
                             "torch's threads then wait on each other and a step can take 5x longer "
                             "(default: torch's choice)")
    parser.add_argument("--cache-dir", default=".cache", help="the recipes' preprocessed cache (default: .cache)")
    parser.add_argument("--out", default="runs/real_data", help="folder of the runs and real_data.json")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(VARIANTS[args.spatial_dims]))
    if unknown:
        choices = ", ".join(VARIANTS[args.spatial_dims])
        parser.error(f"--only {args.only}: unknown runs {unknown}; choose among {choices}")
    if (args.patch_size if args.spatial_dims == 2 else args.image_size) is not None:
        parser.error("--patch-size is for 3D runs and --image-size for --2d runs")
    return args


def main(argv: list[str]) -> list[dict]:
    args = parse_args(argv)
    dims = args.spatial_dims
    try:
        epochs, steps_per_epoch = split_steps(args.steps, args.epochs)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    recipe = train_liver3d.Config if dims == 3 else train_atrium.Config
    budget = Budget(steps=args.steps, epochs=epochs, steps_per_epoch=steps_per_epoch,
                    batch_size=args.batch_size or recipe.batch_size,
                    window=parse_window(args.patch_size if dims == 3 else args.image_size, dims))
    out = Path(args.out)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    names = [name for name in VARIANTS[dims] if name in args.only.split(",")]
    plans = [(name, seed, out / f"{name}-seed{seed}") for seed in seeds for name in names]
    taken = [str(folder) for *_, folder in plans if folder.exists()]
    if taken:
        raise SystemExit(f"{', '.join(taken)} already exist: choose another --out, or remove them")

    train_ids, val_ids = prepare_cache(args.data_dir, cache_dir=args.cache_dir, spatial_dims=dims, workers=args.workers,
                                       spacing=args.spacing)
    print(f"{len(train_ids)} training cases; validation on {len(val_ids)}: {', '.join(val_ids)}", file=sys.stderr)
    runs, run_by_settings = [], {}
    for name, seed, folder in plans:
        command = build_command(VARIANTS[dims][name], budget, spatial_dims=dims, data_dir=args.data_dir, seed=seed,
                                workers=args.workers, cache_dir=args.cache_dir, out=folder,
                                base_channels=args.base_channels, spacing=args.spacing)
        settings = recipe_settings(command)
        if settings in run_by_settings:  # e.g. a variant whose flags are the recipe's defaults already
            earlier = run_by_settings[settings]
            print(f"{name}, seed {seed}: the same settings as {earlier['run']}; not run again", file=sys.stderr)
            runs.append({**earlier, "run": name, "same_as": earlier["run"], "command": command})
            continue
        environment = thread_environment(args.threads)
        print(f"{name}, seed {seed}: {shell_line(command, environment)}", file=sys.stderr)
        runs.append(run_one(name, seed, command, environment=environment,
                            log_path=out / "logs" / f"{name}-seed{seed}.log"))
        print(f"{name}, seed {seed}: {format_duration(runs[-1]['wall_time_s'])}, "
              f"{runs[-1].get('metrics', 'failed: see ' + runs[-1]['log'])}", file=sys.stderr)
        if settings is not None:
            run_by_settings[settings] = runs[-1]

    table = format_table(runs)
    print(table)
    report = {"data_dir": args.data_dir, "spatial_dims": dims, "budget": dataclasses.asdict(budget),
              "train_cases": train_ids, "validation_cases": val_ids, "runs": runs, "table": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_data.json").write_text(json.dumps(report, indent=2) + "\n")
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
