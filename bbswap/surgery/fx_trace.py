"""The ``torch.fx`` trace of one module's own forward, in train and in eval mode.

fx runs a forward on proxies, so ``if self.training:`` takes one branch and the graph
keeps only that one. The forward is traced in both modes; when the graphs differ beyond
dropout and batch-norm statistics the module is refused, naming it. The graph given back
is the eval-mode one, where the ``training`` argument of functional dropout and batch
norm reads ``self.training`` again (fx wrote it as a constant), so the rewritten forward
behaves as the original in both modes. In-place updates of a buffer that only training
makes (a batch counter) are not part of the comparison.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bbswap.errors import SurgeryError
from bbswap.surgery.intermediates_grid import IntermediatesGrid

# functions whose argument of this name (at this position) is the module's mode
_MODE_ARGUMENT: dict[Any, tuple[str, int]] = {
    F.dropout: ("training", 2),
    F.dropout1d: ("training", 2),
    F.dropout2d: ("training", 2),
    F.dropout3d: ("training", 2),
    F.alpha_dropout: ("training", 2),
    F.feature_alpha_dropout: ("training", 2),
    torch.dropout: ("train", 2),
    F.batch_norm: ("training", 5),
    F.instance_norm: ("use_input_stats", 5),
}
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_MARK = "<mode>"


class _ChildrenAsLeaves(fx.Tracer):
    """Trace one module's own forward; every submodule call stays a call, and so does a
    call of timm's position-embedding resampling (:func:`kept_calls`)."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=kept_calls())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name != ""


def kept_calls() -> tuple[Any, ...]:
    """Functions the trace keeps as one call: timm's resampling of a position embedding
    to the grid it is added to (SAM's ViT calls it in its own forward). It compares the
    grid with the embedding's, which fx cannot trace; the generated file imports it from
    timm, as it imports the model's builder. Empty unless timm is already imported."""
    layers = sys.modules.get("timm.layers")
    names = ("resample_abs_pos_embed", "resample_abs_pos_embed_nhwc")
    return tuple(getattr(layers, n) for n in names if hasattr(layers, n))


def trace_children_as_leaves(module: nn.Module, owner: str = "") -> fx.Graph:
    """The graph of ``module``'s own forward, every submodule call kept as a call; the
    forward must not branch on ``self.training`` (``owner``, its path, names it if so).
    An :class:`IntermediatesGrid`, whose forward only calls a method of its timm model,
    gives its graph itself."""
    if isinstance(module, IntermediatesGrid):
        return module.graph()
    with _mode(module, True):
        train = _ChildrenAsLeaves().trace(module)
    with _mode(module, False):
        graph = _ChildrenAsLeaves().trace(module)
    a, b = _signature(train, *_side_heads(train)), _signature(graph, *_side_heads(graph))
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise _branches(module, owner, _described(a, at), _described(b, at))
    for node, value in _mode_values(train, graph):
        _follow_mode(graph, node, value, module, owner)
    return graph


