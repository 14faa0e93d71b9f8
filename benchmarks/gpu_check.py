"""One run that settles on a GPU what the CPU cannot show: compiled mixed-precision training, resuming,
CUDA against CPU predictions, the per-device norm and layout rule, sliding-window placement, loader speed.

    python benchmarks/gpu_check.py                         # on one CUDA GPU: ~5 minutes, never more than ~8
    python benchmarks/gpu_check.py --out runs/gpu_check --device cuda:1
    python benchmarks/gpu_check.py --smoke                 # CPU, toy sizes, well under a minute (the tests run it)
    python benchmarks/gpu_check.py --parts steps_3d,loader # some parts only

Writes OUT/gpu_check.json (every figure, per part) and OUT/gpu_check.md (the table it prints). Each part
runs in a process of its own, forked from this one, with a time budget: a part that overruns is
stopped and flagged "timed out" with what it had measured, a part that fails is flagged "failed"
with its error, and the other parts run on. A part's full output (recipe logs, recompile reasons,
tracebacks) is in OUT/logs/<part>.log. The parts, in the order they run:

environment: GPU name, memory and compute capability, torch, CUDA and cuDNN versions, the CPU and
    the cores this process may use, and /dev/shm, where DataLoader workers hand batches over. Good:
    /dev/shm holds the batches 12 loader workers keep in flight at 128^3 (about 1 GB; Docker's
    default is 64 MB).
liver_train: `train_liver3d.py --amp --compile` for 2 epochs of 50 steps on the synthetic liver
    phantom (its CPU-sized network: patch 32x80x80, base 8, depth 4), compiled as the recipe compiles
    (inductor; "eager" in --smoke, which skips code generation), the graphs counted by Dynamo's own
    counter. Figures: the wall time (phantom, preprocessing, compile, epochs, final validation), the
    time of each epoch (the first pays for compiling), the final loss, the GradScaler's scale after
    each epoch, the graphs compiled in the first epoch and after it. Good: a finite loss and scale
    (fp16 + GradScaler on CUDA), no graph after the first epoch (validation runs the plain model; a
    graph there would mean a recompile per validation on a real run).
liver_resume: `--resume` of that run's last.pt for a third epoch, in a fresh process as after a
    crash. Good: it runs (the checkpoint's RNG states are CPU tensors and must stay so), with a
    finite loss and the scale carried over.
predict: `predict.py` on one phantom volume with that checkpoint: on the device with the checkpoint's
    --amp (fp16 on CUDA; InstanceNorm on contiguous tensors), on the device in fp32, and on the CPU in
    fp32 (GroupNorm on channels-last tensors), the reference. Figures: the three wall times and the
    Dice of each class between each device mask and the CPU's. Good: Dice >= 0.99 for every class
    (the two instance normalisations share their weights; the fp32 pair isolates them from fp16).
    Two masks without foreground agree trivially; the foreground voxel counts say whether they did.
steps_3d: one nnU-Net-sized training step (128^3 patches, batch 2, U-Net base 32, depth 6, max 320,
    deep supervision, CE + Dice, SGD, fp16 autocast + GradScaler, eager) for each of the four
    normalisation kernels x memory layouts: median seconds per step over 10 steps after 3 of warm-up,
    the peak of torch.cuda.max_memory_allocated over those steps, and the eager forward pass of the
    validation path (eval, inference mode, autocast, the default window batch of 4). Good: the
    combination `engine/layout.py` picks for the device ("the rule's pick": instance_norm on
    contiguous tensors on CUDA) is the fastest or within 5% of it.
steps_2d: the same for the 2D recipes' U-Net (512x512 slices, batch 16, base 32, depth 7, max 512,
    one sigmoid logit, batch Dice), forward over 16 slices as the slice-wise validation does.
sliding_window: `predict_volume` (the validation and predict.py path) over a 320x448x448 one-channel
    volume with 128^3 windows, overlap 0.5, the default window batch, fp16, the nnU-Net-sized U-Net:
    wall time of a first call (cuDNN autotuning included) and a second, where the float32 sums and
    the padded image were placed (`engine.inference.place_buffers`), peak memory. Good: both on the
    GPU when it has room (an 80 GB GPU has).
loader: patches/s of the liver recipe's PatchDataset (128^3 patches, batch 2, default augmentation,
    a 256x256x128 phantom CT) through `build_loader` with 4, 8 and 12 workers, over one epoch of 40
    batches after one epoch of warm-up (the workers' start). Good: at least the patches/s the GPU
    consumes (batch 2 / the rule's step time from steps_3d), so training never waits for data.

The table has one row per figure: part, figure, what was measured, what good looks like, and "yes"
or "no" where there is a criterion ("-" where the figure is for the record).
"""

import argparse
import contextlib
import functools
import gc
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch

import predict
import train_liver3d
from benchmarks.common import make_volume
from benchmarks.pipelines import write_cache_entry
from data.nifti import read_nifti
from data.patches import PatchDataset
from data.samplers import EpochSampler
from data.synthetic.liver import ensure_liver_phantom
from engine import inference
from engine.checkpoint import load_checkpoint
from engine.evaluate import predict_volume
from engine.inference import default_window_batch_size, window_starts
from engine.layout import resolve_memory_format, resolve_norm
from engine.loader import PREFETCH_FACTOR, SHARED_MEMORY, build_loader
from engine.metrics import dice_per_class
from engine.optim import build_optimizer
from engine.runtime import resolve_amp_dtype, seed_everything
from engine.threads import available_cores
from engine.train import train_one_epoch
from losses import DeepSupervisionLoss, DiceCELoss, build_loss
from models import UNet

