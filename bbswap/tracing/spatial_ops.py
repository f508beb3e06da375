"""What the tracer knows about torch's spatial and multiply-accumulate functions.

``spatial_call`` turns the arguments of a conv, pooling, padding or resampling call
into a :class:`Window` per axis; ``macs`` counts the multiply-accumulates of convs,
linear layers and matrix products the way ``torch.utils.flop_counter`` does (its
FLOPs divided by two).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bbswap.tracing.sizes import SizeStep

Pair = tuple[int, int]


def pair(value: Any) -> Pair:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return (int(value[0]), int(value[0]))
        return (int(value[-2]), int(value[-1]))
    return (int(value), int(value))


# Modules that pad their input themselves for every input size, as TensorFlow's 'SAME'
# does (timm's ports of TF weights), so that the output is ceil(size / stride) at any
# size, whatever their kernel; their padding attribute is not used.
def dynamic_same(module: object) -> bool:
    """timm's Conv2dSame, MaxPool2dSame, ScaledStdConv2dSame, ... (not its *SameExport,
    whose padding is fixed for one input size)."""
    return type(module).__name__.endswith("Same")


@dataclass(frozen=True)
class SpatialArgs:
    """The normalised spatial arguments of one call, H first."""

    op: str  # conv, conv-transpose, max-pool, avg-pool, lp-pool, adaptive-*-pool, ...
    kernel: Pair
    stride: Pair
    padding: Pair | str
    dilation: Pair
    ceil_mode: bool
    steps: tuple[tuple[SizeStep, ...], tuple[SizeStep, ...]]


def _bind(names: Sequence[str], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _window_steps(
    kernel: Pair, stride: Pair, padding: Pair, dilation: Pair, ceil: bool, pool: bool
) -> tuple[tuple[SizeStep, ...], tuple[SizeStep, ...]]:
    return tuple(  # type: ignore[return-value]  # always two axes
        (SizeStep("window", kernel[i], stride[i], padding[i], dilation[i], ceil, pool),)
        for i in range(2)
    )


def _conv(args: tuple, kwargs: dict) -> SpatialArgs:
    b = _bind(
        ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
        {"stride": 1, "padding": 0, "dilation": 1},
        args,
        kwargs,
    )
    kernel = pair(tuple(b["weight"].shape[-2:]))
    stride, dilation = pair(b["stride"]), pair(b["dilation"])
    padding: Pair | str
    if isinstance(b["padding"], str):
        padding = b["padding"]
        if padding == "same":
            steps: tuple[tuple[SizeStep, ...], tuple[SizeStep, ...]] = ((), ())
        else:
            steps = _window_steps(kernel, stride, (0, 0), dilation, False, False)
    else:
        padding = pair(b["padding"])
        steps = _window_steps(kernel, stride, padding, dilation, False, False)
    return SpatialArgs("conv", kernel, stride, padding, dilation, False, steps)


def _conv_transpose(args: tuple, kwargs: dict) -> SpatialArgs:
    b = _bind(
        ["input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"],
        {"stride": 1, "padding": 0, "output_padding": 0, "dilation": 1},
        args,
        kwargs,
    )
    kernel = pair(tuple(b["weight"].shape[-2:]))
    stride, padding, dilation = pair(b["stride"]), pair(b["padding"]), pair(b["dilation"])
    extra = pair(b["output_padding"])
    steps = tuple(
        (
            SizeStep(
                "transpose", kernel[i], stride[i], padding[i], dilation[i], value=float(extra[i])
            ),
        )
        for i in range(2)
    )
    return SpatialArgs("conv-transpose", kernel, stride, padding, dilation, False, steps)  # type: ignore[arg-type]  # two axes


def _pool(op: str, names: list[str], defaults: dict[str, Any]) -> Callable[..., SpatialArgs]:
    def parse(args: tuple, kwargs: dict) -> SpatialArgs:
        b = _bind(names, defaults, args, kwargs)
        kernel = pair(b["kernel_size"])
        stride = kernel if b.get("stride") in (None, [], ()) else pair(b["stride"])
        padding, dilation = pair(b.get("padding", 0)), pair(b.get("dilation", 1))
        ceil = bool(b.get("ceil_mode", False))
        steps = _window_steps(kernel, stride, padding, dilation, ceil, True)
        return SpatialArgs(op, kernel, stride, padding, dilation, ceil, steps)

    return parse


def _adaptive(op: str) -> Callable[..., SpatialArgs]:
    def parse(args: tuple, kwargs: dict) -> SpatialArgs:
        b = _bind(["input", "output_size"], {}, args, kwargs)
        size = b["output_size"]
        if not isinstance(size, (list, tuple)):
            size = (size, size)
        hw = tuple(b["input"].shape[-2:])
        out = tuple(hw[i] if size[i] is None else int(size[i]) for i in range(2))
        steps = tuple(
            (SizeStep("fixed", value=float(out[i])),) if size[i] is not None else ()
            for i in range(2)
        )
        return SpatialArgs(op, (0, 0), (0, 0), (0, 0), (1, 1), False, steps)  # type: ignore[arg-type]  # two axes

    return parse


def _interpolate(args: tuple, kwargs: dict) -> SpatialArgs:
    b = _bind(["input", "size", "scale_factor"], {"size": None, "scale_factor": None}, args, kwargs)
    steps: list[tuple[SizeStep, ...]] = []
    for i in range(2):
        if b["size"] is not None:
            size = b["size"] if isinstance(b["size"], (list, tuple)) else (b["size"],) * 2
            steps.append((SizeStep("fixed", value=float(size[i])),))
        else:
            scale = b["scale_factor"]
            scale = scale if isinstance(scale, (list, tuple)) else (scale, scale)
            steps.append((SizeStep("scale", value=float(scale[i])),))
    return SpatialArgs("interpolate", (0, 0), (0, 0), (0, 0), (1, 1), False, tuple(steps))  # type: ignore[arg-type]  # two axes


def _pad(args: tuple, kwargs: dict) -> SpatialArgs:
    b = _bind(["input", "pad", "mode"], {"mode": "constant"}, args, kwargs)
    p = list(b["pad"]) + [0] * 4
    w, h = p[0] + p[1], p[2] + p[3]
    # reflect padding needs an input larger than the pad on each side
    low = (max(p[2], p[3]) + 1, max(p[0], p[1]) + 1) if b["mode"] == "reflect" else (0, 0)
    steps = (
        (SizeStep("pad", padding=h, value=float(low[0])),),
        (SizeStep("pad", padding=w, value=float(low[1])),),
    )
    return SpatialArgs("pad", (0, 0), (1, 1), (p[2], p[0]), (1, 1), False, steps)


def _pixel_unshuffle(args: tuple, kwargs: dict) -> SpatialArgs:
    b = _bind(["input", "downscale_factor"], {}, args, kwargs)
    f = int(b["downscale_factor"])
    steps = _window_steps((f, f), (f, f), (0, 0), (1, 1), False, False)
    return SpatialArgs("pixel-unshuffle", (f, f), (f, f), (0, 0), (1, 1), False, steps)


def space_to_depth(factor: Pair) -> SpatialArgs:
    """A reshape that folds each ``factor`` block of pixels into channels (TResNet's
    stem): a pixel-unshuffle written with ``view`` and ``permute``."""
    steps = ((SizeStep("fold", factor[0], factor[0]),), (SizeStep("fold", factor[1], factor[1]),))
    return SpatialArgs("space-to-depth", factor, factor, (0, 0), (1, 1), False, steps)


def _pixel_shuffle(args: tuple, kwargs: dict) -> SpatialArgs:
    b = _bind(["input", "upscale_factor"], {}, args, kwargs)
    f = int(b["upscale_factor"])
    steps = ((SizeStep("scale", value=float(f)),),) * 2
    return SpatialArgs("pixel-shuffle", (0, 0), (0, 0), (0, 0), (1, 1), False, steps)


_POOL_MAX = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"]
_POOL_AVG = ["input", "kernel_size", "stride", "padding", "ceil_mode"]

SPATIAL: dict[str, Callable[[tuple, dict], SpatialArgs]] = {
    "conv2d": _conv,
    "conv_transpose2d": _conv_transpose,
    "max_pool2d": _pool("max-pool", _POOL_MAX, {"padding": 0, "dilation": 1}),
    "max_pool2d_with_indices": _pool("max-pool", _POOL_MAX, {"padding": 0, "dilation": 1}),
    "avg_pool2d": _pool("avg-pool", _POOL_AVG, {"padding": 0}),
    "lp_pool2d": _pool("lp-pool", ["input", "norm_type", "kernel_size", "stride", "ceil_mode"], {}),
    "adaptive_avg_pool2d": _adaptive("adaptive-avg-pool"),
    "adaptive_max_pool2d": _adaptive("adaptive-max-pool"),
    "adaptive_max_pool2d_with_indices": _adaptive("adaptive-max-pool"),
    "interpolate": _interpolate,
    "upsample": _interpolate,
    "pad": _pad,
    "pixel_unshuffle": _pixel_unshuffle,
    "pixel_shuffle": _pixel_shuffle,
}

# Module classes whose forward is exactly one spatial call, edited through attributes.
SPATIAL_MODULES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv2d: ("conv2d",),
    nn.ConvTranspose2d: ("conv_transpose2d",),
    nn.MaxPool2d: ("max_pool2d", "max_pool2d_with_indices"),
    nn.AvgPool2d: ("avg_pool2d",),
    nn.LPPool2d: ("lp_pool2d",),
    nn.AdaptiveAvgPool2d: ("adaptive_avg_pool2d",),
    nn.AdaptiveMaxPool2d: ("adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"),
    nn.Upsample: ("interpolate",),
    nn.ZeroPad2d: ("pad",),
    nn.PixelUnshuffle: ("pixel_unshuffle",),
    nn.PixelShuffle: ("pixel_shuffle",),
}


def is_module_call(module: nn.Module, func_name: str) -> bool:
    """True when ``func_name`` is the one spatial call of a spatial module's forward."""
    for cls, names in SPATIAL_MODULES.items():
        if isinstance(module, cls):
            return func_name in names
    return False


