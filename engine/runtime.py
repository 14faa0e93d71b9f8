"""Setting up a run: device, precision, seeding, DataLoader workers, run folder and logger."""

import os
import random
from pathlib import Path

import numpy as np
import torch

from engine.config import save_config
from engine.distributed import setup_distributed
from engine.loader import default_workers
from engine.logging import RunLogger
from engine.threads import available_cores


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA, then Apple's MPS, then the CPU; any other name is used as given."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available here. Use --device cpu or auto.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_amp_dtype(device: torch.device, amp: bool, name: str = "auto") -> torch.dtype | None:
    """The autocast dtype of a run, decided once from ``--amp`` and ``--amp-dtype``; None means full
    precision (autocast off, no GradScaler).

    ``auto`` is fp16 on CUDA and MPS (with a GradScaler on CUDA) and bf16 on a CPU with native bf16
    kernels. A CPU without them (AVX2 only) runs bf16 3D convolutions through a one-thread reference
    kernel some 30x slower than fp32, so there ``auto`` leaves autocast off, as nnU-Net does on the
    CPU; an explicit ``bf16`` still forces it.
    """
    if not amp:
        return None
    if name == "auto":
        if device.type != "cpu":
            return torch.float16
        return torch.bfloat16 if has_fast_cpu_bf16() else None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise SystemExit(f"--amp-dtype {name}: choose auto, bf16 or fp16")
    return dtypes[name]


def has_fast_cpu_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX-512 BF16 or AMX). Without them bf16 3D
    convolutions fall back to a reference kernel some 30x slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch, and set the backend flags that decide speed vs repeatability.

    On CUDA, cuDNN autotuning (``benchmark``) and TF32 matmuls are on for speed unless
    ``deterministic``; some 3D backward passes have no deterministic CUDA kernel, so this is never
    forced there by default. CPU kernels are deterministic at a fixed thread count.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        # warn_only: an op without a deterministic kernel warns instead of stopping a long run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def start_run(config, resume: str | None) -> tuple[Path, torch.device, torch.dtype | None, int, RunLogger]:
    """Open the run folder ``config.out`` and set up the process for a recipe: the torchrun process
    group when launched by torchrun, device, AMP dtype, DataLoader workers, seeds and backend flags,
    logger, ``config.json``. Refuses a folder that already holds a run unless it is being resumed, so
    a finished run is never overwritten by accident. Only rank 0 writes to the folder.

    ``config.workers`` None means ``default_workers()`` of this host; the config keeps None, so a
    run resumed or repeated on another machine sizes its workers to that machine.

    Returns:
        (run folder, device, autocast dtype or None for full precision, DataLoader workers, logger)
    """
    out = Path(config.out)
    if (out / "last.pt").exists() and resume is None:
        raise SystemExit(f"{out} already holds a run (last.pt). Continue it with --resume {out / 'last.pt'} "
                         "or choose another --out.")
    rank, world_size, device_name = setup_distributed(config.device)
    device = pick_device(device_name)
    amp_dtype = resolve_amp_dtype(device, config.amp, config.amp_dtype)
    seed_everything(config.seed, deterministic=config.deterministic or device.type == "cpu")
    logger = RunLogger(out, active=rank == 0)
    if rank == 0:
        save_config(config, out / "config.json")
    workers = default_workers() if config.workers is None else config.workers
    processes = f", {world_size} processes" if world_size > 1 else ""
    precision = "fp32" if amp_dtype is None else f"autocast {amp_dtype}"
    per_process = " per process" if world_size > 1 else ""
    chosen = f" (auto: {available_cores()} cores available)" if config.workers is None else ""
    logger.info(f"device {device}{processes}, {precision}, DataLoader workers {workers}{per_process}{chosen}, "
                f"run folder {out}")
    if config.amp and amp_dtype is None:
        logger.info("--amp: this CPU has no native bf16 kernels (AVX-512 BF16 or AMX), where bf16 convolutions "
                    "run ~30x slower than fp32, so the run stays in fp32; --amp-dtype bf16 forces bf16")
    elif amp_dtype == torch.bfloat16 and device.type == "cpu" and not has_fast_cpu_bf16():
        logger.info("warning: this CPU has no native bf16 kernels, so bf16 autocast runs far slower than fp32 here")
    return out, device, amp_dtype, workers, logger
