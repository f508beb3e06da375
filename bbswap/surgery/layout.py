"""Modules that put a feature map back in NCHW order.

A hierarchical transformer's stages may hold their maps as N x H x W x C (torchvision's
and timm's Swin, ConvNeXt-style blocks); a backbone cut after such a stage returns its
map channels first, as every CNN's, before a projection. The emitted file carries the
classes a patched model uses, copied from this module.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelsFirst(nn.Module):
    """An N x H x W x C map as N x C x H x W (the same values, no copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


LAYOUT_CLASSES: tuple[type[nn.Module], ...] = (ChannelsFirst,)
