"""2D Inception-v1 with BatchNorm (GoogLeNet-BN), the network I3D is inflated from.

State-dict layout: torchvision's `googlenet` (`conv1.conv.weight`, `conv1.bn.running_var`,
`inception3a.branch2.1.conv.weight`, `fc.weight`, ...), so its ImageNet checkpoint
(googlenet-1378be20.pth, itself a port of TF-slim's inception_v1) loads with `read_googlenet`.
Differences from torchvision's module, all chosen to match TF-slim and I3D:
- input (N, 3, H, W) in [-1, 1], as torchvision's model sees it after `transform_input`;
- TF "SAME" padding everywhere (`models.padding`). torchvision pads conv1 by 3 on both sides
  where SAME pads 2 before and 3 after at even sizes, so its conv1 output is shifted one pixel;
  its ceil-mode pools equal SAME at even sizes;
- the auxiliary classifiers (aux1, aux2) are training-only and left out; `read_googlenet` drops
  their keys by name.
Checked once against torchvision 0.28's GoogLeNet source: the same 344 state-dict entries in the
same order and shapes (plus aux1/aux2), and identical outputs once its conv1 pads the SAME way.
Like TF-slim (and unlike the paper), the "5x5" branch uses 3x3 kernels; I3D inherits this
(3x3x3 in Branch_2), so every 2D layer has exactly one I3D counterpart (`GOOGLENET_TO_I3D`).
"""

from __future__ import annotations

import os

import torch
from torch import nn
import torch.nn.functional as F

from quovadis.models.i3d import BN_EPS, FEATURE_DIM, MIXED_WIDTHS
from quovadis.models.padding import MaxPoolSame, pad_same, use_same_padding
from quovadis.models.weights import read_2d_classifier

# 2D module -> I3D module; inception branches map branch1 -> b0, branch2.{0,1} -> b1{a,b},
# branch3.{0,1} -> b2{a,b}, branch4.1 -> b3b (branch4.0 / b3a is the max-pool).
GOOGLENET_TO_I3D: dict[str, str] = {
    "conv1": "Conv3d_1a_7x7",
    "conv2": "Conv3d_2b_1x1",
    "conv3": "Conv3d_2c_3x3",
    "inception3a": "Mixed_3b",
    "inception3b": "Mixed_3c",
    "inception4a": "Mixed_4b",
    "inception4b": "Mixed_4c",
    "inception4c": "Mixed_4d",
    "inception4d": "Mixed_4e",
    "inception4e": "Mixed_4f",
    "inception5a": "Mixed_5b",
    "inception5b": "Mixed_5c",
}
BRANCHES_TO_I3D: dict[str, str] = {
    "branch1": "b0",
    "branch2.0": "b1a",
    "branch2.1": "b1b",
    "branch3.0": "b2a",
    "branch3.1": "b2b",
    "branch4.1": "b3b",
}
AUX_PREFIXES = ("aux1.", "aux2.")  # torchvision's auxiliary classifiers


