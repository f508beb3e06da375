"""``bbswap fit``: search the recipe ops for the cheapest exact patch to a target.

The source backbone is traced once. Its *units* are the places that can change the
downsample factor: each strided reduction point on the path to the features,
widened to the largest module around it that holds no other reduction (``layer2``
for ResNet's conv2 + shortcut pair, ``trans1`` for a DenseNet transition). A
candidate removes strides at some units (dilating what follows, or not), adds a
pooling or strides a unit further, or truncates at a stage that already has the
target downsample; then the head is dropped, input and output channels adapted.
Each candidate is a recipe, applied and traced on the meta device, and counts only
if its output size equals the target at every probe size, odd and small ones too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bbswap.backbones.instance import as_backbone
from bbswap.backbones.registry import Backbone, resolve
from bbswap.errors import (
    BBSwapError,
    InvalidArgument,
    ModelError,
    NotACNN,
    OneInputSize,
    SurgeryError,
    TargetError,
)
from bbswap.kinds import Device, Mode, Phase, Prefer, Returns, Rounding
from bbswap.parsing import FeatureTarget, parse_stride, parse_target, parse_targets
from bbswap.recipes.channels import InChannels
from bbswap.recipes.patch import MAX_PATCH, Patch
from bbswap.recipes.registry import make_op
from bbswap.recipes.schema import Op, Recipe
from bbswap.recipes.strides import Stride, exact_setting, pad_before, stride_targets
from bbswap.records import short_count
from bbswap.search import targets as several
from bbswap.search.like_outputs import (
    choose_taps,
    no_taps,
    outputs_plan,
    probe_sizes,
    traces_at,
)
from bbswap.surgery.apply import ApplyResult, apply_traced
from bbswap.surgery.fx_trace import require_one_forward
from bbswap.surgery.outputs_plan import OutputsPlan
from bbswap.tracing.inspection import choose_input, first_conv_in_channels
from bbswap.tracing.sizes import from_smallest
from bbswap.tracing.tracer import (
    ForwardFailed,
    SpatialOp,
    Stage,
    Trace,
    tied_at_twice,
    trace,
    trace_at_twice,
)

if TYPE_CHECKING:
    from torch import nn

Size = tuple[int, int]
# the probe sizes of a model that takes any input; moved up to the smallest input the models
# of a fit accept (``from_smallest``), so a model that rejects 1x1 is never probed below it
PROBES: tuple[Size, ...] = (
    (1, 1), (7, 9), (15, 17), (31, 33), (33, 97), (64, 64), (65, 127), (117, 293), (128, 316),
    (255, 257),
)  # fmt: skip
_WINDOW = ("conv", "max-pool", "avg-pool", "lp-pool")


@dataclass(frozen=True)
class Target:
    """What the patched backbone must produce."""

    channels: int
    stride: Size
    in_chans: int | None = None
    like: str | None = None
    like_sizes: dict[Size, Size] | None = None  # the other backbone's output size per probe
    rounding: str = "ceil"  # with a stride target: "ceil", "floor" or "any" (either)
    # several outputs, in their order (``channels`` and ``stride`` are the deepest one's),
    # and what holds them: "list", "tuple" or "dict"
    outputs: tuple[FeatureTarget, ...] = ()
    returns: str = "list"

    @property
    def rules(self) -> tuple[str, ...]:
        """The size rules a candidate may follow, the preferred first."""
        return ("ceil", "floor") if self.rounding == "any" else (self.rounding,)

    def size(self, h: int, w: int) -> Size | None:
        if self.like_sizes is not None:
            return self.like_sizes.get((h, w))
        if self.rounding == "floor":
            return (h // self.stride[0], w // self.stride[1])
        return (math.ceil(h / self.stride[0]), math.ceil(w / self.stride[1]))

    def describe(self) -> str:
        stride = (
            f"{self.stride[0]}"
            if self.stride[0] == self.stride[1]
            else "x".join(map(str, self.stride))
        )
        if self.outputs:
            return (
                f"{several.describe(self.outputs, Returns(self.returns))}, {self.rounding} rounding"
            )
        text = f"{self.channels} channels at 1/{stride}"
        return text + (f" (like {self.like})" if self.like else f", {self.rounding} rounding")


@dataclass(frozen=True)
class Unit:
    """A place where the downsample factor can change: ``at``, and the reductions in other
    modules that run parallel to it (``also``: they read the same grid, reduce it alike and
    meet its output at a join, as the previous cell's factorized reduction meets a NASNet
    reduction cell's output); a stride change changes them all at once."""

    at: str
    stride: Size
    order: int
    also: tuple[str, ...] = ()
    # a conv whose kernel is its stride (a ViT's patch embedding): each pixel read once, so
    # a larger stride would leave pixels it never reads
    patches: bool = False

    @property
    def name(self) -> str:
        """``cell_4``, or ``cell_4 + cell_5`` with its parallel reductions; three or more
        branches of one module as ``cell_stem_1 (9 branches)``."""
        ats = (self.at, *self.also)
        parents = [a.rpartition(".")[0] for a in ats]
        names: list[str] = []
        for at, parent in zip(ats, parents):
            n = parents.count(parent)
            if parent and n >= 3:
                at = f"{parent} ({n} branches)"
            if at not in names:
                names.append(at)
        return " + ".join(names)


@dataclass
class Candidate:
    recipe: Recipe
    label: str
    mode: str
    order: int  # position of the earliest edited unit (later is better on ties)
    result: ApplyResult | None = None
    failure: BBSwapError | None = None  # why it was refused, kept whole
    dilate_refused: BBSwapError | None = None  # why dilate mode was not possible (then: stride)
    misses: list[tuple[Size, Size, Size]] = field(default_factory=list)  # size, got, want
    rule: str = ""  # the size rule an exact candidate follows: "ceil" or "floor"

    def __repr__(self) -> str:
        """``Candidate(layer4: stride 1, dilate, exact, 5.22G MACs)``."""
        head = f"Candidate({self.label or 'as is'}, {self.mode}"
        if self.failed:
            return f"{head}, refused: {self.error or 'not evaluated'})"
        state = "exact" if self.ok else "rounding only" if self.rounding_only else "inexact"
        return f"{head}, {state}, {short_count(self.trace.macs)} MACs)"

    @property
    def failed(self) -> bool:
        return self.result is None or self.failure is not None

    @property
    def error(self) -> str:
        """Why it was refused, without the op's location."""
        return _detail(self.failure) if self.failure is not None else ""

    @property
    def note(self) -> str:
        if self.dilate_refused is None:
            return ""
        return f"dilate refused: {_detail(self.dilate_refused)}"

    @property
    def ok(self) -> bool:
        return self.result is not None and self.failure is None and not self.misses

    @property
    def rounding_only(self) -> bool:
        return (
            self.result is not None
            and bool(self.misses)
            and all(
                min(g) > 0 and abs(g[0] - w[0]) <= 1 and abs(g[1] - w[1]) <= 1
                for _, g, w in self.misses
            )
        )

    @property
    def trace(self) -> Trace:
        assert self.result is not None  # only asked of evaluated candidates
        return self.result.after


def _detail(error: BaseException) -> str:
    return str(error).split(": ", 1)[-1]


@dataclass(frozen=True)
class FitResult:
    backbone: Backbone
    target: Target
    source: Trace
    candidates: tuple[Candidate, ...]  # ranked: exact ones first
    evaluated: int
    probes: tuple[Size, ...]  # every candidate's output size is checked at each of these
    prefer: str
    smallest: Size = (1, 1)  # the smallest input the source (and the like-backbone) accept
    # a like-backbone that returns several outputs (or takes a mask): how the winner gives each
    outputs: OutputsPlan | None = None

    def __repr__(self) -> str:
        """``FitResult(resnet50 -> 684 channels at 1/16, ceil rounding; 5 candidates,
        winner layer4: stride 1 (dilate), 5.22G MACs)``."""
        w = self.winner
        return (
            f"FitResult({self.backbone.spec} -> {self.target.describe()}; {self.evaluated} "
            f"candidates, winner {w.label or 'as is'} ({w.mode}), {short_count(w.trace.macs)} MACs)"
        )

    @property
    def winner(self) -> Candidate:
        return self.candidates[0]


def units(source: Trace, features: Stage | None) -> list[Unit]:
    """The strided reduction points on the path to the features, widened to the largest
    enclosing module that holds no other reduction point; each with the reductions
    parallel to it in other modules (branches that meet it at a join)."""
    chain = features.chain if features is not None else source.chain
    by_id = {o.id: o for o in source.ops}
    head = _head_stages(source, features)
    found: list[Unit] = []
    for op_id in chain:
        op = by_id[op_id]
        if op.op not in _WINDOW or op.stride == (1, 1):
            continue
        ats = [_widened(source, op)]
        covered = {o.id for o in stride_targets(source, ats[0])}
        for other in source.ops:
            if other.id in covered or other.stage in head or other.op not in _WINDOW:
                continue
            if other.stride != (1, 1) and _parallel(other, op):
                ats.append(_widened(source, other))
                covered |= {o.id for o in stride_targets(source, ats[-1])}
        first = {at: min(o.order for o in stride_targets(source, at)) for at in ats}
        ats.sort(key=first.__getitem__)  # in the order the forward reaches them
        patches = op.op == "conv" and op.kernel == op.stride and op.dilation == (1, 1)
        found.append(Unit(ats[0], op.stride, op.order, tuple(ats[1:]), patches))
    return found


def _head_stages(source: Trace, features: Stage | None) -> set[str]:
    """The top-level modules that run after the features (a classifier's head)."""
    if features is None:
        return set()
    top = features.path.split(".")[0]
    children = list(source.children)
    return set(children[children.index(top) + 1 :]) if top in children else set()


def _widened(source: Trace, op: SpatialOp) -> str:
    """The largest module around ``op`` whose reduction points all reduce alike (one
    stride change covers them), else ``op`` itself."""
    at = op.id
    for parent in _ancestors(op):
        group = stride_targets(source, parent)
        if group and all(_parallel(o, op) for o in group):
            at = parent
    return at


def _ancestors(op: SpatialOp) -> list[str]:
    path = op.id if op.kind == "module" else op.owner
    parts = path.split(".") if path else []
    start = len(parts) - 1 if op.kind == "module" else len(parts)
    return [".".join(parts[:i]) for i in range(start, 0, -1)]


def _parallel(a: SpatialOp, b: SpatialOp) -> bool:
    """Two branches reducing the same map alike (a strided conv beside a shortcut's pool);
    one may read it padded first (an anti-aliasing blur pads, then convolves unpadded)."""
    return a.out_hw == b.out_hw and a.stride == b.stride


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def removals(
    found: list[Unit], factor: Size, symmetric: bool, limit: int = 64
) -> list[list[tuple[Unit, Size]]]:
    """Sets of (unit, new stride) whose removed factors multiply to ``factor`` per axis."""
    options = []
    for u in found:
        choices = []
        for th in _divisors(u.stride[0]):
            for tw in _divisors(u.stride[1]):
                if symmetric and (u.stride[0] // th) != (u.stride[1] // tw):
                    continue
                choices.append((th, tw))
        options.append(choices)
    out = []
    for picks in itertools.product(*options):
        fh = math.prod(u.stride[0] // t[0] for u, t in zip(found, picks))
        fw = math.prod(u.stride[1] // t[1] for u, t in zip(found, picks))
        if (fh, fw) == factor:
            out.append([(u, t) for u, t in zip(found, picks) if t != u.stride])
            if len(out) >= limit:
                break
    return out


def _stride_ops(changes: list[tuple[Unit, Size]], mode: str) -> list[Op]:
    """The stride ops of each unit (one for it, one for each reduction parallel to it);
    in dilate mode the last unit first, so that each dilation meets the later reduction
    points with their strides already removed (a 2x2/2 conv dilated before its own
    stride goes would need half a pixel of padding)."""
    per_unit = [
        [
            make_op(
                "stride",
                at=at,
                stride=t,
                mode=mode if t[0] < u.stride[0] or t[1] < u.stride[1] else "stride",
            )
            for at in (u.at, *u.also)
        ]
        for u, t in changes
    ]
    if mode == Mode.DILATE.value:
        per_unit.reverse()
    return [op for ops in per_unit for op in ops]


def _hw(size: Size) -> str:
    """A size as H x W, always both."""
    return f"{size[0]}x{size[1]}"


def _fmt(size: Size) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def plan(
    backbone: Backbone,
    source: Trace,
    target: Target,
    *,
    mode: str = "dilate",
    allow_truncate: bool = False,
    model: nn.Module | None = None,
) -> list[Candidate]:
    """Every candidate recipe for the target (not yet evaluated). ``model``, the (meta)
    model traced, confirms at another size a size rule that says the features have one."""
    features = source.features
    out = features.out_shape if features is not None else source.output_shape
    if len(out) != 4:
        raise TargetError(f"{backbone.spec} has no spatial output to fit (its output is {out})")
    down = features.downsample if features is not None else source.downsample
    have = (round(down[0]), round(down[1]))
    found = units(source, features)
    stem = _stem_ops(source, target)
    head = [make_op("truncate", after=features.path)] if features is not None else []
    tail = _project(features.channels if features is not None else out[1], target)
    rules = source.size_rules(features.chain if features is not None else None)
    fixed = all(rule.rounding == "fixed" and not rule.period for rule in rules)
    if fixed and (model is None or _one_size_at_twice(source, model)):
        # the features are resized to one size at every input size (MobileNetV5's fusion
        # adapter; not MobileViTv2's resize to a multiple, whose rule holds for some sizes
        # only): no stride change moves them; only a cut before the resize follows a stride
        chain = features.chain if features is not None else source.chain
        by_id = {o.id: o for o in source.ops}
        resizes = [
            by_id[i].stage
            for i in chain
            if i in by_id
            and any(st.kind == "fixed" for st in (*by_id[i].steps_h, *by_id[i].steps_w))
        ]
        cuts = cut_candidates(backbone, source, target, before=resizes[-1] if resizes else None)
        if not cuts:
            raise NotACNN(
                f"{backbone.spec} resizes its features to {out[2]}x{out[3]} at any input "
                f"size, and no stage before that is at 1/{_fmt(target.stride)}"
            )
        return cuts
    if any(max(h, t) % min(h, t) for h, t in zip(have, target.stride)):
        # no stride change reaches the target: only another patch size can
        patched = repatched(backbone, source, target)
        if not patched:
            raise TargetError(_infeasible(backbone, target, have, found, source))
        return patched
    candidates = [
        Candidate(
            _fit_recipe(backbone, source, target, [*stem, *ops, *head, *pool, *tail]),
            label,
            cmode,
            order,
        )
        for ops, pool, label, cmode, order in _stride_plans(found, have, target, mode)
    ]
    if allow_truncate or fixed_reductions(source, features):
        candidates += cut_candidates(backbone, source, target)
    if not candidates:
        raise TargetError(_infeasible(backbone, target, have, found, source))
    return _dedupe(candidates)


def _one_size_at_twice(source: Trace, model: nn.Module) -> bool:
    """Whether the features are the size they were traced at when the input is twice as
    large: a resize to a size computed from the input (to a multiple of a patch) is
    recorded as the size it gave, which a second trace tells from a resize to one size."""
    if source.device is Device.CPU:
        return False  # traced on real tensors: not run again (nor, so, called one size)
    try:
        twice = trace_at_twice(model, source.input_shape, device=source.device)
    except ForwardFailed:
        return False  # no second size to compare: nothing says the size is one
    features = source.features
    path = features.path if features is not None else None
    again = twice.stage(path) if path is not None else None
    have = features.out_shape if features is not None else source.output_shape
    got = again.out_shape if again is not None else twice.output_shape
    return tuple(got[-2:]) == tuple(have[-2:])


def repatched(backbone: Backbone, source: Trace, target: Target) -> list[Candidate]:
    """The candidate that gives the first patch embedding another patch size for the
    target's stride, projected to the target's channels; none without one."""
    features = source.features
    out = features.out_shape if features is not None else source.output_shape
    down = features.downsample if features is not None else source.downsample
    made = _repatched(units(source, features), (round(down[0]), round(down[1])), target)
    if made is None or len(out) != 4:
        return []
    ops, label, order = made
    head = [make_op("truncate", after=features.path)] if features is not None else []
    own = features.channels if features is not None else out[1]
    recipe_ops = [*_stem_ops(source, target), *ops, *head, *_project(own, target)]
    return [Candidate(_fit_recipe(backbone, source, target, recipe_ops), label, "-", order)]


def cut_candidates(
    backbone: Backbone, source: Trace, target: Target, *, before: str | None = None
) -> list[Candidate]:
    """The candidate that cuts the body after the last stage already at the target's
    stride (the deepest: a patch embedding at 1/16 is no cut of EfficientViT's stages at
    1/16), projected to the target's channels; none when that stage is the features.
    ``before``: a stage the cut must come before (the one that resizes the features to
    one size); by default, the one that ties the model to one input size."""
    order = {path: i for i, path in enumerate(source.modules)}
    points = sorted(truncation_points(source, target.stride), key=lambda s: order.get(s.path, -1))
    tie = before or source.one_size_at
    if tie in order:  # a model of one input size: cut before the stage that ties it
        points = [
            s
            for s in points
            if order.get(s.path, len(order)) < order[tie] and not tie.startswith(f"{s.path}.")
        ]
    features = source.features
    if not points or (features is not None and points[-1].path == features.path):
        return []
    stage = points[-1]
    ops = [
        *_stem_ops(source, target),
        make_op("truncate", after=stage.path),
        *_project(stage.channels, target),
    ]
    made = _fit_recipe(backbone, source, target, ops)
    return [Candidate(made, f"truncate after {stage.path}", "-", -1)]


def _fit_recipe(backbone: Backbone, source: Trace, target: Target, ops: list[Op]) -> Recipe:
    """A candidate's recipe: the fit's name and description, on the source's output."""
    name = f"fit-{backbone.name}-c{target.channels}-s{_fmt(target.stride)}"
    about = f"fit target: {target.describe()}"
    return Recipe(name, tuple(ops), backbone.spec, about, source_output=source.output_key)


def fixed_reductions(source: Trace, features: Stage | None) -> list[str]:
    """The reductions on the features' path that no stride op changes: a strided slice or
    a reshape merging patches (Swin's patch merging). A stage at the target's stride
    before them is where such a backbone is cut."""
    by_id = {o.id: o for o in source.ops}
    chain = features.chain if features is not None else source.chain
    return [i for i in chain if by_id[i].op in ("slice", "patch-merge") and by_id[i].reduces]


def _stem_ops(source: Trace, target: Target) -> list[Op]:
    """The op that adapts the input channels, if the target changes them."""
    if target.in_chans is None or target.in_chans == source.input_shape[1]:
        return []
    strategy = "sum" if target.in_chans == 1 else "repeat"
    return [InChannels(channels=target.in_chans, strategy=strategy)]


def _project(channels: int, target: Target) -> list[Op]:
    return [] if channels == target.channels else [make_op("project", channels=target.channels)]


def _factor(a: int, b: int) -> int:
    return max(1, a // b) if a >= b else 1


_Plan = tuple[list[Op], list[Op], str, str, int]  # stride ops, pooling, label, mode, order


def _stride_plans(found: list[Unit], have: Size, target: Target, mode: str) -> Iterator[_Plan]:
    """The stride changes that take the features from ``have`` to the target's stride."""
    remove = (_factor(have[0], target.stride[0]), _factor(have[1], target.stride[1]))
    grow = (_factor(target.stride[0], have[0]), _factor(target.stride[1], have[1]))
    symmetric = target.stride[0] == target.stride[1] and have[0] == have[1]
    if remove == (1, 1) and grow == (1, 1):
        yield [], [], "no stride change", "-", 10**9
    combos = removals(found, (remove[0], remove[1]), symmetric) if remove != (1, 1) else [[]]
    for changes in combos:
        if not changes and remove != (1, 1):
            continue
        order = min((u.order for u, _ in changes), default=10**9)
        label = [f"{u.name}: stride {_fmt(t)}" for u, t in changes]
        if grow == (1, 1):
            yield _stride_ops(changes, mode), [], ", ".join(label), mode, order
            continue
        pool = [make_op("pool", stride=grow, kind="avg", ceil_mode=True)]
        pooled = ", ".join([*label, f"avg-pool /{_fmt(grow)}"])
        yield _stride_ops(changes, mode), pool, pooled, mode, order
        if not changes and found and not found[-1].patches:
            # coarsen at the last reduction point, so every earlier layer keeps its resolution
            u = found[-1]
            more = (u.stride[0] * grow[0], u.stride[1] * grow[1])
            yield (
                _stride_ops([(u, more)], "stride"),
                [],
                f"{u.name}: stride {_fmt(more)}",
                "stride",
                u.order,
            )


def truncation_points(source: Trace, stride: Size) -> list[Stage]:
    """The last stage at ``stride``: among the top-level stages, and among the children
    of a top-level stage that itself spans several strides (ConvNeXt's ``features``)."""

    def at(stage: Stage) -> bool:
        return stage.spatial and (round(stage.downsample[0]), round(stage.downsample[1])) == stride

    points = []
    levels = [[s for s in source.stages if not s.functional]]
    for top in levels[0]:
        children = [
            s
            for s in source.module_stages
            if s.path.rsplit(".", 1)[0] == top.path and "." in s.path
        ]
        strides = {(round(s.downsample[0]), round(s.downsample[1])) for s in children if s.spatial}
        if len(strides) > 1:  # one stride: truncating after the stage itself is the same
            levels.append(children)
    for rows in levels:
        for i, stage in enumerate(rows):
            if at(stage) and (i + 1 == len(rows) or not at(rows[i + 1])):
                points.append(stage)
    return points


def _dedupe(candidates: list[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for c in candidates:
        key = tuple((op.op, tuple(sorted(op.params.items()))) for op in c.recipe.ops)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _repatched(found: list[Unit], have: Size, target: Target) -> tuple[list[Op], str, int] | None:
    """The patch op that gives a stride no stride change reaches, when the first reduction
    is a patch embedding (a ViT's 14-pixel patches, ConvMixer's 7, ConvNeXt's stem): its
    patch made ``target / the other reductions`` on each axis; None where that is no
    whole number, or is the patch it has."""
    if not found or not found[0].patches:
        return None
    first = found[0]
    size = []
    for axis in range(2):
        if have[axis] % first.stride[axis]:
            return None
        rest = have[axis] // first.stride[axis]
        if target.stride[axis] % rest or not 1 <= target.stride[axis] // rest < MAX_PATCH:
            return None
        size.append(target.stride[axis] // rest)
    new = (size[0], size[1])
    if new == first.stride:
        return None
    return [Patch(size=new)], f"{first.name}: patch {_fmt(new)}", first.order


def _infeasible(
    backbone: Backbone, target: Target, have: Size, found: list[Unit], source: Trace
) -> str:
    reachable = set()
    for n in range(len(found) + 1):
        for subset in itertools.combinations(found, n):
            f = math.prod(u.stride[0] for u in subset)
            reachable.add(have[0] // f if f and have[0] % f == 0 else None)
    powers = sorted({r for r in reachable if r} | {have[0] * 2, have[0] * 4})
    near = sorted(powers, key=lambda s: abs(s - target.stride[0]))[:3]
    by = ", ".join(_fmt(u.stride) for u in found) or "nothing"
    features = source.features
    chain = features.chain if features is not None else source.chain
    by_id = {o.id: o for o in source.ops}
    fixed = [
        f"{by_id[i].op} by {_fmt(by_id[i].stride)} at {i}"
        for i in chain
        if by_id[i].op not in _WINDOW and by_id[i].reduces
    ]
    if fixed:
        fixed_text = ", ".join(fixed)
        by = (
            f"{by}, and no stride op changes its {fixed_text}"
            if found
            else f"nothing a stride op changes ({fixed_text})"
        )
    return (
        f"{backbone.spec} cannot reach stride {_fmt(target.stride)}: its features are at 1/"
        f"{_fmt(have)} and its reductions are by {by}; "
        f"nearest feasible strides: {', '.join(str(s) for s in sorted(near))}"
    )


def evaluate(
    backbone: Backbone,
    source: Trace,
    model: Any,
    candidate: Candidate,
    target: Target,
    probes: tuple[Size, ...],
) -> Candidate:
    """Apply a candidate on the meta device and check its size at every probe.

    A candidate in dilate mode that cannot be dilated exactly (an average pooling after
    the removed stride, an even kernel) is tried again in stride mode.
    """
    if candidate.failure is not None:  # refused when planned (no stage to tap)
        return candidate
    if not _applied(backbone, source, model, candidate):
        return candidate
    assert candidate.result is not None  # _applied set it
    after = candidate.result.after
    wrong = (
        several.wrong_outputs(after, target.outputs)
        if target.outputs
        else ""
        if len(after.output_shape) == 4 and after.output_shape[1] == target.channels
        else f"output {after.output_shape}"
    )
    tie = source.one_size_at
    if not wrong and source.one_size and (not tie or tie in after.modules):
        wrong = (
            f"it keeps '{tie}', which ties the model to one input size"
            if tie
            else "the model's own forward ties it to one input size"
        )
    if wrong:
        candidate.failure = TargetError(wrong)
        return candidate
    first: list[tuple[Size, Size, Size]] | None = None
    for rule in target.rules:
        misses = _misses(after, replace(target, rounding=rule), probes)
        if not misses:
            candidate.rule = "" if target.like else rule
            return candidate
        first = misses if first is None else first
    candidate.misses = first or []
    return candidate


def _applied(backbone: Backbone, source: Trace, model: Any, candidate: Candidate) -> bool:
    """Apply a candidate's recipe on the meta device (``candidate.result``), in stride mode
    if dilate mode cannot be exact; False if it is refused (``candidate.failure``)."""
    try:
        candidate.result = apply_traced(backbone, candidate.recipe, source, model)
    except SurgeryError as error:
        if candidate.mode != Mode.DILATE.value:
            candidate.failure = error
            return False
        ops = tuple(
            replace(op, mode="stride") if isinstance(op, Stride) else op
            for op in candidate.recipe.ops
        )
        candidate.recipe = replace(candidate.recipe, ops=ops)
        candidate.mode = Mode.STRIDE.value
        candidate.dilate_refused = error
        return _applied(backbone, source, model, candidate)
    except BBSwapError as error:
        candidate.failure = error
        return False
    return True


def plan_several(
    backbone: Backbone,
    source: Trace,
    model: Any,
    target: Target,
    *,
    mode: str = "dilate",
    allow_truncate: bool = False,
) -> list[Candidate]:
    """Every candidate for several targets (not yet evaluated): the stride changes that
    bring the features to the deepest target's stride, then a tap per target at the last
    stage at its stride; with ``allow_truncate``, also the body cut after an earlier stage
    already at the deepest stride."""
    features = source.features
    down = features.downsample if features is not None else source.downsample
    have = (round(down[0]), round(down[1]))
    found = units(source, features)
    low = several.deepest(target.outputs)
    one = replace(target, stride=low.stride, channels=low.channels)
    for i in range(2):
        big, small = max(have[i], low.stride[i]), min(have[i], low.stride[i])
        if big % small:
            raise TargetError(_infeasible(backbone, one, have, found, source))
    stem = _stem_ops(source, target)
    plans: list[tuple[list[Op], str, str, int, str | None]] = [
        ([*stem, *ops], label, cmode, order, None)
        for ops, pool, label, cmode, order in _stride_plans(found, have, one, mode)
        if not pool  # a pooling appended after the body is no stage to tap
    ]
    if allow_truncate:
        plans += [
            (stem, f"truncate after {s.path}", "-", -1, s.path)
            for s in truncation_points(source, low.stride)
        ]
    out = [_tapped(backbone, source, model, target, *p) for p in plans]
    if not out:
        raise TargetError(_infeasible(backbone, one, have, found, source))
    return _dedupe(out)


def _tapped(
    backbone: Backbone,
    source: Trace,
    model: Any,
    target: Target,
    ops: list[Op],
    label: str,
    mode: str,
    order: int,
    upto: str | None,
) -> Candidate:
    """The candidate that makes the stride changes ``ops``, then taps each target at the
    stage at its stride in the result."""
    name = f"fit-{backbone.name}-" + "-".join(
        f"c{t.channels}s{_fmt(t.stride)}" for t in target.outputs
    )
    about = f"fit target: {target.describe()}"

    def recipe(ops: list[Op], returns: str | None) -> Recipe:
        return Recipe(
            name, tuple(ops), backbone.spec, about, source_output=source.output_key, returns=returns
        )

    probe = Candidate(recipe(ops, None), label, mode, order)
    after = source
    if ops and _applied(backbone, source, model, probe):
        assert probe.result is not None  # _applied set it
        after = probe.result.after
    taps = several.tap_stages(after, target.outputs, upto)
    stages = [s.path for s in source.stages if not s.functional and "." not in s.path]
    tapped = ", ".join(dict.fromkeys(s.path for s in taps.stages))
    shown = f"{label or 'no stride change'}; taps {tapped}" if tapped else label
    if probe.failure is not None or taps.missing:
        refused = Candidate(probe.recipe, shown, probe.mode, order)
        refused.failure = probe.failure or TargetError(taps.missing)
        return refused
    last = taps.stages[target.outputs.index(several.deepest(target.outputs))].path
    cut = [make_op("truncate", after=last)] if stages and stages[-1] != last else []
    final = [*probe.recipe.ops, *cut, *several.tap_ops(target.outputs, taps)]
    c = Candidate(recipe(final, target.returns), shown, probe.mode, order)
    c.dilate_refused = probe.dilate_refused
    return c


def _misses(
    after: Trace, target: Target, probes: tuple[Size, ...]
) -> list[tuple[Size, Size, Size]]:
    if target.outputs:
        return several.output_misses(after, target.outputs, target.rounding, probes)
    misses = []
    for h, w in probes:
        want = target.size(h, w)
        got = after.output_size(h, w)
        if want is None or min(want) <= 0:
            continue  # no output wanted there (floor(H/S) of an input below S)
        if got != want:
            misses.append(((h, w), got, want))
    return misses


_PREFER: dict[Prefer, Callable[[Candidate], tuple[Any, ...]]] = {
    Prefer.MACS: lambda c: (c.trace.macs, -c.order),
    Prefer.DEPTH: lambda c: (-c.order, c.trace.macs),
    Prefer.RF: lambda c: (-(c.trace.receptive_field[0] * c.trace.receptive_field[1]), c.trace.macs),
}


def fit(
    spec: str | Backbone | nn.Module,
    *,
    channels: int | None = None,
    stride: str | int | Size | None = None,
    in_chans: int | None = None,
    input_shape: str | None = None,
    like: str | None = None,
    like_kw: Mapping[str, Any] | None = None,
    prefer: Prefer | str = Prefer.MACS,
    allow_truncate: bool = False,
    mode: Mode | str = Mode.DILATE,
    rounding: Rounding | str = Rounding.CEIL,
    kwargs: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    source_output: int | str | None = None,
    on_phase: Callable[[Phase], None] | None = None,
    targets: Sequence[FeatureTarget | str] | None = None,
    returns: Returns | str | None = None,
) -> FitResult:
    """Search for the cheapest exact surgery that makes a backbone produce ``channels``
    channels at 1/``stride``; the candidates come ranked, the winner first.

    The backbone is traced once on the meta device and every candidate recipe is applied
    and traced there, so nothing is allocated. A model instance is never changed: the
    search works on a meta copy of it.

    Args:
        spec: A backbone spec (``"resnet50"``, ``"tv:resnet18"``, ``"timm:resnet18"``,
            ``"path/to/file.py:Name"``), a resolved :class:`~bbswap.backbones.registry.Backbone`,
            or a model instance (an ``nn.Module``).
        channels: The output channels wanted (a 1x1 projection is appended when needed).
            Optional with ``like``, which then gives them.
        stride: The downsample wanted: ``16``, ``"16"``, ``(32, 4)`` or ``"32x4"`` (H x W).
        in_chans: The input channels the patched backbone takes (the stem conv is
            adapted); default the ones ``input_shape`` names, else the backbone's own.
        input_shape: The dummy input, ``"NxCxHxW"`` or ``"HxW"``; default 224x224.
        like: Another backbone spec whose output channels and exact output sizes to match
            instead of a ``stride`` rule. When it returns several outputs (or is an
            encoder of ``(img, img_mask)`` returning ``(features, mask)``), the result's
            ``outputs`` plans every one of them; pass it to
            :func:`~bbswap.codegen.export.export` as ``outputs``.
        like_kw: The constructor arguments of the ``like`` backbone.
        prefer: How exact candidates rank: ``"macs"`` (fewest first), ``"depth"`` (the
            latest stage changed first) or ``"rf"`` (largest receptive field first).
        allow_truncate: Also consider cutting the body after a stage already at the stride.
        mode: ``"dilate"`` (dilate what follows a removed stride) or ``"stride"``.
        rounding: The size rule wanted: ``"ceil"`` (``ceil(H/S)``), ``"floor"`` or
            ``"any"`` (either, ceil first).
        kwargs: Constructor arguments for a spec; for a model instance, the arguments it
            was constructed with (they name its builder when the winner is emitted).
        progress: Called as ``progress(done, total)`` after each candidate is evaluated.
        source_output: For a backbone whose forward returns several tensors, the output to
            fit (an index or a dict key); default the one with the largest downsample.
            Every candidate's recipe names it, and the patched backbone returns it.
        on_phase: Called as the trace and the evaluation of candidates begin
            (:class:`bbswap.kinds.Phase`).
        targets: Several outputs instead of ``channels`` and ``stride``: each a
            :class:`~bbswap.parsing.FeatureTarget` or its text, ``"[NAME=]STRIDE:CHANNELS"``
            (``"p3=8:256"``). The strides change for the deepest; each target taps the
            last stage at its stride, projected (1x1 conv + BN) when its channels differ.
            One target without ``returns`` is the same as ``channels`` and ``stride``.
        returns: With ``targets``: ``"list"`` (the default, timm's ``features_only``),
            ``"tuple"`` or ``"dict"`` (keyed by each target's name, else the tapped
            module's path). The outputs come in the order of ``targets``.
    Output sizes are checked at probe sizes that start from the smallest input the source
    (and ``like``) accept (``FitResult.smallest``, ``FitResult.probes``).

    Returns:
        A :class:`FitResult`: ``candidates`` ranked, ``winner`` the first of them.

    Raises:
        TargetError: No candidate reaches the target exactly (the message says why).
        BBSwapError: A bad value; the message names the parameter and the valid choices.

    Example::

        found = bbswap.fit("resnet50", channels=684, stride=16, in_chans=1,
                           input_shape="1x1x128x316")
        found.winner.label, found.winner.trace.macs    # ('layer4: stride 1', 5218230272)
        bbswap.fit(torchvision.models.resnet18(), channels=256, stride=16)
        bbswap.fit("resnet50", targets=["p3=8:256", "p4=16:256", "p5=32:256"], returns="dict")
    """
    outputs, held, channels, stride = _several(targets, returns, channels, stride, like)
    ranking = Prefer.parse(prefer, "prefer")
    how = Mode.parse(mode, "mode")
    rule = Rounding.parse(rounding, "rounding")
    _check_like_kw(like, like_kw)
    backbone = as_backbone(spec, kwargs)
    shape, asked = choose_input(backbone, input_shape or None, keep_own=True)
    chans = in_chans if in_chans is not None else asked
    _check_counts(channels, chans)
    other = _like_traced(like, like_kw, (shape[2], shape[3])) if like is not None else None
    target = _target(channels, stride, chans, like, other[0] if other is not None else None)
    target = replace(target, rounding=rule.value, outputs=outputs, returns=str(held or "list"))
    own = shape[1]
    if on_phase is not None:
        on_phase(Phase.TRACE)
    source, model = trace(
        lambda: backbone.build(in_chans=own), (1, own, shape[2], shape[3]), name=backbone.spec
    )
    source = source.select_output(source_output, backbone.spec)
    smallest, probes, target, like_plan = _probes(source, like, other, target)
    _require_stem(backbone, model, target, own)
    require_one_forward(model)  # its forward is written out in every plan
    plans = plan_several if outputs else _plan_one
    candidates = plans(
        backbone, source, model, target, mode=how.value, allow_truncate=allow_truncate
    )
    if on_phase is not None:
        on_phase(Phase.CANDIDATES)
    done, reachable = _search(backbone, source, model, candidates, target, probes, progress)
    source, done = _tried_at_twice(backbone, source, model, done, target, probes)
    ranked = _ranked(backbone, target, done, ranking, reachable, source.one_size)
    if like_plan is not None:  # the winner is the first that gives every output
        ranked, like_plan = _with_outputs(backbone, ranked, like_plan)
    return FitResult(
        backbone, target, source, ranked, len(done), probes, ranking.value, smallest, like_plan
    )


def _tried_at_twice(
    backbone: Backbone,
    source: Trace,
    model: Any,
    done: list[Candidate],
    target: Target,
    probes: tuple[Size, ...],
) -> tuple[Trace, list[Candidate]]:
    """The source and the candidates, once none fits a model with attention traced on
    real tensors (which the tracer does not run at twice the size: it would run it for
    real): the model tried at twice the size, and, where it fails there (a model of one
    input size), a cut before the stage that ties it evaluated too."""
    if any(c.ok for c in done) or source.device is not Device.CPU or not source.attention:
        return source, done
    if source.one_size:
        return source, done
    source = tied_at_twice(source, model, source.input_shape)
    if not source.one_size:
        return source, done
    tried = {c.label for c in done}
    cuts = [c for c in cut_candidates(backbone, source, target) if c.label not in tried]
    return source, done + _evaluate_all(backbone, source, model, cuts, target, probes, None)


def _check_like_kw(like: str | None, like_kw: Mapping[str, Any] | None) -> None:
    if like is None and like_kw:
        raise InvalidArgument(
            "{like_kw} gives the constructor arguments of the {like} backbone; give {like} too",
            params=("like_kw", "like"),
        )


def _require_stem(backbone: Backbone, model: Any, target: Target, own: int) -> None:
    """A target of other input channels needs a stem conv whose input channels can change."""
    if (
        target.in_chans is not None
        and target.in_chans != own
        and first_conv_in_channels(model) is None
    ):
        raise TargetError(f"{backbone.spec} has no stem conv whose input channels can change")


def _probes(
    source: Trace, like: str | None, other: tuple[Trace, Any] | None, target: Target
) -> tuple[Size, tuple[Size, ...], Target, OutputsPlan | None]:
    """The smallest input the models accept, the probe sizes from it, the target with the
    like-backbone's real output size at each, and the plan of its several outputs."""
    smallest, multiple = accepted_input(source, *([other[0]] if other is not None else []))
    probes = taken_sizes(source, from_smallest(PROBES, smallest, multiple))
    if like is None or other is None:
        return smallest, probes, target, None
    like_plan = outputs_plan(like, other[0])
    traces = traces_at(like, *other, probes)
    target = replace(target, like_sizes=_like_sizes(other[0], traces))
    like_plan = probe_sizes(like_plan, traces) if like_plan is not None else None
    return smallest, probes, target, like_plan


def taken_sizes(source: Trace, sizes: tuple[Size, ...]) -> tuple[Size, ...]:
    """``sizes`` each moved up to the next size the source takes when its maps are split
    into windows without padding (MaxViT): only those sizes give whole windows."""
    features = source.features
    rules = source.size_rules(features.chain if features is not None else None)

    def up(size: int, axis: int) -> int:
        rule = rules[axis]
        if not rule.period:
            return size
        while size % rule.period not in rule.remainders:
            size += 1
        return size

    return tuple(dict.fromkeys((up(h, 0), up(w, 1)) for h, w in sizes))


def _with_outputs(
    backbone: Backbone, ranked: tuple[Candidate, ...], plan: OutputsPlan
) -> tuple[tuple[Candidate, ...], OutputsPlan]:
    """The ranking with the first exact candidate that gives every output of ``plan``
    moved first, and the plan with its taps."""
    exact = [c for c in ranked if c.ok]
    found = choose_taps(plan, [c.trace for c in exact])
    if found is None:
        raise no_taps(plan, backbone.spec)
    i, plan = found
    return (exact[i], *(c for c in ranked if c is not exact[i])), plan


def _plan_one(
    backbone: Backbone, source: Trace, model: Any, target: Target, **options: Any
) -> list[Candidate]:
    return plan(backbone, source, target, model=model, **options)


def _several(
    targets: Sequence[FeatureTarget | str] | None,
    returns: Returns | str | None,
    channels: int | None,
    stride: str | int | Size | None,
    like: str | None,
) -> tuple[tuple[FeatureTarget, ...], Returns | None, int | None, str | int | Size | None]:
    """The targets, checked; what holds them (None: not asked); and the channels and the
    stride of the deepest (for one target and no ``returns``: the shorthand's, no targets)."""
    outputs, held = _targets_checked(targets, returns, channels, stride, like)
    if len(outputs) == 1 and held is None:
        return (), None, outputs[0].channels, outputs[0].stride
    if outputs:
        low = several.deepest(outputs)
        return outputs, held, low.channels, low.stride
    return outputs, held, channels, stride


def _targets_checked(
    targets: Sequence[FeatureTarget | str] | None,
    returns: Returns | str | None,
    channels: int | None,
    stride: str | int | Size | None,
    like: str | None,
) -> tuple[tuple[FeatureTarget, ...], Returns | None]:
    held = Returns.parse(returns, "returns") if returns is not None else None
    outputs = parse_targets([parse_target(t) for t in targets or []])
    if not outputs:
        if held is not None:
            raise InvalidArgument(
                "{returns} says what holds several outputs; give them with {targets}",
                params=("returns", "targets"),
            )
        return (), None
    if channels is not None or stride is not None:
        raise InvalidArgument(
            "{targets} gives each output's stride and channels; leave out {stride} and "
            "{channels} (they are the one-target shorthand)",
            params=("targets", "stride", "channels"),
        )
    if like is not None:
        raise InvalidArgument(
            "{like} takes its target from another backbone; give it or {targets}, not both",
            params=("like", "targets"),
        )
    several.check_targets(outputs, held or Returns.LIST)
    return outputs, held


def accepted_input(*traces: Trace) -> tuple[Size, Size]:
    """The smallest input H and W that every one of ``traces`` accepts, and the multiple
    each must be of (a stem that folds 4x4 blocks into channels takes multiples of 4)."""
    low, step = [1, 1], [1, 1]
    for t in traces:
        features = t.features
        rules = t.size_rules(features.chain if features is not None else None)
        for axis, smallest in enumerate(t.min_input()):
            low[axis] = max(low[axis], smallest)
            step[axis] = math.lcm(step[axis], rules[axis].multiple)
    return (low[0], low[1]), (step[0], step[1])


def _like_traced(like: str, like_kw: Mapping[str, Any] | None, hw: Size) -> tuple[Trace, Any]:
    """The ``like`` backbone, built with ``like_kw`` and traced at the source's input size
    with its own input channels; and the model."""
    other = resolve(like, dict(like_kw or {}))
    shape, _ = choose_input(other, _hw(hw))
    try:
        return trace(lambda: other.build(in_chans=shape[1]), shape, name=other.spec)
    except ModelError as error:  # said of the like-backbone, which the user may not suspect
        raise ModelError(
            "{like} " + like + ": " + error.template, params=("like", *error.params)
        ) from error


def _search(
    backbone: Backbone,
    source: Trace,
    model: Any,
    candidates: list[Candidate],
    target: Target,
    probes: tuple[Size, ...],
    progress: Callable[[int, int], None] | None,
) -> tuple[list[Candidate], str | None]:
    """Every candidate evaluated, then (if none is exact) their exact variants; and, if
    still none is, the other rounding when a candidate reaches that one."""
    plain = _evaluate_all(backbone, source, model, candidates, target, probes, progress)
    done = list(plain)
    if not any(c.ok for c in done) and target.like is None and not target.outputs:
        done += _exact_variants(backbone, source, model, done, target, probes, progress)
    elif fixed_reductions(source, source.features) and target.like is None:
        # a backbone cut before reductions no stride op changes (Swin's patch merging):
        # its cuts made exact too, which spare the stages a stride change makes dearer
        cuts = [c for c in done if not c.ok and c.label.startswith("truncate after ")]
        done += _exact_variants(backbone, source, model, cuts, target, probes, progress)
    if not any(c.ok for c in done) and target.like is None and not target.outputs:
        # no stride change holds (windows partitioned for one grid, MaxViT's): the body
        # cut after a stage already at the stride, where there is one
        tried = {c.label for c in done}
        more = [c for c in cut_candidates(backbone, source, target) if c.label not in tried]
        done += _evaluate_all(backbone, source, model, more, target, probes, None)
    if not any(c.ok for c in done) and target.like is None and not target.outputs:
        # no stride change holds exactly (a 4x4 stem's kernel would lose pixels at
        # stride 1 on one axis): another patch size at the first patch embedding
        patched = _evaluate_all(
            backbone, source, model, repatched(backbone, source, target), target, probes, None
        )
        done += patched
        if not any(c.ok for c in patched):
            # the new patch misses at sizes it does not divide (SwinV2-CR at 4x1 floors
            # H before its merges round up): its embedding padded to the rule
            done += _exact_variants(backbone, source, model, patched, target, probes, None)
    if any(c.ok for c in done):
        return done, None
    return done, _other_rounding(backbone, source, model, plain, target, probes)


def _other_rounding(
    backbone: Backbone,
    source: Trace,
    model: Any,
    plain: list[Candidate],
    target: Target,
    probes: tuple[Size, ...],
) -> str | None:
    """The rounding other than the target's that some candidate reaches exactly, as it
    stands or with its reduction points made exact; None if none does (or the target
    takes either, or follows another backbone)."""
    if target.like is not None or target.outputs or target.rounding == Rounding.ANY.value:
        return None
    other = Rounding.FLOOR.value if target.rounding == Rounding.CEIL.value else Rounding.CEIL.value
    wanted = replace(target, rounding=other)
    if any(not c.failed and not _misses(c.trace, wanted, probes) for c in plain):
        return other
    variants = _exact_variants(backbone, source, model, plain, wanted, probes, None)
    return other if any(c.ok for c in variants) else None


def _evaluate_all(
    backbone: Backbone,
    source: Trace,
    model: Any,
    candidates: list[Candidate],
    target: Target,
    probes: tuple[Size, ...],
    progress: Callable[[int, int], None] | None,
) -> list[Candidate]:
    done = []
    for i, c in enumerate(candidates):
        done.append(evaluate(backbone, source, model, c, target, probes))
        if progress is not None:
            progress(i + 1, len(candidates))
    return done


def _ranked(
    backbone: Backbone,
    target: Target,
    done: list[Candidate],
    ranking: Prefer,
    other: str | None = None,
    one_size: str = "",
) -> tuple[Candidate, ...]:
    """Exact candidates first, by ``ranking``; then the inexact, then the refused.
    No exact one is an error that says why, and names the ``other`` rounding, which a
    candidate reaches, if there is one."""
    evaluated = [c for c in done if not c.failed]
    exact = sorted((c for c in evaluated if c.ok), key=_PREFER[ranking])
    rest = sorted((c for c in evaluated if not c.ok), key=lambda c: c.trace.macs)
    failed = [c for c in done if c.failed]
    if exact:
        return tuple(exact + rest + failed)
    if other is not None and rest and all(c.rounding_only for c in rest):
        raise TargetError(
            f"every candidate on {backbone.spec} misses {target.describe()} only by rounding "
            f"(e.g. {rest[0].label or 'as is'} gives {_hw(rest[0].misses[0][1])} at "
            f"{_hw(rest[0].misses[0][0])}, not {_hw(rest[0].misses[0][2])}); "
            f"pass {{rounding}} {other} to accept {other}(H/S)",
            params=("rounding",),
        )
    reasons = "; ".join(
        f"{c.label or 'as is'}: "
        + (
            c.error
            or f"misses at {_hw(c.misses[0][0])}: {_hw(c.misses[0][1])} != {_hw(c.misses[0][2])}"
        )
        for c in (rest + failed)[:3]
    )
    if one_size:
        raise OneInputSize(
            f"no candidate reaches {target.describe()} on {backbone.spec}: {one_size}, and "
            f"no cut before that stage reaches the target ({reasons})"
        )
    hint = f"; {other}(H/S) is reachable: pass {{rounding}} {other}" if other else ""
    raise TargetError(
        f"no candidate reaches {target.describe()} exactly on {backbone.spec} ({reasons}){hint}",
        params=("rounding",) if other else (),
    )


def _exact_variants(
    backbone: Backbone,
    source: Trace,
    model: Any,
    done: list[Candidate],
    target: Target,
    probes: tuple[Size, ...],
    progress: Callable[[int, int], None] | None,
) -> list[Candidate]:
    """When no candidate is exact, the ones that miss again with their inexact reduction
    points padded (or, for poolings, rounded) to the target's rule; one rule at a time."""
    ids = {o.id for o in source.ops}
    out: list[Candidate] = []
    for rule in target.rules:
        variants = []
        for c in done:
            if c.failed or not c.misses:
                continue
            fix = _inexact(c.trace, ids, rule)
            if not fix:
                continue
            ops = list(c.recipe.ops)
            at = next(
                (i for i, op in enumerate(ops) if op.op in ("truncate", "pool", "project")),
                len(ops),
            )
            ops[at:at] = [make_op("exact", at=i, rule=rule) for i in fix]
            label = f"{c.label + ', ' if c.label else ''}exact {rule} at {', '.join(fix)}"
            mode = c.mode
            variants.append(Candidate(replace(c.recipe, ops=tuple(ops)), label, mode, c.order))
        one = replace(target, rounding=rule)
        for i, v in enumerate(variants):
            out.append(evaluate(backbone, source, model, v, one, probes))
            if progress is not None:
                progress(i + 1, len(variants))
        if any(c.ok for c in out):
            break
    return out


def _inexact(after: Trace, source_ids: set[str], rule: str) -> list[str] | None:
    """The window ops on the output's path whose size does not follow ``rule`` exactly;
    None if one of them is not a window op of the source (so cannot be made exact)."""
    fix: list[str] = []
    for op_id in after.chain:
        c = after.op(op_id)
        group = [c] + [
            o for o in after.ops if o.id != c.id and o.in_chain == c.in_chain and _parallel(o, c)
        ]
        more = _inexact_ops(after, group, source_ids, rule)
        if more is None:
            return None
        fix += [i for i in more if i not in fix]
    return fix


def _inexact_ops(
    after: Trace, ops: list[SpatialOp], source_ids: set[str], rule: str
) -> list[str] | None:
    """The ids among ``ops`` to make exact; a pad call is left as it is, and the window op
    after it is judged with its padding counted."""
    fix = []
    for o in ops:
        if o.op in ("pad", "windows"):
            continue
        if o.op in ("slice", "patch-merge") and rule == Rounding.CEIL.value:
            continue  # ceil(size / stride) at any size
        if o.op not in _WINDOW or any(st.kind != "window" for st in (*o.steps_h, *o.steps_w)):
            return None
        pre = pad_before(after, o)
        if all(
            exact_setting(
                o.op, st.kernel, st.stride, st.dilation, st.padding, st.ceil, rule, pre=pre[axis]
            )
            == (st.padding, st.ceil)
            for axis, steps in enumerate((o.steps_h, o.steps_w))
            for st in steps
        ):
            continue
        if o.id not in source_ids:
            return None
        fix.append(o.id)
    return fix


def _check_counts(channels: int | None, in_chans: int | None) -> None:
    if channels is not None and channels <= 0:
        raise TargetError(f"{{channels}} must be positive, got {channels}", params=("channels",))
    if in_chans is not None and in_chans <= 0:
        raise TargetError(f"{{in_chans}} must be positive, got {in_chans}", params=("in_chans",))


def _target(
    channels: int | None,
    stride: str | int | Size | None,
    in_chans: int | None,
    like: str | None,
    other: Trace | None,
) -> Target:
    """The target of a stride, or of the ``like`` backbone traced as ``other`` (its output
    sizes come later, at the probes)."""
    if like is None or other is None:
        if channels is None or stride is None:
            raise InvalidArgument(
                "give {channels} and {stride}, or {like} BACKBONE",
                params=("channels", "stride", "like"),
            )
        size = parse_stride(stride)
        if min(size) < 1:
            raise TargetError(f"{{stride}} must be at least 1, got {stride}", params=("stride",))
        return Target(channels, size, in_chans)
    return _like_target(channels, stride, in_chans, like, other)


def _like_target(
    channels: int | None,
    stride: str | int | Size | None,
    in_chans: int | None,
    like: str,
    other: Trace,
) -> Target:
    """The output of the traced ``like`` backbone: its channels (unless ``channels``),
    downsample and input channels (unless ``in_chans``)."""
    features = other.features
    out_shape = features.out_shape if features is not None else other.output_shape
    if len(out_shape) != 4:
        raise TargetError(f"{{like}} {like}: its output is not spatial", params=("like",))
    down = features.downsample if features is not None else other.downsample
    have = (round(down[0]), round(down[1]))
    if stride is not None and parse_stride(stride) != have:
        raise InvalidArgument(
            f"{{stride}} {stride} contradicts {{like}} {like} (1/{_fmt(have)})",
            params=("stride", "like"),
        )
    return Target(
        channels if channels is not None else (features.channels if features else out_shape[1]),
        have,
        in_chans if in_chans is not None else other.input_shape[1],
        like,
        {},
    )


def _like_sizes(other: Trace, traces: dict[Size, Trace]) -> dict[Size, Size]:
    """The ``like`` backbone's output size at each probe, from its trace there."""
    features = other.features
    sizes: dict[Size, Size] = {}
    for (h, w), again in traces.items():
        stage = again.stage(features.path) if features is not None else None
        out = stage.out_shape if stage is not None else again.output_shape
        if len(out) == 4:
            sizes[(h, w)] = (out[-2], out[-1])
    return sizes


def winner_input(result: FitResult) -> str:
    """The input of the winning plan, as NxCxHxW with the channels it takes."""
    source = result.source.input_shape
    w = result.winner
    chans = w.result.surgery.in_chans if w.result is not None else source[1]
    return f"{source[0]}x{chans}x{source[2]}x{source[3]}"


def winner_recipe(result: FitResult, input_text: str | None = None) -> Recipe:
    """The winning candidate of a fit as a recipe, to save or to emit.

    Args:
        result: What :func:`fit` returned.
        input_text: The recipe's traced input, ``"NxCxHxW"``; default the source's input
            with the channels the winner takes (:func:`winner_input`).

    Returns:
        The winner's :class:`~bbswap.recipes.schema.Recipe`.

    Example::

        found = bbswap.fit("resnet50", channels=684, stride=16, in_chans=1)
        recipe = bbswap.winner_recipe(found)
        open("r.toml", "w").write(bbswap.recipe_to_toml(recipe))
    """
    c = result.winner
    kw = dict(result.backbone.kwargs)  # a replay builds the same model
    return replace(c.recipe, input=input_text or winner_input(result), kw=kw)


def recipe_header(result: FitResult) -> str:
    c = result.winner
    t = c.trace
    return (
        f"Written by bbswap fit: {result.backbone.spec} -> {result.target.describe()}.\n"
        f"The cheapest of {result.evaluated} candidates by {result.prefer}: {c.label or 'as is'} "
        f"({c.mode} mode);\n"
        f"{t.macs:,} MACs and output {'x'.join(map(str, t.output_shape))} at "
        f"{'x'.join(map(str, t.input_shape))}."
    )