GIB = 2**30
RULE_TOLERANCE = 0.05  # the rule's pick may be this much slower than the fastest combination
PART_MINIMUM_S = 10  # a part with less time left than this is skipped, not started


@dataclass(frozen=True)
class StepSizes:
    """One training step of `steps_3d` or `steps_2d`."""

    image_size: tuple[int, ...]  # (D, H, W) or (H, W)
    batch_size: int
    base_channels: int
    depth: int
    max_channels: int
    num_classes: int  # 1: one sigmoid logit and batch Dice (the 2D recipes); else CE + Dice
    deep_supervision: bool
    forward_batch_size: int  # windows or slices per validation forward


@dataclass(frozen=True)
class Sizes:
    """Every size of the check: the GPU's (`FULL`) or the CPU smoke test's (`SMOKE`)."""

    liver_flags: tuple[str, ...]  # train_liver3d.py flags besides --amp --compile --epochs --out --device
    compile_backend: str | None  # torch.compile's backend; None: the recipe's (inductor)
    step_3d: StepSizes
    step_2d: StepSizes
    warmup_steps: int
    timed_steps: int
    forward_repeats: int
    volume: tuple[int, int, int]  # sliding-window volume (z, y, x)
    window: tuple[int, int, int]
    sliding_window_model: dict  # UNet sizes of the sliding-window part
    loader_volume: tuple[int, int, int]
    loader_patch: tuple[int, int, int]
    loader_workers: tuple[int, ...]
    loader_batches: int
    budgets_s: dict[str, float]  # per part
    smoke: bool  # toy sizes: the timings' criteria mean nothing and are not judged


FULL = Sizes(
    liver_flags=("--synthetic-cases", "8", "--synthetic-matrix", "128", "--steps-per-epoch", "50",
                 "--val-every", "2", "--val-patches-per-case", "2", "--tta", "false", "--workers", "4"),
    compile_backend=None,
    step_3d=StepSizes(image_size=(128, 128, 128), batch_size=2, base_channels=32, depth=6, max_channels=320,
                      num_classes=3, deep_supervision=True, forward_batch_size=4),
    step_2d=StepSizes(image_size=(512, 512), batch_size=16, base_channels=32, depth=7, max_channels=512,
                      num_classes=1, deep_supervision=False, forward_batch_size=16),
    warmup_steps=3, timed_steps=10, forward_repeats=5,
    volume=(320, 448, 448), window=(128, 128, 128),
    sliding_window_model=dict(base_channels=32, depth=6, max_channels=320),
    loader_volume=(128, 256, 256), loader_patch=(128, 128, 128), loader_workers=(4, 8, 12), loader_batches=40,
    budgets_s=dict(environment=30, liver_train=180, liver_resume=90, predict=60, steps_3d=100, steps_2d=60,
                   sliding_window=60, loader=75),
    smoke=False,
)
SMOKE = Sizes(
    liver_flags=("--synthetic-cases", "4", "--synthetic-matrix", "24", "--val-fraction", "0.25",
                 "--patch-size", "16,24,24",
                 "--base-channels", "4", "--depth", "3", "--steps-per-epoch", "2", "--val-every", "2",
                 "--val-patches-per-case", "2", "--tta", "false", "--workers", "0"),
    compile_backend="eager",
    step_3d=StepSizes(image_size=(16, 16, 16), batch_size=2, base_channels=4, depth=3, max_channels=16,
                      num_classes=3, deep_supervision=True, forward_batch_size=2),
    step_2d=StepSizes(image_size=(32, 32), batch_size=4, base_channels=4, depth=3, max_channels=16,
                      num_classes=1, deep_supervision=False, forward_batch_size=4),
    warmup_steps=1, timed_steps=2, forward_repeats=1,
    volume=(40, 40, 40), window=(16, 16, 16), sliding_window_model=dict(base_channels=4, depth=3, max_channels=16),
    loader_volume=(40, 64, 64), loader_patch=(16, 16, 16), loader_workers=(0, 1), loader_batches=3,
    budgets_s=dict(environment=60, liver_train=180, liver_resume=120, predict=120, steps_3d=120, steps_2d=120,
                   sliding_window=120, loader=120),
    smoke=True,
)


@dataclass
class PartContext:
    """What a part gets: where to write, the device, the sizes, its deadline; and where its figures go.
    Every figure is saved as soon as it is measured, so a part stopped at its deadline keeps them."""

    name: str
    out: Path
    cache_dir: Path
    device: torch.device
    sizes: Sizes
    deadline: float  # time.monotonic() at which the part is stopped
    result_path: Path
    progress: TextIO
    result: dict = field(default_factory=dict)

    def save(self) -> None:
        temporary = self.result_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        os.replace(temporary, self.result_path)

    def row(self, figure: str, measured: str, good: str = "", ok: bool | None = None) -> None:
        """A table row; ``ok`` None for a figure without a criterion."""
        verdict = "-" if ok is None else ("yes" if ok else "no")
        self.result.setdefault("rows", []).append(dict(figure=figure, measured=measured, good=good, ok=verdict))
        self.save()

    def say(self, message: str) -> None:
        print(f"  {self.name}: {message}", file=self.progress, flush=True)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """fp16 on CUDA, as the recipes' --amp; fp32 elsewhere (a CPU has no fast fp16)."""
        return torch.float16 if self.device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(value: float) -> str:
    return f"{value:.3g} s"


