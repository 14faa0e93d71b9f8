"""U-Net for 2D and 3D segmentation.

One class serves both: `spatial_dims` picks `nn.Conv2d`/`nn.Conv3d` and the matching layers. The layout
follows nnU-Net's plain U-Net: each resolution level holds two convolutions, each followed by a
normalisation and LeakyReLU(0.01); the encoder downsamples with strided convolutions; the decoder
upsamples, concatenates the skip connection and applies two convolutions again.

By default every level downsamples every axis by 2 and convolves with 3x3(x3) kernels. On thick-slice
scans (e.g. 10 mm slices of 1.5 mm pixels) `strides` and `kernel_sizes` set them per level and axis,
as `models/planning.py` plans them from the voxel spacing: such a z axis is neither downsampled nor
convolved across (stride 1, kernel 1) until the in-plane axes have become as coarse.

    model = UNet(spatial_dims=3, in_channels=1, num_classes=3)
    logits = model(torch.randn(2, 1, 64, 64, 64))  # (2, 3, 64, 64, 64)
    model = UNet(spatial_dims=3, depth=3, strides=((1, 2, 2), (2, 2, 2)),
                 kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)))
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CONVOLUTIONS = {2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_CONVOLUTIONS = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCH_NORMS = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INSTANCE_NORMS = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
INTERPOLATION_MODES = {2: "bilinear", 3: "trilinear"}
NORMS = ("group_norm", "instance_norm", "batch")


def make_norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """Normalisation layer: instance normalisation (per sample and channel) computed by "group_norm"
    or by "instance_norm", or "batch" normalisation.

    The two instance normalisations give the same output and hold the same parameters (a per-channel
    `weight` and `bias`, no running statistics), so weights move between them; they differ in speed.
    GroupNorm with one channel per group keeps channels_last tensors channels_last and is the faster
    on the CPU; InstanceNorm runs in fp16 under CUDA autocast, where group_norm is kept in fp32.
    """
    if norm == "group_norm":
        return nn.GroupNorm(num_groups=channels, num_channels=channels)
    if norm == "instance_norm":
        return INSTANCE_NORMS[spatial_dims](channels, affine=True)
    if norm == "batch":
        return BATCH_NORMS[spatial_dims](channels)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r} (a recipe's 'instance' is chosen "
                     "per device by engine.layout.resolve_norm)")


class ConvBlock(nn.Module):
    """(conv -> norm -> LeakyReLU(0.01)) x 2; the first convolution may be strided.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input (B, in_channels, *spatial).
        out_channels: channels of the output (B, out_channels, *ceil(spatial / stride)).
        norm: "group_norm", "instance_norm" or "batch" (see make_norm).
        kernel_size: per axis, odd (3 convolves across the axis, 1 leaves the axis's voxels apart).
        stride: per axis, of the first convolution; 2 halves that size (rounding up), 1 keeps it.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str,
                 kernel_size: Sequence[int], stride: Sequence[int]):
        super().__init__()
        conv = CONVOLUTIONS[spatial_dims]
        # Half the kernel on each side keeps ceil(size / stride) voxels, each centred on voxel stride * i.
        padding = tuple(size // 2 for size in kernel_size)
        # No bias: the normalisation right after subtracts the mean, so a bias would be ignored.
        self.conv1 = conv(in_channels, out_channels, kernel_size=tuple(kernel_size), stride=tuple(stride),
                          padding=padding, bias=False)
        self.norm1 = make_norm(norm, spatial_dims, out_channels)
        self.conv2 = conv(out_channels, out_channels, kernel_size=tuple(kernel_size), padding=padding, bias=False)
        self.norm2 = make_norm(norm, spatial_dims, out_channels)
        self.activation = nn.LeakyReLU(negative_slope=0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.conv1(x)))
        x = self.activation(self.norm2(self.conv2(x)))
        return x


