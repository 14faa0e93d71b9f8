"""Side by side: our data path, sliding window and training step against the libraries they replace.

    pip install -r requirements.txt -r benchmarks/requirements-bench.txt   # the peers (benchmarks only)
    python benchmarks/run.py                 # the full comparison (~30 min on 2 cores)
    python benchmarks/run.py --quick         # small sizes, one repeat: checks that everything runs

Every measurement runs in this one process on one CPU thread, on the same in-memory input (a
256 x 256 x 128 synthetic abdominal CT, `benchmarks/common.py`), after one warm-up call that is not
timed. Repeats are interleaved (each repeat times every pipeline once, in turn), so a slow moment of
the machine hits all of them alike; the table gives the median and, in brackets, the range. A peer
library that is not installed is skipped with a note. Prints a markdown report, writes JSON.

How each library's parameters express the same augmentation is documented next to its pipeline in
`benchmarks/peers.py`; ours is `benchmarks/pipelines.py`.
"""

import os

# One thread for every library (set before numpy and torch load their thread pools).
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse
import json
import platform
import shlex
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch

from benchmarks import peers
from benchmarks.common import FULL, LIGHT, format_rate, make_volume, summarize, time_block
from benchmarks.pipelines import ours_2d, ours_3d, scipy_floor, torch_floor, write_cache_entry
from engine.inference import sliding_window_inference, window_starts
from engine.train import train_one_epoch
from losses import DeepSupervisionLoss, DiceCELoss
from models import UNet

TORCHIO_QUEUE = "TorchIO, Queue(samples_per_volume=8)"
TORCHIO_PATCH = "TorchIO, sample then transform patch"
MONAI = "MONAI, RandCropByLabelClassesd + Rand3DElasticd"
BATCHGENERATORS_V2 = "batchgeneratorsv2 (nnU-Net v2)"
SCIPY_FLOOR = "floor: scipy map_coordinates, order 1 + 0"
PEERS_3D = {
    TORCHIO_QUEUE: peers.torchio_queue,
    TORCHIO_PATCH: peers.torchio_patch_then_transform,
    MONAI: peers.monai_dictionary,
    "batchgenerators (nnU-Net v1)": peers.batchgenerators_v1,
    BATCHGENERATORS_V2: peers.batchgenerators_v2,
}
OURS = "ours (data.patches.PatchDataset)"
SECTIONS = ("augment3d", "augment2d", "sliding_window", "engine_step", "end_to_end")


def interleaved(sources: dict, count: int, repeats: int) -> dict[str, dict]:
    """Time ``count`` calls of every source per repeat, repeats interleaved; a warm-up call first."""
    for source in sources.values():
        source()
    rates = {name: [] for name in sources}
    for _ in range(repeats):
        for name, source in sources.items():
            rates[name].append(time_block(source, count))
    return {name: summarize(values) for name, values in rates.items()}


def measure_3d(volume, cache_entry: Path, sizes: list[int], repeats: int, notes: list[str]) -> dict:
    """Patches/s of every pipeline for each size and spec: {"64 full": {pipeline: summary}}."""
    results = {}
    for spec in (FULL, LIGHT):
        for size in sizes:
            patch_size = (size, size, size)
            sources = {OURS: ours_3d(cache_entry, spec, patch_size, seed=0)}
            for name, build in PEERS_3D.items():
                try:
                    sources[name] = build(volume, spec, patch_size, seed=0)
                except ImportError as error:
                    notes.append(f"{name}: skipped, not installed ({error.name or error})")
            if spec is FULL:
                sources[SCIPY_FLOOR] = scipy_floor(volume, patch_size)
                sources["floor: torch grid_sample"] = torch_floor(volume, patch_size)
            # Blocks of 8 patches: TorchIO's queue transforms one volume per 8 patches.
            count = 8 if spec is FULL and size >= 128 else 16
            print(f"3D {spec.name} {size}^3: {len(sources)} pipelines x {repeats} repeats", file=sys.stderr)
            results[f"{size} {spec.name}"] = interleaved(sources, count, repeats)
    return results


