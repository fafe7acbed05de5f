"""ConvNet+LSTM baseline (the paper's section 2.1): Inception-v1 (BN) on every frame, its features
after the last average pool fed to an LSTM with 512 hidden units, then a fully connected classifier.

The paper trains with cross-entropy on the outputs at every time step and predicts from the last
one, on 25 RGB frames kept one in five from the 25 fps stream (50 at test). "An LSTM layer with
batch normalisation": our choice is BatchNorm1d on the LSTM's input (the 1024-d frame features,
statistics over batch and time); the LSTM itself is torch's. 400 classes give 8.97M parameters
(Table 1: 9M). Input float32 (N, 3, T, H, W) in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from quovadis.models.googlenet import GoogLeNetBN, imagenet_trunk
from quovadis.models.i3d import BN_EPS, FEATURE_DIM
from quovadis.models.weights import load_weights

HIDDEN = 512


class ConvNetLSTM(nn.Module):
    """GoogLeNetBN per frame -> BN -> LSTM(1024 -> 512) -> Linear(512 -> classes) per step."""

    def __init__(self, *, num_classes: int = 400) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cnn = GoogLeNetBN(num_classes=1)  # only forward_features / pooled features are used
        del self.cnn.fc, self.cnn.dropout  # the ImageNet classifier is not part of this model
        self.bn = nn.BatchNorm1d(FEATURE_DIM, eps=BN_EPS)
        self.lstm = nn.LSTM(FEATURE_DIM, HIDDEN, batch_first=True)
        self.fc = nn.Linear(HIDDEN, num_classes)

    def load_imagenet(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The Inception-v1 from an ImageNet GoogLeNet state dict (`read_googlenet`), strictly;
        BN, LSTM and classifier keep their fresh initialisation."""
        load_weights(self.cnn, imagenet_trunk(state_dict))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) -> LSTM outputs (N, T, 512)."""
        n, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)  # (N*T, 3, H, W)
        f = self.cnn.forward_features(frames).mean((2, 3))  # (N*T, 1024): the last average pool
        f = self.bn(f).view(n, t, FEATURE_DIM)  # (N, T, 1024)
        return self.lstm(f)[0]  # (N, T, 512)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """LSTM outputs (N, T, 512) -> per-step logits (N, T, classes), or them unchanged."""
        return x if pre_logits else self.fc(x)

    def per_time_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) -> (N, T, classes): every step's logits, for the training loss."""
        return self.forward_head(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) -> the last step's logits (N, classes), the paper's prediction."""
        return self.per_time_logits(x)[:, -1]
