"""Run a model on the meta device for its output shape alone, in milliseconds.

Nothing is allocated, so a size costs the same whatever it is. torch's own meta kernels
for convolutions and poolings import its symbolic-shape and compiler stacks on first
use, which costs seconds; the tracer's shape formulas (:func:`meta_result`: PyTorch's
size arithmetic applied to the arguments of each call as the model makes it) give the
same shapes at once, and any call they do not cover runs through torch itself; a call
bound to fail (tensors that do not concatenate, say) raises at once. Unlike a trace,
nothing is recorded.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from bbswap.tracing.spatial_ops import SPATIAL, meta_refusal, meta_result


def on_meta(model: nn.Module) -> bool:
    """Whether every parameter, buffer and tensor attribute of ``model`` is on meta."""
    tensors = [
        t
        for m in model.modules()
        for t in (*m._parameters.values(), *m._buffers.values(), *vars(m).values())
        if isinstance(t, torch.Tensor)
    ]
    return bool(tensors) and all(t.is_meta for t in tensors)


def any_on_meta(model: nn.Module) -> bool:
    """Whether any parameter, buffer or tensor attribute of ``model`` is still on meta
    (a buffer left out of the state dict, say, after loading real weights)."""
    return any(
        isinstance(t, torch.Tensor) and t.is_meta
        for m in model.modules()
        for t in (*m._parameters.values(), *m._buffers.values(), *vars(m).values())
    )


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer on the meta device: its weights
    are neither copied nor shared."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and id(t) not in memo:
                twin = t.detach().to("meta")
                if isinstance(t, nn.Parameter):
                    twin = nn.Parameter(twin, requires_grad=t.requires_grad)
                memo[id(t)] = twin
    return copy.deepcopy(model, memo)


class _Shapes(TorchFunctionMode):
    """Give each covered call on meta tensors its result from shapes alone."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's protocol
        kwargs = kwargs or {}
        name = getattr(func, "__name__", type(func).__name__)
        parse = SPATIAL.get(name)
        x = args[0] if args else kwargs.get("input")
        spatial = None
        if parse is not None and isinstance(x, torch.Tensor) and x.is_meta and x.dim() >= 3:
            spatial = parse(args, kwargs)
        out = meta_result(name, args, kwargs, spatial)
        if out is not None:
            return out
        refusal = meta_refusal(name, args, kwargs, spatial)
        if refusal:
            raise RuntimeError(f"on the meta device: {refusal}")
        return func(*args, **kwargs)


def run_on_meta(model: nn.Module, input_shape: Sequence[int]) -> Any:
    """The output of ``model`` (built on the meta device) for an input of this shape,
    in meta tensors. The model runs as it is (the caller sets eval mode)."""
    with torch.no_grad(), torch.device("meta"), _Shapes():
        return model(torch.empty(tuple(input_shape)))
