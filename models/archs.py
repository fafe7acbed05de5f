"""The paper's five architectures (section 2, Table 1) by name, with the inputs each is trained
and tested on, for jobs to build from an `--arch` string.

Frames are counted at the 25 fps of `pipeline.conventions`; `frame_step` is the step between the
RGB frames a model sees (5 = the LSTM's 5 fps, 10 = 3D-Fused's frames 10 apart). Flow counts are
fields. `params_m` is Table 1's parameter count in millions, for 400 classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from quovadis.models.c3d import C3D
from quovadis.models.fused import Fused3D
from quovadis.models.i3d import InceptionI3d, TwoStreamI3D
from quovadis.models.lstm import ConvNetLSTM
from quovadis.models.two_stream import TwoStream2D


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


def _two_stream_i3d(*, num_classes: int) -> TwoStreamI3D:
    return TwoStreamI3D(InceptionI3d(num_classes=num_classes), InceptionI3d(num_classes=num_classes, in_channels=2))


ARCHS: dict[str, ArchSpec] = {
    "lstm": ArchSpec(ConvNetLSTM, 25, 0, 50, 0, frame_step=5, crop=224, params_m=9),
    "c3d": ArchSpec(C3D, 16, 0, 240, 0, frame_step=1, crop=112, params_m=79),
    "two-stream": ArchSpec(TwoStream2D, 1, 10, 25, 250, frame_step=1, crop=224, params_m=12),
    "fused-3d": ArchSpec(Fused3D, 5, 50, 25, 250, frame_step=10, crop=224, params_m=39),
    "i3d": ArchSpec(_two_stream_i3d, 64, 64, 250, 250, frame_step=1, crop=224, params_m=25),
}


def build(arch: str, *, num_classes: int) -> nn.Module:
    """A freshly initialised model of `arch` (a key of ARCHS)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch].build(num_classes=num_classes)