def measure_2d(volume, repeats: int, count: int, notes: list[str]) -> dict:
    """Samples/s of 2D augmentation (affine + elastic + flips + gamma + noise) on the volume's axial slice
    with the most liver."""
    middle = int(np.argmax((volume.label > 0).sum(axis=(1, 2))))
    image, mask = volume.image[0, middle], volume.label[middle]
    sources = {"ours (data.augment2d.augment_2d)": ours_2d(image, mask, FULL, seed=0)}
    try:
        sources["Albumentations"] = peers.albumentations_2d(image, mask, seed=0)
    except ImportError as error:
        notes.append(f"Albumentations: skipped, not installed ({error.name or error})")
    return interleaved(sources, count, repeats)


def _small_unet() -> torch.nn.Module:
    return UNet(spatial_dims=3, in_channels=1, num_classes=3, base_channels=4, depth=4, norm="group_norm").eval()


def measure_sliding_window(volume, patch: int, repeats: int, notes: list[str]) -> dict:
    """Seconds per whole-volume prediction: ours, MONAI's, and the bare forwards of the same windows.

    Both predict softmax probabilities of the same model on the same windows (patch, overlap 0.5,
    Gaussian weights with sigma = patch / 8, 2 windows per forward) and average them."""
    model = _small_unet()
    image = torch.from_numpy(volume.image)  # (1, Z, Y, X)
    patch_size = (patch, patch, patch)

    def softmax_model(batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(batch), dim=1)

    runs = {"ours (engine.inference)": lambda: sliding_window_inference(image, model, patch_size=patch_size,
                                                                       num_classes=3, overlap=0.5, batch_size=2)}
    try:
        from monai.inferers import sliding_window_inference as monai_sliding_window

        runs["MONAI sliding_window_inference"] = lambda: monai_sliding_window(
            image[None], patch_size, 2, softmax_model, overlap=0.5, mode="gaussian", sigma_scale=0.125)
    except ImportError as error:
        notes.append(f"MONAI sliding window: skipped, not installed ({error.name or error})")
    # The bare forwards: every window of the volume, cut in advance, through the model two at a time.
    windows = _window_batches(image, patch)
    runs["bare model forwards"] = lambda: [model(batch) for batch in windows]
    seconds = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
    return {"windows": sum(len(batch) for batch in windows), **{name: summarize(v) for name, v in seconds.items()}}


def _window_batches(image: torch.Tensor, patch: int) -> list[torch.Tensor]:
    starts = [window_starts(size, patch, 0.5) for size in image.shape[1:]]
    crops = [image[:, z:z + patch, y:y + patch, x:x + patch] for z in starts[0] for y in starts[1] for x in starts[2]]
    return [torch.stack(crops[first:first + 2]) for first in range(0, len(crops), 2)]