def layout_name(memory_format: torch.memory_format) -> str:
    return "contiguous" if memory_format == torch.contiguous_format else "channels_last"


# ---------------------------------------------------------------------------------------------- environment

def measure_environment(context: PartContext) -> None:
    device, result = context.device, context.result
    shared = shutil.disk_usage(SHARED_MEMORY) if SHARED_MEMORY.is_dir() else None
    result.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                  python=platform.python_version(), numpy=np.__version__, cpu=cpu_name(), cpu_count=os.cpu_count(),
                  available_cores=available_cores(), cuda_available=torch.cuda.is_available(),
                  shared_memory_gib=None if shared is None else shared.total / GIB,
                  shared_memory_free_gib=None if shared is None else shared.free / GIB)
    if device.type == "cuda" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(device)
        result.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / GIB,
                      compute_capability=f"{properties.major}.{properties.minor}",
                      gpu_count=torch.cuda.device_count(), driver=nvidia_driver())
        context.row("device", f"{properties.name}, {result['gpu_memory_gib']:.1f} GiB, compute capability "
                    f"{result['compute_capability']}, driver {result['driver']}")
    else:
        context.row("device", str(device) + ("" if device.type != "cuda" else " (CUDA is not available here)"),
                    ok=None if device.type != "cuda" else False)
    context.row("versions", f"torch {result['torch']}, CUDA {result['cuda']}, cuDNN {result['cudnn']}, "
                f"Python {result['python']}, NumPy {result['numpy']}")
    context.row("CPU", f"{result['cpu']}, {result['cpu_count']} logical CPUs, {result['available_cores']} "
                "available to this process")
    batch_bytes = 2 * math.prod(FULL.loader_patch) * (4 + 1)  # float32 image + uint8 label, batch 2
    needed = max(FULL.loader_workers) * PREFETCH_FACTOR * batch_bytes / GIB
    if shared is None:
        context.row("/dev/shm", "none (no shared-memory check)")
    else:
        enough = result["shared_memory_free_gib"] >= needed
        context.row("/dev/shm", f"{result['shared_memory_gib']:.2f} GiB, {result['shared_memory_free_gib']:.2f} free",
                    f">= {needed:.2f} GiB (12 workers x {PREFETCH_FACTOR} batches of 2 x 128^3)"
                    + (" (not judged at toy sizes)" if context.sizes.smoke else ""),
                    None if context.sizes.smoke else enough)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def nvidia_driver() -> str:
    try:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20, check=True)
        return answer.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


# ---------------------------------------------------------------------------------------------- liver recipe

def liver_run_folder(context: PartContext) -> Path:
    return context.out / "liver"


@contextlib.contextmanager
def counting_compiled_graphs(backend_name: str | None):
    """Record after each epoch of ``train_liver3d`` the graphs compiled so far (Dynamo's own count),
    its loss and the GradScaler's scale; yields (epochs, graphs_so_far): one dict per epoch and a
    function returning the count. ``backend_name`` None leaves ``torch.compile`` as the recipe calls it
    (inductor); a name makes it hand the graphs to that backend instead (the smoke test's "eager")."""
    counters = torch._dynamo.utils.counters
    epochs = []

    def graphs_so_far() -> int:
        return counters["stats"]["unique_graphs"]

    def train_and_count(*args, **kwargs):
        started = time.perf_counter()
        stats = original_train(*args, **kwargs)
        scaler = kwargs["scaler"]
        epochs.append({"seconds": time.perf_counter() - started, "graphs_so_far": graphs_so_far(),
                       "scale": scaler.get_scale() if scaler.is_enabled() else None, **stats})
        return stats

    original_compile, original_train = torch.compile, train_liver3d.train_one_epoch
    torch._dynamo.reset()
    counters.clear()
    if backend_name is not None:
        torch.compile = functools.partial(original_compile, backend=backend_name)
    train_liver3d.train_one_epoch = train_and_count
    try:
        yield epochs, graphs_so_far
    finally:
        torch.compile, train_liver3d.train_one_epoch = original_compile, original_train


def run_liver(context: PartContext, argv: list[str]) -> tuple[list, int, float]:
    """train_liver3d.main(argv) with its compiled graphs counted; (epochs, graphs in all, wall seconds)."""
    torch._logging.set_logs(recompiles=True, graph_breaks=True)  # the reasons, in the part's log
    with counting_compiled_graphs(context.sizes.compile_backend) as (epochs, graphs_so_far):
        started = time.perf_counter()
        scores = train_liver3d.main(argv)
        wall_s = time.perf_counter() - started
        graphs = graphs_so_far()
    context.result.update(wall_s=wall_s, epochs=epochs, graphs=graphs, final_scores=scores,
                          graph_breaks=sum(torch._dynamo.utils.counters["graph_break"].values()))
    context.save()
    return epochs, graphs, wall_s


