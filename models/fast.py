"""The fast I3D inference path, in one place, so extraction runs exactly what `quovadis bench i3d`
measured against eager float32 (the pytorch-i3d way).

Knobs (`InferenceConfig`): autocast dtype (bfloat16 / float16 / float32), channels_last_3d memory
format, BatchNorm folded into the convolutions, cudnn.benchmark, torch.compile (mode
"reduce-overhead" is CUDA graphs). Outputs are always float32; the benchmark reports their max
abs / cosine difference to eager float32.

Example:
    >>> fast = FastI3D(model, torch.device("cuda"), InferenceConfig())
    >>> features, logits = fast(clips)  # float32 (N, C, T, H, W) on any device -> float32 on device
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from quovadis.models.i3d import InceptionI3d, Unit3D
from quovadis.pipeline.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --precision name -> DTYPES name
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class InferenceConfig:
    dtype: str = "bfloat16"  # autocast dtype; "float32" = no autocast
    channels_last: bool = True  # torch.channels_last_3d for weights and inputs
    fold_bn: bool = True  # BatchNorm folded into the preceding convolution (inference only)
    cudnn_benchmark: bool = True  # let cuDNN pick algorithms per input shape (process-wide switch)
    compile: str = "none"  # torch.compile mode, "reduce-overhead" = CUDA graphs; "none" = eager

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")

    def to_dict(self) -> dict[str, str | bool]:
        return asdict(self)


EAGER_FP32 = InferenceConfig(dtype="float32", channels_last=False, fold_bn=False, cudnn_benchmark=False)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` (a DTYPES or --precision name); float32 runs without autocast."""
    name = PRECISIONS.get(dtype, dtype)
    return contextlib.nullcontext() if name == "float32" else torch.autocast(device.type, dtype=DTYPES[name])


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm of the model's `Unit3D`s into its convolution, in place:
    w' = w * g / sqrt(v + eps), b' = beta - m * g / sqrt(v + eps). Same function up to rounding,
    one pass less over the activations. Only for inference: the model has no BN left to train."""
    for unit in model.modules():
        if not isinstance(unit, Unit3D) or unit.bn is None:
            continue
        bn, conv = unit.bn, unit.conv3d
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.weight.mul_(scale.view(-1, 1, 1, 1, 1))
            conv.bias = nn.Parameter(bias)
        unit.bn = None  # unit.relu stays on
    return model


class FastI3D(nn.Module):
    """An InceptionI3d prepared for inference on `device` with `cfg`; call it on clips to get
    (features (N, 1024), logits (N, classes)), both float32 on `device`. The given model is copied,
    not changed."""

    def __init__(self, model: InceptionI3d, device: torch.device | str, cfg: InferenceConfig = InferenceConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.device = torch.device(device)
        m = copy.deepcopy(model).eval()
        if cfg.fold_bn:
            fold_batchnorm(m)
        m = m.to(self.device)
        if cfg.channels_last:
            m = m.to(memory_format=torch.channels_last_3d)
        self.model = m
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        fn = m.features_and_logits
        self._run = fn if cfg.compile == "none" else torch.compile(fn, mode=None if cfg.compile == "default" else cfg.compile)

    @torch.inference_mode()
    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = clips.to(self.device, torch.float32, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with autocast(self.device, self.cfg.dtype):
            features, logits = self._run(x)
        # copies: CUDA-graph outputs are overwritten by the next call
        return features.to(torch.float32, copy=True), logits.to(torch.float32, copy=True)
