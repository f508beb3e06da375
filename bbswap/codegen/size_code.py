"""The emitted ``output_size(h, w)``: closed-form arithmetic where the chain allows it.

A chain of sliding windows (strided convs and poolings, floor or ceil rounding) reduces
to one integer division, ``(n + a) // b``, by the identity
``(floor((n + a) / b) + c) // s == (n + a + b * c) // (b * s)``; a fixed-size step
(adaptive pooling) makes the output a constant. A candidate form is used only after it
has been checked against the step chain itself at every size from 1 up to well past one
whole period of the chain's rounding, so the choice never rests on the shape of the
chain alone. An axis with no such form (padding, folding, transposed convs, a ceil-mode
pooling whose last window can fall into the padding) keeps the step table and the small
interpreter ``_through`` that applies PyTorch's own size formulas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bbswap.codegen.text import Place, as_source
from bbswap.tracing.sizes import SizeStep, chain_size, min_size
from bbswap.tracing.tracer import Trace

_AXES = (("h", "_CHAIN_H"), ("w", "_CHAIN_W"))


@dataclass(frozen=True)
class ClosedForm:
    """``(n + add) // div`` (or the constant ``const``), 0 below ``minimum`` if ``guard``."""

    add: int = 0
    div: int = 1
    const: int | None = None
    minimum: int = 1
    guard: bool = False

    def at(self, n: int) -> int:
        if self.guard and n < self.minimum:
            return 0
        return self.const if self.const is not None else (n + self.add) // self.div

    def expression(self, var: str) -> str:
        if self.const is not None:
            return str(self.const)
        shifted = var if not self.add else f"{var} {'+' if self.add > 0 else '-'} {abs(self.add)}"
        if self.div == 1:
            return shifted
        return f"({shifted}) // {self.div}" if self.add else f"{var} // {self.div}"


def _candidate(steps: Sequence[SizeStep]) -> ClosedForm | None:
    """The form the chain would follow if every window step were plain integer division."""
    fixed = [i for i, s in enumerate(steps) if s.kind == "fixed"]
    if fixed:  # the size is set here: what follows sees one size only
        const = chain_size(steps[fixed[-1] + 1 :], int(steps[fixed[-1]].value))
        return ClosedForm(const=const) if const > 0 else None
    add, div = 0, 1
    for s in steps:
        if s.kind != "window":
            return None
        # floor: (n + 2p - d(k-1) - 1) // s + 1; ceil: the same with s - 1 added first
        shift = 2 * s.padding - s.dilation * (s.kernel - 1) - 1 + s.stride
        if s.ceil:
            shift += s.stride - 1
        add, div = add + div * shift, div * s.stride
    return ClosedForm(add, div)


def closed_form(steps: Sequence[SizeStep]) -> ClosedForm | None:
    """A closed form equal to the chain at every input size, or None.

    Each window's deviation from plain division depends only on its input modulo its
    stride, so the difference between the chain and the candidate repeats with period
    ``div`` once every step gets at least one pixel: checking a few periods past the
    smallest input covers every size."""
    candidate = _candidate(steps)
    if candidate is None:
        return None
    minimum = min_size(steps)
    limit = minimum + 4 * candidate.div + 256
    sizes = range(1, limit + 1)
    for guard in (False, True):
        form = ClosedForm(candidate.add, candidate.div, candidate.const, minimum, guard)
        if all(form.at(n) == chain_size(steps, n) for n in sizes):
            return form
    return None


def output_size_code(trace: Trace) -> tuple[str, str]:
    """The module-level code the method needs ("" when none) and the method itself."""
    steps = (trace.steps(0), trace.steps(1))
    forms = [closed_form(s) for s in steps]
    tables = [name for (_, name), form in zip(_AXES, forms) if form is None]
    lines: list[str] = []
    results: list[str] = []
    for (var, name), form in zip(_AXES, forms):
        if form is None:
            results.append(f"_through({name}, {var})")
        elif form.guard:
            lines.append(
                f"out_{var} = {form.expression(var)} if {var} >= {form.minimum} else 0"
                "  # smaller inputs give no output"
            )
            results.append(f"out_{var}")
        else:
            results.append(form.expression(var))
    how = {0: "; exact at every size", 1: ", one axis from the reduction chain"}.get(
        len(tables), ", from the reduction chain"
    )
    method = "\n".join(
        [
            "@staticmethod",
            "def output_size(h: int, w: int) -> tuple[int, int]:",
            f'    """The output (H, W) for an input of (h, w){how}."""',
            *(f"    {line}" for line in lines),
            f"    return {', '.join(results)}",
        ]
    )
    chains = {name: trace.chain for name in tables}
    return (_chain_code(trace, chains) if tables else ""), method


