import json
from pathlib import Path

import pytest
import torch

from models import UNet
from models.unet import Up

THICK_SLICES = dict(depth=3, strides=((1, 2, 2), (2, 2, 2)), kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)))


@pytest.mark.parametrize("upsample", ["interpolate", "transpose"])
@pytest.mark.parametrize("norm", ["group_norm", "instance_norm", "batch"])
def test_3d_output_has_input_size_at_odd_sizes(upsample, norm):
    model = UNet(spatial_dims=3, in_channels=2, num_classes=3, base_channels=4, depth=4, norm=norm, upsample=upsample)
    logits = model(torch.randn(2, 2, 33, 34, 35))
    assert logits.shape == (2, 3, 33, 34, 35)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("upsample", ["interpolate", "transpose"])
@pytest.mark.parametrize("norm", ["group_norm", "instance_norm", "batch"])
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


def test_channels_last_input_stays_channels_last_and_gives_the_same_logits():
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, base_channels=4, depth=3).eval()
    x = torch.randn(2, 1, 17, 18, 19)
    features = []
    # The decoder's last features, not the logits: oneDNN may return a 1x1x1 head's few output
    # channels contiguous on one thread, which costs nothing; a transpose inside the network would.
    model.decoder[-1].register_forward_hook(lambda module, inputs, output: features.append(output))
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last_3d)
        logits = model(x.to(memory_format=torch.channels_last_3d))
    assert features[-1].is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_parameter_with_deep_supervision():
    model = UNet(spatial_dims=2, in_channels=1, num_classes=2, base_channels=4, depth=4, deep_supervision=True)
    outputs = model(torch.randn(2, 1, 24, 23))
    sum(o.square().mean() for o in outputs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("upsample", ["interpolate", "transpose"])
def test_up_brings_the_input_to_the_skip_size_and_convolves_skip_then_upsampled(upsample):
    # Odd skip sizes: the transposed convolution's 8, 10, 12 voxels are cropped at the far end; the
    # interpolation path runs its 1x1x1 convolution before interpolating and must equal the classic
    # interpolate-then-convolve order.
    torch.manual_seed(0)
    up = Up(spatial_dims=3, in_channels=8, skip_channels=4, out_channels=5, norm="group_norm", upsample=upsample,
            kernel_size=(3, 3, 3), stride=(2, 2, 2)).eval()
    torch.nn.init.normal_(up.up.bias)
    low, skip = torch.randn(2, 8, 4, 5, 6), torch.randn(2, 4, 7, 9, 11)
    with torch.no_grad():
        if upsample == "interpolate":
            upsampled = up.up(torch.nn.functional.interpolate(low, size=(7, 9, 11), mode="trilinear"))
        else:
            upsampled = up.up(low)[:, :, :7, :9, :11]
        expected = up.block(torch.cat([skip, upsampled], dim=1))
        output = up(low, skip)
    assert output.shape == (2, 5, 7, 9, 11)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_kaiming_initialisation_scale():
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, base_channels=32, depth=3)
    weight = model.encoder[1].block.conv2.weight  # fan_in = 64 * 27
    expected_std = (2 / (1 + 0.01**2) / (64 * 27)) ** 0.5
    assert weight.std().item() == pytest.approx(expected_std, rel=0.05)


@pytest.mark.parametrize("name", ["3d_transpose_deep_supervision", "2d_transpose"])
def test_a_state_dict_of_the_uniform_network_loads_unchanged(name):
    # Names and shapes of the parameters of the network before strides and kernel sizes could be set
    # per level: its checkpoints must load strictly into today's default network.
    saved = json.loads((Path(__file__).parent / "unet_state_dict_shapes.json").read_text())[name]
    model = UNet(**saved["kwargs"])
    state_dict = {key: torch.randn(shape) for key, shape in saved["state_dict"].items()}
    model.load_state_dict(state_dict)  # strict: no key missing, none unexpected, every shape equal
    assert list(model.state_dict()) == list(saved["state_dict"])


