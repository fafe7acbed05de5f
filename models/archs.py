"""The paper's five architectures (section 2, Table 1) by name, with the inputs each is trained
and tested on, for jobs to build from an `--arch` string.

Frames are counted at the 25 fps of `pipeline.conventions`; `frame_step` is the step between the
RGB frames a model sees (5 = the LSTM's 5 fps, 10 = 3D-Fused's frames 10 apart). Flow counts are
fields. `params_m` is Table 1's parameter count in millions, for 400 classes (`i3d-r50`, the
inflated ResNet-50 of `models.inflate`, is not in Table 1: its count is ours).

Checkpoints of every architecture (`save_model` / `load_model`) record its name: `i3d` ones are the
`models.weights` checkpoints `extract` and `evaluate` always read, with `arch` in their config (old
ones without it read as `i3d`); the others hold the name, the builder's keyword arguments and a
state dict. Loading a checkpoint as another architecture is refused, naming both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quovadis.models.c3d import C3D
from quovadis.models.fused import Fused3D
from quovadis.models.i3d import InceptionI3d, TwoStreamI3D
from quovadis.models.inflate import i3d_resnet50
from quovadis.models.lstm import ConvNetLSTM
from quovadis.models.two_stream import TwoStream2D
from quovadis.models.weights import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_atomic,
    save_checkpoint,
)
from quovadis.pipeline.errors import WeightsError

ARCH_CHECKPOINT_FORMAT = "quovadis-arch"
ARCH_CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class ArchSpec:
    build: Callable[..., nn.Module]  # keyword-only: num_classes
    train_rgb: int  # RGB frames per training example
    train_flow: int  # flow fields per training example
    test_rgb: int  # RGB frames per test video (Table 1)
    test_flow: int
    frame_step: int  # step between the RGB frames used, at 25 fps
    crop: int  # square crop side in pixels
    params_m: float  # Table 1, millions

    @property
    def flow_per_frame(self) -> int:
        """Flow fields per RGB frame: 10 (a snippet) for the 2D two-stream nets, 1 for I3D."""
        return self.train_flow // self.train_rgb if self.train_flow else 1


def _two_stream_i3d(*, num_classes: int) -> TwoStreamI3D:
    return TwoStreamI3D(InceptionI3d(num_classes=num_classes), InceptionI3d(num_classes=num_classes, in_channels=2))


def _i3d_resnet50(*, num_classes: int) -> nn.Module:
    return i3d_resnet50(num_classes=num_classes)


ARCHS: dict[str, ArchSpec] = {
    "lstm": ArchSpec(ConvNetLSTM, 25, 0, 50, 0, frame_step=5, crop=224, params_m=9),
    "c3d": ArchSpec(C3D, 16, 0, 240, 0, frame_step=1, crop=112, params_m=79),
    "two-stream": ArchSpec(TwoStream2D, 1, 10, 25, 250, frame_step=1, crop=224, params_m=12),
    "fused-3d": ArchSpec(Fused3D, 5, 50, 25, 250, frame_step=10, crop=224, params_m=39),
    "i3d": ArchSpec(_two_stream_i3d, 64, 64, 250, 250, frame_step=1, crop=224, params_m=25),
    "i3d-r50": ArchSpec(_i3d_resnet50, 64, 0, 250, 0, frame_step=1, crop=224, params_m=28),
}


def build(arch: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
    """A freshly initialised model of `arch` (a key of ARCHS); `kwargs` go to its builder (C3D's
    clip_frames and crop, dropout)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch].build(num_classes=num_classes, **kwargs)


def model_inputs(arch: str, batch: Mapping[str, torch.Tensor], streams: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The positional inputs of `arch`'s forward from a ShardDataset batch of `streams`: the
    streams' (N, C, T, H, W) tensors in order, Two-Stream's single RGB frame as (N, 3, H, W)."""
    x = tuple(batch[s] for s in streams)
    if arch == "two-stream":
        return x[0][:, :, 0], x[1]  # (N, 3, H, W), (N, 2, 10, H, W)
    return x


def save_model(path: str | os.PathLike, model: nn.Module, *, arch: str, arch_kwargs: Mapping[str, Any],
               config: Mapping[str, Any]) -> Path:  # fmt: skip
    """Write a trained `arch` model and a plain-Python `config` to `path` atomically (see the module
    docstring); `arch_kwargs` are what `build` needs besides num_classes to rebuild it."""
    config = {**config, "arch": arch}
    if arch == "i3d":
        return save_checkpoint(path, model, config)
    payload = {
        "format": ARCH_CHECKPOINT_FORMAT,
        "version": ARCH_CHECKPOINT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "num_classes": int(model.num_classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config,
    }
    return save_atomic(payload, path)


def checkpoint_arch(path: str | os.PathLike) -> str | None:
    """The architecture a quovadis checkpoint holds (`i3d` for those from before --arch), or None
    for any other file (a plain state dict, ...)."""
    data = read_checkpoint(path)
    if not isinstance(data, dict):
        return None
    if data.get("format") == CHECKPOINT_FORMAT:
        config = data.get("config")
        return config.get("arch", "i3d") if isinstance(config, dict) else "i3d"
    return data["arch"] if data.get("format") == ARCH_CHECKPOINT_FORMAT else None


def load_model(path: str | os.PathLike, arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on the CPU, config) from a `save_model` file; with `arch`, a checkpoint
    of another architecture raises WeightsError naming both."""
    data = read_checkpoint(path)
    kind = data.get("format") if isinstance(data, dict) else None
    if kind == CHECKPOINT_FORMAT:
        model, config = load_checkpoint(path)
        found = config.get("arch", "i3d")  # checkpoints from before --arch
    elif kind == ARCH_CHECKPOINT_FORMAT:
        if data.get("version") != ARCH_CHECKPOINT_VERSION:
            raise WeightsError(f"{path} has checkpoint version {data.get('version')}, this code reads {ARCH_CHECKPOINT_VERSION}")
        found, config = data["arch"], data["config"]
        if found not in ARCHS:
            raise WeightsError(f"{path} holds an unknown architecture {found!r}")
        model = build(found, num_classes=data["num_classes"], **data["arch_kwargs"])
        load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in data["state_dict"].items()})
        model.eval()
    else:
        raise WeightsError(f"{path} is not a quovadis checkpoint (see models.archs.save_model)")
    if arch is not None and found != arch:
        raise WeightsError(f"{path} is a {found} checkpoint; it cannot be loaded as {arch}")
    return model, config
