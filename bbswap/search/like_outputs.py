"""``fit --like`` a backbone that returns several outputs, or an encoder of ``(img, img_mask)``.

The like-backbone is traced at every probe size; each of its outputs is then one of: the
output the fit targets (the one with the largest downsample), a feature map the patched
backbone must give at the very same size at every probe (found as a module on the way to
the fitted output: the outermost, then the last, whose output has that size at every
probe), or the mask of a mask-carrying encoder, whose slice of the mask input the trace
found (``img_mask[:, 0::16, 0::16]``) and which must be at the features' size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bbswap.errors import ModelError, TargetError
from bbswap.surgery.outputs_plan import OutputRole, OutputsPlan, PlannedOutput
from bbswap.tracing.outputs import Output
from bbswap.tracing.tracer import ForwardFailed, Stage, Trace, forward_error, trace_module

Size = tuple[int, int]


def _fmt(stride: Size) -> str:
    return str(stride[0]) if stride[0] == stride[1] else f"{stride[0]}x{stride[1]}"


def _stride(o: Output) -> Size:
    return (max(1, round(o.downsample[0])), max(1, round(o.downsample[1])))


def outputs_plan(like: str, trace: Trace) -> OutputsPlan | None:
    """The plan of a like-backbone that returns several tensors (sizes and taps still
    unknown); None for one that returns one tensor and takes no mask."""
    mask = trace.mask
    if mask is not None:
        _require_mask(like, trace)
    if not trace.outputs:
        return None
    planned = []
    for o in trace.outputs:
        if o.key == trace.output_key:
            planned.append(PlannedOutput(o.key, OutputRole.FEATURES, o.channels, _stride(o)))
        elif mask is not None and o.key == mask.key:
            step = mask.rule.step if mask.rule is not None else (1, 1)
            planned.append(PlannedOutput(o.key, OutputRole.MASK, 0, step, rule=mask.rule))
        elif not o.spatial:
            raise TargetError(
                f"{{like}} {like}: its output {o.key!r} is {'x'.join(map(str, o.shape))}, no "
                "feature map (N x C x H x W) nor the mask of its input; bbswap reproduces "
                "feature maps and masks",
                params=("like",),
            )
        else:
            planned.append(PlannedOutput(o.key, OutputRole.TAP, o.channels, _stride(o)))
    return OutputsPlan(like, trace.returns, tuple(planned), mask.input if mask else None)


def _require_mask(like: str, trace: Trace) -> None:
    """A like-backbone that takes a second input returns its features and their mask."""
    mask = trace.mask
    assert mask is not None  # asked only of a trace with a mask input
    name = mask.input.mask
    if mask.key is None:
        raise TargetError(
            f"{{like}} {like}: its forward takes a second input '{name}', traced as an "
            "image-sized mask (N x H x W, all ones), but returns nothing made from it; "
            "bbswap reproduces a second input only as a mask returned at the features' size",
            params=("like",),
        )
    if mask.rule is None:
        raise TargetError(
            f"{{like}} {like}: the mask it returns (output {mask.key!r}) is made by "
            f"{mask.made_by or 'another call'}, not by slicing '{name}' as "
            f"{name}[:, a::s, b::t]; bbswap reproduces masks sliced so",
            params=("like",),
        )
    if not trace.outputs or len(trace.outputs) < 2:
        raise TargetError(
            f"{{like}} {like}: its forward returns only the mask of '{name}'; bbswap "
            "reproduces an encoder that returns (features, mask)",
            params=("like",),
        )


def traces_at(like: str, trace: Trace, model: Any, probes: Sequence[Size]) -> dict[Size, Trace]:
    """The ``like`` backbone traced at each probe, once for every reader of its sizes."""
    n, c = trace.input_shape[:2]
    traces: dict[Size, Trace] = {}
    for h, w in probes:
        try:
            traces[(h, w)] = trace_module(
                model, (n, c, h, w), depth=trace.depth, device=trace.device
            )
        except ForwardFailed as failed:
            raise ModelError(
                f"{{like}} {like} fails at {h}x{w}, which its size rule accepts: "
                + str(forward_error(failed, (n, c, h, w))),
                params=("like",),
            ) from failed.error
    return traces


def probe_sizes(plan: OutputsPlan, traces: dict[Size, Trace]) -> OutputsPlan:
    """The plan with each output's size at every probe, from ``traces`` (one per probe);
    a mask must be at the features' size, and where its slice says, at every probe."""
    sizes: dict[Any, list[tuple[Size, Size]]] = {o.key: [] for o in plan.outputs}
    for (h, w), again in traces.items():
        got = {o.key: (o.shape[-2], o.shape[-1]) for o in again.outputs}
        for o in plan.outputs:
            sizes[o.key].append(((h, w), got[o.key]))
        _check_mask(plan, (h, w), got)
    outputs = tuple(
        PlannedOutput(o.key, o.role, o.channels, o.stride, tuple(sizes[o.key]), rule=o.rule)
        for o in plan.outputs
    )
    return OutputsPlan(plan.like, plan.returns, outputs, plan.mask_input)