def outputs_size_code(trace: Trace, names: Sequence[str]) -> tuple[str, str]:
    """The same for a backbone that returns several outputs (``trace.outputs``, called
    ``names`` in comments): the method returns one (H, W) per output, in their order."""
    lines: list[str] = []
    results: list[str] = []
    chains: dict[str, tuple[str, ...]] = {}
    for i, out in enumerate(trace.outputs):
        pair = []
        for axis, (var, name) in enumerate(_AXES):
            form = closed_form(trace.steps(axis, out.chain))
            if form is None:
                chains[f"{name}_{i}"] = out.chain
                pair.append(f"_through({name}_{i}, {var})")
            elif form.guard:
                lines.append(
                    f"{var}{i} = {form.expression(var)} if {var} >= {form.minimum} else 0"
                    "  # smaller inputs give no output"
                )
                pair.append(f"{var}{i}")
            else:
                pair.append(form.expression(var))
        results.append(f"({pair[0]}, {pair[1]}),  # {as_source(names[i], Place.COMMENT)}")
    how = "exact at every size" if not chains else "from the reduction chains"
    method = "\n".join(
        [
            "@staticmethod",
            "def output_size(h: int, w: int) -> list[tuple[int, int]]:",
            f'    """The (H, W) of each output, in order, for an input of (h, w); {how}."""',
            *(f"    {line}" for line in lines),
            "    return [",
            *(f"        {line}" for line in results),
            "    ]",
        ]
    )
    return (_chain_code(trace, chains) if chains else ""), method


def _chain_code(trace: Trace, chains: dict[str, tuple[str, ...]]) -> str:
    """The step tables ``chains`` names (each with the ops of its chain) and ``_through``."""
    by_id = {o.id: o for o in trace.ops}
    rows: dict[str, list[str]] = {name: [] for name in chains}
    used: list[SizeStep] = []
    for name, chain in chains.items():
        for op_id in chain:
            o = by_id[op_id]
            for s in o.steps_w if name.startswith("_CHAIN_W") else o.steps_h:
                used.append(s)
                rows[name].append(
                    f'    ("{s.kind}", {s.kernel}, {s.stride}, {s.padding}, {s.dilation}, '
                    f"{s.ceil}, {s.pool}, {s.value!r}),  # {as_source(op_id, Place.COMMENT)}"
                )
    table = (
        "# The reduction chain from input to output, one step per size-changing op:\n"
        "# (kind, kernel, stride, padding, dilation, ceil_mode, is_pool, value).\n"
        + "Step = tuple[str, int, int, int, int, bool, bool, float]\n\n"
        + "\n".join(_tuple_block(name, rows[name]) for name in chains)
    )
    return table.rstrip("\n") + "\n\n\n" + _interpreter(used)


def _interpreter(used: list[SizeStep]) -> str:
    # optional branches, written only when the chain has such a step
    pad = " if n >= value else 0" if any(s.kind == "pad" and s.value > 0 for s in used) else ""
    fold = (
        """
        elif kind == "fold":  # a reshape folding s x s pixel blocks into channels
            n = n // s if n % s == 0 else 0"""
        if any(s.kind == "fold" for s in used)
        else ""
    )
    if any(s.kind == "blocks" for s in used):  # windows of s pixels, split without padding
        fold += """
        elif kind == "blocks":
            n = n if n % s == 0 else 0"""
    return f'''def _through(chain: tuple[Step, ...], n: int) -> int:
    """Apply PyTorch's output-size formulas of a chain of steps to one axis."""
    for kind, k, s, p, d, ceil, pool, value in chain:
        if kind == "fixed":
            n = int(value)
        elif kind == "scale":
            n = int(n * value)
        elif kind == "pad":
            n = n + p{pad}
        elif kind == "transpose":
            n = (n - 1) * s - 2 * p + d * (k - 1) + int(value) + 1{fold}
        else:
            span = n + 2 * p - d * (k - 1) - 1
            out = -(-span // s) + 1 if ceil else span // s + 1
            if ceil and pool and (out - 1) * s >= n + p:
                out -= 1
            n = out
        if n <= 0:  # too small: no output
            return 0
    return n'''


def _tuple_block(name: str, rows: list[str]) -> str:
    if not rows:
        return f"{name}: tuple[Step, ...] = ()\n"
    return f"{name}: tuple[Step, ...] = (\n" + "\n".join(rows) + "\n)\n"
