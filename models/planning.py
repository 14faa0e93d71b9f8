"""Plan the U-Net's geometry from the data: per-axis strides and kernel sizes from the voxel spacing,
and, when no patch is given, the patch (and with it the depth) from the median preprocessed shape.

Thick slices are why: ACDC cine MRI has ~10 slices 10 mm apart of 1.5 mm pixels. Halving z as often as
y and x would leave one slice after two levels, and a 3-voxel kernel across z would mix tissue 20 mm
apart while seeing 4.5 mm in-plane. So, as nnU-Net plans it, an axis whose spacing is at least twice
the finest is neither downsampled (stride 1) nor convolved across (kernel 1) until downsampling the
finer axes has brought them within a factor 2 of it; once 3, a kernel stays 3. An axis also stops being
downsampled when its feature map would shrink below `MIN_FEATURE_SIZE` voxels, and the network ends
when no axis can be downsampled any more. That is nnU-Net's rule; a recipe may ask for at least
`min_downsamplings` levels of downsampling, and a small patch is then halved further while an axis
keeps `SMALLEST_FEATURE_SIZE` voxels (a 32^3 patch: four halvings down to 2^3, as MONAI's BasicUNet,
where nnU-Net's rule stops at 4^3 after three).

    topology = plan_topology((10.0, 1.5, 1.5), (10, 256, 224))
    topology.strides[:3]       # ((1, 2, 2), (1, 2, 2), (2, 2, 2))
    topology.kernel_sizes[:3]  # ((1, 3, 3), (1, 3, 3), (3, 3, 3))

Axes are (z, y, x) in 3D, (y, x) in 2D; spacing in mm.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_FEATURE_SIZE = 4  # voxels an axis keeps at least at the bottleneck (nnU-Net's 4)
SMALLEST_FEATURE_SIZE = 2  # ... or this many, for the downsamplings a recipe asks for beyond that rule
ANISOTROPY_LIMIT = 2.0  # an axis this many times coarser than the finest is neither pooled nor convolved across


@dataclass(frozen=True)
class UNetTopology:
    """What `UNet(strides=..., kernel_sizes=...)` takes.

    Attributes:
        strides: one per-axis stride per downsampling (depth - 1 of them), 2 or 1.
        kernel_sizes: one per-axis kernel size per level (depth of them), 3 or 1.
    """

    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]

    @property
    def depth(self) -> int:
        """Resolution levels, the bottleneck included."""
        return len(self.kernel_sizes)

    @property
    def downsampling(self) -> tuple[int, ...]:
        """Total downsampling of each axis: a patch divisible by it halves exactly at every level, so
        deep supervision's targets pick the voxels the strided convolutions are centred on."""
        return tuple(math.prod(stride[axis] for stride in self.strides) for axis in range(len(self.kernel_sizes[0])))


def plan_topology(spacing: Sequence[float], patch: Sequence[int], *, depth: int | None = None,
                  min_feature_size: int = MIN_FEATURE_SIZE, min_downsamplings: int = 0) -> UNetTopology:
    """Strides and kernel sizes for a patch of `patch` voxels of `spacing` mm.

    Args:
        spacing: the target spacing of the preprocessed data, per axis.
        patch: the patch size, per axis.
        depth: resolution levels wanted; None plans them: downsample while some axis keeps at least
            `min_feature_size` voxels (at least one downsampling). Given, the network stops there, and
            if every axis is already small the spacing rule alone picks the axes of the remaining levels.
        min_feature_size: the fewest voxels an axis may be downsampled to.
        min_downsamplings: planned depth only: while fewer downsamplings than this are planned, an
            axis may also be downsampled to `SMALLEST_FEATURE_SIZE` voxels (0: nnU-Net's rule alone).

    Returns:
        the topology; `depth` levels when given.
    """
    if len(spacing) != len(patch):
        raise ValueError(f"spacing {tuple(spacing)} and patch {tuple(patch)} must have one entry per axis")
    if depth is not None and depth < 2:
        raise ValueError(f"depth must be at least 2, got {depth}")
    level_spacing, sizes = [float(value) for value in spacing], [int(size) for size in patch]
    kernel = [1] * len(sizes)
    strides, kernel_sizes = [], []
    while True:
        finest = min(level_spacing)
        kernel = [3 if previous == 3 or axis_spacing < ANISOTROPY_LIMIT * finest else 1
                  for previous, axis_spacing in zip(kernel, level_spacing)]
        kernel_sizes.append(tuple(kernel))
        if depth is not None and len(kernel_sizes) == depth:
            break
        stride = next_stride(level_spacing, sizes, min_feature_size, required=depth is not None or not strides)
        if stride is None and len(strides) < min_downsamplings:
            stride = next_stride(level_spacing, sizes, SMALLEST_FEATURE_SIZE, required=False)
        if stride is None:
            break
        strides.append(stride)
        level_spacing = [axis_spacing * step for axis_spacing, step in zip(level_spacing, stride)]
        sizes = [math.ceil(size / step) for size, step in zip(sizes, stride)]
    return UNetTopology(tuple(strides), tuple(kernel_sizes))


