"""Inflation: the boring-video fixed point, for single layers, a generic 2D net and GoogLeNet -> I3D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quovadis.models.googlenet import GoogLeNetBN, read_googlenet
from quovadis.models.i3d import InceptionI3d
from quovadis.models.inflate import TimeSpec, i3d_from_googlenet, inflate, inflate_conv, inflate_module
from quovadis.models.weights import load_weights
from quovadis.pipeline.errors import WeightsError
from tests.models.random_init import randomize

TOL = dict(rtol=1e-4, atol=1e-5)


def _boring(image: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, T, H, W), the image repeated T times."""
    return image[:, :, None].expand(-1, -1, frames, -1, -1).contiguous()


@pytest.mark.parametrize("mode", ["mean", "center"])
def test_inflate_conv_boring_video_identity(mode):
    torch.manual_seed(0)
    w2d = torch.randn(6, 4, 3, 3)
    w3d = inflate_conv(w2d, 5, mode)
    assert w3d.shape == (6, 4, 5, 3, 3)
    torch.testing.assert_close(w3d.sum(2), w2d)  # total weight along time is the 2D filter
    if mode == "center":
        assert torch.equal(w3d[:, :, 2], w2d) and not w3d[:, :, [0, 1, 3, 4]].any()
    image = torch.randn(2, 4, 10, 10)
    out2d = nn.functional.conv2d(image, w2d, padding=1)
    out3d = nn.functional.conv3d(_boring(image, 8), w3d, padding=(0, 1, 1))  # no time padding
    assert out3d.shape[2] == 4
    for t in range(4):
        torch.testing.assert_close(out3d[:, :, t], out2d, **TOL)
    with pytest.raises(ValueError, match="inflation mode"):
        inflate_conv(w2d, 3, "gaussian")


def _small_cnn() -> nn.Sequential:
    return randomize(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(8, 16, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
    ).eval()


@pytest.mark.parametrize("mode", ["mean", "center"])
def test_inflate_generic_network_without_time_padding_is_exact_everywhere(mode):
    net2d = _small_cnn()
    specs = {"0": TimeSpec(3), "3": TimeSpec(3), "4": TimeSpec(5), "7": TimeSpec(2)}  # all valid in time
    net3d = inflate(net2d, specs, mode=mode).eval()
    assert isinstance(net3d[0], nn.Conv3d) and net3d[0].kernel_size == (3, 3, 3)
    assert isinstance(net3d[1], nn.BatchNorm3d) and torch.equal(net3d[1].running_var, net2d[1].running_var)
    assert isinstance(net3d[3], nn.MaxPool3d) and isinstance(net3d[7], nn.AvgPool3d)
    assert isinstance(net2d[0], nn.Conv2d)  # the 2D model is left alone
    image = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out2d = net2d(image)
        out3d = net3d(_boring(image, 12))
    assert out3d.shape[2] == 12 - 2 - 2 - 4 - 1
    for t in range(out3d.shape[2]):
        torch.testing.assert_close(out3d[:, :, t], out2d, **TOL)


def test_inflate_default_spec_zero_pads_time_and_breaks_only_the_borders():
    net2d = _small_cnn()
    net3d = inflate(net2d).eval()  # k x k -> k x k x k, time padding (k - 1) // 2, stride 1
    assert net3d[4].kernel_size == (5, 5, 5) and net3d[4].padding == (2, 2, 2)
    image = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        out2d, out3d = net2d(image), net3d(_boring(image, 12))
    assert out3d.shape[2] == 11  # the 2x2 AvgPool becomes 2x2x2 with stride 1 in time
    # conv0 (pad 1) and conv4 (pad 2, after a 3-frame max-pool) reach 4 frames in from either end
    torch.testing.assert_close(out3d[:, :, 5], out2d, **TOL)
    assert not torch.allclose(out3d[:, :, 0], out2d, **TOL)


def test_inflate_module_rejects_what_it_cannot_map():
    with pytest.raises(TypeError, match="Linear"):
        inflate_module(nn.Linear(3, 4), TimeSpec(1))
    with pytest.raises(ValueError, match="padding"):
        inflate_module(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), TimeSpec(3, padding=1))