def _time_training_loops(model, loss_fn, batches: list[dict], repeats: int) -> dict[str, list[float]]:
    """Seconds per step of `train_one_epoch` and of a bare loop doing the same step, interleaved."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def engine() -> None:
        train_one_epoch(model, batches, loss_fn, optimizer, scheduler=scheduler, scaler=scaler,
                        device=torch.device("cpu"), amp_dtype=None, grad_clip=12.0, progress=False)

    def bare() -> None:
        model.train()
        for batch in batches:
            loss = loss_fn(model(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            optimizer.step()
            scheduler.step()

    seconds = {"engine.train.train_one_epoch": [], "bare loop": []}
    engine(), bare()  # warm-up
    for repeat in range(repeats):
        # Alternate which loop goes first, so a drift of the machine's speed favours neither.
        order = (("engine.train.train_one_epoch", engine), ("bare loop", bare))
        for name, run in order if repeat % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            run()
            seconds[name].append((time.perf_counter() - started) / len(batches))
    return seconds


def _random_batches(count: int, size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(2, 1, size, size, size, generator=generator),
             "label": torch.randint(0, 3, (2, size, size, size), generator=generator, dtype=torch.uint8)}
            for _ in range(count)]


def measure_engine_step(size: int, steps: int, repeats: int) -> dict:
    """Seconds per training step: `engine.train.train_one_epoch` against a bare hand-written loop.

    The model is the liver recipe's phantom default (3D U-Net, base 8, depth 4, deep supervision,
    CE + Dice, AdamW, gradient clipping 12), fp32 on CPU, batch 2 of size^3 patches; both loops see the
    same batches in memory. A CPU step of this size varies by +-20% from one step to the next on a
    shared machine, more than the few percent in question, so the engine's own cost per step is also
    measured apart: the same two loops around a one-layer model, where nothing but that cost remains
    (many short steps), divided by the U-Net's step time."""
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, base_channels=8, depth=4, norm="group_norm",
                 upsample="transpose", deep_supervision=True)
    loss_fn = DeepSupervisionLoss(DiceCELoss(include_background=False, batch_dice=True))
    seconds = _time_training_loops(model, loss_fn, _random_batches(steps, size), repeats)
    paired = [engine_s / bare_s - 1 for engine_s, bare_s in zip(*seconds.values())]
    tiny = _time_training_loops(torch.nn.Conv3d(1, 3, 1), DiceCELoss(include_background=False),
                                _random_batches(200, 4), repeats)
    fixed_ms = [1000 * (engine_s - bare_s) for engine_s, bare_s in zip(*tiny.values())]
    return {**{name: summarize(values) for name, values in seconds.items()}, "overhead": summarize(paired),
            "engine_cost_ms": summarize(fixed_ms),
            "engine_cost_fraction": statistics.median(fixed_ms) / 1000 / statistics.median(seconds["bare loop"])}


def measure_end_to_end(steps: int, worker_counts: list[int], extra_args: list[str], cache_dir: Path) -> dict:
    """`train_liver3d.py --benchmark N [extra_args]` for a few --workers values, with all threads.

    Without extra arguments this is the phantom default on the CPU; on a GPU machine, e.g.
    ``--end-to-end-args="--patch-size 128 --amp --compile"`` times the headline recipe."""
    results = {}
    for workers in worker_counts:
        out = cache_dir / f"end_to_end_workers{workers}"
        command = [sys.executable, str(REPO / "train_liver3d.py"), "--benchmark", str(steps), "--workers",
                   str(workers), "--out", str(out), "--cache-dir", str(cache_dir / "liver_cache"), *extra_args]
        print(" ".join(command[1:]), file=sys.stderr)
        environment = {key: value for key, value in os.environ.items() if not key.endswith("_NUM_THREADS")}
        subprocess.run(command, check=True, cwd=REPO, env=environment, stdout=subprocess.DEVNULL)
        results[workers] = json.loads((out / "benchmark.json").read_text())
    return results


def machine_name() -> str:
    """Processor, core count, library versions, and the GPU when there is one."""
    name = (f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}")
    if torch.cuda.is_available():
        name += f", GPU {torch.cuda.get_device_name()}"
    return name