def _last_dim_product(out: torch.Tensor, k: int) -> int:
    return out.numel() * k


def macs(name: str, args: tuple, kwargs: dict, out: Any) -> int:
    """Multiply-accumulates of one call (0 for anything that is not a conv or a product)."""
    if not isinstance(out, torch.Tensor):
        return 0
    if name in ("conv1d", "conv2d", "conv3d"):
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        return out.numel() * math.prod(weight.shape[1:])
    if name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        inp = args[0]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        return inp.numel() * math.prod(weight.shape[1:])
    if name == "linear":
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        return _last_dim_product(out, weight.shape[-1])
    if name in ("matmul", "mm", "bmm", "__matmul__", "__rmatmul__"):
        a = args[0] if name != "__rmatmul__" else args[1]
        return _last_dim_product(out, a.shape[-1]) if a.dim() > 1 else out.numel() * a.shape[0]
    if name in ("addmm", "baddbmm", "addbmm"):
        return _last_dim_product(out, args[1].shape[-1])
    if name == "einsum":
        return _einsum_macs(args)
    if name == "scaled_dot_product_attention":
        q, k = args[:2]
        return q.numel() * k.shape[-2] + out.numel() * k.shape[-2]
    return 0


def _einsum_macs(args: tuple) -> int:
    """A product of two operands written as an einsum (MaxViT's attention): the product of
    the sizes of every index, as the batched matmul it becomes; 0 for one operand, or an
    equation with an ellipsis."""
    if not args or not isinstance(args[0], str):
        return 0
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    equation = args[0].replace(" ", "")
    inputs = equation.split("->")[0].split(",")
    if len(operands) != 2 or len(inputs) != 2 or "." in equation:
        return 0
    sizes: dict[str, int] = {}
    for letters, t in zip(inputs, operands):
        if not isinstance(t, torch.Tensor) or len(letters) != t.dim():
            return 0
        sizes.update(zip(letters, t.shape))
    return math.prod(sizes.values())


