"""The surgery engine: apply a recipe's ops to a copy of a backbone.

Ops never touch the caller's model: a :class:`Surgery` works on a deep copy and
records every change as an :class:`Edit`. Changes come in three forms:

- attribute edits on modules (a conv's ``stride``, ``padding``, ``dilation``) and
  module replacements (a stem conv with other input channels), made on the copy;
- edits of functional calls (``F.avg_pool2d(x, 2)`` in a block's forward) and
  modules appended to a module's output (a Dropout after each block, a 1x1
  projection after the body) or a truncated output: these rewrite the forward of
  the module that owns them, which is traced with ``torch.fx`` (its children kept as
  calls) and replaced by a ``GraphModule`` with the same children, so state_dict
  keys do not change.

The graph rewrites are kept as data (:class:`OwnerRewrite`) until :meth:`finish`,
so the emitter can write them out as code.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import operator
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from bbswap.errors import SurgeryError, gist
from bbswap.records import attrs
from bbswap.surgery.fx_trace import trace_children_as_leaves
from bbswap.tracing.ids import PointId
from bbswap.tracing.outputs import OutputKey
from bbswap.tracing.tracer import SpatialOp, Trace

# fx records F.max_pool2d and friends under their boolean-dispatch wrapper's name.
_FX_NAMES: dict[Any, str] = {
    F.max_pool2d: "max_pool2d",
    F.adaptive_max_pool2d: "adaptive_max_pool2d",
}
_CALL_PARAMS: dict[str, list[str]] = {
    "conv2d": ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
    "max_pool2d": [
        "input",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "ceil_mode",
        "return_indices",
    ],
    "avg_pool2d": [
        "input",
        "kernel_size",
        "stride",
        "padding",
        "ceil_mode",
        "count_include_pad",
        "divisor_override",
    ],
    "lp_pool2d": ["input", "norm_type", "kernel_size", "stride", "ceil_mode"],
}


def fx_name(target: Any) -> str:
    return _FX_NAMES.get(target) or str(getattr(target, "__name__", target))


class EditKind(enum.Enum):
    """What an edit does; the label is how tables show it in the attribute column."""

    SET = "set"  # a module's attribute set (a conv's stride)
    REPLACE = "replace"  # a module replaced by a new one (a stem conv)
    CALL = "call"  # an argument of a functional call in a forward
    APPEND = "append"  # a new module run after another's output
    REMOVE = "remove"  # a module dropped by a truncation

    @property
    def label(self) -> str | None:
        """The attribute column's text for an edit that changes no attribute."""
        return {EditKind.APPEND: "(appended)", EditKind.REMOVE: "(removed)"}.get(self)


@dataclass(frozen=True)
class Edit:
    """One change, as the apply table and the emitted file show it."""

    op_index: int
    op: str
    path: str  # module path, functional call id, or "" for the model itself
    attribute: str  # the attribute changed, or the kind's label
    old: str
    new: str
    value: Any = field(default=None, compare=False, repr=False)  # the new value itself
    kind: EditKind = EditKind.SET


@dataclass
class CallEdit:
    """Set keyword arguments of the ``call``-th call of ``func`` in an owner's forward."""

    func: str
    call: int
    values: dict[str, Any]
    op_index: int


@dataclass(frozen=True)
class TapOutput:
    """One output of a backbone that returns several: a module's output, and the modules
    appended to it (a projection), as the model's own children."""

    at: str  # the tapped module
    key: str  # its key in a dict (the target's name, else the module's path)
    modules: tuple[str, ...]  # child names of the modules run on it, in order
    op_index: int


@dataclass
class OwnerRewrite:
    """Everything that rewrites one module's forward."""

    owner: str
    calls: list[CallEdit] = field(default_factory=list)
    append: list[tuple[str, int]] = field(default_factory=list)  # (child name, op index)
    truncate_after: str | None = None
    select: OutputKey | None = None  # the output kept of a forward that returns several
    taps: list[TapOutput] = field(default_factory=list)  # the outputs of the model itself
    returns: str = "list"  # what holds the taps: "list", "tuple" or "dict"


def fmt(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1]:
        return str(value[0])
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def module_at(root: nn.Module, path: str) -> nn.Module:
    return root if path == "" else root.get_submodule(path)


def parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def child_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


