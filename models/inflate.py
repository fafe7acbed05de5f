"""Inflating 2D networks into 3D (the paper's "Inflating 2D ConvNets into 3D", section 2.4).

A k x k filter becomes t x k x k. With mode "mean" the 2D filter is repeated t times along time
and divided by t, so on a "boring" video (one image repeated) every output frame equals the 2D
network's output on the image: the 3D network starts where the 2D one was. Mode "center" puts the
whole 2D filter in the middle time slice (zeros elsewhere), which has the same fixed point.

The fixed point holds exactly where no time padding is read. Zero padding in time (I3D's "SAME"
convolutions) changes the outputs within a receptive field of the clip's first and last frames;
max-pools pad with -inf and keep it. `tests/models/test_inflate.py` checks both facts.

Entry points:
- `inflate(model2d, time_spec, mode)`: a copy of a torch model with every Conv2d, BatchNorm2d,
  MaxPool2d and AvgPool2d replaced by its 3D version (the model's forward must be written
  dimension-agnostic, e.g. an nn.Sequential of such layers);
- `inflate_state_dict(state_dict_2d, model3d, mode)`: any 2D state dict inflated onto the keys
  and shapes of a model made by `inflate` (e.g. an ImageNet checkpoint for a fresh 3D model);
- `i3d_resnet50(...)`: ResNet-50 (`models.resnet`) inflated as I3D-ResNet-50, see
  `resnet50_time_spec`;
- `i3d_from_googlenet(state_dict_2d)`: the Inception-v1 GoogLeNet-BN state dict
  (`models.googlenet`) mapped onto `models.i3d.InceptionI3d`'s, for `quovadis inflate`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from quovadis.models.googlenet import AUX_PREFIXES, BRANCHES_TO_I3D, GOOGLENET_TO_I3D, GoogLeNetBN
from quovadis.models.i3d import InceptionI3d
from quovadis.models.resnet import ResNet50
from quovadis.models.weights import check_state_dict
from quovadis.pipeline.errors import ConfigError, WeightsError

INFLATE_MODES = ("mean", "center")


@dataclass(frozen=True)
class TimeSpec:
    """The temporal extent an inflated layer gets: kernel, stride and (symmetric) padding."""

    kernel: int
    stride: int = 1
    padding: int = 0

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.stride < 1 or self.padding < 0:
            raise ConfigError(f"bad time spec {self}: kernel and stride must be >= 1, padding >= 0")
        if self.padding > self.kernel // 2:
            raise ConfigError(f"bad time spec {self}: padding must be at most kernel // 2")


def inflate_conv(w2d: torch.Tensor, t: int, mode: str = "mean") -> torch.Tensor:
    """2D conv weight (out, in, kh, kw) -> 3D (out, in, t, kh, kw) with the boring-video fixed point.

    "mean": the filter repeated t times, divided by t; "center": the filter in slice t // 2, zeros
    elsewhere (for even t, the later of the two middle slices).
    """
    if w2d.ndim != 4:
        raise ValueError(f"a 2D conv weight has 4 dimensions (out, in, kh, kw), got shape {tuple(w2d.shape)}")
    if t < 1:
        raise ValueError(f"the temporal size must be >= 1, got {t}")
    if mode == "mean":
        return w2d.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
    if mode == "center":
        w3d = w2d.new_zeros(w2d.shape[0], w2d.shape[1], t, *w2d.shape[2:])
        w3d[:, :, t // 2] = w2d
        return w3d
    raise ValueError(f"inflation mode must be one of {INFLATE_MODES}, got {mode!r}")


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def inflate_module(layer: nn.Module, spec: TimeSpec, mode: str = "mean") -> nn.Module:
    """One Conv2d / BatchNorm2d / MaxPool2d / AvgPool2d as its 3D counterpart with `spec` in time
    (BatchNorm ignores `spec`); parameters and statistics are copied, conv weights inflated."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"cannot inflate {layer}: only numeric zero padding is supported")
        conv = nn.Conv3d(
            layer.in_channels,
            layer.out_channels,
            (spec.kernel, *layer.kernel_size),
            (spec.stride, *layer.stride),
            (spec.padding, *layer.padding),
            (1, *layer.dilation),
            layer.groups,
            bias=layer.bias is not None,
        ).to(device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(inflate_conv(layer.weight, spec.kernel, mode))
            if layer.bias is not None:
                conv.bias.copy_(layer.bias)
        return conv
    if isinstance(layer, nn.BatchNorm2d):
        bn = nn.BatchNorm3d(
            layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats
        )
        bn.load_state_dict(layer.state_dict())
        return bn.to(device=layer.running_mean.device if layer.running_mean is not None else None)
    if isinstance(layer, nn.MaxPool2d):
        if layer.return_indices:
            raise ValueError(f"cannot inflate {layer}: return_indices is not supported")
        return nn.MaxPool3d(
            (spec.kernel, *_pair(layer.kernel_size)),
            (spec.stride, *_pair(layer.stride)),
            (spec.padding, *_pair(layer.padding)),
            (1, *_pair(layer.dilation)),
            ceil_mode=layer.ceil_mode,
        )
    if isinstance(layer, nn.AvgPool2d):
        if layer.divisor_override is not None:
            raise ValueError(f"cannot inflate {layer}: divisor_override is not supported")
        return nn.AvgPool3d(
            (spec.kernel, *_pair(layer.kernel_size)),
            (spec.stride, *_pair(layer.stride)),
            (spec.padding, *_pair(layer.padding)),
            ceil_mode=layer.ceil_mode,
            count_include_pad=layer.count_include_pad,
        )
    raise TypeError(f"inflate_module handles Conv2d, BatchNorm2d, MaxPool2d and AvgPool2d, not {type(layer).__name__}")


def square_time_spec(name: str, layer: nn.Module) -> TimeSpec:
    """The default: a k x k layer becomes k x k x k with stride 1 in time and padding (k - 1) // 2
    (the length is kept for odd k)."""
    k = _pair(layer.kernel_size)[0] if hasattr(layer, "kernel_size") else 1
    return TimeSpec(kernel=k, stride=1, padding=(k - 1) // 2)


_INFLATABLE = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d)


def inflate(
    model2d: nn.Module,
    time_spec: Mapping[str, TimeSpec] | Callable[[str, nn.Module], TimeSpec] | None = None,
    *,
    mode: str = "mean",
) -> nn.Module:
    """A deep copy of `model2d` with its Conv2d / BatchNorm2d / MaxPool2d / AvgPool2d made 3D.

    `time_spec` gives each layer's temporal kernel, stride and padding, by qualified module name
    (a mapping; names not in it get `square_time_spec`) or as a function (name, layer) -> TimeSpec;
    None means `square_time_spec` for all. The copy's forward is the 2D model's code, so it must
    not use 2D-only functions (F.adaptive_avg_pool2d, flatten to (N, C*H*W), ...).
    """
    if mode not in INFLATE_MODES:
        raise ValueError(f"inflation mode must be one of {INFLATE_MODES}, got {mode!r}")
    if time_spec is None:
        spec_of: Callable[[str, nn.Module], TimeSpec] = square_time_spec
    elif isinstance(time_spec, Mapping):
        specs = dict(time_spec)
        spec_of = lambda name, layer: specs.get(name) or square_time_spec(name, layer)  # noqa: E731
    else:
        spec_of = time_spec
    model3d = copy.deepcopy(model2d)
    targets = [(name, m) for name, m in model3d.named_modules() if isinstance(m, _INFLATABLE)]
    for name, layer in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model3d.get_submodule(parent_name)
        setattr(parent, attr, inflate_module(layer, spec_of(name, layer), mode))
    return model3d


def _i3d_key(key2d: str) -> str:
    """torchvision GoogLeNet key -> pytorch-i3d key, e.g. inception4a.branch2.1.conv.weight ->
    Mixed_4b.b1b.conv3d.weight; fc.weight -> logits.conv3d.weight."""
    if key2d.startswith("fc."):
        return "logits.conv3d." + key2d[len("fc.") :]
    block, rest = key2d.split(".", 1)
    if block not in GOOGLENET_TO_I3D:
        raise WeightsError(f"no I3D counterpart for GoogLeNet key {key2d}")
    if block.startswith("inception"):
        for branch2d, branch3d in BRANCHES_TO_I3D.items():
            if rest.startswith(branch2d + "."):
                rest = branch3d + rest[len(branch2d) :]
                break
        else:
            raise WeightsError(f"no I3D counterpart for GoogLeNet key {key2d}")
    unit, _, leaf = rest.rpartition(".")
    unit = unit.removesuffix("conv") + "conv3d" if unit.endswith("conv") else unit
    return f"{GOOGLENET_TO_I3D[block]}.{unit}.{leaf}"


def i3d_from_googlenet(
    state_dict_2d: Mapping[str, torch.Tensor], *, mode: str = "mean", in_channels: int = 3
) -> dict[str, torch.Tensor]:
    """An `InceptionI3d` state dict (pytorch-i3d layout) from a GoogLeNet-BN one (torchvision layout).

    Temporal kernel sizes are I3D's (7 for Conv3d_1a, 3 for the 3x3 convs, 1 for the 1x1s); the
    ImageNet classifier becomes the Logits layer (num_classes = fc rows; use `replace_logits` to
    fine-tune). With `in_channels` other than 3 (2 for flow) the first layer's filters are
    averaged over RGB and repeated per input channel (TSN's cross-modality initialisation; the
    released flow I3D was trained from its own initialisation, not this one).
    """
    state_dict_2d = {k: v for k, v in state_dict_2d.items() if not k.startswith(AUX_PREFIXES)}
    fc = state_dict_2d.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise WeightsError("the 2D state dict has no `fc.weight` (not a torchvision-layout GoogLeNet)")
    num_classes = fc.shape[0]
    with torch.device("meta"):
        check_state_dict(GoogLeNetBN(num_classes=num_classes), state_dict_2d, "2D GoogLeNet state dict")
        target = InceptionI3d(num_classes=num_classes, in_channels=in_channels).state_dict()
    out: dict[str, torch.Tensor] = {}
    for key2d, value in state_dict_2d.items():
        key3d = _i3d_key(key2d)
        shape = target[key3d].shape
        if key2d == "conv1.conv.weight" and in_channels != 3:
            value = value.mean(1, keepdim=True).repeat(1, in_channels, 1, 1)
        if value.ndim == 4:  # conv (out, in, kh, kw) -> (out, in, t, kh, kw)
            value = inflate_conv(value, shape[2], mode)
        elif key3d == "logits.conv3d.weight":  # Linear (classes, 1024) -> 1x1x1 conv
            value = value[:, :, None, None, None]
        if value.shape != shape:
            raise WeightsError(f"{key2d} -> {key3d}: inflated shape {tuple(value.shape)} != I3D {tuple(shape)}")
        out[key3d] = value.clone()
    if out.keys() != target.keys():
        raise WeightsError(f"inflation left I3D keys unset: {sorted(target.keys() - out.keys())}")
    return {k: out[k] for k in target}  # I3D order


def inflate_state_dict(
    state_dict_2d: Mapping[str, torch.Tensor], model3d: nn.Module, *, mode: str = "mean"
) -> dict[str, torch.Tensor]:
    """`model3d`'s state dict from the 2D one it was inflated from: the same keys, conv weights
    (4D where model3d has 5D) inflated to model3d's temporal size, everything else copied.
    Raises WeightsError listing missing / unexpected / mis-shaped keys."""
    target = model3d.state_dict()
    missing = [k for k in target if k not in state_dict_2d]
    unexpected = [k for k in state_dict_2d if k not in target]
    if missing or unexpected:
        raise WeightsError(f"the 2D state dict does not fit {type(model3d).__name__}: missing {missing}, unexpected {unexpected}")
    out: dict[str, torch.Tensor] = {}
    for key, ref in target.items():
        value = state_dict_2d[key]
        if ref.ndim == 5 and value.ndim == 4:  # conv (out, in, kh, kw) -> (out, in, t, kh, kw)
            value = inflate_conv(value, ref.shape[2], mode)
        if value.shape != ref.shape:
            raise WeightsError(f"{key}: inflated shape {tuple(value.shape)} != 3D model's {tuple(ref.shape)}")
        out[key] = value.clone()
    return out


# I3D-ResNet-50's inflated bottlenecks (block indices per stage): every other block from layer2
# on, as the I3D ResNet-50 of Non-local Networks (Wang et al., CVPR 2018) and mmaction2's i3d_r50.
RESNET50_INFLATED_BLOCKS: dict[str, tuple[int, ...]] = {
    "layer1": (0, 1, 2),
    "layer2": (0, 2),
    "layer3": (0, 2, 4),
    "layer4": (1,),
}


def resnet50_time_spec(name: str, layer: nn.Module) -> TimeSpec:
    """I3D-ResNet-50's temporal kernels: conv1 5x7x7 with time stride 2 and the stem max-pool
    3x3x3 with time stride 2 (T/4 time steps after the stem, as mmaction2's i3d_r50); the first
    1x1 conv of each inflated bottleneck becomes 3x1x1 (padding 1, the "3x1x1" style); every other
    layer gets temporal kernel 1."""
    if name == "conv1":
        return TimeSpec(5, stride=2, padding=2)
    if name == "maxpool":
        return TimeSpec(3, stride=2, padding=1)
    stage, _, rest = name.partition(".")
    block, _, leaf = rest.partition(".")
    if leaf == "conv1" and int(block) in RESNET50_INFLATED_BLOCKS.get(stage, ()):
        return TimeSpec(3, stride=1, padding=1)
    return TimeSpec(1)


def i3d_resnet50(
    state_dict_2d: Mapping[str, torch.Tensor] | None = None, *, num_classes: int = 1000, mode: str = "mean"
) -> ResNet50:
    """I3D-ResNet-50 on (N, 3, T, H, W): `ResNet50` inflated with `resnet50_time_spec`, its weights
    from `state_dict_2d` (e.g. `resnet.read_resnet50`, whose fc rows set the class count) inflated
    by `mode` ("mean" or "center"), or random with `num_classes` classes when None."""
    if state_dict_2d is not None:
        fc = state_dict_2d.get("fc.weight")
        if fc is None or fc.ndim != 2:
            raise WeightsError("the 2D state dict has no `fc.weight` (not an ImageNet-layout ResNet-50)")
        num_classes = fc.shape[0]
    model3d = inflate(ResNet50(num_classes=num_classes), resnet50_time_spec, mode=mode)
    if state_dict_2d is not None:
        model3d.load_state_dict(inflate_state_dict(state_dict_2d, model3d, mode=mode), strict=True)
    return model3d
