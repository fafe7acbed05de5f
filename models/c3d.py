"""3D-ConvNet baseline (the paper's section 2.2, "3D ConvNets"): C3D (Tran et al., ICCV 2015) with
batch normalisation, trained from scratch.

The paper's variant: 8 convolutional layers, 5 pooling layers and 2 fully connected layers on
16-frame 112x112 RGB clips, BatchNorm after every convolutional and fully connected layer, and a
temporal stride of 2 (instead of 1) in the first pooling layer. Our choices where the paper is
silent: pool1 is 2x2x2 with stride 2 (C3D's is 1x2x2); every pool is TF "SAME" (`models.padding`),
so pool5 turns the (1, 7, 7) map of a 16-frame clip into (1, 4, 4), the 8192 inputs of C3D's fc6;
dropout 0.5 after fc6 and fc7 as in C3D. Convolutions have no bias (BN follows). 400 classes give
79.7M parameters (Table 1: 79M). Input float32 (N, 3, 16, 112, 112) in [-1, 1]; `clip_frames` and
`crop` build the same network for other clip sizes (tiny ones in tests), fc6 sized to their pool5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quovadis.models.i3d import BN_EPS
from quovadis.models.padding import MaxPoolSame

CLIP_FRAMES = 16
CROP = 112
# (name, input channels, output channels) of the 8 convolutions, each followed by its block's pool
CONVS: tuple[tuple[str, int, int], ...] = (
    ("conv1a", 3, 64),
    ("conv2a", 64, 128),
    ("conv3a", 128, 256),
    ("conv3b", 256, 256),
    ("conv4a", 256, 512),
    ("conv4b", 512, 512),
    ("conv5a", 512, 512),
    ("conv5b", 512, 512),
)
FC_DIM = 4096
POOLS = 5  # each halves time and space, rounding up (SAME)


def pool5_size(size: int) -> int:
    """A time or space size after the five stride-2 SAME pools: 16 -> 1, 112 -> 4."""
    for _ in range(POOLS):
        size = -(-size // 2)
    return size


class ConvBN3d(nn.Module):
    """3x3x3 Conv3d (stride 1, padding 1, no bias) -> BatchNorm3d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class C3D(nn.Module):
    """C3D with BatchNorm; shapes below for (N, 3, 16, 112, 112)."""

    def __init__(self, *, num_classes: int = 400, dropout: float = 0.5, clip_frames: int = CLIP_FRAMES,
                 crop: int = CROP) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.clip_frames, self.crop = num_classes, clip_frames, crop
        self.convs = nn.ModuleDict({name: ConvBN3d(cin, cout) for name, cin, cout in CONVS})
        self.pool1 = MaxPoolSame((2, 2, 2), (2, 2, 2))  # the paper's temporal stride 2
        self.pools = nn.ModuleList([MaxPoolSame((2, 2, 2), (2, 2, 2)) for _ in range(4)])  # pool2..pool5
        self.fc6 = nn.Linear(512 * pool5_size(clip_frames) * pool5_size(crop) ** 2, FC_DIM, bias=False)  # 8192 in
        self.bn6 = nn.BatchNorm1d(FC_DIM, eps=BN_EPS)
        self.fc7 = nn.Linear(FC_DIM, FC_DIM, bias=False)
        self.bn7 = nn.BatchNorm1d(FC_DIM, eps=BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc8 = nn.Linear(FC_DIM, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 16, 112, 112) -> pool5 output (N, 512, 1, 4, 4)."""
        c = self.convs
        x = self.pool1(c["conv1a"](x))  # (N, 64, 8, 56, 56)
        x = self.pools[0](c["conv2a"](x))  # (N, 128, 4, 28, 28)
        x = self.pools[1](c["conv3b"](c["conv3a"](x)))  # (N, 256, 2, 14, 14)
        x = self.pools[2](c["conv4b"](c["conv4a"](x)))  # (N, 512, 1, 7, 7)
        return self.pools[3](c["conv5b"](c["conv5a"](x)))  # (N, 512, 1, 4, 4)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """pool5 output -> fc7 features (N, 4096) or logits (N, classes)."""
        x = x.flatten(1)  # (N, 8192)
        x = self.dropout(F.relu(self.bn6(self.fc6(x)), inplace=True))  # (N, 4096)
        x = F.relu(self.bn7(self.fc7(x)), inplace=True)  # (N, 4096)
        return x if pre_logits else self.fc8(self.dropout(x))  # (N, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or tuple(x.shape[1:]) != (3, self.clip_frames, self.crop, self.crop):
            raise ValueError(f"C3D expects input (N, 3, {self.clip_frames}, {self.crop}, {self.crop}), "
                             f"got shape {tuple(x.shape)}")  # fmt: skip
        return self.forward_head(self.forward_features(x))
