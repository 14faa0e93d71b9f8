"""U-Net for 2D and 3D segmentation.

One class serves both: `spatial_dims` picks `nn.Conv2d`/`nn.Conv3d` and the matching layers. The layout
follows nnU-Net's plain U-Net: each resolution level holds two 3x3(x3) convolutions, each followed by a
normalisation and LeakyReLU(0.01); the encoder downsamples with stride-2 convolutions; the decoder
upsamples, concatenates the skip connection and applies two convolutions again.

    model = UNet(spatial_dims=3, in_channels=1, num_classes=3)
    logits = model(torch.randn(2, 1, 64, 64, 64))  # (2, 3, 64, 64, 64)
"""

import torch
import torch.nn.functional as F
from torch import nn

CONVOLUTIONS = {2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_CONVOLUTIONS = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCH_NORMS = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INTERPOLATION_MODES = {2: "bilinear", 3: "trilinear"}


def make_norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """Normalisation layer: "instance" (per sample and channel) or "batch"."""
    if norm == "instance":
        # GroupNorm with one channel per group is instance normalisation with a per-channel affine;
        # unlike nn.InstanceNorm3d it keeps channels_last tensors channels_last (and is faster on CPU).
        return nn.GroupNorm(num_groups=channels, num_channels=channels)
    if norm == "batch":
        return BATCH_NORMS[spatial_dims](channels)
    raise ValueError(f"norm must be 'instance' or 'batch', got {norm!r}")


class ConvBlock(nn.Module):
    """(conv 3x3(x3) -> norm -> LeakyReLU(0.01)) x 2; the first convolution may be strided.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input (B, in_channels, *spatial).
        out_channels: channels of the output (B, out_channels, *spatial / stride).
        norm: "instance" or "batch".
        stride: stride of the first convolution; 2 halves every spatial size (rounding up).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str, stride: int = 1):
        super().__init__()
        conv = CONVOLUTIONS[spatial_dims]
        # No bias: the normalisation right after subtracts the mean, so a bias would be ignored.
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, spatial_dims, out_channels)
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = make_norm(norm, spatial_dims, out_channels)
        self.activation = nn.LeakyReLU(negative_slope=0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.conv1(x)))
        x = self.activation(self.norm2(self.conv2(x)))
        return x


class Down(nn.Module):
    """Halve the resolution with a stride-2 convolution (learned, unlike max-pooling), then convolve.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input (B, in_channels, *spatial).
        out_channels: channels of the output (B, out_channels, *ceil(spatial / 2)).
        norm: "instance" or "batch".
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.block = ConvBlock(spatial_dims, in_channels, out_channels, norm, stride=2)

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
        norm: "instance" or "batch".
        upsample: "interpolate" (linear interpolation + 1x1(x1) convolution) or "transpose"
            (2x2(x2) transposed convolution with stride 2).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int, norm: str, upsample: str
    ):
        super().__init__()
        if upsample == "interpolate":
            self.up = CONVOLUTIONS[spatial_dims](in_channels, skip_channels, kernel_size=1)
            self.interpolation_mode = INTERPOLATION_MODES[spatial_dims]
        elif upsample == "transpose":
            self.up = TRANSPOSED_CONVOLUTIONS[spatial_dims](in_channels, skip_channels, kernel_size=2, stride=2)
            self.interpolation_mode = None
        else:
            raise ValueError(f"upsample must be 'interpolate' or 'transpose', got {upsample!r}")
        self.block = ConvBlock(spatial_dims, 2 * skip_channels, out_channels, norm)

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
        depth: number of resolution levels, the bottleneck included (depth - 1 downsamplings by 2).
        max_channels: cap on the channels of any level (nnU-Net uses 320 in 3D).
        norm: "instance" or "batch".
        upsample: "interpolate" (bi/trilinear + 1x1 convolution) or "transpose" (transposed convolution).
        deep_supervision: in training mode, also return logits of the lower decoder levels.

    Returns:
        logits (B, num_classes, *spatial) at the input's spatial size. With deep_supervision in
        training mode, a list [full, 1/2, 1/4, ...] of depth - 1 logit tensors, the k-th at the
        resolution of encoder level k (spatial size ceil(size / 2^k) per axis); in eval mode only
        the full-resolution logits.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 3,
        base_channels: int = 32,
        depth: int = 5,
        max_channels: int = 320,
        norm: str = "instance",
        upsample: str = "interpolate",
        deep_supervision: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if depth < 2:
            raise ValueError(f"depth must be at least 2, got {depth}")
        self.deep_supervision = deep_supervision
        channels = [min(base_channels * 2**level, max_channels) for level in range(depth)]

        self.encoder = nn.ModuleList([ConvBlock(spatial_dims, in_channels, channels[0], norm)])
        for level in range(1, depth):
            self.encoder.append(Down(spatial_dims, channels[level - 1], channels[level], norm))

        # decoder[0] leaves the bottleneck; decoder[-1] returns to full resolution.
        self.decoder = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            self.decoder.append(
                Up(spatial_dims, channels[level + 1], channels[level], channels[level], norm, upsample)
            )

        conv = CONVOLUTIONS[spatial_dims]
        self.head = conv(channels[0], num_classes, kernel_size=1)
        # auxiliary_heads[k - 1] reads decoder level k (1/2^k resolution), k = 1 .. depth - 2.
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
        # decoder_features runs coarse to fine; heads run from 1/2 resolution down.
        lower_features = reversed(decoder_features[:-1])
        lower_logits = [head(features) for head, features in zip(self.auxiliary_heads, lower_features)]
        return [logits, *lower_logits]


def initialise_weights(module: nn.Module) -> None:
    """He (Kaiming) initialisation for the LeakyReLU slope, as nnU-Net; zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
