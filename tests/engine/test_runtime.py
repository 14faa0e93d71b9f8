import dataclasses
import json
import os
import random
import re

import numpy as np
import pytest
import torch

import engine.runtime as runtime
from engine.runtime import pick_device, resolve_amp_dtype, seed_everything, start_run


@pytest.mark.parametrize("fast_bf16, expected", [(True, torch.bfloat16), (False, None)])
def test_amp_on_the_cpu_uses_bf16_only_where_it_has_native_kernels(monkeypatch, fast_bf16, expected):
    monkeypatch.setattr(runtime, "has_fast_cpu_bf16", lambda: fast_bf16)
    assert resolve_amp_dtype(torch.device("cpu"), True) == expected
    # An explicit dtype is obeyed even where it is slow; no --amp means full precision everywhere.
    assert resolve_amp_dtype(torch.device("cpu"), True, "bf16") == torch.bfloat16
    assert resolve_amp_dtype(torch.device("cpu"), False, "bf16") is None


def test_amp_on_accelerators_is_fp16_and_unknown_dtypes_are_refused():
    assert resolve_amp_dtype(torch.device("cuda"), True) == torch.float16
    assert resolve_amp_dtype(torch.device("mps"), True) == torch.float16
    assert resolve_amp_dtype(torch.device("cuda"), True, "bf16") == torch.bfloat16
    with pytest.raises(SystemExit, match="--amp-dtype fp8: choose auto, bf16 or fp16"):
        resolve_amp_dtype(torch.device("cuda"), True, "fp8")


class Config:
    out = None
    device = "cpu"
    amp = True
    amp_dtype = "auto"
    seed = 0
    deterministic = False
    workers = 3


def test_a_run_with_amp_on_a_cpu_without_bf16_kernels_stays_fp32_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "has_fast_cpu_bf16", lambda: False)
    monkeypatch.setattr(runtime, "save_config", lambda config, path: None)
    config = Config()
    config.out = str(tmp_path / "run")
    out, device, amp_dtype, workers, logger = start_run(config, resume=None)
    logger.close()
    assert device == torch.device("cpu") and amp_dtype is None and workers == 3
    lines = [line for line in capsys.readouterr().out.splitlines() if "--amp" in line]
    assert len(lines) == 1 and "fp32" in lines[0] and "--amp-dtype bf16" in lines[0]


def test_a_seed_repeats_the_python_numpy_and_torch_draws():
    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    seed_everything(3, deterministic=False)
    first = draws()
    seed_everything(3, deterministic=False)
    assert draws() == first
    seed_everything(4, deterministic=False)
    assert all(a != b for a, b in zip(draws(), first))


@pytest.mark.parametrize("preset, expected", [(None, ":4096:8"), (":16:8", ":16:8")])
def test_deterministic_seeding_forces_deterministic_kernels_and_keeps_a_set_cublas_workspace(monkeypatch, preset,
                                                                                            expected):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset or "")
    if preset is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        seed_everything(0, deterministic=True)
        # warn_only: an op without a deterministic kernel must not stop a run.
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == expected
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def test_pick_device_prefers_cuda_falls_back_to_the_cpu_and_refuses_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="--device cuda:1: CUDA is not available here"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")


@dataclasses.dataclass
class RunConfig:
    out: str
    device: str = "cpu"
    amp: bool = False
    amp_dtype: str = "auto"
    seed: int = 0
    deterministic: bool = False
    workers: int | None = None


def test_start_run_saves_the_config_as_given_and_refuses_a_folder_holding_a_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "default_workers", lambda: 5)
    config = RunConfig(out=str(tmp_path / "run"))
    out, device, amp_dtype, workers, logger = start_run(config, resume=None)
    logger.close()
    assert (out, device, amp_dtype, workers) == (tmp_path / "run", torch.device("cpu"), None, 5)
    # workers stays none in config.json, so a repeat on another machine sizes them to that machine.
    assert json.loads((out / "config.json").read_text()) == dataclasses.asdict(config)
    (out / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="already holds a run .* --resume " + re.escape(str(out / "last.pt"))):
        start_run(config, resume=None)
    *_, logger = start_run(config, resume=str(out / "last.pt"))
    logger.close()