def require_one_forward(model: nn.Module) -> None:
    """Refuse a model whose own forward branches on ``self.training``; one that torch.fx
    cannot trace is left to the rewrite that needs the trace, which says so."""
    try:
        trace_children_as_leaves(model)
    except SurgeryError:
        raise
    except Exception:  # fx raises many kinds of errors on dynamic code
        return


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool) -> Iterator[None]:
    """``module`` and its submodules in one mode for the duration; every flag restored."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.train(training)
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _statistics(graph: fx.Graph) -> set[fx.Node]:
    """In-place updates of a module attribute whose result nothing uses
    (``self.num_batches_tracked += 1``), and the attribute reads only they use."""
    skip = set()
    for node in graph.nodes:
        in_place = node.target in _IN_PLACE_OPERATORS or (
            node.op == "call_method" and str(node.target).endswith("_")
        )
        first = node.args[0] if node.args else None
        if in_place and not node.users and isinstance(first, fx.Node) and first.op == "get_attr":
            skip.add(node)
    for node in graph.nodes:
        if node.op == "get_attr" and node.users and all(u in skip for u in node.users):
            skip.add(node)
    return skip


def _side_heads(graph: fx.Graph) -> tuple[set[fx.Node], fx.Node | None]:
    """The nodes a forward computes only for the later fields of a named record it
    returns: torchvision's GoogLeNet and Inception-v3 return ``(logits, aux2, aux1)`` in
    train mode, their auxiliary heads run for nothing else. Only the first field, the
    one eval mode returns, is on the features' path; the emitted forward is eval's. The
    nodes left out, and that first field (None when the forward returns no such record)."""
    out = next((n for n in graph.nodes if n.op == "output"), None)
    record = out.args[0] if out is not None and out.args else None
    if isinstance(record, tuple) and hasattr(record, "_fields") and record:
        first = record[0]  # a namedtuple of nodes, as fx writes one into the output
    elif (
        isinstance(record, fx.Node)
        and record.op == "call_function"
        and isinstance(record.target, type)
        and hasattr(record.target, "_fields")  # a namedtuple class called in the graph
        and record.args
    ):
        first = record.args[0]
    else:
        return set(), None
    keep: set[fx.Node] = set()
    todo = [first] if isinstance(first, fx.Node) else []
    while todo:
        node = todo.pop()
        if node not in keep:
            keep.add(node)
            todo += node.all_input_nodes
    side = {n for n in graph.nodes if n not in keep and n.op not in ("placeholder", "output")}
    return side, first if isinstance(first, fx.Node) else None


def _signature(
    graph: fx.Graph, side: set[fx.Node] | None = None, first: fx.Node | None = None
) -> list[str]:
    """One entry per node: what it calls with which arguments (nodes by position), the
    mode argument of dropout and batch norm left out; ``side`` nodes left out too, and
    the output read as returning ``first`` alone when it is given."""
    skip = _statistics(graph) | (side or set())
    index: dict[fx.Node, int] = {}
    out: list[str] = []
    for node in graph.nodes:
        if node in skip:
            continue
        index[node] = len(out)
        args, kwargs = _without_mode(node)
        if node.op == "output" and first is not None:
            args, kwargs = (first,), {}
        shown = fx.node.map_arg((args, kwargs), lambda n: f"<node {index.get(n, -1)}>")
        out.append(f"{node.op} {_name(node)} {shown!r}")
    return out


def _without_mode(node: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = tuple(node.args), dict(node.kwargs)
    where = _MODE_ARGUMENT.get(node.target) if node.op == "call_function" else None
    if where is not None:
        name, position = where
        if name in kwargs:
            kwargs[name] = _MARK
        elif len(args) > position:
            args = (*args[:position], _MARK, *args[position + 1 :])
    return args, kwargs


def _name(node: fx.Node) -> str:
    target = node.target
    if node.op in ("call_module", "get_attr", "call_method"):
        return str(target)
    if node.op == "call_function":
        name = str(getattr(target, "__name__", target))
        for prefix, space in (("F", F), ("torch", torch), ("operator", operator)):
            if getattr(space, name, None) is target:
                return f"{prefix}.{name}"
        return f"{getattr(target, '__module__', None) or ''}.{name}"
    return node.op


def _described(signature: list[str], at: int) -> str:
    """How the message names the node at ``at``: ``torch.randn_like``, ``self.down``."""
    if at >= len(signature):
        return "nothing more"
    op, name = signature[at].split(" ", 2)[:2]
    return _shown(op, name)


def _shown(op: str, name: str) -> str:
    if op in ("call_module", "get_attr"):
        return f"self.{name}"
    if op == "call_method":
        return f".{name}()"
    if op == "call_function":
        return name
    return {"output": "returns", "placeholder": "takes an argument"}.get(op, op)


def _branches(module: nn.Module, owner: str, train: str, eval_: str) -> SurgeryError:
    where = f"'{owner}'" if owner else "the model's forward"
    # no ": " in the message: fit lists a candidate's error after its own location
    return SurgeryError(
        f"{where} ({type(module).__name__}) branches on self.training (traced in train mode "
        f"it calls {train} where in eval mode it calls {eval_}); bbswap writes one forward "
        "for both modes, in which only dropout and batch norm may depend on the mode; move "
        "the branch into a submodule of its own, which keeps its code"
    )


def _mode_values(train: fx.Graph, graph: fx.Graph) -> Iterator[tuple[fx.Node, tuple[Any, Any]]]:
    """Each mode-argument call of ``graph`` with its argument's value in both modes."""
    skip_a, skip_b = _statistics(train), _statistics(graph)
    a = [n for n in train.nodes if n not in skip_a]
    b = [n for n in graph.nodes if n not in skip_b]
    for x, y in zip(a, b):
        if y.op == "call_function" and y.target in _MODE_ARGUMENT:
            yield y, (_argument(x), _argument(y))


def _argument(node: fx.Node) -> Any:
    name, position = _MODE_ARGUMENT[node.target]
    if name in node.kwargs:
        return node.kwargs[name]
    if len(node.args) > position:
        return node.args[position]
    return inspect.signature(node.target).parameters[name].default  # type: ignore[arg-type]  # a function of the table


def _follow_mode(
    graph: fx.Graph, node: fx.Node, values: tuple[Any, Any], module: nn.Module, owner: str
) -> None:
    """Make the call's mode argument ``self.training`` where the two modes gave True and
    False; leave one both modes gave alike."""
    if values[0] == values[1]:
        return
    if values != (True, False):
        name = f"{_shown(node.op, _name(node))}({_MODE_ARGUMENT[node.target][0]}="
        raise _branches(module, owner, f"{name}{values[0]})", f"{name}{values[1]})")
    training = next((n for n in graph.nodes if n.op == "get_attr" and n.target == "training"), None)
    if training is None:
        last = [n for n in graph.nodes if n.op == "placeholder"][-1:]
        where = graph.inserting_after(last[0]) if last else graph.inserting_before(node)
        with where:
            training = graph.get_attr("training")
    name, position = _MODE_ARGUMENT[node.target]
    if name not in node.kwargs and len(node.args) > position:
        node.args = (*node.args[:position], training, *node.args[position + 1 :])
    else:
        node.kwargs = {**node.kwargs, name: training}
