"""2D ResNet-50 (He et al., CVPR 2016), the second ImageNet network we inflate (issue 13).

State-dict layout: the common ImageNet ResNet-50 checkpoints' (torchvision's `resnet50`, also
used by timm and mmaction2 for 2D init): `conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.bn1`,
`layer1.0.downsample.0` (1x1 conv) / `.1` (BN), ..., `fc`; no torchvision import. Bottlenecks
stride in their 3x3 conv ("ResNet v1.5", as those checkpoints). Padding is PyTorch's symmetric
zero padding, as they were trained (not TF "SAME"), and BN eps is torch's 1e-5.

The forward is dimension-agnostic (only Conv / BN / MaxPool layers, then a mean over every
position), so `models.inflate.inflate` turns a copy into a 3D ResNet: `inflate.i3d_resnet50`.
Input float32 (N, 3, H, W), normalised as the checkpoint expects.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from quovadis.models.weights import read_2d_classifier

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride) of layer1..4
EXPANSION = 4
FEATURE_DIM = 512 * EXPANSION  # 2048


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels), BN after each, identity or 1x1 downsample shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        return F.relu(self.bn3(self.conv3(y)) + shortcut, inplace=True)


class ResNet50(nn.Module):
    """ResNet-50; shapes for (N, 3, 224, 224). After inflation the same code runs on (N, 3, T, H, W)."""

    def __init__(self, *, num_classes: int = 1000) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        channels = 64
        for i, (width, blocks, stride) in enumerate(STAGES, start=1):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(channels, width, stride if b == 0 else 1))
                channels = width * EXPANSION
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.fc = nn.Linear(FEATURE_DIM, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 224, 224) -> layer4 activations (N, 2048, 7, 7)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))  # (N, 64, 56, 56)
        x = self.layer1(x)  # (N, 256, 56, 56)
        x = self.layer2(x)  # (N, 512, 28, 28)
        x = self.layer3(x)  # (N, 1024, 14, 14)
        return self.layer4(x)  # (N, 2048, 7, 7)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """layer4 activations -> features (N, 2048), the mean over every position, or logits."""
        x = x.flatten(2).mean(2)  # (N, 2048): the global average pool, in 2D or 3D
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def read_resnet50(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ResNet-50 state dict in the layout above from `path`, float32, checked strictly against
    `ResNet50` (class count from `fc.weight`)."""
    return read_2d_classifier(path, lambda n: ResNet50(num_classes=n), "ImageNet-layout ResNet-50")
