"""The fast inference path: BatchNorm folding is exact, and reduced precision stays close."""

from __future__ import annotations

import pytest
import torch

from quovadis.models.fast import EAGER_FP32, FastI3D, InferenceConfig, fold_batchnorm
from quovadis.models.i3d import InceptionI3d
from quovadis.models.weights import load_weights
from quovadis.pipeline.errors import ConfigError
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def flow_model() -> InceptionI3d:
    model = InceptionI3d(in_channels=2).eval()
    return load_weights(model, shared_path("i3d", "flow_random_init.pt"))


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    return torch.rand(2, 2, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_fold_batchnorm_keeps_the_function(flow_model, clips):
    with torch.inference_mode():
        features, logits = flow_model.features_and_logits(clips)
    folded = fold_batchnorm(_copy(flow_model))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    with torch.inference_mode():
        f2, l2 = folded.features_and_logits(clips)
    torch.testing.assert_close(f2, features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l2, logits, rtol=1e-4, atol=1e-3)


def _copy(model: InceptionI3d) -> InceptionI3d:
    twin = InceptionI3d(num_classes=model.num_classes, in_channels=model.in_channels).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_fast_paths_on_cpu(flow_model, clips):
    with torch.inference_mode():
        features, logits = flow_model.features_and_logits(clips)
    eager = FastI3D(flow_model, "cpu", EAGER_FP32)
    f, lg = eager(clips)
    assert torch.equal(f, features) and torch.equal(lg, logits)
    assert flow_model.Conv3d_1a_7x7.bn is not None  # the given model is not changed
    f, lg = FastI3D(flow_model, "cpu", InferenceConfig(dtype="bfloat16"))(clips)
    assert f.dtype == lg.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(f, features).min() > 0.999
    with pytest.raises(ConfigError):
        InferenceConfig(dtype="int8")


@pytest.mark.gpu
def test_fast_path_on_cuda_is_close_to_cpu_fp32(flow_model, clips):
    with torch.inference_mode():
        features = flow_model.features(clips)
    for cfg in (InferenceConfig(dtype="bfloat16"), InferenceConfig(dtype="float16")):
        f, _ = FastI3D(flow_model, "cuda", cfg)(clips)
        assert f.device.type == "cuda"
        assert torch.nn.functional.cosine_similarity(f.cpu(), features).min() > 0.999
