"""Inception-v1 I3D (Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?"), exactly as released
in DeepMind's kinetics-i3d (`i3d.py`) and as converted by piergiaj/pytorch-i3d (`pytorch_i3d.py`).

Contract: input float32 (N, C, T, H, W) in [-1, 1] (see `pipeline.conventions.rgb_to_model` /
`flow_to_model`), C = 3 for RGB or 2 for flow (x, y). Every convolution is followed by
BatchNorm3d(eps=1e-3) and ReLU, except the Logits 1x1x1 convolution (bias, no BN, no ReLU).
Padding is TensorFlow "SAME" from the actual input size (`models.padding`), so odd lengths give the
reference's numbers. Module names are those of pytorch-i3d, so its checkpoints
(`Conv3d_1a_7x7.conv3d.weight`, `Mixed_5b.b2b.bn.running_var`, `logits.conv3d.bias`, ...) load
with strict=True (see `models.weights`).

Head: AvgPool3d over (2, 7, 7) with stride 1 -> dropout -> 1x1x1 conv -> mean over the remaining
time steps (kinetics-i3d's `averaged_logits`). Deviations, both invisible at 224x224:
- spatially the pool averages the whole remaining map (7x7 at 224x224 input, 4x4 at 112x112), so any
  input size gives one vector per time step;
- clips shorter than MIN_FRAMES (where the reference fails: the 2-step time pool has < 2 steps)
  are looped up to MIN_FRAMES frames, frames 0, 1, ..., T-1, 0, 1, ... (`pipeline.conventions`
  looping rule). T >= MIN_FRAMES is never changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quovadis.models.padding import MaxPoolSame, pad_same, use_same_padding
from quovadis.pipeline.conventions import clip_frame_indices
from quovadis.pipeline.errors import ConfigError

MIN_FRAMES = 9  # the shortest clip the reference accepts: 9 -> 5 -> 3 -> 2 time steps at Mixed_5c
FEATURE_DIM = 1024  # channels of Mixed_5c, the size of `features`
BN_EPS = 1e-3  # TF's batch-norm epsilon
BN_MOMENTUM = 0.01  # as pytorch-i3d (kinetics-i3d trains with Sonnet's default decay 0.999, i.e. 0.001); eval is unaffected

# Inception-v1 block widths, shared with the 2D GoogLeNet (models/googlenet.py): (Branch_0 1x1, Branch_1 1x1 -> 3x3x3, Branch_2 1x1 -> 3x3x3, Branch_3 pool -> 1x1)
MIXED_WIDTHS: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


@dataclass(frozen=True)
class I3DConfig:
    num_classes: int = 400  # Kinetics-400 logits of the released model
    in_channels: int = 3  # 3 = RGB, 2 = flow (x, y)
    dropout: float = 0.5  # before the Logits conv; active in train mode only

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1 (3 for RGB, 2 for flow), got {self.in_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


class Unit3D(nn.Module):
    """Conv3d ("SAME") -> BatchNorm3d -> ReLU; the Logits unit has a bias and neither BN nor ReLU.

    State-dict names `conv3d.*` and `bn.*` are pytorch-i3d's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        *,
        norm_act: bool = True,
    ) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=not norm_act)
        self.dynamic_pad = use_same_padding(self.conv3d)
        self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM) if norm_act else None
        self.relu = norm_act  # stays on when `models.fast.fold_batchnorm` removes `bn`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            x = pad_same(x, self.conv3d.kernel_size, self.conv3d.stride)
        x = self.conv3d(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True) if self.relu else x


