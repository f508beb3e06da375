"""A patched backbone that returns what another backbone returns: several outputs
(the plan: :mod:`bbswap.surgery.outputs_plan`).

:func:`with_outputs` rewrites the patched model's own forward so: the modules on the way
to each tap are written out in it (their forwards inlined), so the tap is a call of the
forward, and the forward returns the structure of the plan.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from bbswap.errors import SurgeryError, gist
from bbswap.surgery.apply import ApplyResult
from bbswap.surgery.core import OwnerRewrite, new_module
from bbswap.surgery.outputs_plan import OutputRole, OutputsPlan, projection_name
from bbswap.tracing.mask import MaskInput
from bbswap.tracing.outputs import OutputKey
from bbswap.tracing.tracer import ForwardFailed, forward_error, trace_instance


class _Inline(fx.Tracer):
    """Trace a forward with the modules of ``opened`` written out, the others kept."""

    def __init__(self, opened: set[str]) -> None:
        super().__init__()
        self.opened = opened

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.opened


def _opened(taps: list[str]) -> set[str]:
    """The model and every module that holds a tap (written out in the forward)."""
    out = {""}
    for tap in taps:
        parts = tap.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _traced(model: nn.Module, taps: list[str]) -> fx.Graph:
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        return _Inline(_opened(taps)).trace(model)
    except SurgeryError:
        raise
    except Exception as error:  # fx raises many kinds of errors on dynamic code
        raise SurgeryError(
            f"cannot write the forward that returns several outputs: the modules holding "
            f"{', '.join(taps)} are not traceable with torch.fx ({gist(error)})"
        ) from error
    finally:
        for m, training in flags:
            m.training = training


def _tap_node(graph: fx.Graph, path: str) -> fx.Node:
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == path]
    if len(calls) != 1:
        raise SurgeryError(
            f"cannot return the output of {path}: the forward calls it {len(calls)} times"
        )
    return calls[0]


def projection(cin: int, cout: int, device: torch.device) -> tuple[nn.Module, str]:
    """A 1x1 conv (no bias) + BatchNorm from ``cin`` to ``cout`` channels, and its source."""

    def make() -> nn.Module:
        conv = nn.Conv2d(cin, cout, kernel_size=1, bias=False)
        if not conv.weight.is_meta:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        return nn.Sequential(conv, nn.BatchNorm2d(cout))

    conv = f"nn.Conv2d({cin}, {cout}, kernel_size=1, bias=False)"
    source = f"nn.Sequential({conv}, nn.BatchNorm2d({cout}))"
    return new_module(make, device), source


def _name(model: nn.Module, key: OutputKey) -> str:
    base = name = projection_name(key)
    n = 1
    while hasattr(model, name):
        name = f"{base}_{n}"
        n += 1
    return name


def _inputs(graph: fx.Graph, names: MaskInput | None) -> fx.Node | None:
    """The mask parameter after the image's, both named as the like-backbone names them."""
    if names is None:
        return None
    first = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_before(first):
        image = graph.placeholder(names.image)
    first.replace_all_uses_with(image)
    graph.erase_node(first)
    with graph.inserting_after(image):
        return graph.placeholder(names.mask)


def _graph(model: nn.Module, plan: OutputsPlan, device: torch.device) -> tuple[fx.Graph, dict]:
    """The forward's graph returning the plan's structure; the projections it adds."""
    taps = [o.tap for o in plan.outputs if o.role is OutputRole.TAP]
    graph = _traced(model, taps)
    output = next(n for n in graph.nodes if n.op == "output")
    primary = output.args[0]
    if not isinstance(primary, fx.Node):
        raise SurgeryError("the patched model's forward does not return one tensor")
    mask_in = _inputs(graph, plan.mask_input)
    added: dict[str, tuple[nn.Module, str]] = {}
    nodes: dict[OutputKey, fx.Node] = {}
    for o in plan.outputs:
        with graph.inserting_before(output):
            if o.role is OutputRole.FEATURES:
                nodes[o.key] = primary
            elif o.role is OutputRole.MASK and mask_in is not None and o.rule is not None:
                index = (mask_in, o.rule.index())
                nodes[o.key] = graph.create_node(
                    "call_function", operator.getitem, index, name="mask"
                )
            else:
                node = _tap_node(graph, o.tap)
                if o.projected:
                    name = _name(model, o.key)
                    added[name] = projection(o.tap_channels, o.channels, device)
                    model.add_module(name, added[name][0])
                    node = graph.call_module(name, (node,))
                nodes[o.key] = node
    values = [nodes[o.key] for o in plan.outputs]
    structure: Any = (
        {o.key: nodes[o.key] for o in plan.outputs}
        if plan.returns == "dict"
        else (values if plan.returns == "list" else tuple(values))
    )
    output.args = (structure,)
    return graph, added


def with_outputs(result: ApplyResult, plan: OutputsPlan) -> ApplyResult:
    """``result`` with a model whose forward returns every output of ``plan`` (and takes
    the mask, if the plan has one); its trace describes the fitted output."""
    model = copy.deepcopy(result.model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    graph, added = _graph(model, plan, device)
    gm = fx.GraphModule(model, graph, class_name=type(result.model).__name__)
    gm.graph.lint()
    gm.recompile()
    gm.train(result.model.training)
    surgery = copy.copy(result.surgery)
    surgery.new_modules = {**surgery.new_modules, **{k: v[1] for k, v in added.items()}}
    surgery.rewrites = {**surgery.rewrites, "": surgery.rewrites.get("") or OwnerRewrite("")}
    n, c, h, w = result.after.input_shape
    try:
        after = trace_instance(gm, (n, c, h, w), name=result.backbone.spec)
    except ForwardFailed as failed:  # a bug of this module, said in one line
        raise forward_error(failed, (n, c, h, w)) from failed.error
    after = after.select_output(plan.features.key, result.backbone.spec)
    return replace(result, model=gm, after=after, surgery=surgery, outputs=plan)