@pytest.mark.parametrize("upsample", ["interpolate", "transpose"])
def test_uniform_strides_and_kernels_given_explicitly_are_the_default_network(upsample):
    torch.manual_seed(0)
    default = UNet(spatial_dims=3, in_channels=1, num_classes=2, base_channels=4, depth=3, upsample=upsample).eval()
    explicit = UNet(spatial_dims=3, in_channels=1, num_classes=2, base_channels=4, depth=3, upsample=upsample,
                    strides=((2, 2, 2),) * 2, kernel_sizes=((3, 3, 3),) * 3).eval()
    explicit.load_state_dict(default.state_dict())
    x = torch.randn(1, 1, 13, 14, 15)
    with torch.no_grad():
        torch.testing.assert_close(explicit(x), default(x), rtol=0, atol=0)


@pytest.mark.parametrize("upsample", ["interpolate", "transpose"])
def test_thick_slice_topology_keeps_z_and_returns_the_input_size(upsample):
    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, base_channels=4, upsample=upsample,
                 deep_supervision=True, **THICK_SLICES)
    outputs = model.train()(torch.randn(2, 1, 7, 33, 34))
    # z is kept at the first downsampling and halved (rounding up) at the second.
    assert [tuple(o.shape[2:]) for o in outputs] == [(7, 33, 34), (7, 17, 17)]
    assert model.eval()(torch.randn(2, 1, 7, 33, 34)).shape == (2, 3, 7, 33, 34)
    assert model.encoder[0].conv1.weight.shape[2:] == (1, 3, 3)  # no convolution across the thick slices
    assert model.encoder[1].block.conv1.stride == (1, 2, 2)
    assert model.encoder[2].block.conv1.weight.shape[2:] == (3, 3, 3)
    assert model.decoder[-1].block.conv2.weight.shape[2:] == (1, 3, 3)  # the decoder level shares its kernel
    if upsample == "transpose":
        assert model.decoder[-1].up.weight.shape[2:] == (1, 2, 2)  # kernel = stride: z is not upsampled


def test_kernel_1_keeps_slices_apart():
    # A full-resolution convolution with kernel 1 along z mixes no slices: changing one input slice
    # changes that output slice alone (the normalisation after it does see the whole volume).
    model = UNet(spatial_dims=3, in_channels=1, num_classes=2, base_channels=4, **THICK_SLICES).eval()
    x = torch.randn(1, 1, 5, 16, 16)
    changed = x.clone()
    changed[:, :, 3] += 1
    with torch.no_grad():
        first, second = model.encoder[0].conv1(x), model.encoder[0].conv1(changed)
    assert torch.equal(first[:, :, [0, 1, 2, 4]], second[:, :, [0, 1, 2, 4]])
    assert not torch.equal(first[:, :, 3], second[:, :, 3])


def test_strides_and_kernels_must_fit_the_depth():
    with pytest.raises(ValueError, match="strides must hold 2 entries of 3"):
        UNet(spatial_dims=3, depth=3, strides=((1, 2, 2),))
    with pytest.raises(ValueError, match="kernel_sizes must hold 3 entries of 2"):
        UNet(spatial_dims=2, depth=3, kernel_sizes=((3, 3),) * 2)
    with pytest.raises(ValueError, match="odd"):
        UNet(spatial_dims=2, depth=2, kernel_sizes=((3, 3), (2, 2)))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_weights_move_between_group_norm_and_instance_norm_with_the_same_output(memory_format):
    torch.manual_seed(0)
    group = UNet(spatial_dims=3, in_channels=2, num_classes=3, base_channels=4, norm="group_norm",
                 upsample="transpose", deep_supervision=True, **THICK_SLICES)
    for module in group.modules():  # non-trivial affine parameters, so a swapped weight and bias would show
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.normal_(module.weight)
            torch.nn.init.normal_(module.bias)
    instance = UNet(spatial_dims=3, in_channels=2, num_classes=3, base_channels=4, norm="instance_norm",
                    upsample="transpose", deep_supervision=True, **THICK_SLICES)
    assert list(instance.state_dict()) == list(group.state_dict())
    instance.load_state_dict(group.state_dict())
    group.load_state_dict(instance.state_dict())  # and back
    group, instance = group.to(memory_format=memory_format), instance.to(memory_format=memory_format)
    x = torch.randn(2, 2, 7, 19, 18).to(memory_format=memory_format)
    with torch.no_grad():
        for expected, actual in zip(group.train()(x), instance.train()(x)):  # every deep-supervision output
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(instance.eval()(x), group.eval()(x), rtol=1e-5, atol=1e-5)
