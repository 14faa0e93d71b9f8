import pytest
import torch

from engine.layout import resolve_memory_format, resolve_norm
from models import UNet

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 1), torch.device("mps")


def test_instance_normalisation_takes_each_devices_fast_kernel():
    assert resolve_norm("instance", CPU) == "group_norm"
    assert resolve_norm("instance", CUDA) == "instance_norm"
    assert resolve_norm("instance", MPS) == "group_norm"


def test_explicit_norms_are_kept_on_every_device():
    for device in (CPU, CUDA):
        assert [resolve_norm(norm, device) for norm in ("group_norm", "instance_norm", "batch")] == [
            "group_norm", "instance_norm", "batch"]
    with pytest.raises(SystemExit, match="--norm layer: choose instance, instance_norm, group_norm, batch"):
        resolve_norm("layer", CPU)


def test_auto_memory_format_is_channels_last_on_the_cpu_only():
    assert resolve_memory_format("auto", CPU, 3) == torch.channels_last_3d
    assert resolve_memory_format("auto", CPU, 2) == torch.channels_last
    assert resolve_memory_format("auto", CUDA, 3) == torch.contiguous_format
    assert resolve_memory_format("auto", MPS, 2) == torch.contiguous_format


def test_explicit_memory_formats_are_kept_on_every_device():
    assert resolve_memory_format("channels_last", CUDA, 3) == torch.channels_last_3d
    assert resolve_memory_format("channels_last", CUDA, 2) == torch.channels_last
    assert resolve_memory_format("contiguous", CPU, 3) == torch.contiguous_format
    with pytest.raises(SystemExit, match="--memory-format nhwc: choose auto, channels_last, contiguous"):
        resolve_memory_format("nhwc", CPU, 2)


def test_every_resolved_norm_builds_a_unet():
    for device in (CPU, CUDA):
        for norm in ("instance", "group_norm", "instance_norm", "batch"):
            UNet(spatial_dims=2, base_channels=2, depth=2, norm=resolve_norm(norm, device))