def report_epochs(context: PartContext, epochs: list, graphs: int) -> None:
    if not epochs:
        context.row("epochs", "none ran", "at least one", False)
        return
    times = ", ".join(seconds(epoch["seconds"]) for epoch in epochs)
    context.row("time of each epoch", times + " (the first compiles)")
    loss = epochs[-1]["loss"]
    context.row("final loss", f"{loss:.4f}, {sum(e['nonfinite_steps'] for e in epochs)} non-finite steps skipped",
                "finite", math.isfinite(loss))
    scales = [epoch["scale"] for epoch in epochs]
    if scales[0] is None:
        context.row("GradScaler scale", "disabled (not fp16)")
    else:
        context.row("GradScaler scale after each epoch", ", ".join(f"{scale:g}" for scale in scales), "finite, > 0",
                    all(math.isfinite(scale) and scale > 0 for scale in scales))
    first, after = epochs[0]["graphs_so_far"], graphs - epochs[0]["graphs_so_far"]
    context.result.update(graphs_first_epoch=first, graphs_after_first_epoch=after)
    context.row("graphs compiled in the first epoch / after it (validation included)", f"{first} / {after}",
                "> 0 / 0", first > 0 and after == 0)


def liver_train(context: PartContext) -> None:
    run = liver_run_folder(context)
    shutil.rmtree(run, ignore_errors=True)
    amp = ["--amp"] if context.device.type == "cuda" else []
    argv = [*context.sizes.liver_flags, *amp, "--compile", "--epochs", "2", "--device", str(context.device),
            "--cache-dir", str(context.cache_dir), "--out", str(run)]
    context.result["argv"] = argv
    context.say("train_liver3d.py " + " ".join(argv))
    epochs, graphs, wall_s = run_liver(context, argv)
    context.row("wall time: phantom, preprocessing, 2 epochs, final validation", seconds(wall_s))
    report_epochs(context, epochs, graphs)
    scores = context.result["final_scores"]
    context.row("final whole-volume validation", f"Dice mean {scores.get('dice_mean', math.nan):.3f} (2 epochs)")


def liver_resume(context: PartContext) -> None:
    checkpoint = liver_run_folder(context) / "last.pt"
    saved = load_checkpoint(checkpoint)
    saved_scale = saved["scaler"].get("scale") if saved["scaler"] else None
    argv = ["--resume", str(checkpoint), "--epochs", str(saved["epoch"] + 2), "--device", str(context.device)]
    context.result.update(argv=argv, saved_epoch=saved["epoch"], saved_scale=saved_scale)
    context.say("train_liver3d.py " + " ".join(argv))
    epochs, graphs, wall_s = run_liver(context, argv)
    context.row(f"resumed at epoch {saved['epoch'] + 2} from last.pt", f"ran {len(epochs)} epoch in {seconds(wall_s)}",
                "no crash", len(epochs) == 1)
    if saved_scale is not None:
        context.row("GradScaler scale saved in last.pt", f"{saved_scale:g}", "finite", math.isfinite(saved_scale))
    report_epochs(context, epochs, graphs)


def predict_device_and_cpu(context: PartContext) -> None:
    checkpoint_path = liver_run_folder(context) / "last.pt"
    checkpoint = load_checkpoint(checkpoint_path)
    config = checkpoint["config"]
    phantom = ensure_liver_phantom(Path(config["cache_dir"]) / "synthetic", num_cases=config["synthetic_cases"],
                                   matrix=config["synthetic_matrix"])
    image = sorted((phantom / "imagesTr").glob("[!._]*.nii.gz"))[-1]
    amp_dtype = resolve_amp_dtype(context.device, config["amp"], config["amp_dtype"])  # as predict.py resolves it
    device = f"{context.device} {({None: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}[amp_dtype])}"
    runs = {device: ["--device", str(context.device)], "CPU fp32": ["--device", "cpu", "--amp", "false"]}
    if amp_dtype is not None:  # the device in fp32 too: what the two normalisation kernels alone change
        runs[f"{context.device} fp32"] = ["--device", str(context.device), "--amp", "false"]
    masks, wall_s = {}, {}
    for index, (name, flags) in enumerate(runs.items()):
        output = context.out / f"predict_{index}"
        shutil.rmtree(output, ignore_errors=True)
        context.say(name)
        started = time.perf_counter()
        predict.main(["--checkpoint", str(checkpoint_path), "--input", str(image), "--output", str(output), *flags])
        wall_s[name] = time.perf_counter() - started
        masks[name] = read_nifti(output / image.name, is_label=True).array
        context.result.update(volume=image.name, wall_s=wall_s)
        context.save()
    labels = {int(k): v for k, v in checkpoint["labels"].items()}
    context.row("wall time: " + " / ".join(wall_s), " / ".join(seconds(value) for value in wall_s.values()))
    context.result["dice"] = {}
    for name in [name for name in masks if name != "CPU fp32"]:
        dice = dice_per_class(masks[name], masks["CPU fp32"], len(labels))
        context.result["dice"][f"{name} vs CPU fp32"] = {labels[k]: value for k, value in dice.items()}
        context.row(f"Dice between the {name} and CPU fp32 masks of {image.name}",
                    ", ".join(f"{labels[k]} {value:.4f}" for k, value in dice.items()), ">= 0.99 every class",
                    min(dice.values()) >= 0.99)
    foreground = {name: {labels[k]: int(np.count_nonzero(mask == k)) for k in labels if k > 0}
                  for name, mask in masks.items()}
    context.result["foreground_voxels"] = foreground
    context.row("foreground voxels predicted", "; ".join(
        f"{name}: " + ", ".join(f"{label} {count}" for label, count in classes.items())
        for name, classes in foreground.items()), "> 0 (two empty masks agree trivially)")


