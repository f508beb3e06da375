"""Ops that change how a reduction point rounds or strides: ``stride`` (with ``mode =
"dilate"`` dilating what follows) and ``exact`` (padding so sizes follow a rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bbswap.errors import RecipeError, SurgeryError, choices
from bbswap.recipes.schema import MAX_STRIDE, Field, Op, OpKind
from bbswap.surgery.core import Surgery, fmt, module_at, parent_path
from bbswap.surgery.same import SAME_CLASSES, same_version
from bbswap.tracing.sizes import SizeStep
from bbswap.tracing.spatial_ops import dynamic_same, pair
from bbswap.tracing.tracer import SpatialOp, Trace

WINDOW_OPS = ("conv", "max-pool", "avg-pool", "lp-pool")


def _strided(o: SpatialOp) -> bool:
    return o.op in WINDOW_OPS and (o.stride[0] > 1 or o.stride[1] > 1)


def stride_targets(trace: Trace, at: str) -> list[SpatialOp]:
    """The reduction points an ``at`` names: one op id, or every strided op under a path."""
    for o in trace.ops:
        if o.id == at and o.op in WINDOW_OPS:
            return [o]
    return [o for o in trace.ops if _strided(o) and (o.id.startswith(at + ".") or o.owner == at)]


def _stride_choices(trace: Trace) -> list[str]:
    points = [o for o in trace.ops if _strided(o)]
    stages = []
    for o in points:
        if o.stage and o.stage not in stages and o.stage != o.id:
            stages.append(o.stage)
    return stages + [o.id for o in points]


def _check_at(trace: Trace, at: str, where: str) -> None:
    if not stride_targets(trace, at):
        raise RecipeError(
            f"{where}.at: '{at}' is not a reduction point or a stage with one "
            f"(valid: {choices(_stride_choices(trace))})"
        )


def current(s: Surgery, o: SpatialOp) -> dict[str, Any]:
    """An op's kernel, stride, padding and dilation as the surgery has left them so far;
    ``same``: whether it pads each input by its size (by itself, or made to by an op)."""
    if o.kind == "module":
        m = module_at(s.model, o.id)
        padding = getattr(m, "padding", o.padding)
        return {
            "kernel_size": pair(getattr(m, "kernel_size", o.kernel)),
            "stride": pair(getattr(m, "stride", o.stride)),
            "padding": padding if isinstance(padding, str) else pair(padding),
            "dilation": pair(getattr(m, "dilation", o.dilation)),
            "ceil_mode": bool(getattr(m, "ceil_mode", o.ceil_mode)),
            "same": o.same or dynamic_same(m),
        }
    values: dict[str, Any] = {
        "kernel_size": o.kernel,
        "stride": o.stride,
        "padding": o.padding,
        "dilation": o.dilation,
        "ceil_mode": o.ceil_mode,
        "same": o.same,
    }
    rw = s.rewrites.get(o.owner)
    for edit in rw.calls if rw else []:
        if (edit.func, edit.call) == (o.func, o.call):
            values.update(edit.values)
    return values


def pads_per_size(s: Surgery, o: SpatialOp) -> bool:
    """Whether ``o`` pads each input by its size or can be made to: a plain Conv2d (zero
    padded), MaxPool2d or AvgPool2d module can (a functional call cannot)."""
    if o.kind != "module":
        return o.same
    m = module_at(s.model, o.id)
    if o.same or dynamic_same(m):
        return True
    return type(m) in SAME_CLASSES and getattr(m, "padding_mode", "zeros") == "zeros"


def _set(s: Surgery, o: SpatialOp, values: dict[str, Any], where: str) -> None:
    """Set an op's values; ``same`` among them makes it pad each input by its size (a
    module becomes its class of :mod:`bbswap.surgery.same`, sharing its weights)."""
    values = dict(values)
    if o.kind == "module" and "stride" in values:
        _follow_patch_size(s, o, pair(values["stride"]))
    if values.pop("same", False) and not current(s, o)["same"]:
        _make_same(s, o, values, where)
        return
    if o.op in ("avg-pool", "lp-pool"):
        values = {k: v for k, v in values.items() if k != "dilation"}
    if o.op == "lp-pool":
        values = {k: v for k, v in values.items() if k != "padding"}
    if o.kind == "module":
        for key, value in values.items():
            s.set_attr(o.id, key, value)
    else:
        s.edit_call(o, values)


def _follow_patch_size(s: Surgery, o: SpatialOp, stride: tuple[int, int]) -> None:
    """A patch embedding that computes its token grid as its input size floor-divided by
    its ``patch_size`` (Twins' PatchEmbed), not from its conv's output: when its conv,
    whose stride is that patch size, gets a new stride, the owner's ``patch_size`` follows,
    so the grid it computes stays the one its conv gives."""
    path = parent_path(o.id)
    owner = module_at(s.model, path) if path else s.model
    before = pair(getattr(module_at(s.model, o.id), "stride", o.stride))
    patch = getattr(owner, "patch_size", None)
    if isinstance(patch, (tuple, list)) and tuple(patch) == before and stride != before:
        s.set_attr(path, "patch_size", stride)


def _make_same(s: Surgery, o: SpatialOp, values: dict[str, Any], where: str) -> None:
    made = same_version(module_at(s.model, o.id), values) if pads_per_size(s, o) else None
    if made is None:
        what = (
            f"a functional call ({o.func})"
            if o.kind != "module"
            else f"a {type(module_at(s.model, o.id)).__name__}, not a plain Conv2d, "
            "MaxPool2d or AvgPool2d"
        )
        raise SurgeryError(
            f"{where}: {o.id} would need padding that depends on the input size (its window "
            f"is even or wider than its stride), but it is {what}; choose another "
            "reduction point"
        )
    module = module_at(s.model, o.id)
    new, source = made
    new.train(module.training)
    s.replace(o.id, new, source, getattr(module, "padding", 0), "same per size", "padding")


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


def _same_padding(
    o: SpatialOp, k: int, d: int, stride: int, pre: int, where: str, axis: int
) -> int:
    """Padding per side that makes one axis give ``ceil(size / stride)``."""
    span = d * (k - 1)
    if span % 2:
        raise SurgeryError(
            f"{where}: cannot set stride {stride} at {o.id} exactly: its kernel "
            f"{k} would need {span / 2:g} pixels of padding per side on {'HW'[axis]} "
            "(a pixel would be lost); choose another reduction point"
        )
    if span // 2 < pre:
        raise SurgeryError(
            f"{where}: cannot set stride {stride} at {o.id} exactly: its input "
            f"is already padded by {pre} pixels per side on {'HW'[axis]}, more "
            f"than the {span // 2} its kernel {k} needs; choose another reduction point"
        )
    return span // 2 - pre


def restride(
    o: SpatialOp,
    now: dict[str, Any],
    stride: tuple[int, int],
    where: str,
    pre: tuple[int, int] = (0, 0),
    *,
    keep_window: bool = False,
    per_size: bool = False,
) -> dict[str, Any]:
    """New kernel/stride/padding for a window op so its size follows the new stride exactly.

    A pooling whose window equals its stride lets the window follow the stride, unless
    ``keep_window`` (mode 'dilate': the a-trous algorithm keeps the window, as timm's
    ``output_stride`` keeps a 2x2/2 average at stride 1) and it can keep it. Anything else
    gets 'same' padding,
    ``dilation * (kernel - 1) / 2`` per side, so the output is ``ceil(size / stride)``
    whatever the input size. When that is not a whole number (an even window), a conv
    going to stride 1 takes torch's ``padding='same'``, and an op that can (``per_size``)
    pads each input by its size; both put the odd pixel after. Either is refused where
    it would change an axis the new stride leaves alone. Padding already applied by a pad
    call just before the op (``pre``, per side) counts towards the 'same' padding.
    """
    kernel, padding = list(now["kernel_size"]), now["padding"]
    if now.get("same", False):
        return {"stride": stride}  # it pads itself to ceil(size / stride)
    if isinstance(padding, str):
        if any(v != 1 for v in stride) and padding == "same":
            raise SurgeryError(f"{where}: {o.id} uses padding='same', which needs stride 1")
        return {"stride": stride}
    padding = list(padding)
    odd: list[int] = []  # axes whose 'same' padding is not a whole number per side
    for axis in range(2):
        if stride[axis] == now["stride"][axis]:
            continue
        k, d = kernel[axis], now["dilation"][axis]
        even = d * (k - 1) % 2 == 0
        keep = keep_window and pre == (0, 0) and (even or per_size)
        if o.op != "conv" and k == now["stride"][axis] and padding[axis] == 0 and not keep:
            kernel[axis] = stride[axis]
            continue
        patchify = o.op == "conv" and k == now["stride"][axis] and padding[axis] == 0 and d == 1
        if patchify and pre == (0, 0) and stride[axis] < k and (k - stride[axis]) % 2 == 0:
            # a patch conv floors (size // k); (k - s) / 2 pixels a side keep it flooring,
            # size // s, at any size, as the grid its owner computes from the size does
            padding[axis] = (k - stride[axis]) // 2
            continue
        if not even:
            odd.append(axis)
            continue
        padding[axis] = _same_padding(o, k, d, stride[axis], pre[axis], where, axis)
    if odd:
        return _odd_window(o, now, (kernel[0], kernel[1]), stride, odd, where, pre, per_size)
    _check_pool_padding(o, kernel, padding, f"{where}: cannot set stride {fmt(stride)} at {o.id}")
    return {
        "kernel_size": (kernel[0], kernel[1]),
        "stride": stride,
        "padding": (padding[0], padding[1]),
    }


def _odd_window(
    o: SpatialOp,
    now: dict[str, Any],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    odd: list[int],
    where: str,
    pre: tuple[int, int],
    per_size: bool,
) -> dict[str, Any]:
    """The values for a window whose 'same' padding has an odd pixel on an axis in
    ``odd``: padding on one side more than the other, if that leaves the other axes as
    they are (at stride 1, padded by half the span per side already)."""
    untouched = [a for a in range(2) if stride[a] == now["stride"][a]]
    keeps = all(
        now["stride"][a] == 1 and now["dilation"][a] * (kernel[a] - 1) == 2 * now["padding"][a]
        for a in untouched
    )
    if keeps and pre == (0, 0):
        if o.op == "conv" and stride == (1, 1):
            # torch's padding='same' pads the odd pixel on the right and bottom, so the
            # size stays exactly the input's
            return {"stride": stride, "padding": "same"}
        if per_size:
            return {"kernel_size": kernel, "stride": stride, "same": True}
    axis = odd[0]
    k, span = kernel[axis], now["dilation"][axis] * (kernel[axis] - 1)
    raise SurgeryError(
        f"{where}: cannot set stride {stride[axis]} at {o.id} exactly: its kernel "
        f"{k} would need {span / 2:g} pixels of padding per side on {'HW'[axis]} "
        "(a pixel would be lost); choose another reduction point"
    )


def _check_pool_padding(o: SpatialOp, kernel: list[int], padding: list[int], what: str) -> None:
    """PyTorch pools take at most half the kernel as padding, whatever the dilation."""
    for axis in range(2):
        if o.op in ("max-pool", "avg-pool") and padding[axis] > kernel[axis] // 2:
            raise SurgeryError(
                f"{what} exactly: it would need {padding[axis]} pixels of padding per side "
                f"on {'HW'[axis]}, but a {o.op} with kernel {kernel[axis]} takes at most "
                f"{kernel[axis] // 2}"
            )


def _dilate(s: Surgery, o: SpatialOp, factors: list[int], where: str) -> None:
    now = current(s, o)
    kernel, dilation = now["kernel_size"], list(now["dilation"])
    if all(k == 1 for k in kernel):
        return
    if o.op in ("avg-pool", "lp-pool") and now["stride"] == (1, 1):
        return  # a smoothing with no dilation: it stays as it is, as in timm's output_stride
    if o.op in ("avg-pool", "lp-pool"):
        raise SurgeryError(
            f"{where}: mode 'dilate' would have to dilate {o.id}, an {o.op} with kernel "
            f"{kernel[0]} and stride {fmt(now['stride'])}, which has no dilation; use mode = "
            "'stride'"
        )
    padding = now["padding"]
    if isinstance(padding, str) or now["same"]:
        new = (dilation[0] * factors[0], dilation[1] * factors[1])
        _set(s, o, {"dilation": new}, where)
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
    values = {"dilation": (dilation[0], dilation[1]), "padding": (padding[0], padding[1])}
    _set(s, o, values, where)


@dataclass(frozen=True)
class Stride(Op, kind=OpKind.STRIDE):
    """change the stride of a reduction point or of every one in a stage, per axis"""

    fields = (
        Field("at", "str", "a reduction point id or a stage path", required=True),
        Field(
            "stride",
            "pair",
            "the new stride, or [h, w]",
            required=True,
            minimum=1,
            maximum=MAX_STRIDE,
        ),
        Field(
            "mode",
            "str",
            "'stride' changes it; 'dilate' also dilates what follows",
            default="stride",
            choices=("stride", "dilate"),
        ),
    )
    at: str
    stride: tuple[int, int]
    mode: str = "stride"

    def validate(self, trace: Trace, where: str) -> None:
        _check_at(trace, self.at, where)
        if self.mode != "dilate":
            return
        for o in stride_targets(trace, self.at):
            for axis in range(2):
                old, new = o.stride[axis], self.stride[axis]
                if new > old or old % new:
                    raise RecipeError(
                        f"{where}.stride: mode 'dilate' removes stride; {o.id} has stride "
                        f"{old} on {'HW'[axis]}, which {new} does not divide (use mode = 'stride')"
                    )

    def apply(self, surgery: Surgery, where: str) -> None:
        removed: dict[str, tuple[int, int]] = {}  # target id -> the stride factor it loses
        changed: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}  # id -> (old, new)
        for o in stride_targets(surgery.trace, self.at):
            now = current(surgery, o)
            changed[o.id] = (pair(now["stride"]), self.stride)
            removed[o.id] = (
                max(1, now["stride"][0] // self.stride[0]),
                max(1, now["stride"][1] // self.stride[1]),
            )
            pre = pre_padding(surgery.trace, o)
            keep, per_size = self.mode == "dilate", pads_per_size(surgery, o)
            values = restride(o, now, self.stride, where, pre, keep_window=keep, per_size=per_size)
            _set(surgery, o, values, where)
        if self.mode == "dilate":
            _dilate_downstream(surgery, removed, where)
        _follow_feature_ratio(surgery, changed)


def _follow_feature_ratio(
    s: Surgery, changed: dict[str, tuple[tuple[int, int], tuple[int, int]]]
) -> None:
    """A CNN stem of a hybrid ViT (timm's HybridEmbed) keeps ``feature_ratio``, the
    reduction its ``backbone`` had when it was built, and lays the tokens on the grid of
    the input size floor-divided by it (``dynamic_feat_size``): a stride change inside
    that backbone changes the ratio by the same factor, once for the op's parallel
    branches (they change by the same factor and meet at a join)."""
    for path, module in s.model.named_modules():
        ratio = getattr(module, "feature_ratio", None)
        if not isinstance(ratio, tuple) or len(ratio) != 2 or not hasattr(module, "backbone"):
            continue
        inside = [v for k, v in changed.items() if k.startswith(f"{path}.backbone.".lstrip("."))]
        if not inside:
            continue
        (old, new), now = inside[0], list(ratio)
        for axis in range(2):
            if (now[axis] * new[axis]) % old[axis]:
                return  # no whole ratio: the patched model's trace says what it gives
            now[axis] = now[axis] * new[axis] // old[axis]
        if tuple(now) != ratio:
            s.set_attr(path, "feature_ratio", (now[0], now[1]))


def _dilate_downstream(s: Surgery, removed: dict[str, tuple[int, int]], where: str) -> None:
    """Every window op fed (through the traced chain of reductions) by a restrided point
    is dilated by the stride removed before it, as torchvision's
    replace_stride_with_dilation does: the strided conv itself and parallel branches (a
    shortcut) keep theirs."""
    for o in s.trace.ops:
        factors = [1, 1]
        for upstream in o.in_chain:
            if upstream in removed:
                factors = [factors[axis] * removed[upstream][axis] for axis in range(2)]
        if o.op in WINDOW_OPS and factors != [1, 1]:
            _dilate(s, o, factors, where)


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
    pre: int = 0,
) -> tuple[int, bool] | None:
    """The padding and rounding closest to the current ones for which one axis of a window
    op gives exactly ``rule(size / stride)`` for every input size it accepts; None if no
    padding does (a pooling may pad at most half its kernel, and only a pooling rounds,
    with a ceil_mode among ``modes``). ``pre``: pixels (both sides) that a pad call adds
    to the input first; the rule is of the size before it."""
    pool = op != "conv"
    span = dilation * (kernel - 1)
    limit = kernel // 2 if pool else span
    want = _RULES[rule]
    sizes = range(1, 4 * (span + stride) + 64)
    found = []
    for c in modes if pool else (False,):
        for p in range(limit + 1):
            step = SizeStep("window", kernel, stride, p, dilation, c, pool)
            outs = [step.out_size(n + pre) for n in sizes]
            if all(o <= 0 or o == want(n, stride) for n, o in zip(sizes, outs)) and all(
                o > 0 for n, o in zip(sizes, outs) if n + pre > span
            ):
                found.append((c != ceil, abs(p - padding), p, c))
    if not found:
        return None
    _, _, p, c = min(found)
    return p, c


def pad_before(trace: Trace, o: SpatialOp) -> tuple[int, int]:
    """Pixels (both sides) that a pad call adds to ``o``'s input on H and W, when it is the
    last op before ``o`` that changes the size; (0, 0) when there is none."""
    by_id = {p.id: p for p in trace.ops}
    last = by_id.get(o.in_chain[-1]) if o.in_chain else None
    if last is None or last.op != "pad":
        return (0, 0)
    return (last.steps_h[0].padding, last.steps_w[0].padding)


def _exact_values(
    o: SpatialOp, now: dict[str, Any], rule: str, where: str, pre: tuple[int, int]
) -> dict[str, Any]:
    """The padding (and a pooling's ceil_mode) that makes ``o`` follow ``rule``: a fixed
    one if there is one; else, with no pad call before it, torch's ``padding='same'`` for
    a conv at stride 1, or padding per input size where that gives the rule (always at
    stride 1; at a stride, for ceil)."""
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
                rule,
                (mode,),
                pre[axis],
            )
            for axis in range(2)
        ]
        h, w = settings
        if h is not None and w is not None:
            values: dict[str, Any] = {"padding": (h[0], w[0])}
            if o.op != "conv":
                values["ceil_mode"] = mode
            return values
    if pre == (0, 0) and now["stride"] == (1, 1) and o.op == "conv":
        return {"padding": "same"}  # an even kernel: the odd pixel after, as torch pads it
    if pre == (0, 0) and (rule == "ceil" or now["stride"] == (1, 1)):
        return {"same": True}
    axis = 0 if settings[0] is None else 1
    k, st = now["kernel_size"][axis], now["stride"][axis]
    why = " after the pad call before it" if pre != (0, 0) else ""
    raise SurgeryError(
        f"{where}: no padding makes {o.id} (kernel {k}, stride {st} on {'HW'[axis]}) "
        f"give exactly {rule}(size/{st}){why}"
    )


@dataclass(frozen=True)
class Exact(Op, kind=OpKind.EXACT):
    """pad (and for a pooling, round) reduction points so each gives exactly ceil(H/S) or
    floor(H/S) for every input size"""

    fields = (
        Field("at", "str", "a reduction point id or a stage path", required=True),
        Field("rule", "str", "the size rule", default="ceil", choices=("ceil", "floor")),
    )
    at: str
    rule: str = "ceil"

    def validate(self, trace: Trace, where: str) -> None:
        _check_at(trace, self.at, where)

    def apply(self, surgery: Surgery, where: str) -> None:
        for o in stride_targets(surgery.trace, self.at):
            now = current(surgery, o)
            if now["same"]:
                if self.rule == "floor" and now["stride"] != (1, 1):
                    raise SurgeryError(
                        f"{where}: {o.id} pads itself to ceil(size/stride) at every size; "
                        "it cannot round down"
                    )
                continue
            if isinstance(now["padding"], str):
                if now["padding"] == "same":
                    continue
                now = {**now, "padding": (0, 0)}  # 'valid'
            values = _exact_values(o, now, self.rule, where, pad_before(surgery.trace, o))
            _set(surgery, o, values, where)
