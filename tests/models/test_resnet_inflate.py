"""ResNet-50 and its inflation into I3D-ResNet-50: key layout, and what each initialisation
preserves on a boring video, checked against the 2D network's own forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quovadis.models.inflate import i3d_resnet50, inflate_state_dict
from quovadis.models.resnet import ResNet50, read_resnet50
from quovadis.pipeline.errors import WeightsError
from tests.models.random_init import randomize

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def resnet() -> ResNet50:
    return randomize(ResNet50(num_classes=10)).eval()


def _per_time(model3d: nn.Module, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-time features (N, 2048, t) and logits (N, classes, t) of the 3D ResNet."""
    f = model3d.forward_features(video).mean((3, 4))  # (N, 2048, t)
    return f, model3d.fc(f.transpose(1, 2)).transpose(1, 2)


def test_resnet50_layout_and_size(tmp_path):
    with torch.device("meta"):
        model = ResNet50()
    keys = model.state_dict().keys()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_mean", "layer4.2.bn3.bias", "fc.weight", "fc.bias"):
        assert key in keys
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50
    assert len(keys) == 320
    small = ResNet50(num_classes=10)
    path = tmp_path / "resnet50.pt"
    torch.save(small.state_dict(), path)
    assert read_resnet50(path).keys() == small.state_dict().keys()
    broken = {k: v for k, v in small.state_dict().items() if k != "layer2.0.downsample.0.weight"}
    torch.save(broken, path)
    with pytest.raises(WeightsError, match="missing: layer2.0.downsample.0.weight"):
        read_resnet50(path)


def test_i3d_resnet50_kernels_and_state_dict(resnet):
    model3d = i3d_resnet50(resnet.state_dict(), mode="mean")
    assert model3d.conv1.kernel_size == (5, 7, 7) and model3d.conv1.stride == (2, 2, 2)
    assert model3d.maxpool.kernel_size == (3, 3, 3)
    assert model3d.layer1[0].conv1.kernel_size == (3, 1, 1)
    assert model3d.layer2[1].conv1.kernel_size == (1, 1, 1) and model3d.layer2[2].conv1.kernel_size == (3, 1, 1)
    assert model3d.layer4[0].conv1.kernel_size == (1, 1, 1) and model3d.layer4[1].conv1.kernel_size == (3, 1, 1)
    assert model3d.layer3[0].conv2.kernel_size == (1, 3, 3) and model3d.layer3[0].downsample[0].kernel_size == (1, 1, 1)
    state = model3d.state_dict()
    assert list(state) == list(resnet.state_dict())  # the same keys: a 2D checkpoint maps 1:1
    torch.testing.assert_close(state["layer1.0.conv1.weight"].sum(2), resnet.layer1[0].conv1.weight)
    assert torch.equal(state["fc.weight"], resnet.fc.weight)
    center = i3d_resnet50(resnet.state_dict(), mode="center").state_dict()["conv1.weight"]
    assert torch.equal(center[:, :, 2], resnet.conv1.weight) and not center[:, :, [0, 1, 3, 4]].any()
    with pytest.raises(WeightsError, match="missing"):
        inflate_state_dict({k: v for k, v in resnet.state_dict().items() if k != "fc.bias"}, model3d)


def _boring(image: torch.Tensor, frames: int) -> torch.Tensor:
    return image[:, :, None].expand(-1, -1, frames, -1, -1).contiguous()


def test_center_init_is_the_2d_network_at_every_time_step(resnet):
    """Centre init never reads time padding (each filter's only non-zero slice sits on a real
    frame; max-pool padding is -inf): every time step equals the 2D network, short clip included."""
    model3d = i3d_resnet50(resnet.state_dict(), mode="center").eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features2d = resnet.forward_head(resnet.forward_features(image), pre_logits=True)
        logits2d = resnet(image)
        for frames in (3, 8):
            features, logits = _per_time(model3d, _boring(image, frames))
            assert features.shape[2] == -(-frames // 4)
            for t in range(features.shape[2]):
                torch.testing.assert_close(features[:, :, t], features2d, **TOL)
                torch.testing.assert_close(logits[:, :, t], logits2d, **TOL)


def test_mean_init_is_the_2d_network_away_from_time_padding(resnet):
    """Mean init: zero time padding reaches the borders. With 96 frames: conv1 (5, stride 2,
    pad 2) gives 48 steps, 0 and 47 read padding; the stem max-pool (3, stride 2) gives 24, 0 and
    23 see those; then nine 3x1x1 convs (pad 1) in sequence (layer1: 3, layer2: 2, layer3: 3,
    layer4: 1) widen the border by one step each: steps 10..13 of 24 never see padding. (That
    bound is conservative: the padding's effect can vanish through ReLUs and max-pools earlier.)"""
    model3d = i3d_resnet50(resnet.state_dict(), mode="mean").eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features2d = resnet.forward_head(resnet.forward_features(image), pre_logits=True)
        logits2d = resnet(image)
        features, logits = _per_time(model3d, _boring(image, 96))
    assert features.shape[2] == 24
    for t in (10, 11, 12, 13):
        torch.testing.assert_close(features[:, :, t], features2d, **TOL)
        torch.testing.assert_close(logits[:, :, t], logits2d, **TOL)
    assert not torch.allclose(features[:, :, 0], features2d, **TOL)  # the border effect is real
