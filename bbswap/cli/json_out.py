"""The JSON form of every report, built from the library's data classes.

Each ``*_dict`` function returns one ``--json`` document (its ``schema`` names it,
``bbswap.<command>/1``); the keys and their order are the documented format, see README.
Each schema is a JSON Schema file in ``docs/schemas/`` (``<command>.schema.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bbswap.kinds import Layout
from bbswap.records import attrs

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bbswap.backbones.registry import ListedBackbone
    from bbswap.codegen.export import Exported
    from bbswap.recipes.registry import OpInfo
    from bbswap.recipes.schema import Field
    from bbswap.search.fit import Candidate, FitResult
    from bbswap.search.matrix import Cell, Matrix, Row
    from bbswap.surgery.apply import ApplyResult
    from bbswap.surgery.core import Edit
    from bbswap.surgery.outputs_plan import OutputsPlan
    from bbswap.tracing.cross_check import CrossCheck
    from bbswap.tracing.inspection import InspectReport, SizeCheck
    from bbswap.tracing.mask import MaskRule
    from bbswap.tracing.outputs import Output
    from bbswap.tracing.tracer import SpatialOp, Stage, Trace
    from bbswap.verify.checks import Check, VerifyReport


def list_dict(rows: Sequence[ListedBackbone]) -> dict[str, Any]:
    """``bbswap list --json`` (schema ``bbswap.list/1``)."""
    return {
        "schema": "bbswap.list/1",
        "backbones": [attrs(r, "spec", "family", "in_chans", "description") for r in rows],
    }


def report_dict(report: InspectReport) -> dict[str, Any]:
    """The JSON form of an inspect report (schema ``bbswap.inspect/1``, see README and
    ``docs/schemas/inspect.schema.json``), as ``bbswap inspect --json`` prints it.

    Args:
        report: What :func:`~bbswap.tracing.inspection.inspect_backbone` returned.

    Returns:
        A dict of JSON types only.

    Example::

        json.dumps(bbswap.report_dict(bbswap.inspect_backbone("resnet50")))
    """
    t = report.trace
    f = report.features
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
        if f is None
        else {"stage": f.path, "output": list(f.out_shape), "downsample": list(f.downsample)},
        "size_rule": {"h": report.rules[0].format("H"), "w": report.rules[1].format("W")},
        "outputs": [_output(o) for o in t.outputs],
        "source_output": _source_output(t),
        "mask": _mask(t),
        "stages": [_stage(s) for s in t.stages],
        "reductions": [_reduction(r) for r in t.reductions],
        "sizes": [_size_check(c) for c in report.sizes],
    }


def _output(o: Output) -> dict[str, Any]:
    return {
        "key": o.key,
        "output": list(o.shape),
        "channels": o.channels,
        "downsample": list(o.downsample) if o.spatial else None,
        "receptive_field": list(o.receptive_field) if o.spatial else None,
    }


def _mask(t: Trace) -> dict[str, Any] | None:
    """What a forward of (img, img_mask) made of its mask (None: it takes no mask)."""
    m = t.mask
    if m is None:
        return None
    return {
        "image": m.input.image,
        "input": m.input.mask,
        "key": m.key,
        "rule": _rule(m.rule),
        "made_by": m.made_by or None,
    }


def _rule(rule: MaskRule | None) -> dict[str, Any] | None:
    return None if rule is None else {"start": list(rule.start), "step": list(rule.step)}


def _like_outputs(plan: OutputsPlan | None) -> dict[str, Any] | None:
    """How the winner of a fit gives every output of a like-backbone that returns several."""
    if plan is None:
        return None
    return {
        "like": plan.like,
        "returns": plan.returns,
        "mask_input": None if plan.mask_input is None else attrs(plan.mask_input, "image", "mask"),
        "outputs": [
            {
                "key": o.key,
                "role": o.role.value,
                "channels": o.channels or None,
                "stride": list(o.stride),
                "tap": o.tap or None,
                "projected_from": o.tap_channels if o.projected else None,
                "mask_rule": _rule(o.rule),
                "sizes": [[list(i), list(hw)] for i, hw in o.sizes],
            }
            for o in plan.outputs
        ],
    }


def _source_output(t: Trace) -> dict[str, Any] | None:
    """Which output of a forward that returns several a report is about (None: one)."""
    if t.output_key is None:
        return None
    return {"key": t.output_key, "returns": t.returns, "default": not t.output_given}


def _stage(s: Stage) -> dict[str, Any]:
    return {
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
        "layout": s.layout.value,
        "grid": list(s.grid) if s.grid is not None and s.layout is not Layout.NONE else None,
    }


def _reduction(r: SpatialOp) -> dict[str, Any]:
    return {
        **attrs(r, "id", "owner", "kind", "op", "stage"),
        "kernel": list(r.kernel),
        "stride": list(r.stride),
        "padding": r.padding if isinstance(r.padding, str) else list(r.padding),
        "dilation": list(r.dilation),
        "rounding": r.rounding,
        "input_hw": list(r.in_hw),
        "output_hw": list(r.out_hw),
    }


def _size_check(c: SizeCheck) -> dict[str, Any]:
    return {
        "input": list(c.input_hw),
        "predicted": list(c.predicted_hw),
        "traced": list(c.traced_hw) if c.traced_hw else None,
        "ok": c.ok,
    }


def _summary(t: Trace) -> dict[str, Any]:
    return {
        "input": list(t.input_shape),
        "output": list(t.output_shape),
        "downsample": list(t.downsample),
        "receptive_field": list(t.receptive_field),
        "params": t.params,
        "macs": t.macs,
        "activation_bytes": t.activation_bytes,
    }


def apply_dict(result: ApplyResult) -> dict[str, Any]:
    """The JSON form of an apply result (schema ``bbswap.apply/1``)."""
    from bbswap.surgery.apply import stage_diff

    rules = result.after.size_rules()
    return {
        "schema": "bbswap.apply/1",
        "backbone": result.backbone.spec,
        "recipe": result.recipe.name,
        "source_output": _source_output(result.before),
        "before": _summary(result.before),
        "after": _summary(result.after),
        "size_rule": {"h": rules[0].format("H"), "w": rules[1].format("W")},
        "stages": [
            {
                "path": d.path,
                "before": None if d.before is None else list(d.before.out_shape),
                "after": None if d.after is None else list(d.after.out_shape),
            }
            for d in stage_diff(result.before, result.after)
        ],
        "edits": [_edit(e) for e in result.edits],
    }


def _edit(e: Edit) -> dict[str, Any]:
    return attrs(e, "op_index", "op", "path", "attribute", "old", "new")


def fit_dict(result: FitResult, top: int) -> dict[str, Any]:
    """The JSON form of a fit (schema ``bbswap.fit/1``)."""
    winner = result.winner.trace.macs if result.winner.result else 0
    return {
        "schema": "bbswap.fit/1",
        "backbone": result.backbone.spec,
        "target": {
            "channels": result.target.channels,
            "stride": list(result.target.stride),
            "in_chans": result.target.in_chans,
            "like": result.target.like,
            "rounding": result.target.rounding,
            "outputs": [
                {"name": t.name, "stride": list(t.stride), "channels": t.channels}
                for t in result.target.outputs
            ],
            "returns": result.target.returns if result.target.outputs else None,
        },
        "input": list(result.source.input_shape),
        "source_output": _source_output(result.source),
        "like_outputs": _like_outputs(result.outputs),
        "evaluated": result.evaluated,
        "probes": [list(p) for p in result.probes],
        "prefer": result.prefer,
        "candidates": [_candidate(c, winner) for c in result.candidates[:top]],
    }


def _candidate(c: Candidate, winner: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "label": c.label,
        "mode": c.mode,
        "exact": c.ok,
        "rounding_only": c.rounding_only,
        "rule": c.rule or None,
        "error": c.error or None,
        "note": c.note or None,
        "ops": [op.to_toml() for op in c.recipe.ops],
    }
    if c.result is not None:
        t = c.trace
        row.update(
            output=list(t.output_shape),
            macs=t.macs,
            macs_ratio=t.macs / winner if winner else None,
            params=t.params,
            receptive_field=list(t.receptive_field),
            activation_bytes=t.activation_bytes,
            outputs=[
                {
                    "key": out.key,
                    "taps": tap["at"],
                    "output": list(out.shape),
                    "downsample": list(out.downsample),
                }
                for tap, out in zip(c.recipe.taps, t.outputs)
            ],
        )
    return row


def _checks(checks: Sequence[Check]) -> list[dict[str, Any]]:
    return [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]


def export_dict(exported: Exported) -> dict[str, Any]:
    """What ``-o FILE.py`` wrote, for the ``written`` key of apply and fit."""
    return {
        "path": str(exported.path),
        "class_name": exported.emitted.class_name,
        "weights": str(exported.weights_path) if exported.weights_path else None,
        "checks": _checks(exported.report.checks),
        "weights_source": _weights_source(exported),
    }


def _weights_source(exported: Exported) -> dict[str, Any] | None:
    """Where the source backbone's weights came from (None: random weights)."""
    source = exported.weights_source
    if source is None:
        return None
    path = str(source.path) if source.path is not None else None
    return {"origin": source.origin, "path": path, "sha256": source.sha256}