_SAME_SHAPE = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "local_response_norm"}


def meta_result(name: str, args: tuple, kwargs: dict, spatial: SpatialArgs | None) -> Any:
    """The output of a call on meta tensors, computed from shapes alone.

    Running these ops through torch's own meta kernels first imports torch's Python
    decompositions, which costs seconds; the shapes are simple to compute. Returns
    ``None`` whenever the call is not covered or the arguments would make the real op
    raise, so the real op runs and reports the problem in its own words.
    """
    if name in ("cat", "concat", "concatenate"):
        return _cat(args, kwargs)
    x = args[0] if args else kwargs.get("input", kwargs.get("tensor"))
    if not isinstance(x, torch.Tensor) or not x.is_meta:
        return None
    if name in _POINTWISE or (name.startswith("__") and name.strip("_") in _POINTWISE):
        return _pointwise(name, args, kwargs)
    if name in ("mean", "sum", "amax", "amin"):
        return _reduce(x, args, kwargs)
    if name == "linear":
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        if weight.shape[-1] != x.shape[-1]:
            return None
        return x.new_empty((*x.shape[:-1], weight.shape[0]))
    if x.dim() != 4:
        return None
    n, c, h, w = x.shape
    if name in _SAME_SHAPE:
        weight = args[1] if name == "batch_norm" and len(args) > 1 else None
        if isinstance(weight, torch.Tensor) and weight.numel() != c:
            return None
        if name == "layer_norm":
            shape = tuple(args[1] if len(args) > 1 else kwargs["normalized_shape"])
            if tuple(x.shape[-len(shape) :]) != shape:
                return None
        return x.new_empty(x.shape)
    if spatial is None:
        return None
    out_h, out_w = (_through(steps, size) for steps, size in zip(spatial.steps, (h, w)))
    if out_h <= 0 or out_w <= 0:
        return None
    if name == "conv2d":
        b = _bind(
            ["input", "weight", "bias", "stride", "padding", "dilation", "groups"], {}, args, kwargs
        )
        weight, groups = b["weight"], int(b.get("groups", 1))
        if weight.shape[1] * groups != c or weight.shape[0] % groups:
            return None
        return x.new_empty((n, weight.shape[0], out_h, out_w))
    pad, kernel = spatial.padding, spatial.kernel
    pool = name in ("max_pool2d", "avg_pool2d", "max_pool2d_with_indices")
    if pool and not isinstance(pad, str) and (pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2):
        return None  # torch takes at most half the kernel as padding: let it say so
    if name in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"):
        return x.new_empty((n, c, out_h, out_w))
    if name in ("max_pool2d_with_indices", "adaptive_max_pool2d_with_indices"):
        shape = (n, c, out_h, out_w)
        return x.new_empty(shape), x.new_empty(shape, dtype=torch.long)
    return None


