import pytest
import torch

from models import UNet


@pytest.mark.parametrize("upsample", ["interpolate", "transpose"])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_3d_output_has_input_size_at_odd_sizes(upsample, norm):
    model = UNet(spatial_dims=3, in_channels=2, num_classes=3, base_channels=4, depth=4, norm=norm, upsample=upsample)
    logits = model(torch.randn(2, 2, 33, 34, 35))
    assert logits.shape == (2, 3, 33, 34, 35)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("upsample", ["interpolate", "transpose"])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_2d_output_has_input_size_at_odd_sizes(upsample, norm):
    model = UNet(spatial_dims=2, in_channels=1, num_classes=2, base_channels=4, depth=5, norm=norm, upsample=upsample)
    logits = model(torch.randn(3, 1, 45, 38))
    assert logits.shape == (3, 2, 45, 38)


def test_size_smaller_than_the_total_downsampling():
    # 5 -> 3 -> 2 -> 1 -> 1: the decoder must still come back to 5.
    model = UNet(spatial_dims=3, in_channels=1, num_classes=2, base_channels=4, depth=5)
    assert model(torch.randn(2, 1, 5, 7, 6)).shape == (2, 2, 5, 7, 6)


@pytest.mark.parametrize("upsample", ["interpolate", "transpose"])
def test_deep_supervision_returns_lower_resolutions_in_training_only(upsample):
    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, base_channels=4, depth=5, upsample=upsample,
                 deep_supervision=True)
    x = torch.randn(2, 1, 33, 34, 35)
    outputs = model.train()(x)
    assert [tuple(o.shape) for o in outputs] == [
        (2, 3, 33, 34, 35),
        (2, 3, 17, 17, 18),
        (2, 3, 9, 9, 9),
        (2, 3, 5, 5, 5),
    ]
    assert model.eval()(x).shape == (2, 3, 33, 34, 35)


def test_deep_supervision_2d_list_length_is_depth_minus_one():
    model = UNet(spatial_dims=2, in_channels=1, num_classes=4, base_channels=4, depth=4, deep_supervision=True)
    outputs = model(torch.randn(2, 1, 32, 31))
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 32, 31), (2, 4, 16, 16), (2, 4, 8, 8)]


def test_channels_are_doubled_and_capped():
    model = UNet(spatial_dims=3, base_channels=32, depth=6, max_channels=320)
    widths = [model.encoder[0].conv2.out_channels] + [stage.block.conv2.out_channels for stage in model.encoder[1:]]
    assert widths == [32, 64, 128, 256, 320, 320]


def test_channels_last_input_gives_channels_last_output_and_same_logits():
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, base_channels=4, depth=3).eval()
    x = torch.randn(2, 1, 17, 18, 19)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last_3d)
        logits = model(x.to(memory_format=torch.channels_last_3d))
    assert logits.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_parameter_with_deep_supervision():
    model = UNet(spatial_dims=2, in_channels=1, num_classes=2, base_channels=4, depth=4, deep_supervision=True)
    outputs = model(torch.randn(2, 1, 24, 23))
    sum(o.square().mean() for o in outputs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_interpolation_path_matches_interpolate_then_convolve():
    # The 1x1 convolution is applied before interpolating; check it equals the classic order.
    model = UNet(spatial_dims=3, in_channels=1, num_classes=2, base_channels=4, depth=2)
    up = model.decoder[0]
    torch.nn.init.normal_(up.up.bias)
    low = torch.randn(1, 8, 4, 5, 6)
    size = (7, 9, 11)
    fast = torch.nn.functional.interpolate(up.up(low), size=size, mode="trilinear")
    classic = up.up(torch.nn.functional.interpolate(low, size=size, mode="trilinear"))
    torch.testing.assert_close(fast, classic, rtol=1e-5, atol=1e-5)


def test_kaiming_initialisation_scale():
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, base_channels=32, depth=3)
    weight = model.encoder[1].block.conv2.weight  # fan_in = 64 * 27
    expected_std = (2 / (1 + 0.01**2) / (64 * 27)) ** 0.5
    assert weight.std().item() == pytest.approx(expected_std, rel=0.05)