def verify_dict(report: VerifyReport) -> dict[str, Any]:
    """``bbswap verify --json`` (schema ``bbswap.verify/1``)."""
    return {
        "schema": "bbswap.verify/1",
        "target": report.target,
        "ok": report.ok,
        "checks": _checks(report.checks),
    }


def matrix_dict(result: Matrix) -> dict[str, Any]:
    """The JSON form of a matrix (schema ``bbswap.matrix/1``)."""
    return {
        "schema": "bbswap.matrix/1",
        "patterns": list(result.patterns),
        "strides": list(result.strides),
        "channels": result.channels,
        "rounding": result.rounding,
        "targets": [t.describe() for t in result.targets],
        "returns": (result.returns or None) if result.targets else None,
        "verify": result.verify,
        "passed": result.passed,
        "cnns": result.cnns,
        "rows": [_row(r) for r in result.rows],
    }


def _row(r: Row) -> dict[str, Any]:
    return {
        **attrs(r, "spec", "ok", "channels"),
        "downsample": list(r.downsample) if r.downsample else None,
        "emit": r.emit or None,
        "reason": r.reason or None,
        "refused": r.refused,
        "detail": r.detail or None,
        "seconds": round(r.seconds, 2),
        "cells": [_cell(c) for c in r.cells],
    }


