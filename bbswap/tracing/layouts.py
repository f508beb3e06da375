"""Where the image grid sits in a traced tensor: NCHW, NHWC or a sequence of tokens.

Hierarchical transformers and conv/attention hybrids keep the image grid while their
tensors change shape: Swin works on N x H x W x C maps, PVT and EfficientViT on
N x L x C token sequences with L = H*W, MobileViT and EdgeNeXt permute a map for their
attention and back. Attention keeps the number of tokens, so such a tensor still follows
the strides of the grid it came from. The tracer asks this module, for each call:

- :func:`place`: the layout of the call's output and the grid it sits on, from its shape
  and the grid of its input (the last feature map on the way);
- :func:`reparse`: a padding of an NHWC map read on its H and W axes (``F.pad`` pads the
  last axes first: C, then W, then H);
- :func:`slice_args`: a strided slice of a map (``x[..., 0::2, 0::2, :]``, Swin's patch
  merging) as the reduction it is;
- :func:`window_blocks`: a reshape that splits H and W into windows without padding
  (windowed attention), which only whole windows pass;
- :func:`query_first`: for a product of activations (``q @ k.T``, ``attn @ v``) the
  operand whose rows the output keeps, so keys pooled to a coarser grid (PVT's spatial
  reduction) do not decide the output's stride;
- :func:`fixed_embedding`: a parameter added over every token or pixel (a positional
  embedding of fixed size), which ties the model to one input size;
- :func:`token_linear`: a linear layer across the token axis (MLP-Mixer's token mixing),
  whose weight holds one number of tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bbswap.kinds import Layout
from bbswap.tracing.sizes import SizeStep
from bbswap.tracing.spatial_ops import SpatialArgs

Pair = tuple[int, int]
Shape = tuple[int, ...]

GRIDS = (Layout.NCHW, Layout.NHWC)  # a 4-d map whose H and W are the grid's


def hw_axes(layout: Layout) -> Pair | None:
    """The H and W axes of a 4-d map in ``layout``; None for a token sequence or none."""
    if layout is Layout.NCHW:
        return (2, 3)
    if layout is Layout.NHWC:
        return (1, 2)
    return None


def as_nchw(shape: Shape, layout: Layout) -> Shape:
    """A map's shape in N, C, H, W order (how the tracer records a reduction's shapes)."""
    if layout is Layout.NHWC and len(shape) == 4:
        return (shape[0], shape[3], shape[1], shape[2])
    return shape


def channels(shape: Shape, layout: Layout) -> int:
    """The channels of a tensor in ``layout``: dim 1 of NCHW (and of N x C x L), the last
    dim of NHWC and of tokens."""
    if layout in (Layout.NHWC, Layout.TOKENS):
        return shape[-1]
    if len(shape) >= 2:
        return shape[1]
    return shape[-1] if shape else 1


def classify(shape: Shape, grid: Pair | None, was: Layout) -> Layout:
    """The layout of a tensor of ``shape`` made from one on ``grid`` in layout ``was``."""
    if grid is None:
        return Layout.NONE
    h, w = grid
    if len(shape) == 4:
        nchw, nhwc = tuple(shape[2:]) == grid, tuple(shape[1:3]) == grid
        if nhwc and (was is Layout.NHWC or not nchw):
            return Layout.NHWC
        return Layout.NCHW if nchw else Layout.NONE
    if len(shape) == 3 and h * w > 1:
        if shape[1] == h * w or _with_prefix(shape, grid):
            return Layout.TOKENS
        if shape[2] == h * w:
            return Layout.CHANNELS_TOKENS
    return Layout.NONE


def place(
    in_shape: Shape | None, layout_in: Layout, grid: Pair | None, out: torch.Tensor, last: Layout
) -> tuple[Layout, Pair | None]:
    """The layout and grid of a call's output that no spatial op sized.

    A 4-d map that keeps its input's N and C but not its H and W (a crop of an NCHW map)
    stays NCHW on its new grid; anything else is read against the input's grid, which it
    keeps whatever its layout (a window or an attention score holds none of it)."""
    shape = tuple(out.shape)
    same_nc = in_shape is not None and len(in_shape) == 4 and tuple(in_shape[:2]) == shape[:2]
    if layout_in is Layout.NCHW and len(shape) == 4 and same_nc:
        return Layout.NCHW, (shape[2], shape[3])
    return classify(shape, grid, last), grid


PREFIX = 16  # at most this many prefix tokens (class, register, distillation) before a grid's


def _with_prefix(shape: Shape, grid: Pair) -> bool:
    """Tokens of a grid with a few prefix tokens before them (a ViT's class token): as many
    as its cells and at most :data:`PREFIX` more."""
    cells = grid[0] * grid[1]
    return len(shape) == 3 and cells > 1 and cells <= shape[1] <= cells + PREFIX


def grid_of(shape: Shape, layout: Layout) -> Pair | None:
    axes = hw_axes(layout)
    return None if axes is None else (shape[axes[0]], shape[axes[1]])


def reparse(name: str, args: tuple, kwargs: dict, layout: Layout) -> SpatialArgs | None:
    """A spatial call on a tensor not in NCHW read on its true axes: ``F.pad`` of an NHWC
    map; None for anything else (a pad of tokens pads no grid)."""
    if layout is not Layout.NHWC or name != "pad":
        return None
    pad = list(args[1] if len(args) > 1 else kwargs["pad"]) + [0] * 6
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    w, h = pad[2] + pad[3], pad[4] + pad[5]
    low = (max(pad[4], pad[5]) + 1, max(pad[2], pad[3]) + 1) if mode == "reflect" else (0, 0)
    steps = (
        (SizeStep("pad", padding=h, value=float(low[0])),),
        (SizeStep("pad", padding=w, value=float(low[1])),),
    )
    return SpatialArgs("pad", (0, 0), (1, 1), (pad[4], pad[2]), (1, 1), False, steps)


def zero_pad(sa: SpatialArgs | None) -> bool:
    """A padding by nothing at the traced size: one computed per input size (to a whole
    number of windows, or to an even size before a patch merging)."""
    return (
        sa is not None
        and sa.op == "pad"
        and sa.padding == (0, 0)
        and all(s.padding == 0 for s in (*sa.steps[0], *sa.steps[1]))
    )


def _index_slices(index: Any, ndim: int) -> list[slice | None] | None:
    """One slice per dim of an index made of slices, ints and at most one Ellipsis (None
    in the place of an int); None for any other index (a tensor, a new axis)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for i in items if i is Ellipsis) > 1:
        return None
    if any(not isinstance(i, (slice, int)) and i is not Ellipsis for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = [slice(None)] * (ndim - len(items) + 1)
        items = items[:at] + fill + items[at + 1 :]
    items += [slice(None)] * (ndim - len(items))
    return [i if isinstance(i, slice) else None for i in items]


def slice_args(index: Any, x: torch.Tensor, layout: Layout) -> SpatialArgs | None:
    """A slice of a map that takes every ``s``-th row or column (``x[..., 0::2, 0::2, :]``)
    as a reduction by ``s``: ``ceil(size / s)`` pixels, the offset read as a window. A slice
    with step 1 (a crop) is None: it is left to the ops around it, as before."""
    axes = hw_axes(layout)
    slices = _index_slices(index, x.dim()) if axes is not None else None
    if axes is None or slices is None or len(slices) != x.dim():
        return None
    picked = [slices[a] for a in axes]
    if any(s is None for s in picked):
        return None  # an int index drops the axis
    steps = [int(s.step or 1) for s in picked if s is not None]
    starts = [int(s.start or 0) for s in picked if s is not None]
    if max(steps) == 1 or min(starts) < 0:
        return None
    stride = (steps[0], steps[1])
    kernel = (starts[0] + 1, starts[1] + 1)
    rows = [(SizeStep("window", 1, s, 0, 1, False, False),) for s in stride]
    return SpatialArgs("slice", kernel, stride, (0, 0), (1, 1), False, (rows[0], rows[1]))


def window_blocks(in_shape: Shape, out_shape: Shape, layout: Layout) -> Pair | None:
    """The window a reshape splits H and W into (``(B, C, H/7, 7, W/7, 7)``), or None.

    The output's dims are matched to the input's in order, each input dim to the run of
    output dims whose product it is; H and W each split into two dims give the window."""
    axes = hw_axes(layout)
    if axes is None or len(out_shape) <= len(in_shape) or len(in_shape) != 4:
        return None
    groups: list[list[int]] = []
    j = 0
    for size in in_shape:
        run: list[int] = []
        while j < len(out_shape) and (math.prod(run) < size or not run):
            run.append(out_shape[j])
            j += 1
            if math.prod(run) == size:
                break
        if math.prod(run) != size:
            return None
        groups.append(run)
    if j != len(out_shape):
        return None
    window = [groups[a][-1] if len(groups[a]) == 2 else 1 for a in axes]
    if window == [1, 1]:
        return None
    return (window[0], window[1])


def blocks_args(window: Pair) -> SpatialArgs:
    steps = ((SizeStep("blocks", stride=window[0]),), (SizeStep("blocks", stride=window[1]),))
    return SpatialArgs("windows", (1, 1), (1, 1), (0, 0), (1, 1), False, steps)


_PRODUCTS = frozenset(
    {
        "matmul",
        "__matmul__",
        "bmm",
        "baddbmm",
        "scaled_dot_product_attention",
        "multi_head_attention_forward",
    }
)


def query_first(name: str, args: tuple) -> torch.Tensor | None:
    """The operand whose rows a product keeps (the queries, or the attention weights), or
    None for any other call: ``q @ k.T`` and ``attn @ v`` have as many rows as ``q``."""
    if name not in _PRODUCTS or not args:
        return None
    first = args[1] if name == "baddbmm" and len(args) > 1 else args[0]
    return first if isinstance(first, torch.Tensor) and first.dim() >= 3 else None


_ADDS = frozenset({"add", "__add__", "__radd__", "__iadd__", "add_"})


def fixed_embedding(name: str, args: tuple, layout: Layout, grid: Pair | None) -> str:
    """A parameter or buffer added over every token (or every pixel) of an activation,
    described (``a 1x197x768 parameter``); "" for any other call. Such an embedding holds
    one number of tokens: the model takes one input size only, unless it resizes it
    (then it is no longer the parameter itself that is added)."""
    if name not in _ADDS or len(args) < 2:
        return ""
    x, y = args[0], args[1]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return ""
    act, emb = (y, x) if isinstance(x, nn.Parameter) else (x, y)
    if not isinstance(emb, nn.Parameter) or emb.dim() < 2 or grid is None:
        return ""
    if act.dim() == 3:
        axes: tuple[int, ...] = (1,)
    else:
        found = hw_axes(layout)
        axes = found if found is not None and act.dim() == 4 else ()
    if not axes:
        return ""
    offset = act.dim() - emb.dim()
    sizes = [emb.shape[a - offset] if a - offset >= 0 else 1 for a in axes]
    if all(s == act.shape[a] and s > 1 for s, a in zip(sizes, axes)):
        return f"a {'x'.join(map(str, emb.shape))} parameter"
    return ""


def token_linear(name: str, x: Any, layout: Layout) -> int:
    """The number of tokens a linear layer mixes when it runs across the token axis of an
    N x C x L sequence (MLP-Mixer's token mixing); 0 for any other call."""
    if name != "linear" or not isinstance(x, torch.Tensor):
        return 0
    return int(x.shape[-1]) if layout is Layout.CHANNELS_TOKENS and x.shape[-1] > 1 else 0