class InceptionBlock(nn.Module):
    """Four branches concatenated on channels; names b0, b1a, b1b, b2a, b2b, b3a, b3b as pytorch-i3d.

    Branch_2 uses 3x3x3 like Branch_1 (inherited from TF-slim's Inception-v1, not the paper's 5x5).
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = widths
        self.b0 = Unit3D(in_channels, c0)
        self.b1a = Unit3D(in_channels, c1a)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3))
        self.b2a = Unit3D(in_channels, c2a)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3))
        self.b3a = MaxPoolSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, c3b)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))]
        return torch.cat(branches, dim=1)


def loop_pad_time(x: torch.Tensor, min_frames: int = MIN_FRAMES) -> torch.Tensor:
    """(N, C, T, H, W) with T < min_frames -> T = min_frames by looping frames 0..T-1 (the
    conventions' padding rule); longer inputs are returned unchanged."""
    t = x.shape[2]
    if t >= min_frames:
        return x
    index = torch.as_tensor(clip_frame_indices(0, min_frames, t), device=x.device)
    return x.index_select(2, index)


class InceptionI3d(nn.Module):
    """Inception-v1 I3D. Builder arguments are keyword-only; see `I3DConfig`.

    Shapes below are for an input (N, C, 64, 224, 224); "SAME" gives ceil(size / stride).

    Example:
        >>> model = InceptionI3d(num_classes=400, in_channels=3).eval()
        >>> model(torch.zeros(1, 3, 16, 112, 112)).shape
        torch.Size([1, 400])
    """

    def __init__(self, *, num_classes: int = 400, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.config = I3DConfig(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionBlock(192, MIXED_WIDTHS["Mixed_3b"])
        self.Mixed_3c = InceptionBlock(self.Mixed_3b.out_channels, MIXED_WIDTHS["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPoolSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionBlock(self.Mixed_3c.out_channels, MIXED_WIDTHS["Mixed_4b"])
        self.Mixed_4c = InceptionBlock(self.Mixed_4b.out_channels, MIXED_WIDTHS["Mixed_4c"])
        self.Mixed_4d = InceptionBlock(self.Mixed_4c.out_channels, MIXED_WIDTHS["Mixed_4d"])
        self.Mixed_4e = InceptionBlock(self.Mixed_4d.out_channels, MIXED_WIDTHS["Mixed_4e"])
        self.Mixed_4f = InceptionBlock(self.Mixed_4e.out_channels, MIXED_WIDTHS["Mixed_4f"])
        self.MaxPool3d_5a_2x2 = MaxPoolSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionBlock(self.Mixed_4f.out_channels, MIXED_WIDTHS["Mixed_5b"])
        self.Mixed_5c = InceptionBlock(self.Mixed_5b.out_channels, MIXED_WIDTHS["Mixed_5c"])
        assert self.Mixed_5c.out_channels == FEATURE_DIM
        self.dropout = nn.Dropout(dropout)
        self.logits = Unit3D(FEATURE_DIM, num_classes, norm_act=False)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    def replace_logits(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for `num_classes` classes (for fine-tuning)."""
        self.config = I3DConfig(num_classes=num_classes, in_channels=self.in_channels, dropout=self.config.dropout)
        w = self.logits.conv3d.weight
        self.logits = Unit3D(FEATURE_DIM, num_classes, norm_act=False).to(device=w.device, dtype=w.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) in [-1, 1] -> Mixed_5c activations (N, 1024, ceil(T'/8), ceil(H/32), ceil(W/32)),
        T' = max(T, MIN_FRAMES)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"I3D expects input (N, {self.in_channels}, T, H, W), got shape {tuple(x.shape)}"
            )
        x = loop_pad_time(x)  # (N, C, 64, 224, 224)
        x = self.Conv3d_1a_7x7(x)  # (N, 64, 32, 112, 112)
        x = self.MaxPool3d_2a_3x3(x)  # (N, 64, 32, 56, 56)
        x = self.Conv3d_2b_1x1(x)  # (N, 64, 32, 56, 56)
        x = self.Conv3d_2c_3x3(x)  # (N, 192, 32, 56, 56)
        x = self.MaxPool3d_3a_3x3(x)  # (N, 192, 32, 28, 28)
        x = self.Mixed_3b(x)  # (N, 256, 32, 28, 28)
        x = self.Mixed_3c(x)  # (N, 480, 32, 28, 28)
        x = self.MaxPool3d_4a_3x3(x)  # (N, 480, 16, 14, 14)
        x = self.Mixed_4b(x)  # (N, 512, 16, 14, 14)
        x = self.Mixed_4c(x)  # (N, 512, 16, 14, 14)
        x = self.Mixed_4d(x)  # (N, 512, 16, 14, 14)
        x = self.Mixed_4e(x)  # (N, 528, 16, 14, 14)
        x = self.Mixed_4f(x)  # (N, 832, 16, 14, 14)
        x = self.MaxPool3d_5a_2x2(x)  # (N, 832, 8, 7, 7)
        x = self.Mixed_5b(x)  # (N, 832, 8, 7, 7)
        x = self.Mixed_5c(x)  # (N, 1024, 8, 7, 7)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_5c activations -> per-time features (N, 1024, t): AvgPool3d (2, 7, 7) stride 1 at
        224x224 (the whole spatial map at other sizes), t = ceil(T'/8) - 1."""
        x = F.avg_pool3d(x, kernel_size=(2, x.shape[3], x.shape[4]), stride=1)  # (N, 1024, 7, 1, 1)
        return x.flatten(2)  # (N, 1024, 7)

    def classify(self, per_time_features: torch.Tensor) -> torch.Tensor:
        """(N, 1024, t) -> per-time logits (N, classes, t): dropout, then the 1x1x1 Logits conv."""
        x = self.dropout(per_time_features)[..., None, None]  # (N, 1024, t, 1, 1)
        return self.logits(x).flatten(2)  # (N, classes, t)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mixed_5c activations -> logits (N, classes) averaged over time, or with `pre_logits` the
        time-averaged features (N, 1024)."""
        per_time = self.pool(x)  # (N, 1024, t)
        if pre_logits:
            return per_time.mean(2)  # (N, 1024)
        return self.classify(per_time).mean(2)  # (N, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) in [-1, 1] -> logits (N, classes), averaged over time (pre-softmax)."""
        return self.forward_head(self.forward_features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) -> (N, 1024): the AvgPool output averaged over time; logits are an affine
        map of it (in eval mode)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both `features(x)` (N, 1024) and `forward(x)` (N, classes) from one pass."""
        per_time = self.pool(self.forward_features(x))  # (N, 1024, t)
        return per_time.mean(2), self.classify(per_time).mean(2)

    def per_time_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) -> (N, 1024, t), the features before the time average."""
        return self.pool(self.forward_features(x))

    def per_time_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) -> (N, classes, t), the logits before the time average (pytorch-i3d's output)."""
        return self.classify(self.pool(self.forward_features(x)))


class TwoStreamI3D(nn.Module):
    """RGB and flow I3D side by side. Logits are the sum of the streams' logits (the released joint
    model); features are concatenated rgb then flow, (N, 2048) with both streams. Either stream may
    be absent; a call uses the streams whose input is given.
    """

    def __init__(self, rgb: InceptionI3d | None, flow: InceptionI3d | None) -> None:
        super().__init__()
        if rgb is None and flow is None:
            raise ValueError("TwoStreamI3D needs at least one of the rgb and flow models")
        if rgb is not None and flow is not None and rgb.num_classes != flow.num_classes:
            raise ValueError(
                f"the rgb and flow models must have the same classes, got {rgb.num_classes} and {flow.num_classes}"
            )
        self.rgb = rgb
        self.flow = flow

    @property
    def num_classes(self) -> int:
        return (self.rgb or self.flow).num_classes

    def _streams(self, rgb: torch.Tensor | None, flow: torch.Tensor | None) -> list[tuple[InceptionI3d, torch.Tensor]]:
        pairs = []
        for name, model, x in (("rgb", self.rgb, rgb), ("flow", self.flow, flow)):
            if x is None:
                continue
            if model is None:
                raise ValueError(f"a {name} input was given but this TwoStreamI3D has no {name} model")
            pairs.append((model, x))
        if not pairs:
            raise ValueError("give at least one of the rgb and flow inputs")
        if len({x.shape[0] for _, x in pairs}) != 1:
            raise ValueError(f"rgb and flow inputs must have the same batch size, got {[tuple(x.shape) for _, x in pairs]}")
        return pairs

    def forward(self, rgb: torch.Tensor | None = None, flow: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the given streams' time-averaged logits, (N, classes)."""
        return torch.stack([model(x) for model, x in self._streams(rgb, flow)]).sum(0)

    def features(self, rgb: torch.Tensor | None = None, flow: torch.Tensor | None = None) -> torch.Tensor:
        """The given streams' features concatenated, rgb first: (N, 1024 * streams)."""
        return torch.cat([model.features(x) for model, x in self._streams(rgb, flow)], dim=1)

    def features_and_logits(
        self, rgb: torch.Tensor | None = None, flow: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(`features`, `forward`) from one pass per stream."""
        outs = [model.features_and_logits(x) for model, x in self._streams(rgb, flow)]
        return torch.cat([f for f, _ in outs], dim=1), torch.stack([lg for _, lg in outs]).sum(0)
