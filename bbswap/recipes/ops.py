"""The recipe ops: each a small registered function with declared fields.

Every op has ``validate(trace, op, where)``, which checks what the recipe names
against the source backbone's trace before anything is changed, and
``apply(surgery, op, where)``, which makes the change on the surgery's copy.
``bbswap ops`` lists them from this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bbswap.errors import RecipeError, SurgeryError, choices
from bbswap.recipes.schema import Field, Op
from bbswap.surgery.core import Surgery, fmt, module_at, new_module, parent_path
from bbswap.tracing.sizes import SizeStep
from bbswap.tracing.spatial_ops import pair
from bbswap.tracing.tracer import SpatialOp, Trace

Validate = Callable[[Trace, Op, str], None]
Apply = Callable[[Surgery, Op, str], None]


@dataclass(frozen=True)
class OpDef:
    name: str
    summary: str
    fields: tuple[Field, ...]
    validate: Validate
    apply: Apply


OPS: dict[str, OpDef] = {}


def register(
    name: str, summary: str, fields: tuple[Field, ...], validate: Validate
) -> Callable[[Apply], Apply]:
    def deco(apply: Apply) -> Apply:
        OPS[name] = OpDef(name, summary, fields, validate, apply)
        return apply

    return deco


def _no_check(trace: Trace, op: Op, where: str) -> None:
    del trace, op, where


# -- in_channels --------------------------------------------------------------------------

_STRATEGIES = ("sum", "mean", "repeat", "select", "random")


def stem_conv(trace: Trace, at: str | None) -> SpatialOp:
    convs = [o for o in trace.ops if o.op == "conv" and o.kind == "module"]
    if at is not None:
        for o in convs:
            if o.id == at:
                return o
        raise RecipeError(f"'{at}' is not a conv module (convs: {choices(o.id for o in convs)})")
    if not convs:
        raise SurgeryError("the model has no conv module to change the input channels of")
    return convs[0]


def _check_in_channels(trace: Trace, op: Op, where: str) -> None:
    try:
        conv = stem_conv(trace, op["at"])
    except RecipeError as error:
        raise RecipeError(f"{where}.at: {error}") from None
    source = conv.in_shape[1]
    strategy = op["strategy"] or ("sum" if op["channels"] == 1 else "repeat")
    if strategy in ("sum", "mean") and op["channels"] != 1:
        raise RecipeError(
            f"{where}.strategy: '{strategy}' makes 1 channel, but channels = {op['channels']} "
            "(use repeat, select or random)"
        )
    if strategy == "select":
        select = op["select"]
        if select is None or len(select) != op["channels"]:
            raise RecipeError(
                f"{where}.select: strategy 'select' needs a list of {op['channels']} source "
                f"channel indices, got {list(select) if select else None}"
            )
        bad = [i for i in select if i >= source]
        if bad:
            raise RecipeError(
                f"{where}.select: index {bad[0]} is out of range for {source} source channels"
            )


def adapt_weight(weight: torch.Tensor, channels: int, strategy: str, select: Any) -> torch.Tensor:
    """A stem conv's weight for ``channels`` input channels from one for ``weight.shape[1]``."""
    source = weight.shape[1]
    if strategy == "sum":
        return weight.sum(dim=1, keepdim=True)
    if strategy == "mean":
        return weight.mean(dim=1, keepdim=True)
    if strategy == "repeat":
        index = torch.tensor([i % source for i in range(channels)], device=weight.device)
        return weight.index_select(1, index) * (source / channels)
    if strategy == "select":
        return weight.index_select(1, torch.tensor(list(select), device=weight.device))
    raise ValueError(strategy)


