"""``bbswap apply``: trace a backbone, apply a recipe to a copy, trace the result."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from bbswap.backbones.registry import Backbone, resolve
from bbswap.errors import InvalidArgument, SurgeryError
from bbswap.parsing import parse_dims
from bbswap.recipes.schema import Recipe
from bbswap.surgery.core import Edit, Surgery
from bbswap.tracing.inspection import choose_input
from bbswap.tracing.tracer import ForwardFailed, Stage, Trace, trace, trace_module

Shape4 = tuple[int, int, int, int]


@dataclass(frozen=True)
class ApplyResult:
    """A patched backbone and the record of how it was made."""

    backbone: Backbone
    recipe: Recipe
    before: Trace
    after: Trace
    edits: tuple[Edit, ...]
    model: nn.Module  # the patched model: from ``model=`` when given, else on the meta device
    surgery: Surgery  # the plan, made on the meta device


def source_input(backbone: Backbone, recipe: Recipe, input_text: str | None) -> tuple[Shape4, int]:
    """The source model's input and the input channels it is built with.

    With an ``in_channels`` op the source keeps its own channels and the op changes
    them; without one a backbone that takes ``in_chans`` is built for the input's.
    """
    changes_chans = any(op.op == "in_channels" for op in recipe.ops)
    shape, _ = choose_input(backbone, input_text or recipe.input or None, keep_own=changes_chans)
    return shape, shape[1]


def apply_recipe(
    spec: str | Backbone,
    recipe: Recipe,
    input_shape: str | None = None,
    *,
    kwargs: dict[str, Any] | None = None,
    model: nn.Module | None = None,
) -> ApplyResult:
    """Apply ``recipe`` to a backbone, built with the recipe's constructor arguments
    (``kw``), those in ``kwargs`` taking precedence.

    The surgery is planned and traced on the meta device; when ``model`` (the same
    backbone with real weights) is given, the same ops are applied to a copy of it too,
    and ``result.model`` is that patched copy. ``model`` itself is never changed.
    """
    backbone = (
        spec if isinstance(spec, Backbone) else resolve(spec, {**recipe.kw, **(kwargs or {})})
    )
    recipe = replace(recipe, kw=dict(backbone.kwargs))  # what was built, as a replay needs it
    shape, chans = source_input(backbone, recipe, input_shape)
    before, source = trace(lambda: backbone.build(in_chans=chans), shape, name=backbone.spec)
    result = apply_traced(backbone, recipe, before, source, model=model)
    if input_shape and len(parse_dims(input_shape, "input_shape")) == 4:
        wanted = parse_dims(input_shape, "input_shape")[1]
        if wanted != result.surgery.in_chans:
            raise InvalidArgument(
                f"{{input_shape}} has {wanted} channels but the patched model takes "
                f"{result.surgery.in_chans}",
                params=("input_shape",),
            )
    return result


def apply_traced(
    backbone: Backbone,
    recipe: Recipe,
    before: Trace,
    source: nn.Module,
    *,
    model: nn.Module | None = None,
) -> ApplyResult:
    """Apply ``recipe`` given the source's trace and the (meta) model it traced."""
    for index, op in enumerate(recipe.ops):
        op.validate(before, recipe.where(index))
    surgery = run_ops(source, before, recipe)
    patched = surgery.finish()
    weighted = run_ops(model, before, recipe).finish() if model is not None else None
    n, _, h, w = before.input_shape
    try:
        after = trace_module(patched, (n, surgery.in_chans, h, w), device=before.device)
    except ForwardFailed as failed:
        where = f" in '{failed.stage}'" if failed.stage else ""
        raise SurgeryError(
            f"the patched model fails{where}: {type(failed.error).__name__}: "
            f"{str(failed.error).splitlines()[0]}"
        ) from failed.error
    return ApplyResult(
        backbone, recipe, before, after, tuple(surgery.edits), weighted or patched, surgery
    )


def run_ops(model: nn.Module, before: Trace, recipe: Recipe) -> Surgery:
    """Apply every op of ``recipe`` to a copy of ``model``."""
    surgery = Surgery(model, before)
    for index, op in enumerate(recipe.ops):
        surgery.op_index, surgery.op_name = index, op.op
        op.apply(surgery, recipe.where(index))
    return surgery


@dataclass(frozen=True)
class StageDiff:
    """One stage before and after the surgery (None where it does not exist)."""

    path: str
    before: Stage | None
    after: Stage | None


def stage_diff(before: Trace, after: Trace) -> tuple[StageDiff, ...]:
    after_by_path = {s.path: s for s in after.stages}
    rows = [StageDiff(s.path, s, after_by_path.pop(s.path, None)) for s in before.stages]
    rows += [StageDiff(path, None, s) for path, s in after_by_path.items()]
    return tuple(rows)