def _cell(c: Cell) -> dict[str, Any]:
    return {
        **attrs(c, "stride", "ok", "macs", "plan"),
        "rule": c.rule or None,
        "targets": [t.describe() for t in c.targets] or None,
        "verified": c.verified,
        "reason": c.reason or None,
        "detail": c.detail or None,
    }


def cross_check_dict(check: CrossCheck) -> dict[str, Any]:
    """The ``cross_check`` key of ``bbswap inspect --cross-check --json``."""
    return {
        "input": list(check.input_shape),
        "functional_macs": check.functional_macs,
        "counts": [
            {
                "counter": str(c.counter),
                "device": c.device,
                "input": list(c.input_shape),
                "params": c.params,
                "macs": c.macs,
                "bbswap_params": c.bbswap_params,
                "bbswap_macs": c.bbswap_macs,
                "counts": c.counts,
                "misses": c.misses,
                "error": c.error or None,
            }
            for c in check.counts
        ],
    }


def ops_dict(ops: Sequence[OpInfo]) -> dict[str, Any]:
    """``bbswap ops --json`` (schema ``bbswap.ops/1``): every recipe op and its fields."""
    return {
        "schema": "bbswap.ops/1",
        "ops": [
            {"op": op.name, "summary": op.summary, "fields": [_field(f) for f in op.fields]}
            for op in ops
        ],
    }


def _field(f: Field) -> dict[str, Any]:
    default = list(f.default) if isinstance(f.default, tuple) else f.default
    return {
        **attrs(f, "name", "kind", "required"),
        "default": default,
        "choices": list(f.choices),
        "minimum": f.minimum,
        "exclusive_maximum": f.maximum,
        "help": f.help,
    }
