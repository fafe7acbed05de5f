"""I3DPredictor without Ray: conversion through conventions, features/logits equal the model's, streams
loaded only when asked, precision, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quovadis.models.weights import load_i3d
from quovadis.models.predictor import I3DPredictor, PredictorConfig
from quovadis.pipeline.errors import ConfigError, WeightsError
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def weights() -> dict[str, str]:
    return {s: str(shared_path("i3d", f"{s}_random_init.pt")) for s in ("rgb", "flow")}


@pytest.fixture(scope="module")
def rgb_only(weights, tmp_path_factory) -> I3DPredictor:
    missing = tmp_path_factory.mktemp("w") / "missing.pt"
    return I3DPredictor(PredictorConfig(streams=("rgb",), weights_rgb=weights["rgb"], weights_flow=str(missing), logits=True))


@pytest.fixture(scope="module")
def two_stream(weights) -> I3DPredictor:
    return I3DPredictor(PredictorConfig(weights_rgb=weights["rgb"], weights_flow=weights["flow"], logits=True))


def _batch(n: int = 2, t: int = 9, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "clip_id": np.arange(100, 100 + n, dtype=np.int64),
        "rgb": rng.integers(0, 256, (n, t, size, size, 3), dtype=np.uint8),
        "flow": rng.integers(0, 256, (n, t, size, size, 2), dtype=np.uint8),
    }


def test_rgb_only_equals_the_model_and_never_opens_flow_weights(weights, rgb_only):
    assert set(rgb_only.models) == {"rgb"}  # the flow weights path does not exist: it was never opened
    batch = _batch()
    out = rgb_only(batch)
    np.testing.assert_array_equal(out["clip_id"], batch["clip_id"])
    assert set(out) == {"clip_id", "rgb", "logits_rgb", "logits"}
    model = load_i3d("rgb", weights["rgb"])  # the plain eager float32 model (tests/models/test_weights.py)
    with torch.no_grad():
        x = batch["rgb"].astype(np.float32) / 127.5 - 1.0  # the documented [-1, 1] map, written out
        x = torch.from_numpy(x).permute(0, 4, 1, 2, 3)
        features, logits = model.features(x), model(x)
    assert out["rgb"].shape == (2, 1024) and out["rgb"].dtype == np.float32
    np.testing.assert_allclose(out["rgb"], features.numpy(), rtol=1e-4, atol=1e-4)  # float32 rounding of the two maps
    np.testing.assert_allclose(out["logits_rgb"], logits.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out["logits"], out["logits_rgb"])


def test_two_streams_sum_logits_and_read_flow_as_quantised_or_pixels(weights, two_stream):
    predictor = two_stream
    batch = _batch(n=1)
    out = predictor(batch)
    assert out["flow"].shape == (1, 1024)
    np.testing.assert_allclose(out["logits"], out["logits_rgb"] + out["logits_flow"], rtol=1e-6, atol=1e-5)
    flow_model = load_i3d("flow", weights["flow"])
    with torch.no_grad():
        pixels_f64 = batch["flow"].astype(np.float64) * 40 / 255 - 20  # q -> px, the documented map, written out
        y = torch.from_numpy((pixels_f64 / 20).astype(np.float32)).permute(0, 4, 1, 2, 3)  # px -> [-1, 1], NCTHW
        expected = flow_model.features(y)
    np.testing.assert_allclose(out["flow"], expected.numpy(), rtol=1e-5, atol=1e-5)
    # the same flow as float pixels gives the same features (up to the quantisation's rounding)
    pixels = dict(batch, flow=pixels_f64.astype(np.float32))
    np.testing.assert_allclose(predictor(pixels)["flow"], out["flow"], rtol=1e-4, atol=1e-4)


def test_flow_only_without_logits_and_bf16_close_to_fp32(weights, two_stream):
    bf16 = I3DPredictor(PredictorConfig(streams=("flow",), weights_flow=weights["flow"], precision="bf16"))
    assert set(bf16.models) == {"flow"}
    batch = _batch(n=1)
    out = bf16(batch)
    assert set(out) == {"clip_id", "flow"}
    fp32, bf16 = two_stream(batch)["flow"], out["flow"]
    assert bf16.dtype == np.float32
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(fp32, bf16)


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(WeightsError, match="missing.pt"):
        I3DPredictor(PredictorConfig(streams=("rgb",), weights_rgb=str(tmp_path / "missing.pt")))


def test_bad_config():
    with pytest.raises(ConfigError):
        PredictorConfig(streams=("rgb", "depth"))
    with pytest.raises(ConfigError):
        PredictorConfig(precision="int8")


@pytest.mark.gpu
def test_cuda_matches_cpu(weights):
    batch = _batch(n=4, t=16, size=64)
    cpu = I3DPredictor(PredictorConfig(streams=("rgb",), weights_rgb=weights["rgb"], device="cpu"))(batch)["rgb"]
    gpu = I3DPredictor(PredictorConfig(streams=("rgb",), weights_rgb=weights["rgb"], device="cuda"))(batch)["rgb"]
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3)