class Surgery:
    """A copy of a backbone being patched, and the record of what was done."""

    def __init__(self, model: nn.Module, trace: Trace, *, in_place: bool = False) -> None:
        # ``in_place``: for a model the caller made for this surgery alone (no copy of
        # its weights is kept)
        self.model = model if in_place else copy.deepcopy(model)
        self.trace = trace
        self.edits: list[Edit] = []
        self.rewrites: dict[str, OwnerRewrite] = {}
        self.op_index = 0
        self.op_name = ""
        out = trace.output_shape
        self.out_channels = out[1] if len(out) >= 2 else out[-1]
        self.out_spatial = len(out) == 4
        self.in_chans = trace.input_shape[1]
        self.new_modules: dict[str, str] = {}  # path -> constructor source, for the emitter
        if trace.output_key is not None:  # the patched model returns that output alone
            self.rewrite("").select = trace.output_key

    # -- recording ------------------------------------------------------------------
    def record(
        self,
        path: str,
        attribute: str | EditKind,
        old: Any,
        new: Any,
        value: Any = None,
        kind: EditKind = EditKind.SET,
    ) -> None:
        if isinstance(attribute, EditKind):
            kind, attribute = attribute, attribute.label or ""
        self.edits.append(
            Edit(self.op_index, self.op_name, path, attribute, fmt(old), fmt(new), value, kind)
        )

    def rewrite(self, owner: str) -> OwnerRewrite:
        return self.rewrites.setdefault(owner, OwnerRewrite(owner))

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    # -- edits ------------------------------------------------------------------------
    def set_attr(self, path: str, attribute: str, value: Any) -> None:
        module = module_at(self.model, path)
        old = getattr(module, attribute)
        if _same(old, value):
            return
        setattr(module, attribute, value)
        self.record(path, attribute, old, value, value)

    def replace(
        self, path: str, module: nn.Module, source: str, old: Any, new: Any, what: str
    ) -> None:
        parent = module_at(self.model, parent_path(path))
        setattr(parent, child_name(path), module)
        self.new_modules[path] = source
        self.record(path, what, old, new, kind=EditKind.REPLACE)

    def edit_call(self, op: SpatialOp, values: dict[str, Any]) -> None:
        changed = {}
        current = _call_values(op)
        for key, value in values.items():
            if not _same(current.get(key), value):
                changed[key] = value
                self.record(op.id, key, current.get(key), value, value, EditKind.CALL)
        if changed:
            self.rewrite(op.owner).calls.append(CallEdit(op.func, op.call, changed, self.op_index))

    def add_child(self, owner: str, name: str, module: nn.Module, source: str) -> str:
        """Register a new module under ``owner``; returns the name actually used."""
        parent = module_at(self.model, owner)
        base, n = name, 1
        while hasattr(parent, name):
            name = f"{base}_{n}"
            n += 1
        # a new module takes the model's train/eval mode, as if it had been there all along
        parent.add_module(name, module.to(self.device).train(self.model.training))
        path = f"{owner}.{name}" if owner else name
        self.new_modules[path] = source
        return name

    def append_output(self, owner: str, name: str, module: nn.Module, source: str) -> str:
        used = self.add_child(owner, name, module, source)
        self.rewrite(owner).append.append((used, self.op_index))
        path = f"{owner}.{used}" if owner else used
        self.record(path, EditKind.APPEND, "-", source)
        return used

    def add_tap(self, at: str, key: str, modules: list[tuple[str, nn.Module, str]]) -> None:
        """Return ``at``'s output as one of the model's outputs, after ``modules`` (name,
        module, constructor source), which become the model's own children."""
        names = []
        for name, module, source in modules:
            used = self.add_child("", name, module, source)
            self.record(used, EditKind.APPEND, "-", source)
            names.append(used)
        self.rewrite("").taps.append(TapOutput(at, key, tuple(names), self.op_index))

    def truncate(self, after: str, dropped: list[str]) -> None:
        """Make ``after`` the output: each module from it up to the model stops there."""
        path, point = after, PointId.parse(after)
        if point.is_call and point.owner:
            # a functional call in a module's forward: that module stops at the call
            self.rewrite(point.owner).truncate_after = str(replace(point, owner=""))
            path = point.owner
        owner, target = parent_path(path), child_name(path)
        while True:
            if owner and (_runs_nothing(module_at(self.model, owner)) or self._iterated(owner)):
                # a ModuleList runs nothing itself, and a Sequential its owner loops over
                # (``for blk in self.blocks``) runs no forward of its own: the forward that
                # loops over it stops at the child (a call of ``blocks.3`` in its graph)
                owner, target = parent_path(owner), f"{child_name(owner)}.{target}"
                continue
            self.rewrite(owner).truncate_after = target
            if not owner:
                break
            owner, target = parent_path(owner), child_name(owner)
        for path in dropped:
            self.record(path, EditKind.REMOVE, type(module_at(self.model, path)).__name__, "-")

    def _iterated(self, path: str) -> bool:
        """An ``nn.Sequential`` whose forward never ran in the trace while its children
        did: its owner loops over it (SAM2's Hiera), so its forward is not the one to
        rewrite."""
        module = module_at(self.model, path)
        called = set(self.trace.modules)
        return (
            type(module) is nn.Sequential
            and path not in called
            and any(p.startswith(f"{path}.") for p in called)
        )

    # -- finishing ----------------------------------------------------------------------
    def finish(self) -> nn.Module:
        """Materialise the graph rewrites, deepest owner first; return the patched model."""
        model = self.model
        for owner in sorted(self.rewrites, key=lambda p: -(p.count(".") + (p != ""))):
            module = module_at(model, owner)
            gm = rewrite_forward(module, self.rewrites[owner], owner)
            if owner == "":
                model = gm
            else:
                setattr(module_at(model, parent_path(owner)), child_name(owner), gm)
        return model


