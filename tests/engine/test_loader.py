import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

import engine.loader as loader_module
from engine.loader import PREFETCH_FACTOR, batch_bytes, build_loader, default_workers


class Patches(Dataset):
    """(1, 5, 7, 9) float32 images and (5, 7, 9) uint8 labels keyed by (epoch, index)."""

    def __len__(self):
        return 11

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else key
        return {"image": torch.full((1, 5, 7, 9), float(index)), "label": torch.zeros((5, 7, 9), dtype=torch.uint8)}


SAMPLE_BYTES = 5 * 7 * 9 * (4 + 1)


def test_default_workers_use_the_cores_available_shared_among_the_node_processes(monkeypatch):
    monkeypatch.setattr(loader_module, "available_cores", lambda: 32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 31  # one core left to the training process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun --nproc-per-node 8
    assert default_workers() == 3
    monkeypatch.setattr(loader_module, "available_cores", lambda: 2)
    assert default_workers() == 1  # never none: a worker overlaps loading with the step


def test_the_available_cores_are_the_affinity_not_the_machine(monkeypatch):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this system")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})  # taskset / docker --cpuset-cpus 0-2
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() <= 2


def test_batch_bytes_from_one_sample_of_the_sampler():
    assert batch_bytes(Patches(), [(0, 3), (0, 4)], batch_size=3) == 3 * SAMPLE_BYTES
    assert batch_bytes(Patches(), None, batch_size=2) == 2 * SAMPLE_BYTES


def test_too_small_shared_memory_stops_with_what_to_do(monkeypatch):
    monkeypatch.setattr(loader_module, "SHARED_MEMORY", loader_module.Path("/"))  # a folder every system has
    needed = 2 * PREFETCH_FACTOR * 2 * SAMPLE_BYTES
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=needed - 1))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match=r"2 DataLoader workers x 4 batches.*--workers.*--shm-size=8g.*--ipc=host"):
        build_loader(Patches(), None, batch_size=2, workers=2, device=torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: every process on the node has its workers
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=needed + 1))
    with pytest.raises(SystemExit, match="2 processes x 2 DataLoader workers"):
        build_loader(Patches(), None, batch_size=2, workers=2, device=torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    loader = build_loader(Patches(), None, batch_size=2, workers=2, device=torch.device("cpu"))
    assert loader.num_workers == 2
    # In-process loading needs no shared memory at all.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    assert build_loader(Patches(), None, batch_size=2, workers=0, device=torch.device("cpu")).num_workers == 0


def test_loader_keeps_the_recipes_settings_and_its_workers_run_one_thread(monkeypatch):
    keys = [(0, index) for index in range(7)]
    loader = build_loader(Patches(), keys, batch_size=2, workers=1, device=torch.device("cpu"), drop_last=True)
    assert loader.persistent_workers and loader.prefetch_factor == PREFETCH_FACTOR and not loader.pin_memory
    assert loader.worker_init_fn is loader_module.worker_init
    batches = list(loader)
    assert len(batches) == 3 and batches[2]["image"][:, 0, 0, 0, 0].tolist() == [4.0, 5.0]
    cuda = build_loader(Patches(), keys, batch_size=2, workers=0, device=torch.device("cuda"))
    assert cuda.pin_memory and not cuda.persistent_workers and cuda.prefetch_factor is None
    once = build_loader(Patches(), None, batch_size=2, workers=1, device=torch.device("cpu"), persistent_workers=False)
    assert not once.persistent_workers and len(list(once)) == 6
