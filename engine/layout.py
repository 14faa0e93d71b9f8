"""The U-Net's instance-normalisation kernel and memory layout, chosen per device.

The two choices go together. On the CPU, oneDNN's convolutions are about twice as fast on
channels-last tensors, and `nn.GroupNorm` with one channel per group (instance normalisation by
another kernel) keeps them channels-last. On CUDA, nnU-Net's pairing is the fast one: contiguous
NCDHW tensors with `nn.InstanceNorm3d`. There `group_norm` runs in fp32 under fp16 autocast and has
no channels-last kernel, and InstanceNorm3d on channels-last tensors is reported some 24% slower
(PyTorch issue 59168). Both normalisations hold the same parameters, so a checkpoint trained with one
loads into the other and predicts the same.

Recipes keep `norm="instance"` and `memory_format="auto"` in their configs (so a checkpoint carries
no device choice) and resolve them here, once, for the device they run on; either can be forced
(`--norm group_norm`, `--memory-format contiguous`) to time the combinations.
"""

import torch

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
NORM_CHOICES = ("instance", "instance_norm", "group_norm", "batch")


def resolve_norm(norm: str, device: torch.device) -> str:
    """The `UNet(norm=...)` for a recipe's `norm`: "instance" becomes "instance_norm" on CUDA and
    "group_norm" elsewhere; "instance_norm", "group_norm" and "batch" stay as they are."""
    if norm not in NORM_CHOICES:
        raise SystemExit(f"--norm {norm}: choose {', '.join(NORM_CHOICES)} (instance picks the kernel per device)")
    if norm == "instance":
        return "instance_norm" if device.type == "cuda" else "group_norm"
    return norm


def resolve_memory_format(name: str, device: torch.device, spatial_dims: int) -> torch.memory_format:
    """The memory format of the model and its inputs: "auto" is contiguous on CUDA and MPS (which
    has no fast channels-last 3D path) and channels-last on the CPU."""
    if name not in MEMORY_FORMATS:
        raise SystemExit(f"--memory-format {name}: choose {', '.join(MEMORY_FORMATS)}")
    if name == "auto":
        name = "contiguous" if device.type in ("cuda", "mps") else "channels_last"
    if name == "contiguous":
        return torch.contiguous_format
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
