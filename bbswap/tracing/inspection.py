"""``bbswap inspect``: resolve a backbone, trace it, check its size rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from bbswap.backbones.registry import Backbone, resolve
from bbswap.errors import InvalidArgument, ModelError
from bbswap.parsing import parse_input
from bbswap.tracing.sizes import SizeRule
from bbswap.tracing.tracer import (
    Stage,
    Trace,
    _ForwardFailed,
    build_any,
    forward_error,
    trace,
    trace_instance,
    trace_module,
)

Shape4 = tuple[int, int, int, int]


@dataclass(frozen=True)
class SizeCheck:
    """The output size predicted from the reduction chain, and the one a trace gave."""

    input_hw: tuple[int, int]
    predicted_hw: tuple[int, int]
    traced_hw: tuple[int, int] | None  # None when the output is not spatial

    @property
    def ok(self) -> bool:
        return self.traced_hw is None or self.traced_hw == self.predicted_hw


@dataclass(frozen=True)
class InspectReport:
    """A trace plus its size rule and size checks.

    For a classifier (non-spatial output) the rule and checks are those of
    ``features``, the last spatial stage before the head.
    """

    backbone: str
    trace: Trace
    features: Stage | None
    rules: tuple[SizeRule, SizeRule]
    sizes: tuple[SizeCheck, ...]


@dataclass(frozen=True)
class Prepared:
    """A backbone and an input shape made consistent with each other."""

    backbone: Backbone
    input_shape: Shape4
    build: Callable[[], nn.Module]


def first_conv_in_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def prepare(backbone: Backbone, input_shape: str | Sequence[int]) -> Prepared:
    """Parse ``--input`` and decide the channel count the model is built with.

    A backbone that takes ``in_chans`` is built for the input's channel count; for
    ``HxW`` the channel count is the model's own (read off its first conv if needed).
    """
    if isinstance(input_shape, str):
        in_chans = backbone.default_in_chans
        if in_chans is None and input_shape.lower().count("x") == 1:
            in_chans = first_conv_in_channels(build_any(backbone.build))
        shape = parse_input(input_shape, in_chans)
    else:
        shape = tuple(int(v) for v in input_shape)  # type: ignore[assignment]  # checked below
        if len(shape) != 4 or any(v <= 0 for v in shape):
            raise InvalidArgument(f"input shape must be 4 positive integers, got {input_shape}")
    chans = shape[1]

    def build() -> nn.Module:
        return backbone.build(in_chans=chans)

    return Prepared(backbone, shape, build)


def check_sizes(
    model: nn.Module, result: Trace, sizes: Sequence[tuple[int, int]]
) -> tuple[SizeCheck, ...]:
    """Predict each size from the chain and trace the model again to confirm it."""
    checks = []
    n, c = result.input_shape[:2]
    features = result.features
    for h, w in sizes:
        predicted = result.output_size(h, w, features.chain if features else None)
        try:
            again = trace_module(model, (n, c, h, w), depth=result.depth, device=result.device)
        except _ForwardFailed as failed:
            raise ModelError(
                f"--sizes {h}x{w}: {forward_error(failed, (n, c, h, w))}"
            ) from failed.error
        out = again.output_shape
        if features is not None:
            out = next((s.out_shape for s in again.stages if s.path == features.path), ())
        traced = (out[-2], out[-1]) if len(out) == 4 else None
        checks.append(SizeCheck((h, w), predicted, traced))
    return tuple(checks)


def inspect_backbone(
    spec: str | Backbone | nn.Module,
    input_shape: str | Sequence[int] = "1x3x224x224",
    *,
    depth: int = 1,
    sizes: Sequence[tuple[int, int]] = (),
    kwargs: dict[str, Any] | None = None,
) -> InspectReport:
    """Trace a backbone (a spec, a resolved :class:`Backbone` or a model instance)."""
    if depth < 1:
        raise InvalidArgument(f"--depth must be at least 1, got {depth}")
    if isinstance(spec, nn.Module):
        model = spec
        if isinstance(input_shape, str):
            shape: tuple[int, ...] = parse_input(input_shape, first_conv_in_channels(model))
        else:
            shape = tuple(int(v) for v in input_shape)
            if len(shape) != 4 or min(shape) <= 0:
                raise InvalidArgument(
                    f"input shape must be 4 positive integers (N, C, H, W), got {input_shape}"
                )
        result = trace_instance(model, shape, depth, type(model).__name__)
        name = type(model).__name__
    else:
        backbone = spec if isinstance(spec, Backbone) else resolve(spec, kwargs)
        prepared = prepare(backbone, input_shape)
        result, model = trace(prepared.build, prepared.input_shape, depth, backbone.spec)
        name = backbone.spec
    checks = check_sizes(model, result, sizes) if sizes else ()
    features = result.features
    rules = result.size_rules(features.chain if features else None)
    return InspectReport(name, result, features, rules, checks)


def report_dict(report: InspectReport) -> dict[str, Any]:
    """The JSON form of an inspect report (schema ``bbswap.inspect/1``, see README)."""
    t = report.trace
    return {
        "schema": "bbswap.inspect/1",
        "backbone": report.backbone,
        "input": list(t.input_shape),
        "output": list(t.output_shape),
        "device": t.device,
        "note": t.note,
        "downsample": list(t.downsample),
        "receptive_field": list(t.receptive_field),
        "params": t.params,
        "macs": t.macs,
        "activation_bytes": t.activation_bytes,
        "features": None
        if report.features is None
        else {
            "stage": report.features.path,
            "output": list(report.features.out_shape),
            "downsample": list(report.features.downsample),
        },
        "size_rule": {"h": report.rules[0].format("H"), "w": report.rules[1].format("W")},
        "stages": [
            {
                "path": s.path,
                "type": s.type,
                "output": list(s.out_shape),
                "channels": s.channels,
                "downsample": list(s.downsample),
                "receptive_field": list(s.receptive_field),
                "params": s.params,
                "macs": s.macs,
                "activation_bytes": s.activation_bytes,
                "functional": s.functional,
            }
            for s in t.stages
        ],
        "reductions": [
            {
                "id": r.id,
                "owner": r.owner,
                "kind": r.kind,
                "op": r.op,
                "stage": r.stage,
                "kernel": list(r.kernel),
                "stride": list(r.stride),
                "padding": r.padding if isinstance(r.padding, str) else list(r.padding),
                "dilation": list(r.dilation),
                "rounding": r.rounding,
                "input_hw": list(r.in_hw),
                "output_hw": list(r.out_hw),
            }
            for r in t.reductions
        ],
        "sizes": [
            {
                "input": list(c.input_hw),
                "predicted": list(c.predicted_hw),
                "traced": list(c.traced_hw) if c.traced_hw else None,
                "ok": c.ok,
            }
            for c in report.sizes
        ],
    }
