"""3D-Fused Two-Stream baseline (the paper's section 2.4, after Feichtenhofer et al., CVPR 2016):
two Inception-v1 (BN) streams, their last convolutional grids fused by a small 3D ConvNet.

Inputs: 5 RGB frames sampled 10 apart and, for each, its snippet of 10 flow fields. Each frame
(or 20-channel flow stack) goes through its stream's Inception-v1 up to the layer before the last
average pool (1024 x 7 x 7 at 224x224); the per-frame grids stacked in time (5 x 7 x 7) of both
streams are concatenated (2048 channels) and passed through a 3x3x3 convolution with 512 outputs,
a 3x3x3 3D max-pool and a fully connected layer; the new layers are initialised with Gaussian
noise and the whole model is trained end to end. Our choices where the paper is silent: the
convolution pads by 1 and has a bias and a ReLU; the max-pool is TF "SAME" with stride 2; the FC
is applied to the average over the pooled (t, y, x) positions (equal to averaging it over the
positions), so test clips of 25 frames give one prediction. 400 classes give 39.77M parameters
(Table 1: 39M). Inputs float32 in [-1, 1]: rgb (N, 3, T, H, W), flow (N, 2, 10 T, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quovadis.models.googlenet import GoogLeNetBN, imagenet_trunk
from quovadis.models.i3d import FEATURE_DIM
from quovadis.models.padding import MaxPoolSame
from quovadis.models.two_stream import FLOW_FIELDS
from quovadis.models.weights import load_weights

FUSED_CHANNELS = 512
INIT_STD = 0.01  # Gaussian init of the new layers


class Fused3D(nn.Module):
    """Two GoogLeNetBN trunks -> concat (2048, T, 7, 7) -> 3x3x3 conv 512 -> 3x3x3 max-pool -> FC."""

    def __init__(self, *, num_classes: int = 400, dropout: float = 0.5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.rgb = GoogLeNetBN(num_classes=1)
        self.flow = GoogLeNetBN(num_classes=1, in_channels=2 * FLOW_FIELDS)
        for trunk in (self.rgb, self.flow):
            del trunk.fc, trunk.dropout  # only the grids before the average pool are used
        self.fuse = nn.Conv3d(2 * FEATURE_DIM, FUSED_CHANNELS, 3, padding=1)
        self.pool = MaxPoolSame((3, 3, 3), (2, 2, 2))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(FUSED_CHANNELS, num_classes)
        for layer in (self.fuse, self.fc):
            nn.init.normal_(layer.weight, std=INIT_STD)
            nn.init.zeros_(layer.bias)

    def load_imagenet(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Both trunks from an ImageNet GoogLeNet state dict (`read_googlenet`), strictly, the flow
        trunk's conv1 by the cross-modality rule; the new layers keep their Gaussian init."""
        load_weights(self.rgb, imagenet_trunk(state_dict))
        load_weights(self.flow, imagenet_trunk(state_dict, 2 * FLOW_FIELDS))

    @staticmethod
    def _grids(trunk: GoogLeNetBN, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) frames -> (N, 1024, T, h, w) the trunk's per-frame grids."""
        n, c, t, h, w = x.shape
        g = trunk.forward_features(x.transpose(1, 2).reshape(n * t, c, h, w))  # (N*T, 1024, 7, 7)
        return g.view(n, t, *g.shape[1:]).transpose(1, 2)  # (N, 1024, T, 7, 7)

    @staticmethod
    def snippets(flow: torch.Tensor, frames: int) -> torch.Tensor:
        """(N, 2, 10 T, H, W) flow fields -> (N, 20, T, H, W): RGB frame t's snippet is fields
        10t .. 10t + 9, stacked x0, y0, x1, y1, ... (`two_stream.stack_flow`)."""
        n, c, tf, h, w = flow.shape
        if tf != FLOW_FIELDS * frames:
            raise ValueError(f"need {FLOW_FIELDS} flow fields per RGB frame, got {tf} for {frames} frames")
        x = flow.view(n, c, frames, FLOW_FIELDS, h, w).permute(0, 2, 3, 1, 4, 5)  # (N, T, 10, 2, H, W)
        return x.reshape(n, frames, FLOW_FIELDS * c, h, w).transpose(1, 2)  # (N, 20, T, H, W)

    def forward_features(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """rgb (N, 3, 5, 224, 224), flow (N, 2, 50, 224, 224) -> pooled (N, 512, 3, 4, 4)."""
        snippets = self.snippets(flow, rgb.shape[2])  # (N, 20, 5, 224, 224)
        x = torch.cat([self._grids(self.rgb, rgb), self._grids(self.flow, snippets)], 1)  # (N, 2048, 5, 7, 7)
        x = F.relu(self.fuse(x), inplace=True)  # (N, 512, 5, 7, 7)
        return self.pool(x)  # (N, 512, 3, 4, 4)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """pooled grid -> features (N, 512) averaged over positions, or logits (N, classes)."""
        x = x.mean((2, 3, 4))  # (N, 512)
        return x if pre_logits else self.fc(self.dropout(x))

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(rgb, flow))