@pytest.fixture(scope="module")
def googlenet() -> GoogLeNetBN:
    return randomize(GoogLeNetBN(num_classes=10)).eval()


def test_i3d_from_googlenet_center_is_the_2d_network_on_boring_videos(googlenet):
    """Center initialisation never reads time padding: any clip length gives the 2D outputs."""
    i3d = InceptionI3d(num_classes=10).eval()
    load_weights(i3d, i3d_from_googlenet(googlenet.state_dict(), mode="center"))
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        features2d = googlenet.forward_head(googlenet.forward_features(image), pre_logits=True)
        logits2d = googlenet(image)
        features3d, logits3d = i3d.features_and_logits(_boring(image, 16))
    torch.testing.assert_close(features3d, features2d, **TOL)
    torch.testing.assert_close(logits3d, logits2d, **TOL)


def test_i3d_from_googlenet_mean_is_the_2d_network_away_from_the_clip_ends(googlenet):
    """Mean initialisation: I3D's zero "SAME" padding in time reaches the per-time outputs within
    6 steps of either end (counting the receptive field through Conv3d_1a, Conv3d_2c, the 3x3x3
    convs of Mixed_3b..5c, the stride-2 pools 4a and 5a and the 2-step average). A 128-frame clip
    has 15 steps; steps 6, 7 and 8 never see padding and must equal the 2D network exactly."""
    i3d = InceptionI3d(num_classes=10).eval()
    load_weights(i3d, i3d_from_googlenet(googlenet.state_dict(), mode="mean"))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        features2d = googlenet.forward_head(googlenet.forward_features(image), pre_logits=True)
        logits2d = googlenet(image)
        per_time = i3d.per_time_features(_boring(image, 128))
        per_time_logits = i3d.classify(per_time)
    assert per_time.shape[2] == 15
    for t in (6, 7, 8):
        torch.testing.assert_close(per_time[:, :, t], features2d, **TOL)
        torch.testing.assert_close(per_time_logits[:, :, t], logits2d, **TOL)
    assert not torch.allclose(per_time[:, :, 0], features2d, **TOL)  # the border effect is real


def test_i3d_from_googlenet_layout_and_flow_channels(googlenet, tmp_path):
    state_dict = i3d_from_googlenet(googlenet.state_dict())
    assert list(state_dict) == list(InceptionI3d(num_classes=10).state_dict())
    assert state_dict["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    assert state_dict["Mixed_5c.b2b.conv3d.weight"].shape == (128, 48, 3, 3, 3)  # the "5x5" branch
    torch.testing.assert_close(
        state_dict["Mixed_4b.b1b.conv3d.weight"].sum(2), googlenet.inception4a.branch2[1].conv.weight
    )
    torch.testing.assert_close(state_dict["logits.conv3d.bias"], googlenet.fc.bias)
    flow = i3d_from_googlenet(googlenet.state_dict(), in_channels=2)
    w = flow["Conv3d_1a_7x7.conv3d.weight"]
    assert w.shape == (64, 2, 7, 7, 7) and torch.equal(w[:, 0], w[:, 1])
    torch.testing.assert_close(w[:, 0].sum(1), googlenet.conv1.conv.weight.mean(1))

    # torchvision checkpoints carry the auxiliary classifiers; read_googlenet drops them by name
    path = tmp_path / "googlenet.pt"
    torch.save({**googlenet.state_dict(), "aux1.fc2.weight": torch.zeros(10, 1024)}, path)
    assert read_googlenet(path).keys() == googlenet.state_dict().keys()
    broken = dict(googlenet.state_dict())
    del broken["inception3a.branch3.1.bn.running_mean"]
    with pytest.raises(WeightsError, match="missing: inception3a.branch3.1.bn.running_mean"):
        i3d_from_googlenet(broken)