def _runs_nothing(module: nn.Module) -> bool:
    """A container without a forward of its own (ModuleList, ModuleDict): its owner's
    forward calls its children."""
    return type(module).forward is nn.Module.forward


def _same(a: Any, b: Any) -> bool:
    """Equal values, an int counting as the pair it stands for (``0`` is ``(0, 0)``)."""

    def norm(v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return (v, v)
        return tuple(v) if isinstance(v, (list, tuple)) else v

    return bool(norm(a) == norm(b))


def _call_values(op: SpatialOp) -> dict[str, Any]:
    return {"kernel_size": op.kernel, **attrs(op, "stride", "padding", "dilation", "ceil_mode")}


def trace_forward(module: nn.Module, owner: str) -> fx.Graph:
    try:
        return trace_children_as_leaves(module, owner)
    except SurgeryError:
        raise
    except Exception as error:  # fx raises many kinds of errors on dynamic code
        name = owner or "the model"
        raise SurgeryError(
            f"cannot rewrite the forward of {name} ({type(module).__name__}): it is not "
            f"traceable with torch.fx ({gist(error)})"
        ) from error


def _require_fx_names(graph: fx.Graph, owner: str) -> None:
    """torch.fx writes a submodule's name into a string literal without escaping it, so
    a name with a quote, a backslash or a control character cannot be rewritten; and it
    writes an identifier as an attribute (``self.name``), which Python reads in its NFKC
    form (a fullwidth 'Ａbc' is 'Abc' there), so such a name cannot be either."""
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "call_module":
            continue
        unsafe = not name.isprintable() or any(c in name for c in "\\\"'")
        folded = any(
            part.isidentifier() and unicodedata.normalize("NFKC", part) != part
            for part in name.split(".")
        )
        if unsafe or folded:
            what = (
                "a name Python reads as another (NFKC)"
                if folded and not unsafe
                else "a quote, backslash or control character in a module name"
            )
            raise SurgeryError(
                f"cannot rewrite the forward of {owner or 'the model'}: torch.fx cannot write "
                f"a call of its submodule named {name!r} ({what}); rename the module"
            )


def rewrite_forward(module: nn.Module, rw: OwnerRewrite, owner: str) -> fx.GraphModule:
    """Trace ``module``'s forward, apply the rewrite, return an equivalent GraphModule.

    The modules the rewrite appends are hidden from the trace: a container that runs its
    children (an ``nn.Sequential``, the model itself or a block of it) would run them as
    well, and the appended output would then run them a second time."""
    added = [name for name, _ in rw.append] + [n for tap in rw.taps for n in tap.modules]
    with _hidden(module, added):
        graph = trace_forward(module, owner)
    for edit in rw.calls:
        node = _nth_call(graph, edit.func, edit.call, owner)
        names = _CALL_PARAMS.get(edit.func)
        if names is None:
            raise SurgeryError(f"cannot edit calls of {edit.func} in {owner or 'the model'}")
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        bound.update(edit.values)
        node.args = (bound.pop("input"),)
        node.kwargs = bound
    output = next(n for n in graph.nodes if n.op == "output")
    if rw.select is not None:
        output.args = (_selected(graph, output, rw.select),)
    if rw.truncate_after is not None:
        target = _stage_node(graph, rw.truncate_after)
        output.args = (target,)
    if rw.append:
        value = output.args[0]
        if not isinstance(value, fx.Node):
            raise SurgeryError(
                f"cannot append to the output of {owner or 'the model'}: it returns "
                f"{type(value).__name__}, not one tensor"
            )
        with graph.inserting_before(output):
            for name, _ in rw.append:
                value = graph.call_module(name, (value,))
        output.args = (value,)
    if rw.taps:
        output.args = (_tap_outputs(graph, output, rw),)
    _require_fx_names(graph, owner)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    _delete_unused_submodules(gm)
    gm.recompile()
    _keep_child_order(gm, module)
    return gm


def _delete_unused_submodules(gm: fx.GraphModule) -> None:
    """fx's ``delete_all_unused_submodules``, where a module the graph reads as an
    attribute (``IntermediatesGrid`` reads its timm model, to call one of its methods) is
    used whole, as a called one is."""
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        parts = str(node.target).split(".")
        used.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        try:
            target = gm.get_submodule(str(node.target))
        except AttributeError:  # a parameter or buffer, not a module
            continue
        used.update(f"{node.target}.{name}" for name, _ in target.named_modules() if name)
    for name in [name for name, _ in gm.named_modules() if name and name not in used]:
        gm.delete_submodule(name)


@contextlib.contextmanager
def _hidden(module: nn.Module, names: list[str]) -> Iterator[None]:
    """``module`` without its children ``names`` for the duration; their order is kept."""
    if not names:
        yield
        return
    children = module._modules
    saved = dict(children)
    for name in names:
        del children[name]
    try:
        yield
    finally:
        children.clear()
        children.update(saved)


def _selected(graph: fx.Graph, output: fx.Node, key: OutputKey) -> fx.Node:
    """The node of output ``key`` of a forward that returns several tensors."""
    value = output.args[0]
    if isinstance(value, fx.Node):  # a container made by a call: index it
        with graph.inserting_before(output):
            return graph.call_function(operator.getitem, (value, key))
    try:
        chosen = value[key]  # type: ignore[index]  # a tuple, list or dict of nodes
    except (TypeError, KeyError, IndexError):
        chosen = None
    if not isinstance(chosen, fx.Node):
        raise SurgeryError(
            f"the model's forward returns {type(value).__name__} whose output {key!r} the "
            "torch.fx trace does not show as one tensor"
        )
    return chosen


def _tap_outputs(graph: fx.Graph, output: fx.Node, rw: OwnerRewrite) -> Any:
    """The model's outputs: each tapped module's output node, run through the modules
    appended to it, held as ``rw.returns`` says."""
    values = []
    for tap in rw.taps:
        value = _stage_node(graph, tap.at)
        with graph.inserting_before(output):
            for name in tap.modules:
                value = graph.call_module(name, (value,))
        values.append(value)
    if rw.returns == "dict":
        return {tap.key: value for tap, value in zip(rw.taps, values)}
    return tuple(values) if rw.returns == "tuple" else values


def _nth_call(graph: fx.Graph, func: str, call: int, owner: str) -> fx.Node:
    calls = [n for n in graph.nodes if n.op == "call_function" and fx_name(n.target) == func]
    if call >= len(calls):
        raise SurgeryError(
            f"{owner or 'the model'}: the fx trace has {len(calls)} calls of {func}, "
            f"the stage trace saw at least {call + 1}"
        )
    return calls[call]


def _stage_node(graph: fx.Graph, stage: str) -> fx.Node:
    """The node that produces a top-level stage's output (its last call)."""
    found = None
    point = PointId.parse(stage)
    if point.func is not None:
        return _nth_call(graph, point.func, point.call, "")
    for node in graph.nodes:
        if node.op == "call_module" and (
            node.target == stage or node.target.startswith(stage + ".")
        ):
            found = node
    if found is None:
        raise SurgeryError(f"stage '{stage}' is not called in the model's forward")
    return found


def _keep_child_order(gm: fx.GraphModule, original: nn.Module) -> None:
    """Order the GraphModule's children as the original registered them (state_dict order)."""
    order = list(original._modules)
    children = gm._modules
    ranked = sorted(children, key=lambda k: order.index(k) if k in order else len(order))
    gm._modules = type(children)((k, children[k]) for k in ranked)


# -- module construction helpers used by ops --------------------------------------------------


M = TypeVar("M", bound=nn.Module)


def new_module(factory: Callable[[], M], device: torch.device) -> M:
    """Build a module on ``device`` (meta models get meta modules)."""
    with torch.device(device):
        return factory()