class Down(nn.Module):
    """Lower the resolution with a strided convolution (learned, unlike max-pooling), then convolve.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input (B, in_channels, *spatial).
        out_channels: channels of the output (B, out_channels, *ceil(spatial / stride)).
        norm: "group_norm", "instance_norm" or "batch".
        kernel_size: per axis, of both convolutions.
        stride: per axis, 2 (halve) or 1 (keep).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str,
                 kernel_size: Sequence[int], stride: Sequence[int]):
        super().__init__()
        self.block = ConvBlock(spatial_dims, in_channels, out_channels, norm, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def match_size(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Crop or zero-pad the spatial dims of x (B, C, *spatial) at their far end to `size`."""
    x = x[(..., *(slice(0, s) for s in size))]
    padding = []
    for current, target in zip(reversed(x.shape[2:]), reversed(size)):
        padding += [0, target - current]
    if any(padding):
        x = F.pad(x, padding)
    return x


class Up(nn.Module):
    """Upsample to the skip connection's size, concatenate the skip, then convolve.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the low-resolution input (B, in_channels, *low).
        skip_channels: channels of the skip connection (B, skip_channels, *high).
        out_channels: channels of the output (B, out_channels, *high).
        norm: "group_norm", "instance_norm" or "batch".
        upsample: "interpolate" (linear interpolation + 1x1(x1) convolution) or "transpose"
            (transposed convolution with kernel = stride per axis).
        kernel_size: per axis, of the two convolutions after the concatenation.
        stride: per axis, the downsampling between the skip's level and the input's (2 or 1).
    """

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int, norm: str,
                 upsample: str, kernel_size: Sequence[int], stride: Sequence[int]):
        super().__init__()
        if upsample == "interpolate":
            self.up = CONVOLUTIONS[spatial_dims](in_channels, skip_channels, kernel_size=1)
            self.interpolation_mode = INTERPOLATION_MODES[spatial_dims]
        elif upsample == "transpose":
            self.up = TRANSPOSED_CONVOLUTIONS[spatial_dims](in_channels, skip_channels, kernel_size=tuple(stride),
                                                            stride=tuple(stride))
            self.interpolation_mode = None
        else:
            raise ValueError(f"upsample must be 'interpolate' or 'transpose', got {upsample!r}")
        self.block = ConvBlock(spatial_dims, 2 * skip_channels, out_channels, norm, kernel_size,
                               stride=(1,) * spatial_dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.interpolation_mode is None:
            # A stride-2 transposed convolution doubles the size; odd skip sizes are one voxel shorter.
            x = match_size(x, skip.shape[2:])
        else:
            # The 1x1 convolution ran before interpolating: both are linear and the interpolation
            # weights sum to one, so the result equals interpolate-then-convolve at 1/2^d of the cost.
            x = F.interpolate(x, size=skip.shape[2:], mode=self.interpolation_mode, align_corners=False)
        x = torch.cat([skip, x], dim=1)
        return self.block(x)


class UNet(nn.Module):
    """U-Net returning per-class logits, for 2D or 3D inputs of any size.

    Args:
        spatial_dims: 2 for inputs (B, in_channels, H, W), 3 for (B, in_channels, D, H, W).
        in_channels: image channels (modalities).
        num_classes: output channels, one logit per class (background included); 1 for a single
            sigmoid logit.
        base_channels: channels at full resolution; doubled at each level down.
        depth: number of resolution levels, the bottleneck included (depth - 1 downsamplings).
        max_channels: cap on the channels of any level (nnU-Net uses 320 in 3D).
        norm: "group_norm" or "instance_norm" (the same instance normalisation by two kernels, see
            make_norm), or "batch".
        upsample: "interpolate" (bi/trilinear + 1x1 convolution) or "transpose" (transposed convolution).
        deep_supervision: in training mode, also return logits of the lower decoder levels.
        strides: depth - 1 per-axis strides, the k-th from level k to level k + 1 (2 halves an axis, 1 keeps it);
            None: 2 along every axis.
        kernel_sizes: depth per-axis odd kernel sizes, one per level (encoder and decoder share it);
            None: 3 along every axis.

    Returns:
        logits (B, num_classes, *spatial) at the input's spatial size. With deep_supervision in
        training mode, a list [full, level 1, level 2, ...] of depth - 1 logit tensors, the k-th at the
        resolution of encoder level k: spatial size ceil(size / f) per axis, f the product of that
        axis's first k strides (2^k with the default strides); in eval mode only the full-resolution logits.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 3,
        base_channels: int = 32,
        depth: int = 5,
        max_channels: int = 320,
        norm: str = "group_norm",
        upsample: str = "interpolate",
        deep_supervision: bool = False,
        strides: Sequence[Sequence[int]] | None = None,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if depth < 2:
            raise ValueError(f"depth must be at least 2, got {depth}")
        self.strides = check_per_level("strides", strides, depth - 1, spatial_dims, default=2)
        self.kernel_sizes = check_per_level("kernel_sizes", kernel_sizes, depth, spatial_dims, default=3)
        if any(size % 2 == 0 for kernel in self.kernel_sizes for size in kernel):
            raise ValueError(f"kernel_sizes must be odd to keep the feature map centred, got {self.kernel_sizes}")
        self.deep_supervision = deep_supervision
        channels = [min(base_channels * 2**level, max_channels) for level in range(depth)]

        self.encoder = nn.ModuleList([
            ConvBlock(spatial_dims, in_channels, channels[0], norm, self.kernel_sizes[0], stride=(1,) * spatial_dims)
        ])
        for level in range(1, depth):
            self.encoder.append(Down(spatial_dims, channels[level - 1], channels[level], norm,
                                     self.kernel_sizes[level], self.strides[level - 1]))

        # decoder[0] leaves the bottleneck; decoder[-1] returns to full resolution.
        self.decoder = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            self.decoder.append(Up(spatial_dims, channels[level + 1], channels[level], channels[level], norm,
                                   upsample, self.kernel_sizes[level], self.strides[level]))

        conv = CONVOLUTIONS[spatial_dims]
        self.head = conv(channels[0], num_classes, kernel_size=1)
        # auxiliary_heads[k - 1] reads decoder level k, k = 1 .. depth - 2.
        self.auxiliary_heads = nn.ModuleList()
        if deep_supervision:
            for level in range(1, depth - 1):
                self.auxiliary_heads.append(conv(channels[level], num_classes, kernel_size=1))

        self.apply(initialise_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()  # the bottleneck is no skip connection

        decoder_features = []
        for up in self.decoder:
            x = up(x, skips.pop())
            decoder_features.append(x)
        logits = self.head(x)

        if not (self.deep_supervision and self.training):
            return logits
        # decoder_features runs coarse to fine; heads run from level 1 down.
        lower_features = reversed(decoder_features[:-1])
        lower_logits = [head(features) for head, features in zip(self.auxiliary_heads, lower_features)]
        return [logits, *lower_logits]


def check_per_level(name: str, values: Sequence[Sequence[int]] | None, count: int, spatial_dims: int,
                    default: int) -> tuple[tuple[int, ...], ...]:
    """`values` as `count` tuples of `spatial_dims` positive ints, or `default` along every axis when None."""
    if values is None:
        return ((default,) * spatial_dims,) * count
    values = tuple(tuple(int(value) for value in entry) for entry in values)
    if len(values) != count or any(len(entry) != spatial_dims or min(entry) < 1 for entry in values):
        raise ValueError(f"{name} must hold {count} entries of {spatial_dims} positive ints (one per "
                         f"{'downsampling' if name == 'strides' else 'level'} for this depth), got {values}")
    return values


def initialise_weights(module: nn.Module) -> None:
    """He (Kaiming) initialisation for the LeakyReLU slope, as nnU-Net; zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
