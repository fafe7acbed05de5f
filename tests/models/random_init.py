"""Random BatchNorm statistics and affine parameters, and a classifier bias, for models under test."""

from __future__ import annotations

import torch
from torch import nn


def randomize(model: nn.Module) -> nn.Module:
    """So that every parameter matters (default BN is the identity up to eps); seeded, returns `model`."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
        if isinstance(m, nn.Linear):
            m.bias.data.uniform_(-1, 1)
    return model
