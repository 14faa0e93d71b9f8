"""Class activation maps: exact for a pooled linear head, equal to Grad-CAM there, peaking on a
planted opacity, and drawn as PNG overlays with the boxes."""

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cam import box_area_fraction, cam_mass_in_boxes, cam_peak_in_boxes, class_activation_maps, grad_cams, \
    save_cam_overlay, upsample_cells
from models.resnet import ResNet18Classifier


class OpacityDetector(torch.nn.Module):
    """A constructed classifier whose evidence is local brightness: features are the image pooled
    over 8x8 cells (stride 8, as a CNN's coarse maps), the head weighs them positively."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(1, 1)
        with torch.no_grad():
            self.head.weight.fill_(2.0)
            self.head.bias.fill_(-1.0)

    def features(self, image):
        return torch.nn.functional.avg_pool2d(image, 8)  # (B, 1, H/8, W/8)

    def classify(self, features):
        return self.head(features.mean(dim=(2, 3)))


def test_cam_peaks_on_a_planted_opacity_and_its_box_holds_most_mass():
    image = torch.zeros(2, 1, 72, 56)
    image[0, 0, 40:56, 8:24] = 1.0  # an opacity in the first image only
    cams = class_activation_maps(OpacityDetector(), image)
    assert cams.shape == (2, 72, 56)
    row, column = np.unravel_index(cams[0].argmax().item(), (72, 56))
    assert 40 <= row < 56 and 8 <= column < 24
    box = [(8, 40, 16, 16)]
    assert cam_mass_in_boxes(cams[0].numpy(), box) > 0.7 > box_area_fraction(box, (72, 56))
    assert cams[1].abs().max() == 0 and cam_mass_in_boxes(cams[1].numpy(), box) == 0.0


class StridedOpacityDetector(OpacityDetector):
    """The same evidence through three stride-2 3x3 convolutions padded by 1 (as ResNet's): stride 8,
    cell k centred on pixel 8k rather than on the middle of an 8-pixel tile."""

    feature_stride = 8

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False) for _ in range(3)])
        for conv in self.convs:
            torch.nn.init.constant_(conv.weight, 1 / 9)

    def features(self, image):
        return self.convs(image)


def test_cam_of_strided_convolutions_is_drawn_where_the_cells_look():
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 14:18, 38:42] = 1.0  # around pixel (16, 40): cell (2, 5) of the stride-8 map
    cam = class_activation_maps(StridedOpacityDetector(), image)[0]
    row, column = np.unravel_index(cam.argmax().item(), cam.shape)
    assert (row, column) == (16, 40)  # drawn as tiles, the peak would sit 3.5 pixels down and right


def test_upsampling_places_cells_on_their_centres():
    torch.manual_seed(0)
    cells = torch.rand(2, 5, 7)
    # Tiles (no stride given) is what bilinear resizing without corner alignment does.
    torch.testing.assert_close(upsample_cells(cells, (40, 56)), torch.nn.functional.interpolate(
        cells[:, None], size=(40, 56), mode="bilinear", align_corners=False)[:, 0])
    # With a stride, the map passes through every cell's value at pixel stride * k.
    upsampled = upsample_cells(cells, (40, 56), stride=8)
    torch.testing.assert_close(upsampled[:, ::8, ::8], cells)
    torch.testing.assert_close(upsampled[:, 4, 4], cells[:, :2, :2].mean(dim=(1, 2)))  # halfway: the mean
    torch.testing.assert_close(upsampled[:, 39, 55], cells[:, -1, -1])  # beyond the last centre: held


@pytest.mark.parametrize("output_stride", [16, 32])
def test_resnet_cells_are_centred_where_feature_stride_says(output_stride):
    # Constant weights and average instead of max pooling (ties would send all the gradient to one
    # corner) leave only the geometry: the input region a cell depends on, weighted by path count.
    model = ResNet18Classifier(output_stride=output_stride).eval()
    with torch.no_grad():
        for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.fill_(1 / conv.weight[0].numel())
    model.backbone.maxpool = torch.nn.AvgPool2d(3, stride=2, padding=1)
    image = torch.ones(1, 1, 512, 512, requires_grad=True)
    features = model.features(image)
    k = features.shape[-1] // 2
    features[0, :, k, k].sum().backward()
    weight = image.grad[0, 0].sum(dim=1)
    centre = float((weight * torch.arange(512.0)).sum() / weight.sum())
    assert centre == pytest.approx(model.feature_stride * k, abs=0.01)


def test_cam_is_the_logit_decomposition_and_grad_cam_is_proportional_for_resnet():
    torch.manual_seed(0)
    model = ResNet18Classifier().eval()
    image = torch.randn(2, 1, 96, 64)
    with torch.no_grad():
        features = model.features(image)
        raw = torch.einsum("c,bchw->bhw", model.head.weight[0], features)
        # The logit is the spatial mean of the (un-ReLU'd) CAM plus the bias.
        torch.testing.assert_close(raw.mean(dim=(1, 2)) + model.head.bias, model(image)[:, 0], rtol=1e-4,
                                   atol=1e-5)
    cam, grad_cam = class_activation_maps(model, image), grad_cams(model, image)
    assert cam.shape == grad_cam.shape == (2, 96, 64)
    cells = features.shape[2] * features.shape[3]
    torch.testing.assert_close(grad_cam * cells, cam, rtol=1e-4, atol=1e-5)


def test_box_mass_and_area_by_hand():
    cam = np.zeros((10, 20))
    cam[2, 3], cam[8, 15] = 3.0, 1.0
    assert cam_mass_in_boxes(cam, [(3, 2, 1, 1)]) == pytest.approx(0.75)
    assert cam_mass_in_boxes(cam, [(0, 0, 5, 5), (14, 7, 3, 3)]) == pytest.approx(1.0)
    assert box_area_fraction([(0, 0, 10, 5), (5, 0, 10, 5)], (10, 20)) == pytest.approx(75 / 200)
    assert cam_peak_in_boxes(cam, [(3, 2, 1, 1)]) and not cam_peak_in_boxes(cam, [(14, 7, 3, 3)])


def test_overlay_png_shows_the_box_in_green(tmp_path):
    image = np.linspace(0, 255, 31 * 47).reshape(31, 47).astype(np.uint8)
    cam = np.zeros((31, 47))
    cam[10:20, 10:20] = 1.0
    save_cam_overlay(tmp_path / "cam" / "a.png", image, cam, [(5, 4, 12, 9)], caption="p 0.9")
    picture = np.asarray(Image.open(tmp_path / "cam" / "a.png"))
    assert picture.shape == (31, 47, 3)
    assert tuple(picture[12, 8]) == (0, 255, 0) and tuple(picture[12, 16]) == (0, 255, 0)  # bottom edge
    assert picture[15, 15, 0] > picture[15, 15, 2]  # strongest heat is red
    assert picture[28, 40, 0] == picture[28, 40, 1] == picture[28, 40, 2]  # no heat: grey


def test_overlay_marks_a_box_smaller_than_one_pixel(tmp_path):
    """A small opacity on a large film shown at a small size scales below one pixel; it is still drawn."""
    image = np.full((31, 47), 100, np.uint8)
    save_cam_overlay(tmp_path / "a.png", image, np.zeros((31, 47)), [(20.3, 7.6, 0.4, 0.2), (3, 5, 0.6, 9)])
    picture = np.asarray(Image.open(tmp_path / "a.png"))
    green = np.argwhere(np.all(picture == (0, 255, 0), axis=-1))
    assert {(7, 20), (8, 20)} & {tuple(pixel) for pixel in green}
    tall = {column for row, column in green if row > 9}
    assert len(tall) == 1 and tall <= {3, 4}  # the thin tall box: one column wide
