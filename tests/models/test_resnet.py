"""ResNet18 with one input channel: RGB weights summed exactly, clear errors when weights are missing."""

import urllib.error

import pytest
import torch
import torchvision

from models.resnet import ResNet18Classifier, load_weights


def test_shapes_on_an_odd_size():
    model = ResNet18Classifier().eval()
    image = torch.randn(2, 1, 67, 45)
    assert model(image).shape == (2, 1)
    assert model.features(image).shape == (2, 512, 3, 2)


def test_output_stride_16_is_the_same_network_sampled_twice_as_densely():
    # Dilation instead of striding in the last stage: every other output of the stride-16 network is
    # exactly the stride-32 network's output, so weights (pretrained ones too) carry over unchanged.
    torch.manual_seed(0)
    coarse = ResNet18Classifier().eval()
    fine = ResNet18Classifier(output_stride=16).eval()
    fine.load_state_dict(coarse.state_dict())
    image = torch.randn(2, 1, 128, 96)
    with torch.no_grad():
        dense, sparse = fine.features(image), coarse.features(image)
    assert dense.shape == (2, 512, 8, 6) and sparse.shape == (2, 512, 4, 3)
    torch.testing.assert_close(dense[:, :, ::2, ::2], sparse, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="16 or 32"):
        ResNet18Classifier(output_stride=8)


def test_summed_rgb_filters_equal_the_rgb_network_on_a_grey_image(tmp_path):
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(rgb.state_dict(), path)
    model = ResNet18Classifier().eval()
    load_weights(model, str(path))
    grey = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = rgb.avgpool(rgb.layer4(rgb.layer3(rgb.layer2(rgb.layer1(
            rgb.maxpool(rgb.relu(rgb.bn1(rgb.conv1(grey.expand(-1, 3, -1, -1))))))))))
        torch.testing.assert_close(model.features(grey).mean(dim=(2, 3)), expected.flatten(1), rtol=1e-4,
                                   atol=1e-5)


def test_imagenet_offline_stops_and_names_the_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(SystemExit, match=r"--weights PATH.*--weights none"):
        load_weights(ResNet18Classifier(), "imagenet")
    with pytest.raises(SystemExit, match="no such file"):
        load_weights(ResNet18Classifier(), "/nowhere/resnet18.pth")


def test_frozen_backbone_trains_the_head_only_and_keeps_batch_norm_statistics():
    model = ResNet18Classifier()
    model.freeze_backbone()
    model.train()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["backbone.fc.weight", "backbone.fc.bias"]
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(3, 1, 32, 32))
    assert torch.equal(model.backbone.bn1.running_mean, before) and model.backbone.fc.training