def _check_mask(plan: OutputsPlan, size: Size, got: dict[Any, Size]) -> None:
    mask = plan.mask
    if mask is None or mask.rule is None:
        return
    at, features = got[mask.key], got[plan.features.key]
    h, w = size
    shown = "x".join(map(str, at))
    if at != features:
        raise TargetError(
            f"{{like}} {plan.like}: at {h}x{w} the mask it returns is {shown} but its "
            f"features are {features[0]}x{features[1]}; bbswap reproduces a mask at the "
            "features' size",
            params=("like",),
        )
    if at != mask.rule.size(h, w):  # the slice seen at one size is not the rule at another
        raise TargetError(
            f"{{like}} {plan.like}: at {h}x{w} its mask is {shown}, not what "
            f"{mask.rule.describe()} gives; its mask follows no one slice",
            params=("like",),
        )


def _taps(after: Trace, want: tuple[tuple[Size, Size], ...]) -> list[Stage]:
    """The modules on the way to the output whose output has the ``want`` sizes, best
    first: the outermost, then the last called."""
    found = []
    for index, s in enumerate(after.module_stages):
        if not s.spatial or after.chain[: len(s.chain)] != s.chain:
            continue
        if all(after.output_size(h, w, s.chain) == hw for (h, w), hw in want if min(hw) > 0):
            found.append((s.path.count("."), -index, s))
    return [s for *_, s in sorted(found, key=lambda f: (f[0], f[1]))]


def choose_taps(plan: OutputsPlan, traces: Sequence[Trace]) -> tuple[int, OutputsPlan] | None:
    """The first of ``traces`` (the exact candidates' patched backbones, ranked) that has
    a tap for every feature map of the plan besides the fitted one, and the plan with
    those taps; None if none has."""
    for i, after in enumerate(traces):
        outputs = []
        for o in plan.outputs:
            if o.role is not OutputRole.TAP:
                outputs.append(o)
                continue
            taps = _taps(after, o.sizes)
            if not taps:
                break
            outputs.append(
                PlannedOutput(
                    o.key, o.role, o.channels, o.stride, o.sizes, taps[0].path, taps[0].channels
                )
            )
        else:
            return i, OutputsPlan(plan.like, plan.returns, tuple(outputs), plan.mask_input)
    return None


def no_taps(plan: OutputsPlan, spec: str) -> TargetError:
    """The error when no exact candidate gives every output of the plan."""
    taps = [o for o in plan.outputs if o.role is OutputRole.TAP]
    first = taps[0]
    (h, w), (oh, ow) = first.sizes[0] if first.sizes else ((0, 0), (0, 0))
    return TargetError(
        f"no exact candidate on {spec} has a module whose output is at the size of "
        f"{{like}} {plan.like}'s output {first.key!r} at every probe (1/"
        f"{_fmt(first.stride)}, e.g. {oh}x{ow} at {h}x{w}) on the way to its features",
        params=("like",),
    )