def next_stride(spacing: list[float], sizes: list[int], min_feature_size: int,
                required: bool) -> tuple[int, ...] | None:
    """The stride from a level of `spacing` mm and `sizes` voxels to the next: 2 along the axes large
    enough to halve and within ANISOTROPY_LIMIT of the finest of those; None when no axis is large
    enough, unless `required` (then every axis is a candidate)."""
    candidates = [axis for axis, size in enumerate(sizes) if size >= 2 * min_feature_size]
    if not candidates:
        if not required:
            return None
        candidates = list(range(len(sizes)))
    finest = min(spacing[axis] for axis in candidates)
    pooled = {axis for axis in candidates if spacing[axis] < ANISOTROPY_LIMIT * finest}
    return tuple(2 if axis in pooled else 1 for axis in range(len(sizes)))


def resolve_topology(spacing: Sequence[float], patch: Sequence[int], *, depth: int | None = None,
                     strides: Sequence[Sequence[int]] | None = None,
                     kernel_sizes: Sequence[Sequence[int]] | None = None,
                     min_downsamplings: int = 0) -> UNetTopology:
    """The topology with whatever was given explicitly, the rest planned by `plan_topology` (with
    `min_downsamplings`).

    Several `strides` (`kernel_sizes`) fix the depth at their number + 1 (their number); a single one
    is repeated for every downsampling (level), like `--patch-size 128` for every axis.
    """
    fixed_depth = depth
    for name, values, levels_more in (("strides", strides, 1), ("kernel_sizes", kernel_sizes, 0)):
        if values is not None and len(values) > 1:
            if fixed_depth is not None and fixed_depth != len(values) + levels_more:
                raise ValueError(f"{len(values)} {name} make {len(values) + levels_more} levels, not {fixed_depth}: "
                                 f"give one entry per {'downsampling' if levels_more else 'level'} or leave one out")
            fixed_depth = len(values) + levels_more
    planned = plan_topology(spacing, patch, depth=fixed_depth, min_downsamplings=min_downsamplings)
    return UNetTopology(
        strides=repeat_per_level("strides", strides, planned.depth - 1, len(spacing)) or planned.strides,
        kernel_sizes=repeat_per_level("kernel_sizes", kernel_sizes, planned.depth, len(spacing))
        or planned.kernel_sizes)


def repeat_per_level(name: str, values: Sequence[Sequence[int]] | None, count: int,
                     spatial_dims: int) -> tuple[tuple[int, ...], ...] | None:
    """`values` as a tuple of tuples, a single entry repeated `count` times; None stays None."""
    if values is None:
        return None
    values = tuple(tuple(int(value) for value in entry) for entry in values)
    if any(len(entry) != spatial_dims or min(entry) < 1 for entry in values):
        raise ValueError(f"each of the {name} needs {spatial_dims} positive values (one per axis), got {values}")
    if name == "kernel_sizes" and any(size % 2 == 0 for entry in values for size in entry):
        raise ValueError(f"kernel sizes must be odd (a centred kernel keeps the voxels in place), got {values}")
    return values * count if len(values) == 1 else values