class BasicConv2d(nn.Module):
    """Conv2d ("SAME", no bias) -> BatchNorm2d(eps=1e-3) -> ReLU; names `conv`, `bn` as torchvision."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, bias=False)
        self.dynamic_pad = use_same_padding(self.conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            x = pad_same(x, self.conv.kernel_size, self.conv.stride)
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """torchvision's Inception block layout with SAME padding."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        c1, c2a, c2b, c3a, c3b, c4 = widths
        self.branch1 = BasicConv2d(in_channels, c1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, c2a, 1), BasicConv2d(c2a, c2b, 3))
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, c3a, 1), BasicConv2d(c3a, c3b, 3))
        self.branch4 = nn.Sequential(MaxPoolSame((3, 3), (1, 1)), BasicConv2d(in_channels, c4, 1))
        self.out_channels = c1 + c2b + c3b + c4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNetBN(nn.Module):
    """Inception-v1 with BatchNorm on (N, C, H, W) in [-1, 1] (C = `in_channels`); shapes for 224x224."""

    def __init__(self, *, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        w = {g: MIXED_WIDTHS[i] for g, i in GOOGLENET_TO_I3D.items() if g.startswith("inception")}
        self.num_classes = num_classes
        self.conv1 = BasicConv2d(in_channels, 64, 7, stride=2)  # 3 = RGB, 20 = 10 stacked flow fields
        self.maxpool1 = MaxPoolSame((3, 3), (2, 2))
        self.conv2 = BasicConv2d(64, 64, 1)
        self.conv3 = BasicConv2d(64, 192, 3)
        self.maxpool2 = MaxPoolSame((3, 3), (2, 2))
        self.inception3a = Inception(192, w["inception3a"])
        self.inception3b = Inception(self.inception3a.out_channels, w["inception3b"])
        self.maxpool3 = MaxPoolSame((3, 3), (2, 2))
        self.inception4a = Inception(self.inception3b.out_channels, w["inception4a"])
        self.inception4b = Inception(self.inception4a.out_channels, w["inception4b"])
        self.inception4c = Inception(self.inception4b.out_channels, w["inception4c"])
        self.inception4d = Inception(self.inception4c.out_channels, w["inception4d"])
        self.inception4e = Inception(self.inception4d.out_channels, w["inception4e"])
        self.maxpool4 = MaxPoolSame((2, 2), (2, 2))
        self.inception5a = Inception(self.inception4e.out_channels, w["inception5a"])
        self.inception5b = Inception(self.inception5a.out_channels, w["inception5b"])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(FEATURE_DIM, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, 224, 224) -> inception5b activations (N, 1024, 7, 7)."""
        x = self.maxpool1(self.conv1(x))  # (N, 64, 56, 56)
        x = self.conv3(self.conv2(x))  # (N, 192, 56, 56)
        x = self.maxpool2(x)  # (N, 192, 28, 28)
        x = self.inception3b(self.inception3a(x))  # (N, 480, 28, 28)
        x = self.maxpool3(x)  # (N, 480, 14, 14)
        for block in (self.inception4a, self.inception4b, self.inception4c, self.inception4d, self.inception4e):
            x = block(x)  # (N, 512 | 512 | 512 | 528 | 832, 14, 14)
        x = self.maxpool4(x)  # (N, 832, 7, 7)
        return self.inception5b(self.inception5a(x))  # (N, 1024, 7, 7)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """inception5b activations -> pooled features (N, 1024) or logits (N, classes)."""
        x = x.mean((2, 3))  # (N, 1024): the 7x7 average pool at 224x224
        return x if pre_logits else self.fc(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def read_googlenet(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torchvision-layout GoogLeNet state dict from `path`, float32, auxiliary classifiers dropped,
    checked strictly against `GoogLeNetBN` (class count from `fc.weight`)."""
    return read_2d_classifier(path, lambda n: GoogLeNetBN(num_classes=n), "torchvision-layout GoogLeNet", AUX_PREFIXES)


def adapt_input_channels(state_dict: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """A copy of a GoogLeNet state dict whose conv1 takes `in_channels` inputs: the RGB filters
    averaged over their 3 channels and repeated (the cross-modality initialisation of Wang et al.,
    TSN, ECCV 2016), e.g. 20 for a stack of 10 flow fields (x, y interleaved)."""
    w = state_dict["conv1.conv.weight"]  # (64, 3, 7, 7)
    return {**state_dict, "conv1.conv.weight": w.mean(1, keepdim=True).repeat(1, in_channels, 1, 1)}


def imagenet_trunk(state_dict: dict[str, torch.Tensor], in_channels: int = 3) -> dict[str, torch.Tensor]:
    """An ImageNet GoogLeNet state dict (`read_googlenet`) without its classifier (`fc.*`), conv1
    adapted to `in_channels` when it is not 3: the weights of a trunk whose `fc` was removed."""
    trunk = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    return trunk if in_channels == 3 else adapt_input_channels(trunk, in_channels)
