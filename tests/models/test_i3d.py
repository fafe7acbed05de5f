"""InceptionI3d against the reference outputs in ../shared/i3d, plus its shape and padding rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from quovadis.models.i3d import FEATURE_DIM, MIN_FRAMES, InceptionI3d, TwoStreamI3D, loop_pad_time
from quovadis.models.padding import MaxPoolSame, pad_same, same_padding
from quovadis.models.weights import load_weights
from tests.conftest import shared_path

# Golden tolerances: float32 on different BLAS builds. rtol as the reference promises; atol for the
# many features that are exactly 0 or ~1e-4 after ReLU (the largest deviation seen is ~1e-5).
RTOL, ATOL = 1e-4, 5e-5


def _reference_cases() -> list[dict]:
    return json.loads(shared_path("i3d", "reference_outputs.json").read_text())


def _reference_input(case: dict) -> torch.Tensor:
    rng = np.random.default_rng(case["input_seed"])
    x = rng.uniform(-1, 1, size=case["input_shape"]).astype(np.float32)
    checks = case["input_checks"]
    assert math.isclose(float(x.astype(np.float64).sum()), checks["sum"], rel_tol=1e-12)
    np.testing.assert_array_equal(x.ravel()[:4], np.float32(checks["first"]))
    return torch.from_numpy(x)


@pytest.fixture(scope="module")
def golden_cases() -> dict[str, dict]:
    return {c["stream"]: c for c in _reference_cases()}


@pytest.mark.parametrize("stream", ["rgb", "flow"])
def test_matches_reference_outputs(golden_cases, stream):
    case = golden_cases[stream]
    model = InceptionI3d(in_channels=case["in_channels"]).eval()
    load_weights(model, shared_path("i3d", case["weights"]))
    x = _reference_input(case)
    with torch.inference_mode():
        fmap = model.forward_features(x)
        per_time = model.pool(fmap)
        per_time_logits = model.classify(per_time)
        features, logits = model.forward_head(fmap, pre_logits=True), model.forward_head(fmap)
    assert list(per_time_logits.shape) == case["per_time_logits_shape"]
    assert list(per_time.shape) + [1, 1] == case["features_shape"]
    np.testing.assert_allclose(features.numpy(), case["features_time_mean"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(logits.numpy(), case["logits_time_mean"], rtol=RTOL, atol=ATOL)
    # logits = Linear(features): the 1x1x1 Logits conv commutes with the time average
    conv = model.logits.conv3d
    with torch.inference_mode():
        linear = features @ conv.weight.flatten(1).T + conv.bias
    np.testing.assert_allclose(linear.numpy(), logits.numpy(), rtol=1e-5, atol=1e-4)


def test_same_padding_is_tensorflow_rule():
    for size in range(1, 40):
        for kernel in (1, 2, 3, 7):
            for stride in (1, 2):
                before, after = same_padding(size, kernel, stride)
                out = (size + before + after - kernel) // stride + 1
                assert out == math.ceil(size / stride)
                assert after - before in (0, 1)  # the odd pixel goes at the end


def test_max_pool_pads_with_minus_infinity():
    # TF's max_pool never picks a padded position; zero padding would raise a border of -1s to 0
    x = -torch.ones(1, 1, 5, 6, 7)
    for kernel, stride in (((3, 3, 3), (1, 1, 1)), ((1, 3, 3), (1, 2, 2)), ((2, 2, 2), (2, 2, 2))):
        y = MaxPoolSame(kernel, stride)(x)
        assert y.shape[2:] == tuple(math.ceil(s / st) for s, st in zip(x.shape[2:], stride))
        assert torch.equal(y, -torch.ones_like(y))
    assert pad_same(x, (3, 3, 3), (2, 2, 2), value=-math.inf).shape[2:] == (7, 7, 9)


@pytest.fixture(scope="module")
def small_model() -> InceptionI3d:
    torch.manual_seed(0)
    return _randomize_bn(InceptionI3d(num_classes=7, in_channels=3)).eval()


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so tests see every layer."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model


def test_shapes_at_112_and_every_output_agrees(small_model):
    x = torch.rand(1, 3, 9, 112, 112) * 2 - 1
    with torch.inference_mode():
        fmap = small_model.forward_features(x)
        assert fmap.shape == (1, FEATURE_DIM, 2, 4, 4)
        per_time = small_model.pool(fmap)
        assert per_time.shape == (1, FEATURE_DIM, 1)
        # the spatial pool averages the whole 4x4 map, then the 2-step time pool
        torch.testing.assert_close(per_time[:, :, 0], fmap.mean((2, 3, 4)))
        features, logits = small_model.features_and_logits(x)
        assert features.shape == (1, FEATURE_DIM) and logits.shape == (1, 7)
        torch.testing.assert_close(small_model.features(x), features)
        torch.testing.assert_close(small_model(x), logits)
        torch.testing.assert_close(small_model.per_time_logits(x)[:, :, 0], logits)


def test_short_clips_are_looped_to_min_frames(small_model):
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    looped = x[:, :, [0, 1, 2, 3, 4, 0, 1, 2, 3]]
    torch.testing.assert_close(loop_pad_time(x), looped)
    long = torch.rand(1, 3, MIN_FRAMES, 8, 8)
    assert loop_pad_time(long) is long
    with torch.inference_mode():
        torch.testing.assert_close(small_model(x), small_model(looped), rtol=0, atol=0)
        assert small_model(x[:, :, :1]).shape == (1, 7)


def test_rejects_wrong_channel_count(small_model):
    with pytest.raises(ValueError, match=r"\(N, 3, T, H, W\)"):
        small_model(torch.zeros(1, 2, 9, 32, 32))


def test_replace_logits_keeps_features(small_model):
    model = InceptionI3d(num_classes=7).eval()
    model.load_state_dict(small_model.state_dict())
    x = torch.rand(1, 3, 9, 32, 32)
    with torch.inference_mode():
        before = model.features(x)
        model.replace_logits(3)
        features, logits = model.features_and_logits(x)
    assert model.num_classes == 3 and logits.shape == (1, 3)
    torch.testing.assert_close(features, before)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = InceptionI3d(num_classes=5, in_channels=2).train()
    logits = model(torch.rand(2, 2, 9, 32, 32) * 2 - 1)
    logits.logsumexp(1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_two_stream_sums_logits_and_concatenates_features(small_model):
    torch.manual_seed(1)
    flow_model = _randomize_bn(InceptionI3d(num_classes=7, in_channels=2)).eval()
    both = TwoStreamI3D(small_model, flow_model).eval()
    rgb = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    flow = torch.rand(2, 2, 9, 32, 32) * 2 - 1
    with torch.inference_mode():
        rgb_features, rgb_logits = small_model.features_and_logits(rgb)
        flow_features, flow_logits = flow_model.features_and_logits(flow)
        features, logits = both.features_and_logits(rgb, flow)
        torch.testing.assert_close(logits, rgb_logits + flow_logits)
        torch.testing.assert_close(features, torch.cat([rgb_features, flow_features], 1))
        assert features.shape == (2, 2 * FEATURE_DIM)
        torch.testing.assert_close(both(rgb, flow), logits)
        torch.testing.assert_close(both.features(rgb, flow), features)
        # either stream alone
        torch.testing.assert_close(both(flow=flow), flow_logits)
        torch.testing.assert_close(TwoStreamI3D(small_model, None).features(rgb), rgb_features)
    with pytest.raises(ValueError, match="no flow model"):
        TwoStreamI3D(small_model, None)(rgb, flow)
    with pytest.raises(ValueError, match="same batch size"):
        both(rgb, flow[:1])
    with pytest.raises(ValueError, match="same classes"):
        TwoStreamI3D(small_model, InceptionI3d(num_classes=400, in_channels=2))


@pytest.mark.gpu
def test_cuda_matches_cpu_and_reference(golden_cases):
    case = golden_cases["flow"]
    model = InceptionI3d(in_channels=2).eval()
    load_weights(model, shared_path("i3d", case["weights"]))
    x = _reference_input(case)
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would cost ~3 digits
    try:
        with torch.inference_mode():
            cpu_features = model.features(x)
            gpu_features, gpu_logits = model.cuda().features_and_logits(x.cuda())
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.testing.assert_close(gpu_features.cpu(), cpu_features, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gpu_logits.cpu().numpy(), case["logits_time_mean"], rtol=RTOL, atol=ATOL)
