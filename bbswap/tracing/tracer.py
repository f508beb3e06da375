"""Trace a backbone with a dummy input and record its stages and spatial ops.

The model runs once on the meta device (or, for a model that already holds real
weights, under ``FakeTensorMode``), so no activation is ever allocated: a 4096x4096
input costs what a 224x224 one does. A ``TorchFunctionMode`` sees every torch call,
module-based or functional, including a functional pooling inside a child's forward;
module hooks keep the stack of module paths so every call knows its owner.

From that one run the trace derives, per tensor, the receptive field, the cumulative
stride along each axis and the chain of size-changing ops that produced it, and, per
module, params, MACs and activation bytes. Only when a model cannot run without real
data does the trace fall back to real CPU tensors, and it says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten

from bbswap.backbones.guard import user_code
from bbswap.errors import ModelError, NotACNN
from bbswap.kinds import Device, Layout
from bbswap.records import dims, short_count
from bbswap.tracing import layouts
from bbswap.tracing.ids import call_id
from bbswap.tracing.mask import MaskRule, MaskTrace, all_ones_mask, follow, mask_input
from bbswap.tracing.outputs import (
    Output,
    OutputKey,
    choose_output,
    default_output,
    describe_outputs,
    refuse_single,
    returned,
)
from bbswap.tracing.sizes import SizeRule, SizeStep, chain_size, min_size, size_rule
from bbswap.tracing.spatial_ops import (
    SPATIAL,
    Pair,
    SpatialArgs,
    dynamic_same,
    is_module_call,
    macs,
    meta_result,
    space_to_depth,
)
from bbswap.tracing.vit_grid import grid_note, grid_of, recognise

Shape = tuple[int, ...]


@dataclass(frozen=True)
class SpatialOp:
    """One call of a conv, pooling, padding or resampling function.

    ``id`` is how recipes name it: the module path for a spatial module
    (``layer2.0.conv2``), or ``owner.func()`` for a functional call made in a
    module's forward (``trans1.avg_pool2d()``; ``max_pool2d()`` in the model's own
    forward; ``#k`` is appended for the k-th further call of the same function).
    """

    id: str
    owner: str
    kind: str  # "module" or "functional"
    op: str
    func: str
    call: int
    kernel: Pair
    stride: Pair
    padding: Pair | str
    dilation: Pair
    ceil_mode: bool
    in_shape: Shape
    out_shape: Shape
    stage: str
    steps_h: tuple[SizeStep, ...]
    steps_w: tuple[SizeStep, ...]
    order: int
    in_chain: tuple[str, ...] = ()  # ids of the size-changing ops that led to its input
    same: bool = False  # pads itself per input size ('same' as in TF): ceil(size / stride)

    @property
    def in_hw(self) -> Pair:
        return (self.in_shape[-2], self.in_shape[-1])

    @property
    def out_hw(self) -> Pair:
        return (self.out_shape[-2], self.out_shape[-1])

    @property
    def rounding(self) -> str:
        """``ceil``, ``floor``, or ``whole`` for a reshape that takes only whole blocks; a
        strided slice or a patch merging padded per size takes ``ceil(size / stride)``."""
        if self.op == "space-to-depth":
            return "whole"
        if self.op in ("slice", "patch-merge"):
            return "ceil"
        return "ceil" if self.ceil_mode else "floor"

    @property
    def reduces(self) -> bool:
        """Whether this op shrinks H or W at the traced size."""
        return self.out_hw[0] < self.in_hw[0] or self.out_hw[1] < self.in_hw[1]

    @property
    def changes_size(self) -> bool:
        """Whether this op changes H or W for some input size (not just this one)."""
        strided = any(s.kind != "window" or s.stride != 1 for s in self.steps_h + self.steps_w)
        return strided or self.out_hw != self.in_hw


@dataclass(frozen=True)
class Stage:
    """One row of the stage table: a module (or a functional call) and what it costs."""

    path: str
    type: str
    out_shape: Shape
    downsample: tuple[float, float]
    receptive_field: tuple[int, int]
    params: int
    macs: int
    activation_bytes: int
    chain: tuple[str, ...] = ()  # ids of the size-changing ops that led to this output
    functional: bool = False
    layout: Layout = Layout.NCHW  # where its output holds the image grid, if it does
    grid: tuple[int, int] | None = None  # the H and W of that grid (of the last map before)

    @property
    def spatial(self) -> bool:
        """A 4-d map on the image grid: NCHW, or NHWC (Swin, ConvNeXt-style blocks)."""
        return len(self.out_shape) == 4 and self.layout in layouts.GRIDS

    @property
    def channels(self) -> int:
        """Dim 1 of an NC... output, the last dim of an NHWC map or of tokens; the size of
        a 1-d one; 1 for a scalar."""
        return layouts.channels(self.out_shape, self.layout)


@dataclass(frozen=True)
class Trace:
    """Everything one traced forward pass tells about a backbone."""

    input_shape: Shape
    output_shape: Shape
    stages: tuple[Stage, ...]
    ops: tuple[SpatialOp, ...]
    chain: tuple[str, ...]  # ids of the size-changing ops on the path to the output
    downsample: tuple[float, float]
    receptive_field: tuple[int, int]
    params: int
    macs: int
    activation_bytes: int
    device: Device
    note: str  # why the trace fell back to real tensors, or ""
    children: tuple[str, ...]  # top-level children in execution order
    modules: tuple[str, ...]  # every module path in execution order
    depth: int
    module_stages: tuple[Stage, ...] = ()  # a row for every called module, any depth
    attention: str = ""  # the first module whose forward multiplies two activations
    # what ties the model to one input size (a positional embedding of fixed size, a linear
    # layer across the tokens), and the module whose forward does it; "" if nothing does
    fixed_size: str = ""
    fixed_size_at: str = ""
    fixed_size_brief: str = ""  # its refusal's short form: what it is that fixes the size
    # a model with attention that fails at twice its input size: why, and the stage its
    # forward had reached there (its size rule holds at the traced size only); "" if not
    one_size: str = ""
    one_size_at: str = ""
    features_at: str = ""  # the outermost module whose output forward_features returns
    # a forward that returns several tensors: each of them, what holds them ("tuple",
    # "list" or "dict"), which one the output fields describe and whether it was asked for
    outputs: tuple[Output, ...] = ()
    returns: str = ""
    output_key: OutputKey | None = None
    output_given: bool = False
    mask: MaskTrace | None = None  # a forward of (img, img_mask): what it made of the mask

    def select_output(self, key: OutputKey | None, name: str = "the model") -> Trace:
        """This trace with its output fields describing the output ``key`` (an index or a
        dict key; None: the default, the one with the largest downsample)."""
        if not self.outputs:
            refuse_single(key, name)
            return self
        o = choose_output(self.outputs, self.returns, key, name)
        return replace(
            self,
            output_shape=o.shape,
            chain=o.chain,
            downsample=o.downsample,
            receptive_field=o.receptive_field,
            output_key=o.key,
            output_given=key is not None,
        )

    def __repr__(self) -> str:
        """The summary line, not the data: ``Trace(1x3x224x224 -> 1x1000, 11 stages, ...)``."""
        return (
            f"Trace({dims(self.input_shape)} -> {dims(self.output_shape)}, "
            f"{len(self.stages)} stages, {len(self.reductions)} reductions, "
            f"{short_count(self.params)} params, {short_count(self.macs)} MACs, {self.device})"
        )

    def stage(self, path: str) -> Stage | None:
        """The row of a stage or of any called module."""
        for s in (*self.stages, *self.module_stages):
            if s.path == path:
                return s
        return None

    @property
    def reductions(self) -> tuple[SpatialOp, ...]:
        return tuple(op for op in self.ops if op.reduces)

    def op(self, op_id: str) -> SpatialOp:
        for op in self.ops:
            if op.id == op_id:
                return op
        raise KeyError(op_id)

    def steps(self, axis: int, chain: tuple[str, ...] | None = None) -> tuple[SizeStep, ...]:
        """The size steps along a chain (default: the output's) for axis 0 (H) or 1 (W)."""
        by_id = {op.id: op for op in self.ops}
        ids = self.chain if chain is None else chain
        return tuple(s for i in ids for s in (by_id[i].steps_h if axis == 0 else by_id[i].steps_w))

    def output_size(self, h: int, w: int, chain: tuple[str, ...] | None = None) -> Pair:
        """The output H, W predicted from the reduction chain for another input size."""
        return (chain_size(self.steps(0, chain), h), chain_size(self.steps(1, chain), w))

    def size_rules(self, chain: tuple[str, ...] | None = None) -> tuple[SizeRule, SizeRule]:
        return (size_rule(self.steps(0, chain)), size_rule(self.steps(1, chain)))

    def min_input(self) -> Pair:
        """The smallest input H and W with which every spatial op gets at least one pixel:
        branches off the output's path (a gate pooled by 2) may need more than it does."""
        sizes = [1, 1]
        paths = {self.chain} | {(*o.in_chain, o.id) for o in self.ops}
        for path in paths:
            for axis in range(2):
                sizes[axis] = max(sizes[axis], min_size(self.steps(axis, path)))
        return (sizes[0], sizes[1])

    @property
    def features(self) -> Stage | None:
        """The last spatial stage when the output itself is not spatial (a classifier):
        the one a ``forward_features`` method returns (timm's convention: the rest is
        the head, a ``pre_logits`` block included), else the last one no adaptive pooling
        has sized."""
        if len(self.output_shape) == 4:
            return None
        by_id = {op.id: op for op in self.ops}
        spatial = [
            s
            for s in self.stages
            if s.spatial and not any(by_id[i].op.startswith("adaptive") for i in s.chain)
        ]
        at = self.features_at
        named = [s for s in spatial if at and (s.path == at or s.path.startswith(f"{at}."))]
        return named[-1] if named else spatial[-1] if spatial else None


@dataclass
class _TensorInfo:
    rf: tuple[float, float] = (1.0, 1.0)
    jump: tuple[float, float] = (1.0, 1.0)
    chain: tuple[str, ...] = ()
    fixed: bool = False  # sized by the call, not the input (adaptive pool, interpolate to size)
    hw: Pair | None = None  # H and W of the last 4-D feature map on the way here
    layout: Layout = Layout.NONE  # where this tensor holds that grid, if it does
    last: Layout = Layout.NCHW  # the layout of that last map
    padded: bool = False  # just padded: by a padding computed per size, to whole windows
    # the chain and grid before the last padding of the map: a crop back to that grid (a
    # window attention's x[:, :H, :W]) undoes the padding, whatever it was at this size
    before_pad: tuple[tuple[str, ...], Pair] | None = None
    weights: bool = False  # made from parameters alone (a position embedding resized)
    scores: bool = False  # a product of activations shaped like a map: attention, no map


@dataclass
class _Call:
    owner: str
    name: str
    call: int
    out: torch.Tensor
    info: _TensorInfo
    macs: int
    act_bytes: int
    order: int


@dataclass
class _ModuleStats:
    path: str
    type: str
    order: int
    macs: int = 0
    act_bytes: int = 0
    out: Any = None
    calls: int = 0


@dataclass
class _Recorder:
    """Mutable state of one traced run."""

    model: nn.Module
    stack: list[str] = field(default_factory=list)
    modules: dict[str, _ModuleStats] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    info: dict[int, _TensorInfo] = field(default_factory=dict)
    keep: list[torch.Tensor] = field(default_factory=list)  # ids stay unique while alive
    ops: dict[str, SpatialOp] = field(default_factory=dict)
    calls: list[_Call] = field(default_factory=list)  # shape-changing functional calls
    clock: int = 0
    by_path: dict[str, nn.Module] = field(default_factory=dict)
    attention: str | None = None
    # what ties it to one input size, where, and the refusal's short form
    fixed_size: tuple[str, str, str] | None = None
    features_out: torch.Tensor | None = None  # what the model's forward_features returned
    total_macs: int = 0
    total_act: int = 0
    # tensors made from a mask input (an encoder's ``img_mask``): the slice rule of each
    # (None once another call made it) and that call
    masks: dict[int, tuple[MaskRule | None, str]] = field(default_factory=dict)
    batch: int = 1  # the input's

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def tensor_info(self, t: torch.Tensor) -> _TensorInfo:
        return self.info.get(id(t), _TensorInfo())

    def register(self, t: torch.Tensor, info: _TensorInfo) -> None:
        self.info[id(t)] = info
        self.keep.append(t)


def _tensors(obj: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _func_name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


_QUERIES = frozenset({"__get__", "size", "dim", "numel", "stride", "is_contiguous", "__len__"})


class _Mode(TorchFunctionMode):
    def __init__(self, rec: _Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's protocol
        kwargs = kwargs or {}
        name = _func_name(func)
        if name in _QUERIES:
            return func(*args, **kwargs)
        spatial = None
        parse = SPATIAL.get(name)
        x = args[0] if args else kwargs.get("input")
        if parse is not None and isinstance(x, torch.Tensor) and x.dim() >= 3:
            layout = self.rec.tensor_info(x).layout
            if layout in (Layout.NCHW, Layout.NONE):
                spatial = parse(args, kwargs)
            else:
                spatial = layouts.reparse(name, args, kwargs, layout)
        out = meta_result(name, args, kwargs, spatial)
        if out is None:
            out = func(*args, **kwargs)
        if self.rec.masks and self._follow_mask(name, args, kwargs, out):
            return out
        try:
            self._record(name, args, kwargs, out, spatial)
        except Exception as error:  # a bug in the tracer, not in the user's model
            raise _TracerBug(f"while recording {name}") from error
        return out

    def _follow_mask(self, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
        """Note what a call made only from mask tensors makes (it is no feature map);
        False for any other call."""
        rec = self.rec
        ins = _tensors((args, kwargs))
        made = [rec.masks[id(t)] for t in ins if id(t) in rec.masks]
        if not made or any(id(t) in rec.info for t in ins):
            return False
        rule, why = follow(made[0][0], name, args)
        if len(made) > 1:
            rule, why = None, name
        for t in _tensors(out):
            rec.masks[id(t)] = (rule, why or made[0][1])
            rec.keep.append(t)
        return True

    def _record(
        self, name: str, args: tuple, kwargs: dict, out: Any, spatial: SpatialArgs | None
    ) -> None:
        rec = self.rec
        ins = _tensors((args, kwargs))
        outs = _tensors(out)
        if not outs:
            return
        owner = rec.stack[-1] if rec.stack else ""
        if _from_weights(rec, ins):  # no stage, no reduction point: weights being shaped
            self._count(macs(name, args, kwargs, out), 0)
            for t in outs:
                rec.register(t, _TensorInfo(weights=True))
            return
        if rec.attention is None and _is_attention(name, ins):
            rec.attention = owner or "(the model's forward)"
        key = (owner, name)
        call = rec.counts.get(key, 0)
        rec.counts[key] = call + 1
        if spatial is not None and args and isinstance(args[0], torch.Tensor):
            # a window op's input decides: its kernel, even one computed from the input
            # (CondConv mixes its experts' kernels by a routing pooled to 1x1), is none
            ins = [args[0]]
        # activations only: weights and constants carry no size, stride or receptive field
        ins = [t for t in ins if id(t) in rec.info and not rec.info[id(t)].weights] or ins
        infos = [rec.tensor_info(t) for t in ins]
        if spatial is None:
            # A gate or bias broadcast over H and W (a squeeze-excitation scale) does not
            # decide the output's stride, chain or receptive field.
            infos = [i for t, i in zip(ins, infos) if not _broadcast(t, outs[0])] or infos
        infos = infos or [_TensorInfo()]
        # A branch sized by its call (a gate pooled to 1x1, or interpolated back to the
        # feature map's shape) does not decide the output's size: the other branch does.
        base = max(infos, key=lambda i: (not i.fixed, i.rf, len(i.chain)))
        jump = (max(i.jump[0] for i in infos), max(i.jump[1] for i in infos))
        query = layouts.query_first(name, args)
        if query is not None and id(query) in rec.info:  # its rows are the output's
            base = rec.info[id(query)]
            jump = base.jump
        info = replace(base, rf=(max(i.rf[0] for i in infos), max(i.rf[1] for i in infos)))
        info = replace(info, jump=jump)
        self._note_fixed_size(name, args, base, owner)
        grid = info.hw
        info = self._placed(name, args, spatial, owner, call, ins, outs[0], info)
        if _is_attention(name, ins) and not _keeps_map(rec, ins, outs[0], info.layout):
            # attention scores (windows x heads x tokens x tokens) are no map, even where
            # a window holds as many tokens as the grid has rows (8x8 windows on 64x64)
            info = replace(info, layout=Layout.NONE, hw=grid, scores=True)
        n_macs = macs(name, args, kwargs, out)
        new_bytes = sum(
            t.numel() * t.element_size()
            for t in outs
            if id(t) not in rec.info and all(t is not i for i in ins)
        )
        for t in outs:
            rec.register(t, info)
        self._count(n_macs, new_bytes)
        owner_module = rec.by_path.get(owner, rec.model)
        if not is_module_call(owner_module, name) and _changes_shape(ins, outs[0]):
            rec.calls.append(_Call(owner, name, call, outs[0], info, n_macs, new_bytes, rec.tick()))

    def _count(self, n_macs: int, new_bytes: int) -> None:
        """Add a call's MACs and new activation bytes to the totals and every open module."""
        rec = self.rec
        rec.total_macs += n_macs
        rec.total_act += new_bytes
        for path in rec.stack:
            stats = rec.modules[path]
            stats.macs += n_macs
            stats.act_bytes += new_bytes

    def _note_fixed_size(self, name: str, args: tuple, x: _TensorInfo, owner: str) -> None:
        """Keep the first call that ties the model to one input size."""
        rec = self.rec
        if rec.fixed_size is not None:
            return
        embedding = layouts.fixed_embedding(name, args, x.layout, x.hw)
        # timm's dynamic_img_size: the model resizes its embedding to any other grid, and
        # adds it as it is at the grid it was built for (the one traced here, by default)
        resized = getattr(rec.model, "dynamic_img_size", False) is True
        if embedding and not resized:
            at = f"at '{owner}'" if owner else "in the model's own forward"
            what = f"a positional embedding of fixed size ({embedding}) is added {at}"
            rec.fixed_size = (what, owner, FIXED_EMBEDDING)
        tokens = layouts.token_linear(name, args[0] if args else None, x.layout)
        if tokens:
            what = f"a linear layer at '{owner}' mixes the tokens, {tokens} of them, no more"
            rec.fixed_size = (what, owner, "fixed size: tokens")

    def _placed(
        self,
        name: str,
        args: tuple,
        spatial: SpatialArgs | None,
        owner: str,
        call: int,
        ins: list[torch.Tensor],
        y: torch.Tensor,
        info: _TensorInfo,
    ) -> _TensorInfo:
        """The output's info after the call's spatial op, if it makes one, with its layout
        and grid (see :mod:`bbswap.tracing.layouts`)."""
        info = replace(info, scores=False)  # scores are made by a product, kept below
        x = ins[0] if ins else None
        x_info = self.rec.tensor_info(x) if x is not None else _TensorInfo()
        in_shape = tuple(x.shape) if x is not None else None
        same_size = x is not None and x.numel() == y.numel()
        pads = spatial is not None and spatial.op == "pad" and x_info.layout in layouts.GRIDS
        padded = (x_info.padded and same_size) or layouts.zero_pad(spatial) or pads
        if spatial is not None and y.dim() >= 3 and in_shape is not None:
            lay: Layout = x_info.layout if x_info.layout is Layout.NHWC else Layout.NCHW
            shapes = (layouts.as_nchw(in_shape, lay), layouts.as_nchw(tuple(y.shape), lay))
            before = (info.chain, x_info.hw) if pads and x_info.hw is not None else None
            info = self._spatial(name, spatial, owner, call, *shapes, info)
            if y.dim() != 4:
                return replace(info, layout=Layout.NONE, padded=padded, before_pad=None)
            grid = layouts.grid_of(tuple(y.shape), lay)
            return replace(info, layout=lay, last=lay, hw=grid, padded=padded, before_pad=before)
        if name == "__getitem__" and x is not None and len(args) > 1:
            sa = layouts.slice_args(args[1], x, x_info.layout)
            if sa is not None and in_shape is not None:
                lay = x_info.layout
                shapes = (layouts.as_nchw(in_shape, lay), layouts.as_nchw(tuple(y.shape), lay))
                info = self._spatial(name, sa, owner, call, *shapes, info)
                grid = layouts.grid_of(tuple(y.shape), lay)
                return replace(info, layout=lay, last=lay, hw=grid, before_pad=None)
            undone = self._unpadded(x_info, y, info)
            if undone is not None:
                return undone
        if name in _RESHAPES and in_shape is not None and not padded:
            window = layouts.window_blocks(in_shape, tuple(y.shape), x_info.layout)
            if window is not None:
                nchw = layouts.as_nchw(in_shape, x_info.layout)
                sa = layouts.blocks_args(window)
                info = self._spatial(name, sa, owner, call, nchw, nchw, info)
        if name in _FOLDS and y.dim() in (3, 4):
            folded = self._folded(name, owner, call, y, info, padded)
            if folded is not info:
                return folded
        if x_info.scores and same_size:  # scaled, masked, softmax, dropout: still scores
            return replace(info, layout=Layout.NONE, scores=True)
        layout, grid = layouts.place(in_shape, x_info.layout, info.hw, y, info.last)
        last = layout if layout in layouts.GRIDS else info.last
        return replace(info, layout=layout, hw=grid, last=last, padded=padded)

    def _unpadded(self, x: _TensorInfo, y: torch.Tensor, info: _TensorInfo) -> _TensorInfo | None:
        """A crop of a padded map back to its grid before the padding: the chain and grid
        from before it (the padding, per input size, and the crop cancel out); None for
        any other slice."""
        if x.before_pad is None or x.layout not in layouts.GRIDS:
            return None
        chain, grid = x.before_pad
        if layouts.grid_of(tuple(y.shape), x.layout) != grid or y.dim() != 4:
            return None
        return replace(info, chain=chain, hw=grid, layout=x.layout, last=x.layout, before_pad=None)

    def _folded(
        self, name: str, owner: str, call: int, y: torch.Tensor, info: _TensorInfo, padded: bool
    ) -> _TensorInfo:
        """A ``view``/``reshape``/``flatten`` back to 4-D that folds pixel blocks into
        channels (space-to-depth through a 6-D permute, NCHW or NHWC): a reduction like a
        pixel-unshuffle; one padded per size first (timm's patch merging) takes any size,
        rounding up."""
        if info.hw is None or layouts.classify(tuple(y.shape), info.hw, info.last) in layouts.GRIDS:
            return info  # the grid itself, in either layout: no fold
        if y.dim() == 3:
            return self._folded_to_tokens(name, owner, call, y, info)
        lay = Layout.NHWC if info.last is Layout.NHWC else Layout.NCHW
        shape = layouts.as_nchw(tuple(y.shape), lay)
        (h, w), (n, c, oh, ow) = info.hw, shape
        if min(oh, ow) < 1 or h % oh or w % ow or (h, w) == (oh, ow) or n != self.rec.batch:
            return info  # not a fold (windows stacked along the batch are none)
        fh, fw = h // oh, w // ow
        if c % (fh * fw):
            return info
        sa = space_to_depth((fh, fw))
        if padded:
            rows = [(SizeStep("window", 1, f, 0, 1, False, False),) for f in (fh, fw)]
            sa = replace(sa, op="patch-merge", steps=(rows[0], rows[1]))
        info = self._spatial(name, sa, owner, call, (n, c // (fh * fw), h, w), shape, info)
        return replace(info, layout=lay, last=lay, hw=(oh, ow), padded=False, before_pad=None)

    def _folded_to_tokens(
        self, name: str, owner: str, call: int, y: torch.Tensor, info: _TensorInfo
    ) -> _TensorInfo:
        """A reshape of a 6-D permute straight to tokens, ``N x (H/f * W/f) x (C*f*f)``:
        a patchify written without a conv (NaFlexViT's linear patch embedding), a
        space-to-depth by ``f`` whose output is the token sequence of the coarser grid.
        Only square patches are read so: the token count alone does not tell a 16x8
        patch from an 8x16 one."""
        if info.hw is None or info.layout is not Layout.NONE:
            return info  # tokens of the grid itself, or no grid at all
        (h, w), (n, tokens, c) = info.hw, tuple(y.shape)
        if n != self.rec.batch or tokens < 1 or (h * w) % tokens:
            return info
        f = math.isqrt((h * w) // tokens)
        if f < 2 or f * f * tokens != h * w or h % f or w % f or c % (f * f):
            return info
        grid = (h // f, w // f)
        shape = (n, c, grid[0], grid[1])
        sa = space_to_depth((f, f))
        info = self._spatial(name, sa, owner, call, (n, c // (f * f), h, w), shape, info)
        return replace(info, layout=Layout.TOKENS, hw=grid, padded=False, before_pad=None)

    def _spatial(
        self,
        name: str,
        sa: SpatialArgs,
        owner: str,
        call: int,
        x_shape: Shape,
        y_shape: Shape,
        info: _TensorInfo,
    ) -> _TensorInfo:
        """Record a spatial op (its shapes in N, C, H, W order); the info after it."""
        rec = self.rec
        owner_module = rec.by_path.get(owner, rec.model)
        same = dynamic_same(owner_module)
        if same and sa.op == "pad":
            return info  # part of the op's own 'same' padding, computed per input size
        if same:
            # the output is ceil(size / stride) at any size: one step of kernel 1
            sa = replace(
                sa,
                steps=tuple(  # type: ignore[arg-type]  # two axes
                    (SizeStep("window", 1, sa.stride[i], 0, 1, False, False),) for i in range(2)
                ),
            )
        module_kind = is_module_call(owner_module, name)
        if module_kind:
            op_id, kind = owner, "module"
        else:
            op_id, kind = call_id(owner, name, call), "functional"
        rf, jump = _grow_field(sa, x_shape[-2:], y_shape[-2:], info)
        op = SpatialOp(
            id=op_id,
            owner=owner,
            kind=kind,
            op=sa.op,
            func=name,
            call=call,
            kernel=sa.kernel,
            stride=sa.stride,
            padding=sa.padding,
            dilation=sa.dilation,
            ceil_mode=sa.ceil_mode,
            in_shape=x_shape,
            out_shape=y_shape,
            stage=_stage_of(owner if kind == "module" else op_id),
            steps_h=sa.steps[0],
            steps_w=sa.steps[1],
            order=rec.tick(),
            in_chain=info.chain,
            same=same,
        )
        rec.ops.setdefault(op_id, op)
        chain = info.chain + ((op_id,) if op.changes_size else ())
        fixed = info.fixed or any(st.kind == "fixed" for st in (*op.steps_h, *op.steps_w))
        return replace(info, rf=(rf[0], rf[1]), jump=(jump[0], jump[1]), chain=chain, fixed=fixed)


def _grow_field(
    sa: SpatialArgs, in_hw: Shape, out_hw: Shape, info: _TensorInfo
) -> tuple[list[float], list[float]]:
    """The receptive field and jump (input pixels per output step) after one op."""
    rf, jump = list(info.rf), list(info.jump)
    for axis in range(2):
        steps = sa.steps[axis]
        if sa.op.startswith("adaptive") and steps:
            rf[axis] += (in_hw[axis] - 1) * jump[axis]
            jump[axis] *= in_hw[axis] / max(out_hw[axis], 1)
        elif sa.op in ("interpolate", "pixel-shuffle", "conv-transpose") and steps:
            jump[axis] *= in_hw[axis] / max(out_hw[axis], 1)
        elif sa.op != "pad":
            rf[axis] += (sa.kernel[axis] - 1) * sa.dilation[axis] * jump[axis]
            jump[axis] *= sa.stride[axis]
    return rf, jump


_RESHAPES = frozenset({"view", "reshape"})
_FOLDS = frozenset({"view", "reshape", "flatten"})
_ATTENTION = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward"})
_PRODUCTS = frozenset({"matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm", "einsum"})


def _is_attention(name: str, ins: list[torch.Tensor]) -> bool:
    """A fused attention call, or a product of two activations (query by key, weights
    by value): what mixes tokens. A product with a parameter is a linear layer."""
    if name in _ATTENTION:
        return True
    acts = [t for t in ins if not isinstance(t, nn.Parameter) and t.dim() >= 3]
    return name in _PRODUCTS and len(acts) >= 2


def not_a_cnn(trace: Trace) -> str:
    """Why no size rule can hold for the model's features, or "".

    Attention alone is no reason: it keeps the number of tokens, so the features of Swin,
    PVT or EdgeNeXt follow their strides. What breaks a size rule is what holds one number
    of tokens: a positional embedding of fixed size added to them, or a linear layer across
    them; or a model whose work runs on tokens after its last feature map (its features
    are not that map). Either in a head after the features (CLIP's attention pool) does
    not matter."""
    features = trace.features
    tokens, share = _token_share(trace, features)
    on_grid = _last_grid(trace)
    if _fixed_size_decides(trace):
        return f"{trace.fixed_size}, so the model takes one input size"
    if len(trace.output_shape) == 4:
        return ""
    if (
        on_grid is not None
        and on_grid.layout is Layout.TOKENS
        and (
            features is None
            or (_after(trace, on_grid.path, features) and _tokens_worked_after(trace, features))
        )
    ):
        grid = "x".join(map(str, on_grid.grid or ()))
        after = ", after its last feature map" if features is not None else ""
        return (
            f"its features are tokens on its {grid} grid ('{on_grid.path}', "
            f"{'x'.join(map(str, on_grid.out_shape))}){after}; laying tokens back on their "
            "grid is not supported for it"
        )
    out = "x".join(map(str, trace.output_shape))
    if features is None:
        if any(s.spatial for s in trace.stages):
            return ""
        return f"its output ({out}) comes from no spatial feature map"
    if share > 0.3 and tokens is not None:
        return (
            f"{share:.0%} of its MACs run after its last feature map ('{features.path}') on "
            f"tokens ({'x'.join(map(str, tokens.out_shape))} out of '{tokens.path}') that are "
            "not on its grid, so the feature map is not its backbone's output"
        )
    return ""


def _fixed_size_decides(trace: Trace) -> bool:
    """Whether what ties the model to one input size acts on its features: before them,
    or in a head that does most of the work on tokens."""
    if not trace.fixed_size:
        return False
    _, share = _token_share(trace, trace.features)
    on_grid = _last_grid(trace)
    return not _after(trace, trace.fixed_size_at, on_grid or trace.features) or share > 0.3


def _token_share(trace: Trace, features: Stage | None) -> tuple[Stage | None, float]:
    """The first stage after the features on tokens off the grid, and the share of the
    MACs such stages take."""
    if features is None or features not in trace.stages:
        return None, 0.0
    after = trace.stages[trace.stages.index(features) + 1 :]
    tokens = [
        s
        for s in after
        if len(s.out_shape) == 3 and s.out_shape[1] > 1 and s.layout is not Layout.TOKENS
    ]
    share = sum(s.macs for s in tokens) / max(trace.macs, 1)
    return (tokens[0] if tokens else None), share


def _tokens_worked_after(trace: Trace, features: Stage) -> bool:
    """Whether a stage with weights or MACs runs on tokens on the grid after the features
    (a ViT's blocks after its patch embedding): a flatten of the last map into tokens for
    the head alone (Qwen3's ViT) leaves that map the backbone's output."""
    if features not in trace.stages:
        return True
    after = trace.stages[trace.stages.index(features) + 1 :]
    return any(s.layout is Layout.TOKENS and (s.params or s.macs) for s in after)


def _last_grid(trace: Trace) -> Stage | None:
    """The last stage on the image grid, a map or tokens, that no adaptive pooling sized."""
    by_id = {op.id: op for op in trace.ops}
    rows = [
        s
        for s in trace.stages
        if (s.spatial or s.layout is Layout.TOKENS)
        and not any(by_id[i].op.startswith("adaptive") for i in s.chain)
    ]
    return rows[-1] if rows else None


def _after(trace: Trace, path: str, features: Stage | None) -> bool:
    """Whether the module (or the stage of a call in the model's own forward) at ``path``
    runs after the features and outside them (a head)."""
    if features is None:
        return False
    order = list(trace.modules)
    if path not in order or features.path not in order:
        order = [s.path for s in trace.stages]  # a call's stage: the stage table's order
    if path not in order or features.path not in order:
        return False
    inside = path == features.path or path.startswith(f"{features.path}.")
    return not inside and order.index(path) > order.index(features.path)


def require_cnn(trace: Trace, name: str) -> None:
    """Refuse, in one line, a model for which no size rule can hold (see
    :func:`not_a_cnn`): never for attention alone."""
    why = not_a_cnn(trace)
    if why:
        fixed = _fixed_size_decides(trace)
        raise NotACNN(
            f"{name} has no feature map that follows the input size: {why}",
            brief=trace.fixed_size_brief if fixed else "not a CNN: token output",
        )


def _keeps_map(rec: _Recorder, ins: list[torch.Tensor], out: torch.Tensor, layout: Layout) -> bool:
    """Whether a product's output in a grid ``layout`` is an operand's map in that layout,
    reshaped by nothing (a map weighted by a product with it)."""
    if layout not in layouts.GRIDS:
        return True
    return any(
        tuple(t.shape) == tuple(out.shape) and rec.tensor_info(t).layout is layout for t in ins
    )


def _from_weights(rec: _Recorder, ins: list[torch.Tensor]) -> bool:
    """Whether a call takes parameters (or what was made of them alone) and no activation."""
    made = [id(t) in rec.info and rec.info[id(t)].weights for t in ins]
    if any(id(t) in rec.info and not w for t, w in zip(ins, made)):
        return False
    return any(made) or any(isinstance(t, nn.Parameter) for t in ins)


def _broadcast(t: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``t`` is 1x1 in space and broadcast over a larger H, W of ``out``."""
    return (
        t.dim() >= 3
        and out.dim() >= 3
        and tuple(t.shape[-2:]) == (1, 1)
        and tuple(out.shape[-2:]) != (1, 1)
    )


def _changes_shape(ins: list[torch.Tensor], out: torch.Tensor) -> bool:
    return bool(ins) and tuple(ins[0].shape) != tuple(out.shape)


def _stage_of(path: str) -> str:
    return path.split(".")[0] if path else ""


@contextlib.contextmanager
def _hooked(rec: _Recorder) -> Iterator[None]:
    """Module hooks that keep the stack of module paths; always removed."""
    handles = []

    def pre(path: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            stats = rec.modules.get(path)
            if stats is None:
                stats = _ModuleStats(path, type(module).__name__, rec.tick())
                rec.modules[path] = stats
            stats.calls += 1
            for key in [k for k in rec.counts if k[0] == path]:
                del rec.counts[key]
            rec.stack.append(path)

        return hook

    def post(path: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if rec.stack and rec.stack[-1] == path:
                rec.stack.pop()
            rec.modules[path].out = out

        return hook

    try:
        for path, module in rec.model.named_modules():
            if not path:
                continue
            rec.by_path[path] = module
            handles.append(module.register_forward_pre_hook(pre(path)))
            handles.append(module.register_forward_hook(post(path)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode for the trace and restore every flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


class _TracerBug(RuntimeError):
    """Raised through the user's forward when recording a call fails; never wrapped."""


class ForwardFailed(Exception):
    """The user's forward raised; ``stage`` is the stage it had reached."""

    def __init__(self, stage: str, error: BaseException, mask: str = "") -> None:
        super().__init__(str(error))
        self.stage = stage
        self.error = error
        self.mask = mask  # the second input, given an all-ones mask, if the forward takes one


@contextlib.contextmanager
def _watch_features(model: nn.Module, rec: _Recorder) -> Iterator[None]:
    """Note what the model's own ``forward_features`` returns, if it has one; the
    method is wrapped on the instance for the run and the class's is back after."""
    method = getattr(type(model), "forward_features", None)
    if not callable(method) or "forward_features" in vars(model):
        yield
        return

    def forward_features(*args: Any, **kwargs: Any) -> Any:
        out = method(model, *args, **kwargs)
        if isinstance(out, torch.Tensor):
            rec.features_out = out
        return out

    object.__setattr__(model, "forward_features", forward_features)
    try:
        yield
    finally:
        object.__delattr__(model, "forward_features")


def _run(model: nn.Module, x: torch.Tensor) -> tuple[_Recorder, Any]:
    rec = _Recorder(model, batch=x.shape[0] if x.dim() else 1)
    grid = (x.shape[-2], x.shape[-1]) if x.dim() == 4 else None
    rec.register(x, _TensorInfo(hw=grid, layout=Layout.NCHW if grid else Layout.NONE))
    # a forward of (img, img_mask) gets an all-ones mask of the image's size
    names = mask_input(model) if x.dim() == 4 else None
    extra = [all_ones_mask(x)] if names is not None else []
    for m in extra:
        rec.masks[id(m)] = (MaskRule(), "")
        rec.keep.append(m)
    with _hooked(rec), _eval_mode(model), _watch_features(model, rec), torch.no_grad():
        try:
            with _Mode(rec), user_code("the model's forward"):
                out = model(x, *extra)
        except _TracerBug:
            raise
        except ModelError as error:  # sys.exit, an interrupt or the time limit
            where = f" in stage '{rec.stack[-1]}'" if rec.stack else ""
            raise ModelError(f"{error}{where}", brief=error.brief) from None
        except Exception as error:  # any failure of the user's forward
            mask = names.mask if names is not None else ""
            raise ForwardFailed(rec.stack[-1] if rec.stack else "", error, mask) from error
    return rec, out


def _summarise(
    rec: _Recorder, x: torch.Tensor, out: Any, depth: int, device: Device, note: str
) -> Trace:
    outs = _tensors(out)
    if not outs:
        raise ModelError("the model's forward returned no tensor")
    y, several = outs[0], returned(out)
    outputs: tuple[Output, ...] = ()
    if several is not None:
        outputs = describe_outputs(several[1], lambda t: _output_info(rec, t))
        y = dict(several[1])[default_output(outputs).key]
    mask = _mask_trace(rec, several[1] if several is not None else [(0, y)])
    if mask is not None and mask.rule is not None:  # its downsample is the slice's step
        step = (float(mask.rule.step[0]), float(mask.rule.step[1]))
        outputs = tuple(replace(o, downsample=step) if o.key == mask.key else o for o in outputs)
    y_info = rec.tensor_info(y)
    ops = tuple(sorted(rec.ops.values(), key=lambda o: o.order))
    params = sum(p.numel() for p in rec.model.parameters())
    stages = _stages(rec, depth)
    order = sorted(rec.modules.values(), key=lambda s: s.order)
    return Trace(
        input_shape=tuple(x.shape),
        output_shape=tuple(y.shape),
        stages=stages,
        ops=ops,
        chain=y_info.chain,
        downsample=y_info.jump,
        receptive_field=(int(y_info.rf[0]), int(y_info.rf[1])),
        params=params,
        macs=rec.total_macs,
        activation_bytes=rec.total_act,
        device=device,
        note=note,
        children=tuple(s.path for s in order if "." not in s.path),
        modules=tuple(s.path for s in order),
        depth=depth,
        module_stages=_stages(rec, 10**6, functional=False),
        attention=rec.attention or "",
        fixed_size=rec.fixed_size[0] if rec.fixed_size else "",
        fixed_size_at=rec.fixed_size[1] if rec.fixed_size else "",
        fixed_size_brief=rec.fixed_size[2] if rec.fixed_size else "",
        features_at=_features_at(rec),
        outputs=outputs,
        returns=several[0] if several is not None else "",
        output_key=default_output(outputs).key if outputs else None,
        mask=mask,
    )


def _mask_trace(rec: _Recorder, returned: list[tuple[OutputKey, torch.Tensor]]) -> MaskTrace | None:
    """What the forward did with its mask input; None for a forward that takes none."""
    names = mask_input(rec.model)
    if names is None or not rec.masks:
        return None
    for key, t in returned:
        if id(t) in rec.masks:
            rule, why = rec.masks[id(t)]
            return MaskTrace(names, key, rule, why, tuple(t.shape))
    return MaskTrace(names, None, None)


def _output_info(
    rec: _Recorder, t: torch.Tensor
) -> tuple[tuple[float, float], tuple[int, int], tuple[str, ...]]:
    info = rec.tensor_info(t)
    return info.jump, (int(info.rf[0]), int(info.rf[1])), info.chain


def _features_at(rec: _Recorder) -> str:
    """The outermost module whose output is what ``forward_features`` returned."""
    if rec.features_out is None:
        return ""
    same = [s for s in rec.modules.values() if s.path and s.out is rec.features_out]
    return min(same, key=lambda s: s.order).path if same else ""


def _expanded(rec: _Recorder, path: str, depth: int) -> bool:
    """Whether the stage table at ``depth`` shows this module's insides instead of it."""
    if path == "" or path not in rec.modules:  # a container never called: its children
        return True
    module = rec.by_path[path]
    if path not in rec.modules and any(True for _ in module.children()):
        return True  # never called (a ModuleList the forward loops over): its children are
    return path.count(".") + 1 < depth and any(True for _ in module.children())


def _opened(rec: _Recorder, path: str, depth: int) -> bool:
    """Whether the stage table at ``depth`` shows the insides of ``path`` and of each of
    its ancestors."""
    parts = path.split(".") if path else []
    return all(_expanded(rec, ".".join(parts[:i]), depth) for i in range(len(parts) + 1))


def _stages(rec: _Recorder, depth: int, functional: bool = True) -> tuple[Stage, ...]:
    """Rows at ``depth``; with a huge depth and no functional rows, every module."""
    rows: list[tuple[int, Stage]] = []
    for stats in rec.modules.values():
        parent = stats.path.rsplit(".", 1)[0] if "." in stats.path else ""
        if functional and (_expanded(rec, stats.path, depth) or not _opened(rec, parent, depth)):
            continue
        outs = _tensors(stats.out)
        if not outs:
            continue
        info = rec.tensor_info(outs[0])
        module = rec.by_path[stats.path]
        rows.append(
            (
                stats.order,
                Stage(
                    path=stats.path,
                    type=stats.type,
                    out_shape=tuple(outs[0].shape),
                    downsample=info.jump,
                    receptive_field=(int(info.rf[0]), int(info.rf[1])),
                    params=sum(p.numel() for p in module.parameters()),
                    macs=stats.macs,
                    activation_bytes=stats.act_bytes,
                    chain=info.chain,
                    layout=info.layout,
                    grid=info.hw,
                ),
            )
        )
    seen: set[str] = set()
    for c in rec.calls if functional else []:
        if not _opened(rec, c.owner, depth):
            continue
        path = call_id(c.owner, c.name, c.call)
        if path in seen:
            continue
        seen.add(path)
        rows.append(
            (
                c.order,
                Stage(
                    path=path,
                    type=f"F.{c.name}",
                    out_shape=tuple(c.out.shape),
                    downsample=c.info.jump,
                    receptive_field=(int(c.info.rf[0]), int(c.info.rf[1])),
                    params=0,
                    macs=c.macs,
                    activation_bytes=c.act_bytes,
                    chain=c.info.chain,
                    functional=True,
                    layout=c.info.layout,
                    grid=c.info.hw,
                ),
            )
        )
    return tuple(stage for _, stage in sorted(rows, key=lambda r: r[0]))


def trace_module(
    model: nn.Module,
    input_shape: Shape,
    depth: int = 1,
    device: Device | str = Device.META,
    note: str = "",
) -> Trace:
    """Trace a model that already exists, with one dummy forward.

    Args:
        model: The model; it is not changed (a forward that writes to its own tensors
            is :func:`trace_instance`'s case).
        input_shape: The dummy input's shape, ``(N, C, H, W)``.
        depth: How deep the stage table goes (1: the top-level children).
        device: ``"meta"`` (the model is on the meta device), ``"fake"`` (real weights,
            traced under ``FakeTensorMode``: neither copied nor used) or ``"cpu"`` (real
            tensors).
        note: Why the trace runs where it does, kept in ``Trace.note``.

    Returns:
        The :class:`Trace`: stages, reduction points, params, MACs and size rules.

    Example::

        model = bbswap.resolve("resnet18").build()
        bbswap.trace_module(model, (1, 3, 224, 224), device="fake").features.downsample
        # (32.0, 32.0): the classifier's features, before its head
    """
    device = Device.parse(device, "device")
    if device is Device.META:
        with torch.device("meta"):
            x = torch.empty(input_shape)
            rec, out = _run(model, x)
        return _summarise(rec, x, out, depth, Device.META, note)
    if device is Device.FAKE:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(input_shape)
            rec, out = _run(model, x)
        return _summarise(rec, x, out, depth, Device.FAKE, note)
    x = torch.zeros(input_shape)
    rec, out = _run(model, x)
    return _summarise(rec, x, out, depth, Device.CPU, note)


class _SkipMetaInit(TorchFunctionMode):
    """Skip in-place ops on meta tensors while a model is built there.

    Such ops have no effect on meta tensors beyond returning them, but torch's meta
    kernel for ``normal_`` alone imports torch's compiler stack, which costs seconds.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's protocol
        name = _func_name(func)
        kwargs = kwargs or {}
        first = args[0] if args else kwargs.get("tensor")
        if (
            name.endswith("_")
            and not name.startswith(("resize", "set_", "__"))
            and isinstance(first, torch.Tensor)
            and first.is_meta
        ):
            return first
        out = meta_result(name, args, kwargs, None)
        return func(*args, **kwargs) if out is None else out


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model on the meta device without running its weight initialisation.

    A constructor that computes with tensors (RegNet's widths, say) cannot run with meta
    as the default device; it is built again with only its parameters and buffers moved
    to meta as they are registered, one at a time.
    """
    try:
        with torch.device("meta"), _SkipMetaInit():
            return build()
    except ModelError:
        raise
    except Exception:  # tensors computed in the constructor: move only the weights
        pass
    with _weights_to_meta(), _SkipMetaInit():
        return build()


@contextlib.contextmanager
def _weights_to_meta() -> Iterator[None]:
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer(
        module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        if tensor is not None and not tensor.is_meta:
            tensor = tensor.to("meta")
        register_buffer(module, name, tensor, persistent=persistent)

    # patched on the class for the duration of one build, restored whatever happens;
    # patching a class method: mypy refuses the assignment, which is the point here
    nn.Module.register_parameter = parameter  # type: ignore[method-assign,assignment]
    nn.Module.register_buffer = buffer  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]  # restore
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]  # restore


def trace(
    build: Callable[[], nn.Module],
    input_shape: Shape,
    depth: int = 1,
    name: str = "the model",
) -> tuple[Trace, nn.Module]:
    """Build a model with ``build`` on the meta device and trace it there; fall back to
    real CPU tensors when the model cannot run without data. A model no size rule holds
    for is refused (:class:`~bbswap.errors.NotACNN`, see :func:`not_a_cnn`).

    Args:
        build: Makes the model, called with no arguments (under the meta device).
        input_shape: The dummy input's shape, ``(N, C, H, W)``.
        depth: How deep the stage table goes (1: the top-level children).
        name: What the model is called in error messages.

    Returns:
        The :class:`Trace` and the model it traced (on the device it ran on).

    Example::

        result, model = bbswap.trace(lambda: torchvision.models.resnet18(), (1, 3, 224, 224))
        result.output_shape, [r.id for r in result.reductions][:2]   # (1, 1000), ['conv1', ...]
    """
    result, model = _trace_built(build, input_shape, depth)
    layout = grid_of(model)
    if layout is None:
        result = _resized_elsewhere(result, model, input_shape, depth)
        require_cnn(result, name)
        result = _tried_elsewhere(result, model, input_shape, depth)
    else:  # a ViT on its grid keeps its tokens' number: no refusal
        result = replace(result, note="; ".join(filter(None, [result.note, layout.note])))
    note = grid_note(model)  # tokens laid on their grid by timm's forward_intermediates
    if note is not None:
        result = replace(result, note="; ".join(filter(None, [result.note, note])))
    return result, model


FIXED_EMBEDDING = "fixed size: positional embedding"  # a refusal's brief, and its kind


def _resized_elsewhere(result: Trace, model: nn.Module, input_shape: Shape, depth: int) -> Trace:
    """The trace without its fixed-size embedding when that embedding is no tie: the
    model, traced again at twice the size (on meta or fake tensors, as it was first),
    runs and adds no parameter as it is there. A model that resizes its embedding to
    each grid itself (SAM's ViT) adds the parameter unchanged at the size it was built
    for, the one traced first; a model that cannot take another size fails at twice it,
    and keeps its refusal."""
    if result.fixed_size_brief != FIXED_EMBEDDING or result.device is Device.CPU:
        return result
    try:
        other = trace_at_twice(model, input_shape, depth, result.device)
    except ForwardFailed:
        return result
    if other.fixed_size:
        return result
    return replace(result, fixed_size="", fixed_size_at="", fixed_size_brief="")


def _tried_elsewhere(result: Trace, model: nn.Module, input_shape: Shape, depth: int) -> Trace:
    """The trace, noting that the model takes one input size when its forward has
    attention and fails at twice the size traced (on meta or fake tensors, the model kept
    as it was): an attention bias or a global query of one grid's size (LeViT, CoAtNet,
    GCViT), a reshape to the grid it was built for (EfficientFormerV2). Twice a size keeps
    whatever divisibility windows need, so a failure there is the size's, not a
    remainder's. A CNN is not tried (its size rule says where it fails)."""
    if not result.attention or result.fixed_size or result.device is Device.CPU:
        return result
    return tied_at_twice(result, model, input_shape, depth)


def tied_at_twice(result: Trace, model: nn.Module, input_shape: Shape, depth: int = 1) -> Trace:
    """The trace, noting that the model takes one input size when its forward fails at
    twice the size traced, on the device it was traced on (the model kept as it was).
    On real tensors this runs the model at four times the pixels, so the search asks it
    only once no candidate fits: MViTv2 indexes relative-position tables sized for the
    grid it was built for, which meta tensors do not bound-check."""
    h, w = input_shape[2], input_shape[3]
    if result.device is Device.CPU and 16 * math.prod(input_shape) > MAX_CPU_INPUT_BYTES:
        return result  # twice the input would be too large to run on real tensors
    try:
        trace_at_twice(model, input_shape, depth, result.device)
    except ForwardFailed as failed:
        where = f" in '{failed.stage}'" if failed.stage else ""
        why = (
            f"it takes one input size: at {2 * h}x{2 * w} its forward fails{where} "
            f"({type(failed.error).__name__}: {_one_line(failed.error)}); the size rule "
            f"holds at {h}x{w} only"
        )
        note = "; ".join(filter(None, [result.note, why]))
        return replace(result, one_size=why, one_size_at=failed.stage, note=note)
    return result


def trace_at_twice(
    model: nn.Module, input_shape: Shape, depth: int = 1, device: Device | str = Device.META
) -> Trace:
    """The model traced again at twice ``input_shape``'s size, on meta or fake tensors,
    the model kept as it was; :class:`ForwardFailed` where its forward fails there (the
    fake-tensor logger, which logs that failure, kept quiet)."""
    n, c, h, w = input_shape
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # setLevel, not the attribute: it clears the cache
    try:
        with _preserved(model):
            return trace_module(model, (n, c, 2 * h, 2 * w), depth, device)
    finally:
        quiet.setLevel(level)


def _trace_built(
    build: Callable[[], nn.Module], input_shape: Shape, depth: int
) -> tuple[Trace, nn.Module]:
    try:
        model = build_on_meta(build)
    except ModelError:
        raise
    except Exception as error:  # any failure of a user's constructor
        meta_error: BaseException | None = error
    else:
        try:
            return trace_module(model, input_shape, depth, "meta"), model
        except ForwardFailed as failed:
            meta_error = failed.error
    note = (
        "traced on real CPU tensors: the model cannot run on the meta device "
        f"({_one_line(meta_error)})"
    )
    _require_small_enough(input_shape, meta_error)
    model = _build_real(build)
    try:
        return trace_module(model, input_shape, depth, "cpu", note), model
    except ForwardFailed as failed:
        raise forward_error(failed, input_shape) from failed.error


MAX_CPU_INPUT_BYTES = 1 << 30


def _require_small_enough(input_shape: Shape, why: BaseException | None) -> None:
    """The CPU fallback allocates real tensors: refuse an input too large for that."""
    size = 4 * math.prod(input_shape)
    if size > MAX_CPU_INPUT_BYTES:
        raise ModelError(
            f"the model cannot run on the meta device ({_one_line(why)}), and on real CPU "
            f"tensors an input of {'x'.join(map(str, input_shape))} would take "
            f"{size / (1 << 30):.1f} GiB (at most {MAX_CPU_INPUT_BYTES >> 30} GiB); "
            "give a smaller input"
        )


def forward_error(failed: ForwardFailed, input_shape: Shape) -> ModelError:
    """The one-line error for a model whose forward raised, naming the stage reached."""
    where = f" in stage '{failed.stage}'" if failed.stage else ""
    mask = (
        f" and an all-ones {input_shape[0]}x{'x'.join(map(str, input_shape[2:]))} mask as "
        f"'{failed.mask}' (a second input is traced as the image's mask)"
        if failed.mask
        else ""
    )
    return ModelError(
        f"the model's forward raised {type(failed.error).__name__}{where} "
        f"at input {'x'.join(map(str, input_shape))}{mask}: {_one_line(failed.error)}"
    )


def trace_instance(
    model: nn.Module, input_shape: Shape, depth: int = 1, name: str = "the model"
) -> Trace:
    """Trace a model that already exists, falling back to real CPU tensors (with a note)
    when it cannot run on meta or fake tensors. A model no size rule holds for is refused
    (NotACNN, see :func:`not_a_cnn`)."""
    result = _trace_instance(model, input_shape, depth)
    if grid_of(model) is None:
        if recognise(model) is not None:
            raise NotACNN(
                f"{name} is a ViT given as a model instance: bbswap lays a ViT's tokens on "
                "their grid, its position embedding interpolated, when it builds the ViT from "
                "its spec: give tv:NAME or timm:NAME (--kw for its arguments, --weights for "
                "a checkpoint)",
                brief="ViT instance: give its spec",
            )
        result = _resized_elsewhere(result, model, input_shape, depth)
        require_cnn(result, name)
        result = _tried_elsewhere(result, model, input_shape, depth)
    return result


def _trace_instance(model: nn.Module, input_shape: Shape, depth: int) -> Trace:
    on_meta = all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    try:
        if on_meta:
            return trace_module(model, input_shape, depth, "meta")
        with _preserved(model):
            return trace_module(model, input_shape, depth, "fake")
    except ForwardFailed as failed:
        if on_meta:
            raise forward_error(failed, input_shape) from failed.error
        note = (
            "traced on real CPU tensors: the model cannot run on fake tensors "
            f"({_one_line(failed.error)})"
        )
        _require_small_enough(input_shape, failed.error)
    try:
        with _preserved(model):
            return trace_module(model, input_shape, depth, "cpu", note)
    except ForwardFailed as failed:
        raise forward_error(failed, input_shape) from failed.error


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Give the model back as it was: every parameter and buffer the same object with
    the same values, even if its forward updates one in place (``self.calls.add_(1)``)
    or rebinds it (``self.count = self.count + 1``). A tensor is copied only when
    something is about to write to it."""
    slots: list[tuple[dict[str, Any], str, torch.Tensor]] = [
        (table, name, t)
        for m in model.modules()
        for table in (m._buffers, m._parameters)
        for name, t in table.items()
        if t is not None
    ]
    guard = _CopyOnWrite({id(t): t for _, _, t in slots if not t.is_meta})
    try:
        with guard:
            yield
    finally:
        for table, name, t in slots:
            table[name] = t
        with torch.no_grad():
            for t, value in guard.saved.values():
                t.copy_(value)


class _CopyOnWrite(TorchFunctionMode):
    """Keep a copy of each watched tensor before the first in-place call that writes it."""

    def __init__(self, watched: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.watched = watched
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's protocol
        kwargs = kwargs or {}
        name = _func_name(func)
        in_place = (name.endswith("_") and not name.startswith("__")) or name in _WRITING
        targets = [args[0]] if in_place and args else []
        targets += [kwargs["out"]] if isinstance(kwargs.get("out"), torch.Tensor) else []
        for t in targets:
            key = id(t)
            if key in self.watched and key not in self.saved:
                # a real copy, made outside FakeTensorMode (which would make it fake)
                with torch.no_grad(), _disable_current_modes(), torch._C.DisableTorchFunction():
                    self.saved[key] = (t, t.detach().clone())
        return func(*args, **kwargs)


_WRITING = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__"}


def build_any(build: Callable[[], nn.Module]) -> nn.Module:
    """Build on the meta device, or on the CPU when the constructor needs real data."""
    try:
        return build_on_meta(build)
    except ModelError:
        raise
    except Exception:  # a constructor that cannot run on meta: try it for real
        pass
    return _build_real(build)


def _build_real(build: Callable[[], nn.Module]) -> nn.Module:
    """Build on the CPU; a constructor that raises is the user's error."""
    try:
        return build()
    except ModelError:
        raise
    except Exception as error:  # any failure of a user's constructor
        raise ModelError(
            f"the model's constructor raised {type(error).__name__}: {_one_line(error)}"
        ) from error


def _one_line(error: BaseException | None) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def describe_factor(factor: tuple[float, float]) -> str:
    """A downsample factor as printed: ``16``, ``32x4`` (H x W), or ``1/2`` when upsampled."""

    def one(v: float) -> str:
        if v >= 1:
            return str(round(v)) if math.isclose(v, round(v)) else f"{v:.3g}"
        inv = 1 / v
        return f"1/{round(inv)}" if math.isclose(inv, round(inv)) else f"{v:.3g}"

    h, w = one(factor[0]), one(factor[1])
    return h if h == w else f"{h}x{w}"