@register(
    "in_channels",
    "change the stem conv's input channels, adapting its weights",
    (
        Field("channels", "int", "the new number of input channels", required=True, minimum=1),
        Field("strategy", "str", "how weights are adapted", choices=_STRATEGIES),
        Field("select", "ints", "source channels to keep, for strategy = 'select'", minimum=0),
        Field("at", "str", "the conv to change (default: the first conv)"),
    ),
    _check_in_channels,
)
def in_channels(s: Surgery, op: Op, where: str) -> None:
    target = stem_conv(s.trace, op["at"])
    conv = module_at(s.model, target.id)
    assert isinstance(conv, nn.Conv2d)  # stem_conv only returns conv modules
    if conv.groups != 1:
        raise SurgeryError(f"{where}: {target.id} is a grouped conv; its input channels are fixed")
    channels, strategy = (
        op["channels"],
        op["strategy"] or ("sum" if op["channels"] == 1 else "repeat"),
    )
    source = (
        f"nn.Conv2d({channels}, {conv.out_channels}, kernel_size={conv.kernel_size}, "
        f"stride={conv.stride}, padding={conv.padding!r}, dilation={conv.dilation}, "
        f"bias={conv.bias is not None})"
    )
    new = new_module(
        lambda: nn.Conv2d(
            channels,
            conv.out_channels,
            pair(conv.kernel_size),
            pair(conv.stride),
            conv.padding if isinstance(conv.padding, str) else pair(conv.padding),
            pair(conv.dilation),
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        ),
        conv.weight.device,
    )
    if not conv.weight.is_meta and strategy != "random":
        with torch.no_grad():
            new.weight.copy_(adapt_weight(conv.weight, channels, strategy, op["select"]))
            if conv.bias is not None and new.bias is not None:
                new.bias.copy_(conv.bias)
    s.replace(target.id, new, source, conv.in_channels, f"{channels} ({strategy})", "in_channels")
    s.in_chans = channels


# -- stride -----------------------------------------------------------------------------------

_WINDOW_OPS = ("conv", "max-pool", "avg-pool", "lp-pool")


def _strided(o: SpatialOp) -> bool:
    return o.op in _WINDOW_OPS and (o.stride[0] > 1 or o.stride[1] > 1)


def stride_targets(trace: Trace, at: str) -> list[SpatialOp]:
    """The reduction points an ``at`` names: one op id, or every strided op under a path."""
    for o in trace.ops:
        if o.id == at and o.op in _WINDOW_OPS:
            return [o]
    return [o for o in trace.ops if _strided(o) and (o.id.startswith(at + ".") or o.owner == at)]


def _stride_choices(trace: Trace) -> list[str]:
    points = [o for o in trace.ops if _strided(o)]
    stages = []
    for o in points:
        if o.stage and o.stage not in stages and o.stage != o.id:
            stages.append(o.stage)
    return stages + [o.id for o in points]


def _check_stride(trace: Trace, op: Op, where: str) -> None:
    if not stride_targets(trace, op["at"]):
        raise RecipeError(
            f"{where}.at: '{op['at']}' is not a reduction point or a stage with one "
            f"(valid: {choices(_stride_choices(trace))})"
        )
    if op["mode"] == "dilate":
        for o in stride_targets(trace, op["at"]):
            for axis in range(2):
                old, new = o.stride[axis], op["stride"][axis]
                if new > old or old % new:
                    raise RecipeError(
                        f"{where}.stride: mode 'dilate' removes stride; {o.id} has stride "
                        f"{old} on {'HW'[axis]}, which {new} does not divide (use mode = 'stride')"
                    )


def current(s: Surgery, o: SpatialOp) -> dict[str, Any]:
    """An op's kernel, stride, padding and dilation as the surgery has left them so far."""
    if o.kind == "module":
        m = module_at(s.model, o.id)
        return {
            "kernel_size": pair(getattr(m, "kernel_size", o.kernel)),
            "stride": pair(getattr(m, "stride", o.stride)),
            "padding": m.padding
            if isinstance(getattr(m, "padding", 0), str)
            else pair(getattr(m, "padding", o.padding)),
            "dilation": pair(getattr(m, "dilation", o.dilation)),
            "ceil_mode": bool(getattr(m, "ceil_mode", o.ceil_mode)),
        }
    values: dict[str, Any] = {
        "kernel_size": o.kernel,
        "stride": o.stride,
        "padding": o.padding,
        "dilation": o.dilation,
        "ceil_mode": o.ceil_mode,
    }
    rw = s.rewrites.get(o.owner)
    for edit in rw.calls if rw else []:
        if (edit.func, edit.call) == (o.func, o.call):
            values.update(edit.values)
    return values


def _set(s: Surgery, o: SpatialOp, values: dict[str, Any]) -> None:
    if o.op in ("avg-pool", "lp-pool"):
        values = {k: v for k, v in values.items() if k != "dilation"}
    if o.op == "lp-pool":
        values = {k: v for k, v in values.items() if k != "padding"}
    if o.kind == "module":
        for key, value in values.items():
            s.set_attr(o.id, key, value)
    else:
        s.edit_call(o, values)


