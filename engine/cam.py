"""Class activation maps: where in the image a classifier's evidence for the finding lies.

CAM (Zhou et al. 2016) weights the last convolutional maps by the linear layer's weights. For a network
that ends in global average pooling and one linear layer (ResNet), the logit is exactly the spatial mean
of the CAM plus the bias, so CAM is the model's own decomposition, not an approximation. Grad-CAM
(Selvaraju et al. 2017) weights the maps by the mean gradient of the logit instead, which works for
any head; for a ResNet head it equals CAM up to a constant factor before the ReLU.

Models provide ``features(image) -> (B, C, h, w)`` and ``classify(features) -> (B, K)`` logits,
with ``head`` the final ``nn.Linear`` (see ``models/resnet.py``).

Where a feature cell lies on the image matters as much as its value. In a network whose strided layers
pad by half their kernel (ResNet: a stride-2 3x3 convolution with padding 1 centres output k on input
2k), cell k of a map of total stride S is centred on pixel S*k, not on the middle of the k-th S-pixel
tile, S*k + (S-1)/2, that plain bilinear resizing assumes: that would draw every map half a cell (15.5
pixels at stride 32) down and to the right. Such models say so with a ``feature_stride`` attribute;
without one, cells are taken to tile the image (as after average pooling).
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


@torch.no_grad()
def class_activation_maps(model, image: torch.Tensor, class_index: int = 0) -> torch.Tensor:
    """CAM of ``class_index``, ReLU'd (evidence for, not against) and upsampled to the image size.

    Shapes:
        image (B, C, H, W) -> (B, H, W) float32, not normalised.
    """
    features = model.features(image).float()  # (B, 512, h, w)
    weights = model.head.weight[class_index].float()  # (512,)
    cam = torch.einsum("c,bchw->bhw", weights, features)
    return upsample_cells(F.relu(cam), image.shape[-2:], getattr(model, "feature_stride", None))


def grad_cams(model, image: torch.Tensor, class_index: int = 0) -> torch.Tensor:
    """Grad-CAM of ``class_index``: maps weighted by the spatially averaged gradient of the logit.

    Shapes:
        image (B, C, H, W) -> (B, H, W) float32, not normalised.
    """
    with torch.enable_grad():
        features = model.features(image).float().detach().requires_grad_(True)
        logits = model.classify(features)[:, class_index]
        # Samples are independent, so the gradient of the sum is each sample's own gradient.
        (gradients,) = torch.autograd.grad(logits.sum(), features)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # (B, 512, 1, 1)
    cam = (weights * features.detach()).sum(dim=1)
    return upsample_cells(F.relu(cam), image.shape[-2:], getattr(model, "feature_stride", None))


def upsample_cells(cam: torch.Tensor, size, stride: int | None = None) -> torch.Tensor:
    """Linear interpolation of per-cell maps to image pixels, each cell placed where it looks.

    Args:
        cam: (B, h, w) one value per feature cell.
        size: (H, W) of the image.
        stride: cell k is centred on pixel ``stride * k`` (ResNet-style padded strided layers); None:
            cells tile the image, cell k centred on pixel ``S * k + (S - 1) / 2`` with S = H / h.
            Beyond the outermost centres the edge cells' values are held.

    Shapes:
        (B, h, w) -> (B, H, W)
    """
    for axis, (cells, pixels) in enumerate(zip(cam.shape[1:], size), start=1):
        step = stride if stride is not None else pixels / cells
        first_centre = 0.0 if stride is not None else (step - 1) / 2
        position = (torch.arange(pixels, dtype=torch.float32, device=cam.device) - first_centre) / step
        position = position.clamp(0, cells - 1)  # fractional cell index of every pixel
        low = position.floor().long()
        high = (low + 1).clamp(max=cells - 1)
        weight = (position - low).view([-1 if a == axis else 1 for a in range(3)])
        cam = cam.index_select(axis, low) * (1 - weight) + cam.index_select(axis, high) * weight
    return cam


def boxes_mask(boxes, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool union of ``(x, y, width, height)`` boxes in pixel units (x along columns); a pixel
    is inside when its centre is."""
    rows = np.arange(shape[0])[:, None] + 0.5
    columns = np.arange(shape[1])[None, :] + 0.5
    mask = np.zeros(shape, dtype=bool)
    for x, y, width, height in boxes:
        mask |= (columns >= x) & (columns < x + width) & (rows >= y) & (rows < y + height)
    return mask


def cam_mass_in_boxes(cam: np.ndarray, boxes) -> float:
    """Share of the (non-negative) CAM's total inside the boxes: 1 = all evidence on the opacities;
    a uniform map scores the boxes' area fraction. 0 for an all-zero map."""
    cam = np.asarray(cam, dtype=np.float64)
    total = cam.sum()
    return float(cam[boxes_mask(boxes, cam.shape)].sum() / total) if total > 0 else 0.0


def cam_peak_in_boxes(cam: np.ndarray, boxes) -> bool:
    """The pointing game (Zhang et al. 2016): whether the CAM's maximum lies inside a box. Stricter
    about where the peak is and blind to how far the heat spreads, unlike `cam_mass_in_boxes`."""
    cam = np.asarray(cam)
    return bool(boxes_mask(boxes, cam.shape)[np.unravel_index(np.argmax(cam), cam.shape)])


def box_area_fraction(boxes, shape: tuple[int, int]) -> float:
    """Share of the image the boxes cover (their union): what a uniform map scores."""
    return float(boxes_mask(boxes, shape).mean())


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Blue -> cyan -> yellow -> red colour map of values in [0, 1]: (..., 3) uint8."""
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colours = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float64)
    values = np.clip(values, 0, 1)
    return np.stack([np.interp(values, stops, colours[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


def save_cam_overlay(path: Path, image: np.ndarray, cam: np.ndarray, boxes=(), caption: str = "") -> None:
    """Write a PNG: the radiograph in grey, the CAM as heat where it is strong, boxes in green.

    Args:
        image: (H, W) uint8 or float (shown from its own minimum to maximum).
        cam: (H, W) non-negative map, same size; scaled to its own maximum.
        boxes: ``(x, y, width, height)`` in pixels of ``image``.
        caption: text written in the top-left corner (e.g. label and probability).
    """
    image = np.asarray(image, dtype=np.float64)
    grey = (image - image.min()) / max(image.max() - image.min(), 1e-6)
    heat = np.asarray(cam, dtype=np.float64) / max(float(np.max(cam)), 1e-12)
    alpha = 0.6 * heat[..., None]  # weak evidence stays transparent, so the anatomy shows through
    rgb = (1 - alpha) * (grey[..., None] * 255) + alpha * heat_colours(heat)
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for x, y, width, height in boxes:
        # A box scaled below one pixel (a small opacity on a large film shown small) is still marked,
        # as one pixel: PIL refuses a rectangle whose far corner lies before its near one.
        draw.rectangle([x, y, max(x + width - 1, x), max(y + height - 1, y)], outline=(0, 255, 0), width=1)
    if caption:
        draw.text((2, 1), caption, fill=(255, 255, 255))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
