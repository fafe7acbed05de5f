"""Two-Stream baseline (the paper's section 2.3, after Simonyan & Zisserman 2014): two ImageNet
Inception-v1 (BN) networks, one on a single RGB frame, one on a stack of 10 optical flow fields,
their predictions averaged.

The flow network's first convolution takes 20 channels (x, y of each field, field-major); from an
ImageNet checkpoint it is initialised by the cross-modality rule (`googlenet.imagenet_trunk`).
At test the paper averages 25 snapshots per video; that is the caller's loop. 400 classes give
12.07M parameters (Table 1: 12M). Inputs float32 in [-1, 1]: rgb (N, 3, H, W), flow
(N, 2, 10, H, W) in the project's flow layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from quovadis.models.googlenet import GoogLeNetBN, imagenet_trunk
from quovadis.models.weights import load_weights

FLOW_FIELDS = 10


def stack_flow(flow: torch.Tensor) -> torch.Tensor:
    """(N, 2, F, H, W) flow fields -> (N, 2F, H, W) channels x0, y0, x1, y1, ..."""
    n, c, f, h, w = flow.shape
    return flow.transpose(1, 2).reshape(n, f * c, h, w)


class TwoStream2D(nn.Module):
    """RGB GoogLeNetBN and flow GoogLeNetBN (20 input channels); logits averaged."""

    def __init__(self, *, num_classes: int = 400, flow_fields: int = FLOW_FIELDS) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.rgb = GoogLeNetBN(num_classes=num_classes)
        self.flow = GoogLeNetBN(num_classes=num_classes, in_channels=2 * flow_fields)

    def load_imagenet(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Both streams from one ImageNet GoogLeNet state dict (`read_googlenet`) except the
        classifiers, which stay freshly initialised (`num_classes` rows)."""
        for stream in (self.rgb, self.flow):
            fc = {f"fc.{k}": v for k, v in stream.fc.state_dict().items()}
            load_weights(stream, {**imagenet_trunk(state_dict, stream.conv1.conv.in_channels), **fc})

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """rgb (N, 3, H, W), flow (N, 2, 10, H, W) -> the two streams' logits averaged (N, classes)."""
        return (self.rgb(rgb) + self.flow(stack_flow(flow))) / 2  # (N, classes)
