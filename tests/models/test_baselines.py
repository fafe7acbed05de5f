"""The paper's baselines (section 2): Table 1's parameter counts, shapes, gradients, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quovadis.models.archs import ARCHS, build
from quovadis.models.c3d import C3D
from quovadis.models.fused import Fused3D
from quovadis.models.googlenet import GoogLeNetBN
from quovadis.models.lstm import ConvNetLSTM
from quovadis.models.two_stream import TwoStream2D, stack_flow

TABLE1_PARAMS = {"lstm": 9e6, "c3d": 79e6, "two-stream": 12e6, "fused-3d": 39e6, "i3d": 25e6}


@pytest.mark.parametrize("arch", sorted(TABLE1_PARAMS))
def test_parameter_count_is_table_1_within_5_percent(arch):
    with torch.device("meta"):
        model = build(arch, num_classes=400)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - TABLE1_PARAMS[arch]) <= 0.05 * TABLE1_PARAMS[arch], count
    assert ARCHS[arch].params_m * 1e6 == TABLE1_PARAMS[arch]


def _check_all_grads(model: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def _eval_twice(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        a, b = model(*inputs), model(*inputs)
    assert torch.equal(a, b)
    return a


def test_c3d_shapes_gradients_determinism():
    torch.manual_seed(0)
    model = C3D(num_classes=7)
    x = torch.rand(2, 3, 16, 112, 112) * 2 - 1
    assert model.forward_features(x).shape == (2, 512, 1, 4, 4)
    _check_all_grads(model, model(x).square().sum())
    assert _eval_twice(model, x).shape == (2, 7)
    with pytest.raises(ValueError, match="C3D expects"):
        model(torch.zeros(1, 3, 8, 112, 112))


def test_lstm_every_step_and_last_step():
    torch.manual_seed(0)
    model = ConvNetLSTM(num_classes=5)
    x = torch.rand(2, 3, 4, 32, 32) * 2 - 1
    per_time = model.per_time_logits(x)
    assert per_time.shape == (2, 4, 5)
    _check_all_grads(model, per_time.square().sum())  # the loss on every time step
    out = _eval_twice(model, x)
    torch.testing.assert_close(out, model.per_time_logits(x)[:, -1].detach())
    # causal: the first step's output ignores later frames
    y = x.clone()
    y[:, :, 1:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model.per_time_logits(y)[:, 0], model.per_time_logits(x)[:, 0])


def test_two_stream_averages_streams_and_flow_stacking():
    torch.manual_seed(0)
    model = TwoStream2D(num_classes=6)
    assert model.flow.conv1.conv.in_channels == 20
    rgb, flow = torch.rand(2, 3, 32, 32), torch.rand(2, 2, 10, 32, 32)
    stacked = stack_flow(flow)
    assert torch.equal(stacked[:, 0], flow[:, 0, 0]) and torch.equal(stacked[:, 1], flow[:, 1, 0])
    assert torch.equal(stacked[:, 19], flow[:, 1, 9])
    _check_all_grads(model, model(rgb, flow).square().sum())
    out = _eval_twice(model, rgb, flow)
    with torch.no_grad():
        torch.testing.assert_close(out, (model.rgb(rgb) + model.flow(stacked)) / 2)


def test_two_stream_imagenet_init_is_cross_modality():
    torch.manual_seed(0)
    imagenet = GoogLeNetBN(num_classes=10).state_dict()
    model = TwoStream2D(num_classes=6)
    model.load_imagenet(imagenet)
    w = model.flow.conv1.conv.weight
    assert w.shape == (64, 20, 7, 7)
    for c in range(20):
        torch.testing.assert_close(w[:, c], imagenet["conv1.conv.weight"].mean(1))
    torch.testing.assert_close(model.rgb.conv1.conv.weight, imagenet["conv1.conv.weight"])
    torch.testing.assert_close(model.flow.inception5b.branch1.conv.weight, imagenet["inception5b.branch1.conv.weight"])
    assert model.rgb.fc.weight.shape == (6, 1024)


def test_fused_3d_shapes_snippets_gradients():
    torch.manual_seed(0)
    model = Fused3D(num_classes=4)
    rgb, flow = torch.rand(1, 3, 5, 64, 64), torch.rand(1, 2, 50, 64, 64)
    assert model.forward_features(rgb, flow).shape == (1, 512, 3, 1, 1)
    _check_all_grads(model, model(rgb, flow).square().sum())
    assert _eval_twice(model, rgb, flow).shape == (1, 4)
    # RGB frame t is fused with flow fields 10t .. 10t + 9, each snippet stacked as in Two-Stream
    snippets = Fused3D.snippets(flow, 5)
    assert snippets.shape == (1, 20, 5, 64, 64)
    for t in range(5):
        assert torch.equal(snippets[:, :, t], stack_flow(flow[:, :, 10 * t : 10 * t + 10]))
    with pytest.raises(ValueError, match="10 flow fields per RGB frame"):
        model(rgb, flow[:, :, :40])


def test_lstm_and_fused_load_imagenet_trunks():
    torch.manual_seed(0)
    imagenet = GoogLeNetBN(num_classes=10).state_dict()
    lstm = ConvNetLSTM(num_classes=3)
    lstm.load_imagenet(imagenet)
    torch.testing.assert_close(lstm.cnn.inception4c.branch3[1].conv.weight, imagenet["inception4c.branch3.1.conv.weight"])
    fused = Fused3D(num_classes=3)
    fused.load_imagenet(imagenet)
    torch.testing.assert_close(fused.rgb.conv1.conv.weight, imagenet["conv1.conv.weight"])
    assert fused.flow.conv1.conv.weight.shape == (64, 20, 7, 7)
    torch.testing.assert_close(fused.flow.conv1.conv.weight[:, 7], imagenet["conv1.conv.weight"].mean(1))
    torch.testing.assert_close(fused.flow.inception5b.branch4[1].bn.running_var, imagenet["inception5b.branch4.1.bn.running_var"])