def pre_padding(trace: Trace, o: SpatialOp) -> tuple[int, int]:
    """Padding per side that a pad call in the same forward applies to ``o``'s input
    just before it (an anti-aliasing blur pads, then convolves unpadded): part of the
    'same' padding ``o`` needs at a new stride. (0, 0) when there is none, or it is not
    the same on both sides."""
    parent = o.id.rpartition(".")[0] if o.kind == "module" else o.owner
    pads = [
        p
        for p in trace.ops
        if p.op == "pad" and p.owner == parent and p.order < o.order and p.out_hw == o.in_hw
    ]
    if not pads:
        return (0, 0)
    pad = max(pads, key=lambda p: p.order)
    per_side = []
    for axis, steps in enumerate((pad.steps_h, pad.steps_w)):
        total, first = steps[0].padding, pad.padding[axis]
        if not isinstance(first, int) or total != 2 * first:
            return (0, 0)
        per_side.append(first)
    return (per_side[0], per_side[1])


def restride(
    o: SpatialOp,
    now: dict[str, Any],
    stride: tuple[int, int],
    where: str,
    pre: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """New kernel/stride/padding for a window op so its size follows the new stride exactly.

    A pooling whose window equals its stride keeps that (the window follows the stride);
    anything else gets 'same' padding, ``dilation * (kernel - 1) / 2``, so the output is
    ``ceil(size / stride)`` whatever the input size. When that is not a whole number (an
    even kernel on a conv, whose weights fix the kernel), a conv going to stride 1 takes
    torch's ``padding='same'``, which pads the odd pixel on one side; other strides are
    refused. Padding already applied by a pad call just before the op (``pre``, per side)
    counts towards that.
    """
    kernel, padding = list(now["kernel_size"]), now["padding"]
    if o.same:
        return {"stride": stride}  # it pads itself to ceil(size / stride)
    if isinstance(padding, str):
        if any(v != 1 for v in stride) and padding == "same":
            raise SurgeryError(f"{where}: {o.id} uses padding='same', which needs stride 1")
        return {"stride": stride}
    padding = list(padding)
    for axis in range(2):
        if stride[axis] == now["stride"][axis]:
            continue
        k, d = kernel[axis], now["dilation"][axis]
        if o.op != "conv" and k == now["stride"][axis] and padding[axis] == 0:
            kernel[axis] = stride[axis]
            continue
        span = d * (k - 1)
        if span % 2 and o.op == "conv" and stride == (1, 1) and pre == (0, 0):
            # an even kernel at stride 1: torch's padding='same' pads the odd pixel on
            # the right and bottom, so the size stays exactly the input's
            return {"stride": stride, "padding": "same"}
        if span % 2:
            raise SurgeryError(
                f"{where}: cannot set stride {stride[axis]} at {o.id} exactly: its kernel "
                f"{k} would need {span / 2:g} pixels of padding per side on {'HW'[axis]} "
                "(a pixel would be lost); choose another reduction point"
            )
        if span // 2 < pre[axis]:
            raise SurgeryError(
                f"{where}: cannot set stride {stride[axis]} at {o.id} exactly: its input "
                f"is already padded by {pre[axis]} pixels per side on {'HW'[axis]}, more "
                f"than the {span // 2} its kernel {k} needs; choose another reduction point"
            )
        padding[axis] = span // 2 - pre[axis]
    _check_pool_padding(o, kernel, padding, f"{where}: cannot set stride {fmt(stride)} at {o.id}")
    return {
        "kernel_size": (kernel[0], kernel[1]),
        "stride": stride,
        "padding": (padding[0], padding[1]),
    }


def _check_pool_padding(o: SpatialOp, kernel: list[int], padding: list[int], what: str) -> None:
    """PyTorch pools take at most half the kernel as padding, whatever the dilation."""
    for axis in range(2):
        if o.op in ("max-pool", "avg-pool") and padding[axis] > kernel[axis] // 2:
            raise SurgeryError(
                f"{what} exactly: it would need {padding[axis]} pixels of padding per side "
                f"on {'HW'[axis]}, but a {o.op} with kernel {kernel[axis]} takes at most "
                f"{kernel[axis] // 2}"
            )


@register(
    "stride",
    "change the stride of a reduction point or of every one in a stage, per axis",
    (
        Field("at", "str", "a reduction point id or a stage path", required=True),
        Field("stride", "pair", "the new stride, or [h, w]", required=True, minimum=1),
        Field(
            "mode",
            "str",
            "'stride' changes it; 'dilate' also dilates what follows",
            default="stride",
            choices=("stride", "dilate"),
        ),
    ),
    _check_stride,
)
def stride(s: Surgery, op: Op, where: str) -> None:
    targets = stride_targets(s.trace, op["at"])
    new_stride: tuple[int, int] = op["stride"]
    removed: dict[str, tuple[int, int]] = {}  # target id -> the stride factor it loses
    for o in targets:
        now = current(s, o)
        removed[o.id] = (
            max(1, now["stride"][0] // new_stride[0]),
            max(1, now["stride"][1] // new_stride[1]),
        )
        _set(s, o, restride(o, now, new_stride, where, pre_padding(s.trace, o)))
    if op["mode"] != "dilate":
        return
    # Every window op fed (through the traced chain of reductions) by a target is
    # dilated by the stride removed before it, as torchvision's replace_stride_with_dilation
    # does: the strided conv itself and parallel branches (a shortcut) keep theirs.
    for o in s.trace.ops:
        factors = [1, 1]
        for upstream in o.in_chain:
            if upstream in removed:
                factors = [factors[axis] * removed[upstream][axis] for axis in range(2)]
        if o.op in _WINDOW_OPS and factors != [1, 1]:
            _dilate(s, o, factors, where)


def _dilate(s: Surgery, o: SpatialOp, factors: list[int], where: str) -> None:
    now = current(s, o)
    kernel, dilation = now["kernel_size"], list(now["dilation"])
    if all(k == 1 for k in kernel):
        return
    if o.op in ("avg-pool", "lp-pool"):
        raise SurgeryError(
            f"{where}: mode 'dilate' would have to dilate {o.id}, an {o.op} with kernel "
            f"{kernel[0]}, which has no dilation; use mode = 'stride'"
        )
    padding = now["padding"]
    if isinstance(padding, str) or o.same:
        new = (dilation[0] * factors[0], dilation[1] * factors[1])
        _set(s, o, {"dilation": new})
        return
    padding = list(padding)
    for axis in range(2):
        if kernel[axis] == 1 or factors[axis] == 1:
            continue
        grow = dilation[axis] * (kernel[axis] - 1) * (factors[axis] - 1)
        if grow % 2:
            raise SurgeryError(
                f"{where}: cannot dilate {o.id} exactly: kernel {kernel[axis]} would need "
                f"{grow / 2:g} more pixels of padding per side; use mode = 'stride'"
            )
        padding[axis] += grow // 2
        dilation[axis] *= factors[axis]
    _check_pool_padding(o, list(kernel), padding, f"{where}: cannot dilate {o.id}")
    _set(s, o, {"dilation": (dilation[0], dilation[1]), "padding": (padding[0], padding[1])})


# -- exact -------------------------------------------------------------------------------------

_RULES = {"ceil": lambda n, s: -(-n // s), "floor": lambda n, s: n // s}


def exact_setting(
    op: str,
    kernel: int,
    stride: int,
    dilation: int,
    padding: int,
    ceil: bool,
    rule: str,
    modes: tuple[bool, ...] = (False, True),
) -> tuple[int, bool] | None:
    """The padding and rounding closest to the current ones for which one axis of a window
    op gives exactly ``rule(size / stride)`` for every input size it accepts; None if no
    padding does (a pooling may pad at most half its kernel, and only a pooling rounds,
    with a ceil_mode among ``modes``)."""
    pool = op != "conv"
    span = dilation * (kernel - 1)
    limit = kernel // 2 if pool else span
    want = _RULES[rule]
    sizes = range(1, 4 * (span + stride) + 64)
    found = []
    for c in modes if pool else (False,):
        for p in range(limit + 1):
            step = SizeStep("window", kernel, stride, p, dilation, c, pool)
            outs = [step.out_size(n) for n in sizes]
            if all(o <= 0 or o == want(n, stride) for n, o in zip(sizes, outs)) and all(
                o > 0 for n, o in zip(sizes, outs) if n > span
            ):
                found.append((c != ceil, abs(p - padding), p, c))
    if not found:
        return None
    _, _, p, c = min(found)
    return p, c


def _check_exact(trace: Trace, op: Op, where: str) -> None:
    if not stride_targets(trace, op["at"]):
        raise RecipeError(
            f"{where}.at: '{op['at']}' is not a reduction point or a stage with one "
            f"(valid: {choices(_stride_choices(trace))})"
        )


@register(
    "exact",
    "pad (and for a pooling, round) reduction points so each gives exactly ceil(H/S) or "
    "floor(H/S) for every input size",
    (
        Field("at", "str", "a reduction point id or a stage path", required=True),
        Field("rule", "str", "the size rule", default="ceil", choices=("ceil", "floor")),
    ),
    _check_exact,
)
def exact(s: Surgery, op: Op, where: str) -> None:
    for o in stride_targets(s.trace, op["at"]):
        now = current(s, o)
        if o.same:
            if op["rule"] == "floor":
                raise SurgeryError(
                    f"{where}: {o.id} pads itself to ceil(size/stride) at every size; "
                    "it cannot round down"
                )
            continue
        if isinstance(now["padding"], str):
            if now["padding"] == "same" or o.stride == (1, 1):
                continue
            now = {**now, "padding": (0, 0)}  # 'valid'
        # ceil_mode is one flag for both axes: the current one if it serves both, else the other
        for mode in (now["ceil_mode"], not now["ceil_mode"]):
            settings = [
                exact_setting(
                    o.op,
                    now["kernel_size"][axis],
                    now["stride"][axis],
                    now["dilation"][axis],
                    now["padding"][axis],
                    now["ceil_mode"],
                    op["rule"],
                    (mode,),
                )
                for axis in range(2)
            ]
            if settings[0] is not None and settings[1] is not None:
                break
        else:
            axis = 0 if settings[0] is None else 1
            k, st = now["kernel_size"][axis], now["stride"][axis]
            raise SurgeryError(
                f"{where}: no padding makes {o.id} (kernel {k}, stride {st} on {'HW'[axis]}) "
                f"give exactly {op['rule']}(size/{st})"
            )
        values: dict[str, Any] = {"padding": (settings[0][0], settings[1][0])}
        if o.op != "conv":
            values["ceil_mode"] = mode
        _set(s, o, values)


# -- truncate ---------------------------------------------------------------------------------


def _top_stages(trace: Trace) -> list[str]:
    return [st.path for st in trace.stages if "." not in st.path.split("(")[0]]


def _check_truncate(trace: Trace, op: Op, where: str) -> None:
    stages = _top_stages(trace)
    if op["after"] not in stages and op["after"] not in trace.modules:
        raise RecipeError(
            f"{where}.after: '{op['after']}' is not a stage or module "
            f"(stages: {choices(stages)}; a deeper module path such as "
            f"'{next((m for m in trace.modules if '.' in m), 'features.5')}' works too)"
        )


@register(
    "truncate",
    "drop everything after a stage (for zoo models: the classifier head)",
    (Field("after", "str", "the last stage to keep", required=True),),
    _check_truncate,
)
def truncate(s: Surgery, op: Op, where: str) -> None:
    after: str = op["after"]
    stage = s.trace.stage(after)
    if stage is None:
        raise SurgeryError(f"{where}.after: '{after}' is never called in the forward")
    s.truncate(after, _dropped(s.trace, after))
    s.out_channels = stage.channels
    s.out_spatial = stage.spatial


def _dropped(trace: Trace, after: str) -> list[str]:
    """Modules after ``after`` among its siblings and those of each ancestor."""
    if after not in trace.modules:  # a functional stage of the model's own forward
        names = [st.path for st in trace.stages]
        return [p for p in names[names.index(after) + 1 :] if p in trace.modules]
    dropped: list[str] = []
    path = after
    while True:
        parent = parent_path(path) if not path.endswith(")") or "." in path else ""
        siblings = [
            m for m in trace.modules if parent_path(m) == parent and "(" not in m and m != path
        ]
        anchor = trace.modules.index(path) if path in trace.modules else -1
        order = {m: i for i, m in enumerate(trace.modules)}
        dropped += [m for m in siblings if order[m] > anchor and anchor >= 0]
        if not parent:
            break
        path = parent
    return dropped


# -- project ------------------------------------------------------------------------------------

# name -> (the module, its source for the emitted file); "none" adds nothing
_ACTIVATIONS: dict[str, tuple[Callable[[], nn.Module], str] | None] = {
    "none": None,
    "relu": (lambda: nn.ReLU(inplace=True), "nn.ReLU(inplace=True)"),
    "relu6": (lambda: nn.ReLU6(inplace=True), "nn.ReLU6(inplace=True)"),
    "silu": (lambda: nn.SiLU(inplace=True), "nn.SiLU(inplace=True)"),
    "gelu": (nn.GELU, "nn.GELU()"),
}


def _need_spatial(s: Surgery, where: str, what: str) -> None:
    if not s.out_spatial:
        raise SurgeryError(
            f"{where}: {what} needs a spatial output, but the model's output is not NCHW "
            "(a classifier head?); add a truncate op before it"
        )


@register(
    "project",
    "append a 1x1 conv (no bias) + BatchNorm (+ activation) to C channels",
    (
        Field("channels", "int", "output channels", required=True, minimum=1),
        Field(
            "activation",
            "str",
            "activation after the BatchNorm",
            default="none",
            choices=tuple(_ACTIVATIONS),
        ),
    ),
    _no_check,
)
def project(s: Surgery, op: Op, where: str) -> None:
    _need_spatial(s, where, "project")
    cin, cout = s.out_channels, op["channels"]

    def conv() -> nn.Module:
        m = nn.Conv2d(cin, cout, kernel_size=1, bias=False)
        if not m.weight.is_meta:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        return m

    s.append_output(
        "",
        "proj",
        new_module(conv, s.device),
        f"nn.Conv2d({cin}, {cout}, kernel_size=1, bias=False)",
    )
    s.append_output(
        "", "proj_bn", new_module(lambda: nn.BatchNorm2d(cout), s.device), f"nn.BatchNorm2d({cout})"
    )
    act = _ACTIVATIONS[op["activation"]]
    if act is not None:
        make, source = act
        s.append_output("", "proj_act", make(), source)
    s.out_channels = cout


# -- pool ----------------------------------------------------------------------------------------


@register(
    "pool",
    "append an average or max pooling reduction, per axis",
    (
        Field("stride", "pair", "the pooling stride, or [h, w]", required=True, minimum=1),
        Field("kind", "str", "avg or max", default="avg", choices=("avg", "max")),
        Field("kernel", "pair", "the window (default: the stride)", minimum=1),
        Field("ceil_mode", "bool", "round sizes up (ceil) rather than down", default=True),
    ),
    _no_check,
)
def pool(s: Surgery, op: Op, where: str) -> None:
    _need_spatial(s, where, "pool")
    stride_hw: tuple[int, int] = op["stride"]
    kernel: tuple[int, int] = op["kernel"] or stride_hw
    cls = nn.AvgPool2d if op["kind"] == "avg" else nn.MaxPool2d
    module = cls(kernel, stride_hw, ceil_mode=op["ceil_mode"])
    source = (
        f"nn.{cls.__name__}(kernel_size={kernel}, stride={stride_hw}, ceil_mode={op['ceil_mode']})"
    )
    s.append_output("", "pool", module, source)


# -- dropout --------------------------------------------------------------------------------------


def _check_dropout(trace: Trace, op: Op, where: str) -> None:
    del trace, op, where  # class names are checked against the model in apply


@register(
    "dropout",
    "add Dropout(p) after every block of a given class",
    (
        Field("block", "str", "the block class name, e.g. Bottleneck", required=True),
        Field("p", "float", "the drop probability", default=0.2, minimum=0.0, maximum=1.0),
    ),
    _check_dropout,
)
def dropout(s: Surgery, op: Op, where: str) -> None:
    paths = [p for p, m in s.model.named_modules() if p and type(m).__name__ == op["block"]]
    if not paths:
        names = sorted({type(m).__name__ for _, m in s.model.named_modules()})
        raise RecipeError(
            f"{where}.block: no module of class '{op['block']}' (classes: {choices(names)})"
        )
    p = op["p"]
    for path in paths:
        s.append_output(path, "dropout", nn.Dropout(p), f"nn.Dropout(p={p:g})")


def describe_ops() -> list[tuple[str, str, list[str]]]:
    """(name, summary, field descriptions) of every op, for ``bbswap ops``."""
    rows = []
    for d in OPS.values():
        fields = []
        for f in d.fields:
            req = (
                "required"
                if f.required
                else f"default {f.default!r}"
                if f.default is not None
                else "optional"
            )
            extra = f"; one of {', '.join(f.choices)}" if f.choices else ""
            fields.append(f"{f.name} ({f.kind}, {req}{extra}): {f.help}")
        rows.append((d.name, d.summary, fields))
    return rows
