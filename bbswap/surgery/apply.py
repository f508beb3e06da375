"""``bbswap apply``: trace a backbone, apply a recipe to a copy, trace the result."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from torch import nn

from bbswap.backbones.instance import as_backbone, has_weights, real_copy
from bbswap.backbones.registry import Backbone
from bbswap.errors import InvalidArgument, SurgeryError, gist
from bbswap.parsing import parse_dims
from bbswap.recipes.patch import Patch
from bbswap.recipes.schema import Recipe
from bbswap.records import dims, short_count
from bbswap.surgery.core import Edit, Surgery
from bbswap.surgery.fx_trace import require_one_forward
from bbswap.tracing.inspection import choose_input, features_text
from bbswap.tracing.tracer import ForwardFailed, Stage, Trace, trace, trace_module

if TYPE_CHECKING:
    from bbswap.surgery.outputs_plan import OutputsPlan

Shape4 = tuple[int, int, int, int]


@dataclass(frozen=True)
class ApplyResult:
    """A patched backbone and the record of how it was made."""

    backbone: Backbone
    recipe: Recipe
    before: Trace
    after: Trace
    edits: tuple[Edit, ...]
    model: nn.Module  # the patched model: with real weights when given some, else on meta
    surgery: Surgery  # the plan, made on the meta device
    # the outputs of a --like backbone that returns several, which the model returns too
    outputs: OutputsPlan | None = None

    def __repr__(self) -> str:
        """The summary, not the data: ``ApplyResult(resnet50 + seed-hmer-resnet50,
        1x1x128x316 -> 684@/16, 9 edits, 24.9M params, 11.3G MACs)``."""
        t = self.after
        return (
            f"ApplyResult({self.backbone.spec} + {self.recipe.name}, {dims(t.input_shape)} -> "
            f"{features_text(t)}, {len(self.edits)} edits, {short_count(t.params)} params, "
            f"{short_count(t.macs)} MACs)"
        )


def source_input(backbone: Backbone, recipe: Recipe, input_text: str | None) -> tuple[Shape4, int]:
    """The source model's input and the input channels it is built with.

    With an ``in_channels`` op the source keeps its own channels and the op changes
    them; without one a backbone that takes ``in_chans`` is built for the input's.
    """
    changes_chans = any(op.op == "in_channels" for op in recipe.ops)
    shape, _ = choose_input(backbone, input_text or recipe.input or None, keep_own=changes_chans)
    return shape, shape[1]


def apply_recipe(
    spec: str | Backbone | nn.Module,
    recipe: Recipe,
    input_shape: str | None = None,
    *,
    kwargs: dict[str, Any] | None = None,
    model: nn.Module | None = None,
    source_output: int | str | None = None,
) -> ApplyResult:
    """Apply ``recipe`` to a backbone and trace the result. A spec is built with the
    recipe's constructor arguments (``kw``), those in ``kwargs`` taking precedence.

    The surgery is planned and traced on the meta device, where nothing is allocated.
    With real weights, from ``model`` or a model instance given as ``spec``, the same ops
    are applied to a copy of them too, and ``result.model`` is that patched copy: a
    working CPU module with the weights carried through the edits. Neither ``model`` nor
    the instance is ever changed.

    Args:
        spec: A backbone spec (``"resnet50"``, ``"tv:resnet18"``, ``"file.py:Name"``), a
            resolved :class:`~bbswap.backbones.registry.Backbone`, or a model instance.
        recipe: The recipe, from :func:`~bbswap.recipes.toml_io.load_recipe` or
            :func:`~bbswap.search.fit.winner_recipe`.
        input_shape: The dummy input, ``"NxCxHxW"`` or ``"HxW"``; default the recipe's
            ``input``, else 224x224.
        kwargs: Constructor arguments for a spec; for a model instance, the arguments it
            was constructed with.
        model: The same backbone as ``spec`` with real weights (built with the same
            constructor arguments, e.g. with a checkpoint loaded); default the instance
            when ``spec`` is one, else none, and ``result.model`` is on the meta device.
        source_output: For a backbone whose forward returns several tensors, the output
            the ops work on (an index or a dict key; default the recipe's, else the one
            with the largest downsample); the patched backbone returns that output alone.

    Returns:
        An :class:`ApplyResult`: the traces ``before`` and ``after``, every ``edits``
        record, and the patched ``model``.

    Example::

        recipe = bbswap.load_recipe("recipes/seed-hmer-resnet50.toml")
        result = bbswap.apply_recipe("resnet50", recipe, "1x1x128x316")
        result.after.output_shape                      # (1, 684, 8, 20)
        weighted = bbswap.apply_recipe("resnet50", recipe, model=my_resnet50).model
        weighted(torch.randn(1, 1, 128, 316)).shape    # torch.Size([1, 684, 8, 20])
    """
    if isinstance(spec, nn.Module):
        backbone = as_backbone(spec, kwargs)
        if model is None and has_weights(spec):
            model = real_copy(spec)
    else:
        backbone = as_backbone(spec, {**recipe.kw, **(kwargs or {})})
        recipe = replace(recipe, kw=dict(backbone.kwargs))  # what was built, for a replay
    shape, chans = source_input(backbone, recipe, input_shape)
    before, source = trace(lambda: backbone.build(in_chans=chans), shape, name=backbone.spec)
    wanted = source_output if source_output is not None else recipe.source_output
    before = before.select_output(wanted, backbone.spec)
    if source_output is not None:  # the recipe shown with the result names the output
        recipe = replace(recipe, source_output=before.output_key)
    require_one_forward(source)  # the emitted file writes the model's forward out
    result = apply_traced(backbone, recipe, before, source, model=model)
    if input_shape and len(parse_dims(input_shape, "input_shape")) == 4:
        wanted_chans = parse_dims(input_shape, "input_shape")[1]
        if wanted_chans != result.surgery.in_chans:
            raise InvalidArgument(
                f"{{input_shape}} has {wanted_chans} channels but the patched model takes "
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
    h, w = _whole_patches(recipe, h, w)
    try:
        after = trace_module(patched, (n, surgery.in_chans, h, w), device=before.device)
    except ForwardFailed as failed:
        where = f" in '{failed.stage}'" if failed.stage else ""
        why = gist(failed.error)
        raise SurgeryError(f"the patched model fails{where}: {why}") from failed.error
    return ApplyResult(
        backbone, recipe, before, after, tuple(surgery.edits), weighted or patched, surgery
    )


def _whole_patches(recipe: Recipe, h: int, w: int) -> tuple[int, int]:
    """The traced size ``h x w`` moved up to whole patches of every new patch size the
    recipe gives: a patch embedding of 32 rows takes no 336-row input (a ViT's asserts)."""
    for op in recipe.ops:
        if isinstance(op, Patch):
            ph, pw = op.size
            h, w = -(-h // ph) * ph, -(-w // pw) * pw
    return h, w


def run_ops(model: nn.Module, before: Trace, recipe: Recipe, *, in_place: bool = False) -> Surgery:
    """Apply every op of ``recipe`` to a copy of ``model`` (to ``model`` itself with
    ``in_place``, for a model made for this alone)."""
    surgery = Surgery(model, before, in_place=in_place)
    for index, op in enumerate(recipe.ops):
        surgery.op_index, surgery.op_name = index, op.op
        op.apply(surgery, recipe.where(index))
    if recipe.taps:
        surgery.rewrite("").returns = recipe.returns or "list"
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