def cpu_name() -> str:
    """The processor's model name (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return numerator["median"] / denominator["median"]


def check_targets(results: dict, sizes: list[int]) -> list[tuple[str, float | None, str, bool | None]]:
    """(target, measured, threshold, met) rows for the report."""
    rows = []
    small, large = sizes[0], sizes[-1]
    if "3d" in results:
        for key, bg2_min, monai_min, torchio_min in ((f"{small} full", 1.2, 10, 10), (f"{large} full", 2, 10, 5)):
            table = results["3d"][key]
            ours = table[OURS]
            torchio_rows = [table[name] for name in (TORCHIO_QUEUE, TORCHIO_PATCH) if name in table]
            torchio_best = max(torchio_rows, key=lambda summary: summary["median"], default=None)
            rows.append((f"3D {key}: ours / batchgeneratorsv2", ratio(ours, table.get(BATCHGENERATORS_V2)),
                         f">= {bg2_min}", bg2_min))
            rows.append((f"3D {key}: ours / MONAI", ratio(ours, table.get(MONAI)), f">= {monai_min}", monai_min))
            rows.append((f"3D {key}: ours / faster TorchIO row", ratio(ours, torchio_best), f">= {torchio_min}",
                         torchio_min))
            rows.append((f"3D {key}: our time / scipy floor's", ratio(table[SCIPY_FLOOR], ours), "<= 1.5", -1.5))
        for size in (small, large):
            table = results["3d"][f"{size} light"]
            rows.append((f"3D {size} light: ours / batchgeneratorsv2",
                         ratio(table[OURS], table.get(BATCHGENERATORS_V2)), ">= 0.8", 0.8))
    if "2d" in results:
        table = results["2d"]
        rows.append(("2D: ours / Albumentations",
                     ratio(table["ours (data.augment2d.augment_2d)"], table.get("Albumentations")), ">= 1", 1.0))
    if "sliding_window" in results:
        table = results["sliding_window"]
        ours = table["ours (engine.inference)"]
        monai = table.get("MONAI sliding_window_inference")
        rows.append(("sliding window: ours time / MONAI time (median)", ratio(ours, monai),
                     "<= 1 or within MONAI's range", None if monai is None else ours["median"] <= monai["max"]))
        rows.append(("sliding window: ours time / bare forwards - 1", ratio(ours, table["bare model forwards"]) - 1,
                     "<= 0.05", -0.05))
    if "engine_step" in results:
        table = results["engine_step"]
        spread = f"range {table['overhead']['min']:+.2f} to {table['overhead']['max']:+.2f}"
        rows.append((f"engine step: train_one_epoch / bare loop - 1, median of adjacent pairs ({spread})",
                     table["overhead"]["median"], "<= 0.03", -0.03))
        rows.append((f"engine step: the engine's own cost ({table['engine_cost_ms']['median']:.2f} ms) / step time",
                     table["engine_cost_fraction"], "<= 0.03", -0.03))
    report = []
    for name, measured, threshold, rule in rows:
        if measured is None:
            met = None
        elif isinstance(rule, bool):
            met = rule
        elif rule < 0:
            met = measured <= -rule
        else:
            met = measured >= rule
        report.append((name, measured, threshold, met))
    return report


def markdown(results: dict, sizes: list[int], targets: list, notes: list[str]) -> str:
    header = (f"Machine: {results['machine']}. One process, one thread; median (min-max) of {results['repeats']} "
              f"interleaved repeats ({results['timing_repeats']} for the sliding window and the training step), "
              "warm-up excluded.")
    lines = [header, ""]
    if "3d" in results:
        columns = [f"{size} {name}" for name in ("full", "light") for size in sizes]
        lines += ["| pipeline, patches/s | " + " | ".join(f"{c.split()[0]}^3 {c.split()[1]}" for c in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        names = list(dict.fromkeys(name for column in columns for name in results["3d"][column]))
        for name in names:
            cells = [format_rate(results["3d"][column].get(name)) for column in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "2d" in results:
        height, width = results["volume_shape"][1:]
        lines += ["", f"| 2D augmentation, {height}x{width} image + mask | samples/s |", "|---|---|"]
        lines += [f"| {name} | {format_rate(summary)} |" for name, summary in results["2d"].items()]
    if "sliding_window" in results:
        table = results["sliding_window"]
        shape = "x".join(str(size) for size in results["volume_shape"][::-1])
        title = f"sliding window over {shape}, {results['sliding_window_patch']}^3 patch, {table['windows']} windows"
        lines += ["", f"| {title} | seconds |", "|---|---|"]
        lines += [f"| {name} | {format_rate(summary)} |" for name, summary in table.items() if name != "windows"]
    if "engine_step" in results:
        lines += ["", "| training step, liver 3D U-Net, batch 2, fp32 | seconds/step |", "|---|---|"]
        lines += [f"| {name} | {format_rate(results['engine_step'][name])} |"
                  for name in ("engine.train.train_one_epoch", "bare loop")]
    if results.get("end_to_end"):
        flags = " ".join(["--benchmark", str(results["end_to_end_steps"]), *results["end_to_end_args"]])
        title = (f"| `train_liver3d.py {flags}` (all threads), --workers | steps/s | samples/s | data wait "
                 "| first step (s) | peak RSS (MB) | CUDA max allocated (MB) |")
        lines += ["", title, "|---" * 7 + "|"]
        for workers, figures in results["end_to_end"].items():
            cuda = figures.get("cuda_max_allocated_mb")
            lines.append(f"| {workers} | {figures['steps_per_s']:.3f} | {figures['samples_per_s']:.2f} | "
                         f"{100 * figures['data_wait_fraction']:.1f}% | {figures['first_step_s']:.1f} | "
                         f"{figures['peak_rss_mb']:.0f} | {'-' if cuda is None else f'{cuda:.0f}'} |")
    lines += ["", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for name, measured, threshold, met in targets:
        shown = "-" if measured is None else f"{measured:.2f}"
        lines.append(f"| {name} | {shown} | {threshold} | {'-' if met is None else ('yes' if met else 'no')} |")
    if notes:
        lines += [""] + [f"- {note}" for note in dict.fromkeys(notes)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized: a 40x64x64 volume, 16^3/24^3 patches, one repeat, no end-to-end run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats of each augmentation measurement (sliding window and training "
                             "step: at least 5)")
    parser.add_argument("--out", default="runs/benchmarks/results.json", help="where the JSON results go")
    parser.add_argument("--cache-dir", default=".cache/benchmarks", help="phantom and scratch files")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated parts to run (default all): {','.join(SECTIONS)}")
    parser.add_argument("--end-to-end-steps", type=int, default=30,
                        help="steps of train_liver3d.py --benchmark per worker count (0 skips it)")
    parser.add_argument("--end-to-end-workers", default="0,1,2", help="comma-separated --workers values to time")
    parser.add_argument("--end-to-end-args", default="",
                        help='more train_liver3d.py flags for the end-to-end part, '
                             'e.g. "--patch-size 128 --amp --compile"')
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache_dir = Path(args.cache_dir)
    if args.quick:
        volume_shape, sizes, patch, repeats, engine_size, steps = (40, 64, 64), [16, 24], 16, 1, 16, 1
    else:
        volume_shape, sizes, patch, repeats, engine_size, steps = (128, 256, 256), [64, 128], 64, args.repeats, 64, 2
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    notes: list[str] = []
    needs_volume = {"augment3d", "augment2d", "sliding_window"} & set(sections)
    volume = make_volume(cache_dir / "phantom", volume_shape) if needs_volume else None
    timing_repeats = repeats if args.quick else max(repeats, 5)
    results = {
        "machine": machine_name(),
        "repeats": repeats,
        "timing_repeats": timing_repeats,
        "volume_shape": volume_shape,
    }
    if "augment3d" in sections:
        with tempfile.TemporaryDirectory() as scratch:
            cache_entry = write_cache_entry(volume, Path(scratch))
            results["3d"] = measure_3d(volume, cache_entry, sizes, repeats, notes)
    if "augment2d" in sections:
        print("2D augmentation", file=sys.stderr)
        results["2d"] = measure_2d(volume, repeats, count=16 if args.quick else 64, notes=notes)
    if "sliding_window" in sections:
        print("sliding window", file=sys.stderr)
        results["sliding_window_patch"] = patch
        results["sliding_window"] = measure_sliding_window(volume, patch, timing_repeats, notes)
    if "engine_step" in sections:
        print("engine step", file=sys.stderr)
        results["engine_step"] = measure_engine_step(engine_size, steps, 2 * timing_repeats)
    if "end_to_end" in sections and not args.quick and args.end_to_end_steps > 0:
        results["end_to_end_steps"], results["end_to_end_args"] = args.end_to_end_steps, shlex.split(args.end_to_end_args)
        workers = [int(count) for count in args.end_to_end_workers.split(",")]
        results["end_to_end"] = measure_end_to_end(args.end_to_end_steps, workers, results["end_to_end_args"], cache_dir)
    targets = check_targets(results, sizes)
    results["targets"] = [dict(zip(("target", "measured", "wanted", "met"), row)) for row in targets]
    report = markdown(results, sizes, targets, notes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(report)


if __name__ == "__main__":
    main()