def meta_refusal(name: str, args: tuple, kwargs: dict, spatial: SpatialArgs | None) -> str:
    """Why a call on meta tensors that :func:`meta_result` leaves to torch cannot work,
    or "" when it may: tensors that do not concatenate or broadcast, or a window larger
    than its padded input. torch's own meta kernels say so too, but some first import
    its compiler stack, which costs seconds, for a call bound to fail."""
    if name in ("cat", "concat", "concatenate"):
        tensors = list(args[0] if args else kwargs.get("tensors", ()))
        fit = _cat(args, kwargs) is not None
    elif name in _POINTWISE or (name.startswith("__") and name.strip("_") in _POINTWISE):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        fit = bool(tensors) and _broadcast([tuple(t.shape) for t in tensors]) is not None
    else:
        return _too_small(name, args, kwargs, spatial)
    if fit or not tensors or not all(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        return ""
    shapes = ", ".join("x".join(map(str, t.shape)) for t in tensors)
    return f"{name} of tensors of shapes {shapes}, which do not fit together"


def _too_small(name: str, args: tuple, kwargs: dict, spatial: SpatialArgs | None) -> str:
    x = args[0] if args else kwargs.get("input")
    if spatial is None or not isinstance(x, torch.Tensor) or not x.is_meta or x.dim() != 4:
        return ""
    out = [_through(steps, size) for steps, size in zip(spatial.steps, x.shape[-2:])]
    if min(out) > 0:
        return ""
    return f"{name} on an input of {x.shape[-2]}x{x.shape[-1]}, too small for its window"


def _through(steps: tuple[SizeStep, ...], size: int) -> int:
    for step in steps:
        size = step.out_size(size)
    return size


_POINTWISE = frozenset(
    {
        "add",
        "sub",
        "mul",
        "div",
        "true_divide",
        "rsub",
        "radd",
        "rmul",
        "rtruediv",
        "maximum",
        "minimum",
        "pow",
        "relu",
        "relu6",
        "gelu",
        "silu",
        "sigmoid",
        "tanh",
        "hardswish",
        "hardsigmoid",
        "hardtanh",
        "leaky_relu",
        "elu",
        "selu",
        "mish",
        "softplus",
        "clamp",
        "clip",
        "neg",
        "exp",
        "log",
        "sqrt",
        "rsqrt",
        "abs",
        "erf",
        "softmax",
        "log_softmax",
        "iadd",
        "isub",
        "imul",
        "itruediv",
        "idiv",
        "dropout",
        "dropout2d",
        "alpha_dropout",
        "feature_alpha_dropout",
    }
)


def _pointwise(name: str, args: tuple, kwargs: dict) -> Any:
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if any(not t.is_meta for t in tensors):
        return None
    if kwargs.get("inplace") or (name.startswith("__i") and name != "__invert__"):
        return args[0]
    if "dropout" in name:
        training = args[2] if len(args) > 2 else kwargs.get("training", True)
        inplace = args[3] if len(args) > 3 else kwargs.get("inplace", False)
        if not training or inplace:
            return args[0] if args else kwargs["input"]  # eval-mode dropout returns its input
    shape = _broadcast([tuple(t.shape) for t in tensors])
    if shape is None:
        return None  # let the real op raise its own message
    return tensors[0].new_empty(shape)


def _broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """NumPy broadcasting of shapes, or None when they do not broadcast."""
    ndim = max(len(s) for s in shapes)
    out = []
    for i in range(ndim):
        sizes = {s[len(s) - ndim + i] for s in shapes if len(s) - ndim + i >= 0} - {1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _cat(args: tuple, kwargs: dict) -> Any:
    tensors = list(args[0] if args else kwargs["tensors"])
    dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0))
    if not tensors or any(not isinstance(t, torch.Tensor) or not t.is_meta for t in tensors):
        return None
    ref = tensors[0]
    dim = dim % ref.dim()
    for t in tensors:
        if t.dim() != ref.dim() or any(
            t.shape[i] != ref.shape[i] for i in range(ref.dim()) if i != dim
        ):
            return None
    shape = list(ref.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return ref.new_empty(shape)


def _reduce(x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    if dims is None or not isinstance(dims, (int, list, tuple)):
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    axes = {d % x.dim() for d in dims}
    shape = [1 if i in axes else s for i, s in enumerate(x.shape) if keepdim or i not in axes]
    return x.new_empty(shape)
