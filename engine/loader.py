"""The DataLoader of every recipe: how many workers, one thread each, and room for their batches.

    loader = build_loader(train_data, sampler, batch_size=2, workers=workers, device=device)

Workers are persistent (their start, a fork of the training process, is paid once) and keep
``PREFETCH_FACTOR`` batches ready each; on CUDA batches are pinned, so the host-to-device copy runs
without blocking. A worker hands each batch to the training process through shared memory
(``/dev/shm``): where that is too small (Docker gives a container 64 MB) the worker dies with a bus
error mid-epoch, so the room is checked before the workers start.
"""

import os
import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.threads import available_cores, limit_native_threads

PREFETCH_FACTOR = 4  # batches each worker prepares ahead: absorbs the slower patches (e.g. elastic ones)
SHARED_MEMORY = Path("/dev/shm")


def default_workers() -> int:
    """DataLoader workers for one training process: the cores it may use (``available_cores``),
    shared among the processes torchrun starts on this node (``LOCAL_WORLD_SIZE``), less one core
    for the process itself (the training step, collation of results, host-to-device copies); at
    least one."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(available_cores() // processes - 1, 1)


def worker_init(worker_id: int) -> None:
    """One thread of every kind per DataLoader worker: the workers are the parallelism, and torch,
    BLAS or OpenMP threads inside each would oversubscribe the cores. Randomness is per sample (see
    PatchDataset), so nothing is seeded here."""
    torch.set_num_threads(1)
    limit_native_threads(1)


def batch_bytes(dataset: Dataset, sampler: Sampler | None, batch_size: int) -> int:
    """Bytes of the tensors of one batch, from one sample drawn in this process (the sampler's first key)."""
    sample = dataset[next(iter(sampler))] if sampler is not None else dataset[0]
    tensors = sample.values() if isinstance(sample, dict) else sample
    return batch_size * sum(tensor.numel() * tensor.element_size() for tensor in tensors
                            if isinstance(tensor, torch.Tensor))


def check_shared_memory(batch_size_bytes: int, *, workers: int, processes: int, path: Path) -> None:
    """Stop with what to do when the batches the workers of this node's training processes keep in
    flight (``processes x workers x PREFETCH_FACTOR`` batches) do not fit in the free shared memory.
    Pinned copies live in ordinary memory and do not count."""
    needed = processes * workers * PREFETCH_FACTOR * batch_size_bytes
    free = shutil.disk_usage(path).free
    if needed > free:
        megabyte = 2**20
        who = f"{processes} processes x " if processes > 1 else ""
        raise SystemExit(
            f"{path} has {free / megabyte:.0f} MB free, but {who}{workers} DataLoader workers x {PREFETCH_FACTOR} "
            f"batches in flight x {batch_size_bytes / megabyte:.1f} MB per batch need about {needed / megabyte:.0f} MB "
            f"there (workers hand their batches over through it, and die with a bus error when it is full). "
            f"Lower --workers (or --batch-size), or give the container more shared memory: "
            f"docker run --shm-size=8g ..., or docker run --ipc=host ...")


def build_loader(dataset: Dataset, sampler: Sampler | None, *, batch_size: int, workers: int,
                 device: torch.device, drop_last: bool = False, persistent_workers: bool = True) -> DataLoader:
    """A DataLoader over ``dataset`` in the order of ``sampler`` (none: in order), after checking that
    the workers' batches fit in shared memory.

    Args:
        workers: worker processes (0: load in this process).
        device: where the batches go; CUDA gets pinned batches.
        drop_last: drop a last, smaller batch.
        persistent_workers: keep the workers between epochs (a loader used once in a while, such as
            validation's, had better let them go).
    """
    if workers > 0 and SHARED_MEMORY.is_dir():  # not in-process loading, nor a system without it (macOS)
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        check_shared_memory(batch_bytes(dataset, sampler, batch_size), workers=workers, processes=processes,
                            path=SHARED_MEMORY)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=device.type == "cuda", persistent_workers=persistent_workers and workers > 0,
                      worker_init_fn=worker_init, prefetch_factor=PREFETCH_FACTOR if workers > 0 else None)