def activation_memory(patch: Sequence[int], topology: UNetTopology, *, batch_size: int, base_channels: int,
                      max_channels: int) -> int:
    """Bytes of fp32 activations a training step keeps for the backward pass, roughly.

    Per level of `channels` x `voxels`: the encoder keeps two convolution and two normalisation
    outputs (LeakyReLU works in place); the decoder the upsampled input, the concatenation (twice
    the channels) and again two convolution and two normalisation outputs. Weights, gradients and
    cuDNN workspaces are left out: at these patch sizes the activations dominate.
    """
    sizes, total = list(patch), 0
    for level in range(topology.depth):
        if level > 0:
            sizes = [math.ceil(size / step) for size, step in zip(sizes, topology.strides[level - 1])]
        channels = min(base_channels * 2**level, max_channels)
        tensors = 4 if level == topology.depth - 1 else 4 + 7  # the bottleneck has no decoder stage
        total += tensors * channels * math.prod(sizes)
    return 4 * batch_size * total


# nnU-Net's familiar 3D configuration sets the default budget: a 1 mm isotropic dataset with a large
# median shape gets a 128 x 128 x 128 patch at batch 2 with 32 base channels (capped at 320), planned
# topology (6 levels). By the estimate above that is about 8 GB of fp32 activations.
DEFAULT_MEMORY_BUDGET = activation_memory((128, 128, 128), plan_topology((1.0, 1.0, 1.0), (128, 128, 128)),
                                          batch_size=2, base_channels=32, max_channels=320)


def plan_patch(spacing: Sequence[float], median_shape: Sequence[float], *, batch_size: int, base_channels: int,
               max_channels: int, depth: int | None = None, strides: Sequence[Sequence[int]] | None = None,
               kernel_sizes: Sequence[Sequence[int]] | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
               min_feature_size: int = MIN_FEATURE_SIZE, min_downsamplings: int = 0
               ) -> tuple[tuple[int, ...], UNetTopology]:
    """The largest patch up to the median shape whose training step fits `memory_budget`.

    Starts from the median shape rounded up to its topology's total downsampling (a patch never
    needs to be larger) and, while `activation_memory` exceeds the budget, shortens the axis of the
    largest extent in mm by its downsampling factor, so the patch tends towards a cube in mm and stays
    divisible. If no axis can be shortened any more (every axis down to `min_feature_size`), that
    smallest patch is returned over budget.

    Args:
        spacing: the target spacing of the preprocessed data, per axis.
        median_shape: the median shape of the preprocessed cases, per axis.
        batch_size, base_channels, max_channels: as the network trains them (see activation_memory).
        depth, strides, kernel_sizes: what is fixed of the topology (see resolve_topology); None: planned.
        min_downsamplings: passed to the planner (see plan_topology).

    Returns:
        (patch, the topology for it); the patch is divisible by the topology's downsampling.
    """
    patch = [max(1, round(size)) for size in median_shape]
    while True:
        topology = resolve_topology(spacing, patch, depth=depth, strides=strides, kernel_sizes=kernel_sizes,
                                    min_downsamplings=min_downsamplings)
        factors = topology.downsampling
        patch = [math.ceil(size / factor) * factor for size, factor in zip(patch, factors)]
        memory = activation_memory(patch, topology, batch_size=batch_size, base_channels=base_channels,
                                   max_channels=max_channels)
        shorter = [axis for axis, (size, factor) in enumerate(zip(patch, factors)) if size - factor >= min_feature_size]
        if memory <= memory_budget or not shorter:
            return tuple(patch), topology
        axis = max(shorter, key=lambda axis: (patch[axis] * spacing[axis], -axis))
        patch[axis] -= factors[axis]