# ---------------------------------------------------------------------------------------------- training steps

def random_batch(step: StepSizes, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch as the loader hands it over: host tensors, pinned for CUDA; labels uint8."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(step.batch_size, 1, *step.image_size, generator=generator)
    label = torch.randint(0, max(step.num_classes, 2), (step.batch_size, *step.image_size), generator=generator,
                          dtype=torch.uint8)
    if device.type == "cuda":
        image, label = image.pin_memory(), label.pin_memory()
    return {"image": image, "label": label}


def time_combination(step: StepSizes, norm: str, memory_format: torch.memory_format, context: PartContext) -> dict:
    """Median step and validation-forward seconds and peak memory of one norm x layout."""
    device, amp_dtype, sizes = context.device, context.amp_dtype, context.sizes
    spatial_dims = len(step.image_size)
    model = UNet(spatial_dims=spatial_dims, in_channels=1, num_classes=step.num_classes,
                 base_channels=step.base_channels, depth=step.depth, max_channels=step.max_channels, norm=norm,
                 upsample="transpose", deep_supervision=step.deep_supervision).to(device, memory_format=memory_format)
    if step.num_classes == 1:
        loss_fn = build_loss("dice", 1)
    else:
        loss_fn = DiceCELoss(include_background=False, batch_dice=True)
        loss_fn = DeepSupervisionLoss(loss_fn) if step.deep_supervision else loss_fn
    total_steps = sizes.warmup_steps + sizes.timed_steps
    optimizer, scheduler = build_optimizer(model.parameters(), "sgd", lr=0.01, momentum=0.99, weight_decay=3e-5,
                                           schedule="poly", total_steps=total_steps, warmup_steps=0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    batch = random_batch(step, device)
    figures, step_seconds, losses = {}, [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for index in range(total_steps):
        started = time.perf_counter()
        stats = train_one_epoch(model, [batch], loss_fn, optimizer, scheduler=scheduler, scaler=scaler, device=device,
                                amp_dtype=amp_dtype, grad_clip=12.0, memory_format=memory_format, progress=False)
        elapsed = time.perf_counter() - started
        losses.append(stats["loss"])
        if index == sizes.warmup_steps - 1 and device.type == "cuda":
            figures["peak_warmup_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            torch.cuda.reset_peak_memory_stats(device)
        if index >= sizes.warmup_steps:
            step_seconds.append(elapsed)
    if device.type == "cuda":
        figures["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    # The validation path: plain model, eval mode, inference mode, autocast, contiguous windows.
    windows = torch.randn(step.forward_batch_size, 1, *step.image_size, device=device)
    forward_seconds = []
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for index in range(sizes.forward_repeats + 2):
            synchronize(device)
            started = time.perf_counter()
            model(windows)
            synchronize(device)
            if index >= 2:  # two warm-up calls: cuDNN tunes the eval-mode shapes anew
                forward_seconds.append(time.perf_counter() - started)
    figures.update(step_s=statistics.median(step_seconds), step_s_all=step_seconds,
                   forward_s=statistics.median(forward_seconds), losses=losses,
                   finite=all(math.isfinite(loss) for loss in losses))
    return figures


def time_training_steps(context: PartContext, step: StepSizes) -> None:
    device = context.device
    seed_everything(0, deterministic=False)  # cuDNN autotuning and TF32 as in a recipe run
    spatial_dims = len(step.image_size)
    picked = (resolve_norm("instance", device), layout_name(resolve_memory_format("auto", device, spatial_dims)))
    shape = "x".join(str(size) for size in step.image_size)
    precision = "fp16 + GradScaler" if context.amp_dtype == torch.float16 else "fp32"
    context.result.update(image_size=step.image_size, batch_size=step.batch_size, precision=precision,
                          rule_pick="/".join(picked), combinations={})
    # The rule's pick first and the other device's pick next: the two that matter most if time runs out.
    combinations = [("instance_norm", "contiguous"), ("group_norm", "channels_last"),
                    ("instance_norm", "channels_last"), ("group_norm", "contiguous")]
    combinations.remove(picked)
    longest = 0.0
    for norm, layout in [picked, *combinations]:
        name = f"{norm}/{layout}"
        figure = f"{spatial_dims}D {shape} x{step.batch_size} step, {name}" + (
            " (the rule's pick)" if (norm, layout) == picked else "")
        if context.time_left() < 1.2 * longest + 5:
            context.row(figure, "skipped: the part's time ran out", "", False)
            continue
        context.say(name)
        started = time.perf_counter()
        try:
            figures = time_combination(step, norm, resolve_memory_format(layout, device, spatial_dims), context)
        except (Exception, SystemExit) as error:  # e.g. out of memory: the other combinations still run
            context.result["combinations"][name] = {"error": f"{type(error).__name__}: {error}"}
            context.row(figure, f"failed: {type(error).__name__}: {str(error)[:200]}", "", False)
            continue
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        longest = max(longest, time.perf_counter() - started)
        context.result["combinations"][name] = figures
        memory = f", peak {figures['peak_gib']:.2f} GiB" if "peak_gib" in figures else ""
        context.row(figure, f"{figures['step_s']:.4f} s/step{memory}, forward {figures['forward_s']:.4f} s "
                    f"({step.forward_batch_size} at once), {precision}", "finite loss", figures["finite"])
    timed = {name: figures["step_s"] for name, figures in context.result["combinations"].items() if "step_s" in figures}
    pick = context.result["rule_pick"]
    if pick in timed:
        fastest = min(timed, key=timed.get)
        within = timed[pick] <= (1 + RULE_TOLERANCE) * timed[fastest]
        context.row(f"{spatial_dims}D: the rule's pick against the fastest",
                    f"{pick} {timed[pick]:.4f} s, fastest {fastest} {timed[fastest]:.4f} s",
                    f"pick within {100 * RULE_TOLERANCE:.0f}% of the fastest" + (" (not judged at toy sizes)"
                                                                                 if context.sizes.smoke else ""),
                    None if context.sizes.smoke else within)


def steps_3d(context: PartContext) -> None:
    time_training_steps(context, context.sizes.step_3d)


def steps_2d(context: PartContext) -> None:
    time_training_steps(context, context.sizes.step_2d)


# ---------------------------------------------------------------------------------------------- sliding window

@contextlib.contextmanager
def recording_placement():
    """Record every decision of `engine.inference.place_buffers` (made on CUDA only) in the list yielded."""
    decisions, original = [], inference.place_buffers

    def place_and_record(**sizes):
        placed = original(**sizes)
        decisions.append({**sizes, "accumulate_on_device": placed[0], "image_on_device": placed[1]})
        return placed

    inference.place_buffers = place_and_record
    try:
        yield decisions
    finally:
        inference.place_buffers = original


def sliding_window(context: PartContext) -> None:
    device, sizes = context.device, context.sizes
    seed_everything(0, deterministic=False)
    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, norm=resolve_norm("instance", device),
                 upsample="transpose", deep_supervision=True, **sizes.sliding_window_model)
    model = model.to(device, memory_format=resolve_memory_format("auto", device, 3)).eval()
    image = np.random.default_rng(0).standard_normal((1, *sizes.volume), dtype=np.float32)  # (C, Z, Y, X)
    batch_size = default_window_batch_size(device, sizes.window)
    windows = math.prod(len(window_starts(size, roi, 0.5)) for size, roi in zip(sizes.volume, sizes.window))
    precision = "fp16" if context.amp_dtype == torch.float16 else "fp32"
    title = (f"{'x'.join(map(str, sizes.volume))}, {sizes.window[0]}^3 windows, overlap 0.5, {windows} windows, "
             f"{batch_size} per forward, {precision}")
    context.result.update(volume=sizes.volume, window=sizes.window, windows=windows, window_batch_size=batch_size,
                          precision=precision, call_s=[])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with recording_placement() as decisions:
        for call in range(2):
            if call and context.time_left() < 2 * context.result["call_s"][0]:
                break
            context.say(f"call {call + 1}")
            started = time.perf_counter()
            predict_volume(model, image, patch_size=sizes.window, num_classes=3, device=device,
                           amp_dtype=context.amp_dtype, overlap=0.5)
            context.result["call_s"].append(time.perf_counter() - started)
            context.save()
    context.result["placement"] = decisions
    context.row(title, " / ".join(seconds(value) for value in context.result["call_s"]) + " (first call, second)")
    if device.type == "cuda":
        decision = decisions[0]
        places = [str(device) if decision[key] else "host" for key in ("accumulate_on_device", "image_on_device")]
        context.row("float32 sums / padded image placed on", " / ".join(places) +
                    f" ({decision['available_bytes'] / GIB:.1f} GiB available)", "the GPU (it has room)",
                    decision["accumulate_on_device"] and decision["image_on_device"])
        context.row("peak memory", f"{torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB")
    else:
        context.row("float32 sums / padded image placed on", f"{device} / {device} (no placement choice off CUDA)")


# ---------------------------------------------------------------------------------------------- loader

def loader_throughput(context: PartContext) -> None:
    sizes, device = context.sizes, context.device
    volume = make_volume(context.cache_dir / "loader_phantom", sizes.loader_volume)
    entry = write_cache_entry(volume, context.cache_dir / "loader_entry")
    recipe = train_liver3d.Config()  # the recipe's foreground share and default augmentation
    batch_size = 2
    dataset = PatchDataset(entry, ["case"], patch_size=sizes.loader_patch,
                           samples_per_epoch=sizes.loader_batches * batch_size,
                           foreground_share=recipe.foreground_share, augment=recipe.augment, seed=0)
    needed = gpu_patches_per_second(context)
    context.result.update(patch=sizes.loader_patch, batches=sizes.loader_batches, gpu_patches_per_s=needed, workers={})
    longest = 0.0
    for workers in sizes.loader_workers:
        figure = f"--workers {workers}, {sizes.loader_patch[0]}^3 patches, batch {batch_size}"
        if context.time_left() < 1.5 * longest + 5:
            context.row(figure, "skipped: the part's time ran out", "", False)
            continue
        context.say(f"{workers} workers")
        started = time.perf_counter()
        try:
            figures = time_loader(dataset, workers=workers, batches=sizes.loader_batches, batch_size=batch_size,
                                  device=device)
        except (Exception, SystemExit) as error:  # e.g. /dev/shm too small for this many workers
            context.result["workers"][workers] = {"error": f"{type(error).__name__}: {error}"}
            context.row(figure, f"failed: {str(error)[:300]}", "", False)
            continue
        longest = max(longest, time.perf_counter() - started)
        context.result["workers"][workers] = figures
        good, ok = "", None
        if needed is not None:
            good = f">= {needed:.1f} patches/s (what the rule's 3D step consumes)"
            if sizes.smoke:
                good += " (not judged at toy sizes)"
            else:
                ok = figures["patches_per_s"] >= needed
        context.row(figure, f"{figures['patches_per_s']:.1f} patches/s (first batch after "
                    f"{seconds(figures['first_batch_s'])})", good, ok)


def time_loader(dataset: PatchDataset, *, workers: int, batches: int, batch_size: int, device: torch.device) -> dict:
    """Patches/s over one epoch of ``batches`` after a warm-up epoch that starts the workers."""
    sampler = EpochSampler(batches, batch_size)
    loader = build_loader(dataset, sampler, batch_size=batch_size, workers=workers, device=device)
    try:
        started = time.perf_counter()
        first_batch_s = None
        for _ in loader:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - started
        sampler.set_epoch(1)
        started = time.perf_counter()
        count = sum(len(batch["image"]) for batch in loader)
        return {"patches_per_s": count / (time.perf_counter() - started), "first_batch_s": first_batch_s}
    finally:
        del loader
        gc.collect()


def gpu_patches_per_second(context: PartContext) -> float | None:
    """Patches/s a training run with the rule's pick consumes, from steps_3d's figures when it ran."""
    path = context.result_path.with_name("steps_3d.json")
    if not path.exists():
        return None
    steps = json.loads(path.read_text())
    figures = steps.get("combinations", {}).get(steps.get("rule_pick"), {})
    return steps["batch_size"] / figures["step_s"] if "step_s" in figures else None


# ---------------------------------------------------------------------------------------------- running the parts

@dataclass(frozen=True)
class Part:
    title: str
    run: Callable[[PartContext], None]
    needs_checkpoint: bool = False  # runs only when liver_train left a last.pt


PARTS = {
    "environment": Part("environment", measure_environment),
    "liver_train": Part("liver run, --amp --compile, 2 epochs", liver_train),
    "liver_resume": Part("liver --resume, 1 more epoch", liver_resume, needs_checkpoint=True),
    "predict": Part("predict.py, device vs CPU", predict_device_and_cpu, needs_checkpoint=True),
    "steps_3d": Part("3D training step, norm x layout", steps_3d),
    "steps_2d": Part("2D training step, norm x layout", steps_2d),
    "sliding_window": Part("sliding window", sliding_window),
    "loader": Part("loader throughput", loader_throughput),
}


def run_part(context: PartContext, log_path: Path | None) -> None:
    """Run one part, its output into ``log_path`` (None: leave it on the console); never raises."""
    if log_path is not None:  # in the part's own process: every thread and subprocess writes to the log
        log = open(log_path, "w", buffering=1)
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
    started = time.perf_counter()
    try:
        PARTS[context.name].run(context)
        context.result["status"] = "ok"
    except (Exception, SystemExit, KeyboardInterrupt) as error:
        traceback.print_exc()
        context.result.update(status="failed", error=f"{type(error).__name__}: {error}")
    context.result["part_s"] = time.perf_counter() - started
    context.save()
    sys.stdout.flush()
    sys.stderr.flush()


def part_in_own_process(context: PartContext, log_path: Path) -> None:
    """Target of the forked process: its own process group, so a timeout stops its workers too."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler is not this process's
    if context.device.type == "cpu":
        # A parent that has run OpenMP work (pytest, for --smoke) leaves a forked child a thread pool whose
        # threads did not survive the fork: its first parallel region would wait forever. One thread, as
        # DataLoader workers run.
        torch.set_num_threads(1)
    context.progress = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    run_part(context, log_path)


def run_isolated(context: PartContext, budget_s: float, log_path: Path) -> dict:
    """Fork a process for the part and stop it (and every process it started) at ``budget_s``.
    Forked, it pays no second import of torch, and a crash or a broken CUDA context stays in it."""
    sys.stdout.flush()
    sys.stderr.flush()
    process = multiprocessing.get_context("fork").Process(target=part_in_own_process, args=(context, log_path))
    try:
        process.start()
        wait_for_part(process, budget_s)
    finally:  # also on Ctrl-C: the part runs in a session of its own, which the terminal's signal misses
        timed_out = process.is_alive()  # False when start() was interrupted before the fork
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()  # the part itself, had it not reached os.setsid yet
            process.join()
    result = json.loads(context.result_path.read_text()) if context.result_path.exists() else {}
    if timed_out:
        result.update(status="timed out", error=f"stopped after its budget of {budget_s:.0f} s")
    elif "status" not in result:
        result.update(status="failed", error=f"the part's process died with exit code {process.exitcode}")
    return result


def wait_for_part(process: multiprocessing.Process, budget_s: float) -> None:
    """Join ``process`` for at most ``budget_s``, a second at a time: a SIGTERM whose KeyboardInterrupt
    was lost (raised in code that cannot raise, such as fork's at-fork callbacks) still ends the wait."""
    deadline = time.monotonic() + budget_s
    while process.is_alive() and time.monotonic() < deadline:
        process.join(min(1.0, max(deadline - time.monotonic(), 0.0)))
        if terminated.is_set():
            raise KeyboardInterrupt("SIGTERM")


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def markdown(results: dict) -> str:
    lines = [f"`benchmarks/gpu_check.py` on {results['device']}{' (smoke sizes)' if results['smoke'] else ''}, "
             f"{results['wall_s']:.0f} s", "",
             "| part | figure | measured | good | ok |", "|---|---|---|---|---|"]
    for name, result in results["parts"].items():
        rows = [[row["figure"], row["measured"], row["good"], row["ok"]] for row in result.get("rows", [])]
        if result["status"] != "ok":
            rows.append(["status", f"{result['status']}: {result.get('error', '')}", "ok", "no"])
        for row in rows:
            cells = [PARTS[name].title, *row]
            lines.append("| " + " | ".join(str(cell).replace("|", "/").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json, gpu_check.md, "
                        "logs/ and the runs (default: runs/gpu_check)")
    parser.add_argument("--cache-dir", help="phantoms and preprocessed data (default: OUT/cache)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks that every part runs")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda; cpu with --smoke)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, in this order: {','.join(PARTS)}")
    parser.add_argument("--time-limit", type=float, default=480, metavar="SECONDS",
                        help="for the whole check; a part that would start with less than "
                             f"{PART_MINIMUM_S} s left is skipped (default: 480)")
    args = parser.parse_args(argv)
    names = [name for name in args.parts.split(",") if name]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    # Nothing here touches CUDA: a process forked after CUDA has started in its parent cannot use it.
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    sizes = SMOKE if args.smoke else FULL
    out = Path(args.out)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    for folder in (out / "parts", out / "logs", cache_dir):
        folder.mkdir(parents=True, exist_ok=True)
    fork = "fork" in multiprocessing.get_all_start_methods()
    results = {"device": str(device), "smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "isolated": fork, "parts": {}}
    started = time.monotonic()
    # A SIGTERM (a job's time limit) ends the check as Ctrl-C does: the running part is stopped with
    # every process it started, and what was measured so far is written.
    terminated.clear()
    previous_handler = signal.signal(signal.SIGTERM, interrupt)
    try:
        run_parts([name for name in PARTS if name in names], results, out=out, cache_dir=cache_dir, device=device,
                  sizes=sizes, deadline=started + args.time_limit, fork=fork)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        results["wall_s"] = time.monotonic() - started
        table = markdown(results)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "gpu_check.md").write_text(table)
        print(table)
    return results


# Set by a SIGTERM, for wait_for_part: the handler's KeyboardInterrupt is lost when the signal lands
# in code that cannot raise.
terminated = threading.Event()


def interrupt(signal_number, frame) -> None:
    terminated.set()
    raise KeyboardInterrupt(f"signal {signal_number}")


def run_parts(names: list[str], results: dict, *, out: Path, cache_dir: Path, device: torch.device, sizes: Sizes,
              deadline: float, fork: bool) -> None:
    """Run the parts in turn into ``results["parts"]``, each within its budget and the time left."""
    started = time.monotonic()
    for name in names:
        budget_s = min(sizes.budgets_s[name], deadline - time.monotonic())
        checkpoint = out / "liver" / "last.pt"
        if budget_s < PART_MINIMUM_S:
            result = {"status": "skipped", "error": f"{budget_s:.0f} s left of the time limit"}
        elif PARTS[name].needs_checkpoint and not checkpoint.exists():
            result = {"status": "skipped", "error": f"no {checkpoint}: liver_train did not write it"}
        else:
            print(f"[{time.monotonic() - started:4.0f} s] {name}: started, budget {budget_s:.0f} s", flush=True)
            result_path, log_path = out / "parts" / f"{name}.json", out / "logs" / f"{name}.log"
            result_path.unlink(missing_ok=True)
            context = PartContext(name, out, cache_dir, device, sizes, time.monotonic() + budget_s, result_path,
                                  sys.stdout)
            try:
                if fork:
                    result = run_isolated(context, budget_s, log_path)
                else:  # no fork (Windows): in this process, without a time limit
                    run_part(context, None)
                    result = context.result
            except KeyboardInterrupt:
                result = json.loads(result_path.read_text()) if result_path.exists() else {}
                results["parts"][name] = {**result, "status": "interrupted", "error": "Ctrl-C or SIGTERM"}
                raise
            if result["status"] != "ok":
                result["log_tail"] = log_tail(log_path)
        print(f"[{time.monotonic() - started:4.0f} s] {name}: {result['status']}"
              + (f" ({result['error']})" if "error" in result else ""), flush=True)
        results["parts"][name] = result
        if name == "environment" and device.type == "cuda" and not result.get("cuda_available", True):
            print(f"--device {device}: CUDA is not available here; run with --smoke (CPU) or on a GPU.", flush=True)
            return

if __name__ == "__main__":
    main()
