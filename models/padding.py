"""TensorFlow "SAME" padding, the one helper every quovadis model uses (2D and 3D alike).

TF "SAME" makes a layer with stride s output ceil(n / s) positions along a dimension of size n,
padding max((ceil(n / s) - 1) * s + k - n, 0) in total, the odd one at the END. The amount depends
on n when s > 1, so those layers pad in `forward` (dynamic). With stride 1 and an odd kernel the
padding is (k - 1) / 2 on both sides whatever n is, so the layer's own `padding=` does it (static,
no extra copy). Convolutions pad with zeros; max-pools pad with -inf, which is what TF's max_pool
does (padded positions never win).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of one dimension of `size` for TF "SAME"; the extra one goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def static_same_padding(kernel: Sequence[int], stride: Sequence[int]) -> tuple[int, ...] | None:
    """The symmetric per-dimension padding equal to "SAME" for every input size, or None when the
    padding depends on the input size (some stride > 1 or even kernel with padding needed)."""
    if all(s == 1 and k % 2 == 1 for k, s in zip(kernel, stride, strict=True)):
        return tuple((k - 1) // 2 for k in kernel)
    return None


def pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the last len(kernel) dimensions of `x` for TF "SAME" (dynamic: from x's actual sizes)."""
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[-len(kernel):]), reversed(kernel), reversed(stride), strict=True):
        pads += same_padding(int(size), k, s)  # F.pad wants the last dimension first
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


def use_same_padding(conv: nn.Conv2d | nn.Conv3d) -> bool:
    """Give `conv` the static "SAME" padding when there is one (else 0) and say whether its owner
    must call `pad_same(x, conv.kernel_size, conv.stride)` in forward (True: dynamic)."""
    static = static_same_padding(conv.kernel_size, conv.stride)
    conv.padding = static if static is not None else (0,) * len(conv.kernel_size)
    return static is None


class MaxPoolSame(nn.Module):
    """Max-pool (2D or 3D by len(kernel)) with TF "SAME" padding; padded positions are -inf."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        if len(self.kernel) not in (2, 3) or len(self.stride) != len(self.kernel):
            raise ValueError(f"kernel {kernel} and stride {stride} must both have 2 or 3 entries")
        static = static_same_padding(self.kernel, self.stride)
        self.dynamic = static is None
        pool = nn.MaxPool3d if len(self.kernel) == 3 else nn.MaxPool2d
        # torch's own padding of a max-pool is -inf, exactly TF's behaviour
        self.pool = pool(self.kernel, self.stride, padding=static if static is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            x = pad_same(x, self.kernel, self.stride, value=-math.inf)
        return self.pool(x)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, same"
