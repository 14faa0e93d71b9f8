"""Class activation maps: exact for a pooled linear head, equal to Grad-CAM there, peaking on a
planted opacity, and drawn as PNG overlays with the boxes."""

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cam import box_area_fraction, cam_mass_in_boxes, cam_peak_in_boxes, class_activation_maps, grad_cams, \
    save_cam_overlay
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
