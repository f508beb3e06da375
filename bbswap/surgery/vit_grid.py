"""A plain ViT as a backbone of one feature map: its tokens laid back on their grid.

:class:`ViTGrid` runs a timm or torchvision ViT's own modules, under their own names
(so its state_dict keys are the ViT's, less the classifier head), on any input of at
least one patch: the patch conv floors the input to whole patches, the position
embedding is interpolated to that grid (its prefix rows kept as they are), the prefix
tokens are dropped after the last norm and the tokens are laid on the grid in NCHW.

Its forward branches on nothing but the layout, so ``torch.fx`` writes it out: the
emitted file's forward is this one, on the modules of the model its library builds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bbswap.tracing.vit_grid import ViTFamily, ViTLayout, recognise


class ViTGrid(nn.Module):
    """A timm or torchvision ViT's patch, position and block modules, its tokens returned
    on their grid (N, dim, H // patch, W // patch)."""

    # the ViT's own modules, of its library's classes (timm, then torchvision)
    patch_embed: Any
    pos_drop: Any
    patch_drop: Any
    norm_pre: Any
    blocks: Any
    norm: Any
    conv_proj: Any
    encoder: Any

    def __init__(self, vit: nn.Module, layout: ViTLayout) -> None:
        super().__init__()
        self.vit_layout = layout
        names: tuple[str, ...] = ("conv_proj", "encoder")
        if layout.family is ViTFamily.TIMM:
            names = ("patch_embed", "pos_drop", "patch_drop", "norm_pre", "blocks", "norm")
        for name in names:
            self.add_module(name, getattr(vit, name))
        for name in (*layout.prefix_names, "pos_embed"):
            if isinstance(getattr(vit, name, None), nn.Parameter):
                self.register_parameter(name, getattr(vit, name))
        cfg = getattr(vit, "pretrained_cfg", None)  # where timm's own weights came from
        if cfg is not None:
            self.pretrained_cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vit_layout.family is ViTFamily.TIMM:
            patches = self.patch_embed.proj(x)
            tokens = self.patch_embed.norm(patches.flatten(2).transpose(1, 2))
            tokens = self._embed(tokens, patches, getattr(self, "pos_embed", None))
            tokens = self.norm_pre(self.patch_drop(self.pos_drop(tokens)))
            tokens = self.norm(self.blocks(tokens))
        else:
            patches = self.conv_proj(x)
            tokens = self._embed(
                patches.flatten(2).transpose(1, 2), patches, self.encoder.pos_embedding
            )
            tokens = self.encoder.ln(self.encoder.layers(self.encoder.dropout(tokens)))
        # the prefix tokens dropped, the others laid back on the patches' grid (NCHW)
        return tokens[:, self.vit_layout.prefix :].transpose(1, 2).unflatten(2, patches.shape[2:])

    def _embed(
        self, tokens: torch.Tensor, patches: torch.Tensor, position: torch.Tensor | None
    ) -> torch.Tensor:
        """The prefix tokens and the position embedding, in the order the ViT adds them."""
        layout = self.vit_layout
        prefix = [getattr(self, n).expand(patches.shape[0], -1, -1) for n in layout.prefix_names]
        if position is None or layout.grid is None:
            return torch.cat([*prefix, tokens], dim=1) if prefix else tokens
        rows = layout.pos_prefix
        cells = position[:, rows:].reshape(1, layout.grid[0], layout.grid[1], layout.dim)
        cells = F.interpolate(
            cells.permute(0, 3, 1, 2),
            size=patches.shape[2:],
            mode=layout.mode,
            align_corners=layout.align_corners,
            antialias=layout.antialias,
        )
        cells = cells.flatten(2).transpose(1, 2)
        if rows == 0:  # the embedding holds no prefix rows: add it, then put the prefix first
            tokens = tokens + cells
            return torch.cat([*prefix, tokens], dim=1) if prefix else tokens
        position = torch.cat([position[:, :rows], cells], dim=1)
        return torch.cat([*prefix, tokens], dim=1) + position


def token_grid(model: nn.Module) -> nn.Module:
    """A recognised ViT as a :class:`ViTGrid`; any other model as it is."""
    layout = recognise(model)
    return ViTGrid(model, layout) if layout is not None else model
