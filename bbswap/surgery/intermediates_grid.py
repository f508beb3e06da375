"""A timm model whose features are tokens, as a backbone of one feature map: the grid its
own ``forward_intermediates`` lays them on.

EVA, BEiT, XCiT, the rotary-embedding ViTs (DINOv3, PE, ...) or MViTv2 end in tokens, and
the code that gives them their positions (a rotary or relative embedding built for each
grid, a class-attention stage) runs in the model's own forward, where torch.fx cannot
write it out. timm's ``forward_intermediates`` runs that code and returns the last
block's tokens on the grid of patches in NCHW, prefix tokens dropped, as timm's
``features_only`` models do. :class:`IntermediatesGrid` calls it: the emitted file calls
the same method of the model timm builds, so the code stays timm's.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
from torch import fx, nn

# the child that holds the timm model, and so the prefix of its state_dict keys
MODEL = "body"


def call_arguments(model: nn.Module) -> dict[str, Any]:
    """The arguments ``forward_intermediates`` is called with: the last block alone, its
    final norm applied (as ``forward_features`` does), the tokens in NCHW, nothing else."""
    method = type(model).forward_intermediates  # type: ignore[attr-defined]  # timm models have it (checked by the caller)
    taken = inspect.signature(method).parameters
    wanted = {"indices": 1, "norm": True, "output_fmt": "NCHW", "intermediates_only": True}
    return {k: v for k, v in wanted.items() if k in taken or k == "indices"}


class IntermediatesGrid(nn.Module):
    """A timm model's last block, its tokens on their grid (N, C, H', W'), by the model's
    own ``forward_intermediates``; the classifier head it does not run is pruned."""

    body: Any  # the timm model, of its own class

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.arguments = call_arguments(model)
        prune = getattr(model, "prune_intermediate_layers", None)
        if callable(prune):
            prune(indices=1, prune_norm=False, prune_head=True)
        self.add_module(MODEL, model)
        # one line for the inspect output and the emitted file's docstring
        self.intermediates_note = (
            f"tokens on their grid by {type(model).__name__}.forward_intermediates "
            "(the last block, prefix tokens dropped, NCHW)"
        )
        cfg = getattr(model, "pretrained_cfg", None)  # where timm's own weights came from
        if cfg is not None:
            self.pretrained_cfg = cfg

    @property
    def dynamic_img_size(self) -> bool:
        """timm's switch, as the model has it: its embedding resized to each grid."""
        return getattr(self.body, "dynamic_img_size", False) is True

    @staticmethod
    def prune_line(base: str) -> str:
        """The statement the emitted file prunes its model with, as ``__init__`` does."""
        return f"{base}.prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_intermediates(x, **self.arguments)[-1]

    def graph(self) -> fx.Graph:
        """The forward as a graph, written by hand: torch.fx would trace into timm's method
        (which it cannot write out), where the emitted forward only calls it."""
        graph = fx.Graph()
        x = graph.placeholder("x")
        model = graph.get_attr(MODEL)
        tokens = graph.call_method("forward_intermediates", (model, x), dict(self.arguments))
        graph.output(graph.call_function(operator.getitem, (tokens, -1)))
        return graph
