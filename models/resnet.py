"""ResNet18 for single-channel images (radiographs) with one logit, from torchvision's network.

The ImageNet weights expect RGB; a grey image is the same value in all three channels, so summing the
first convolution's filters over the colour axis gives a one-channel filter with exactly the response
the RGB network has to the grey image repeated three times.
"""

from pathlib import Path

import torch
import torchvision
from torch import nn


class ResNet18Classifier(nn.Module):
    """torchvision ResNet18 with ``in_channels`` inputs and ``num_classes`` logits.

    ``features`` returns the last convolutional maps and ``classify`` turns them into logits through
    global average pooling and the linear layer, so class activation maps can be computed exactly.

    Args:
        in_channels: image channels (1 for radiographs).
        num_classes: logits (1 for a binary finding).
        output_stride: 32 (ResNet18 as published) or 16: the last stage keeps the resolution of the one
            before and dilates its convolutions instead (as DeepLab does), so every filter, pretrained
            ones included, sees the same context, and the maps behind the CAMs have twice the resolution
            (4x4 -> 8x8 at 128 px) for ~1.7x the compute.

    Shapes:
        image (B, in_channels, H, W) -> logits (B, num_classes); features (B, 512, H/S, W/S), S = output_stride.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 1, output_stride: int = 32):
        super().__init__()
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.backbone.fc = nn.Linear(512, num_classes)
        if output_stride == 16:
            first, second = self.backbone.layer4
            first.conv1.stride = first.downsample[0].stride = (1, 1)
            for conv in (first.conv2, second.conv1, second.conv2):
                conv.dilation, conv.padding = (2, 2), (2, 2)
        self.backbone_frozen = False
        # Every strided layer pads by half its kernel, so feature cell k is centred on input pixel
        # output_stride * k (what engine/cam.py needs to draw the maps in place).
        self.feature_stride = output_stride

    def features(self, image: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(image))))  # (B, 64, H/4, W/4)
        x = net.layer2(net.layer1(x))  # (B, 128, H/8, W/8)
        return net.layer4(net.layer3(x))  # (B, 512, H/S, W/S)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.fc(features.mean(dim=(2, 3)))  # (B, num_classes)

    @property
    def head(self) -> nn.Linear:
        return self.backbone.fc

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(image))

    def load_pretrained(self, state_dict: dict) -> None:
        """Load a torchvision ResNet18 state_dict (RGB or not, any head): the first convolution is
        summed over its input channels when they differ, and the head is left as initialised."""
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        conv1 = state_dict["conv1.weight"]
        if conv1.shape[1] != self.backbone.conv1.in_channels:
            if self.backbone.conv1.in_channels != 1:
                raise ValueError(f"cannot adapt a {conv1.shape[1]}-channel first convolution to "
                                 f"{self.backbone.conv1.in_channels} channels")
            state_dict["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
        missing, unexpected = self.backbone.load_state_dict(state_dict, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise ValueError(f"not a ResNet18 state_dict: missing {missing}, unexpected {unexpected}")

    def freeze_backbone(self) -> None:
        """Train the head only: backbone weights stop learning and its batch-norm statistics stay as
        loaded (updating them from a few batches of new images would undo the pretrained features)."""
        self.backbone_frozen = True
        for name, parameter in self.backbone.named_parameters():
            parameter.requires_grad = name.startswith("fc.")

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.backbone_frozen:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self


def load_weights(model: ResNet18Classifier, weights: str) -> None:
    """``none`` keeps the random initialisation; ``imagenet`` loads torchvision's IMAGENET1K_V1
    (downloaded once into the torch hub cache); anything else is a path to a ResNet18 state_dict.
    Never falls back silently: a failure stops the run and says what to pass instead."""
    if weights == "none":
        return
    if weights == "imagenet":
        try:
            state_dict = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as error:  # no network, proxy, or a damaged download
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            raise SystemExit(
                f"--weights imagenet: cannot get torchvision's ResNet18 IMAGENET1K_V1 weights "
                f"({type(error).__name__}: {error}). Download resnet18-f37072fd.pth elsewhere and pass "
                f"--weights PATH (or place it in {cache}), or train from scratch with --weights none."
            ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise SystemExit(f"--weights {weights}: no such file. Pass --weights PATH of a ResNet18 "
                             "state_dict, --weights imagenet or --weights none.")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = state_dict.get("model", state_dict)  # a checkpoint of this codebase works too
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
    model.load_pretrained(state_dict)
