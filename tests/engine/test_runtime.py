import pytest
import torch

import engine.runtime as runtime
from engine.runtime import resolve_amp_dtype, start_run


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
