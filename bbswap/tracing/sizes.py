"""Exact spatial size arithmetic along a chain of reductions.

A :class:`SizeStep` is one axis of one spatial op (a strided conv, a pooling, a
fixed-size adaptive pooling, a padding). ``out_size`` reproduces PyTorch's own
formulas, including ``ceil_mode``'s rule that the last window must start inside the
input, so a chain of steps predicts a network's output size for any input size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SizeStep:
    """One axis of a size-changing op.

    kind ``window``: sliding window (conv or pool) with kernel, stride, padding,
    dilation and rounding; ``fixed``: output size independent of the input
    (adaptive pooling, interpolate to a size); ``scale``: ``floor(in * factor)``;
    ``pad``: ``in + padding`` (``padding`` is the total of both sides); ``transpose``:
    a transposed conv, ``value`` holding its output padding; ``fold``: blocks of
    ``stride`` pixels folded into channels by a reshape, which needs whole blocks (0 for
    any other size, where the reshape fails); ``blocks``: the size kept, but split into
    windows of ``stride`` pixels (windowed attention without padding), so only whole
    windows pass (0 for any other size).
    """

    kind: str
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    ceil: bool = False
    pool: bool = False
    value: float = 0.0

    def out_size(self, size: int) -> int:
        if self.kind == "fixed":
            return int(self.value)
        if self.kind == "scale":
            return math.floor(size * self.value)
        if self.kind == "pad":  # ``value``: the smallest size it takes (reflect padding)
            return size + self.padding if size >= self.value else 0
        if self.kind == "fold":
            return size // self.stride if size % self.stride == 0 else 0
        if self.kind == "blocks":
            return size if size % self.stride == 0 else 0
        if self.kind == "transpose":
            extra = int(self.value)
            return (
                (size - 1) * self.stride
                - 2 * self.padding
                + self.dilation * (self.kernel - 1)
                + extra
                + 1
            )
        span = size + 2 * self.padding - self.dilation * (self.kernel - 1) - 1
        if self.ceil:
            out = -(-span // self.stride) + 1
            # PyTorch pooling: the last window must start inside the input or left padding.
            if self.pool and (out - 1) * self.stride >= size + self.padding:
                out -= 1
        else:
            out = span // self.stride + 1
        return out

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"-> {int(self.value)}"
        if self.kind == "scale":
            return f"x{self.value:g}"
        if self.kind == "pad":
            return f"+{self.padding}"
        if self.kind == "transpose":
            return f"up k{self.kernel} s{self.stride} p{self.padding}"
        if self.kind == "fold":
            return f"/{self.stride} whole"
        if self.kind == "blocks":
            return f"windows of {self.stride}"
        rounding = "ceil" if self.ceil else "floor"
        return f"k{self.kernel} s{self.stride} p{self.padding} d{self.dilation} {rounding}"


def chain_size(steps: Sequence[SizeStep], size: int) -> int:
    """The output size of ``steps`` applied in order; 0 or less when too small."""
    for step in steps:
        size = step.out_size(size)
        if size <= 0:
            return 0
    return size


def min_size(steps: Sequence[SizeStep], limit: int = 4096) -> int:
    """The smallest input size that passes every step with at least one pixel."""
    for size in range(1, limit + 1):
        if chain_size(steps, size) > 0 and all(
            chain_size(steps[: i + 1], size) > 0 for i in range(len(steps))
        ):
            return size
    return limit


def from_smallest(
    sizes: Sequence[tuple[int, int]],
    minimum: tuple[int, int] = (1, 1),
    multiple: tuple[int, int] = (1, 1),
) -> tuple[tuple[int, int], ...]:
    """``sizes`` moved up to inputs a model accepts, never below its smallest one.

    On each axis a size under ``minimum`` becomes ``minimum + (size - 1) // 2``: the
    smallest input itself for a size of 1, then sizes just above it, odd and even, as the
    small ones were; every size is rounded up to a whole ``multiple``. Each size once, in
    order; with the defaults the sizes stay as given.
    """

    def one(size: int, low: int, step: int) -> int:
        moved = size if size >= low else low + (size - 1) // 2
        return -(-moved // step) * step

    return tuple(
        dict.fromkeys(
            (one(h, minimum[0], multiple[0]), one(w, minimum[1], multiple[1])) for h, w in sizes
        )
    )


def total_stride(steps: Sequence[SizeStep]) -> float:
    factor = 1.0
    for step in steps:
        if step.kind in ("window", "fold"):
            factor *= step.stride
        elif step.kind == "transpose":
            factor /= step.stride
        elif step.kind == "scale":
            factor /= step.value
    return factor


@dataclass(frozen=True)
class SizeRule:
    """The closed form a chain follows, e.g. ``ceil(H/16)``, found by checking a range."""

    expression: str  # with "{x}" for the axis name
    factor: float  # overall downsample factor along the chain
    rounding: str  # "ceil", "floor", "fixed" or "other"
    minimum: int  # smallest input size that yields an output
    multiple: int = 1  # every size that yields an output is a multiple of this
    # windows split without padding: the sizes taken repeat with this period, at these
    # remainders (0 and () when every size from the minimum on is taken, or a multiple)
    period: int = 0
    remainders: tuple[int, ...] = ()

    def format(self, axis: str) -> str:
        rule = f"{axis} -> " + self.expression.format(x=axis)
        if self.period:
            return rule + f" ({axis} mod {self.period} in {_ranges(self.remainders)})"
        return rule + (f" ({axis} a multiple of {self.multiple})" if self.multiple > 1 else "")


def _ranges(values: tuple[int, ...]) -> str:
    """``0-3, 8`` for (0, 1, 2, 3, 8)."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def windows_period(steps: Sequence[SizeStep]) -> int:
    """The period of the sizes a chain with windows split without padding takes: each
    window times the stride before it (0 when the chain splits no windows)."""
    period, factor = 0, 1.0
    for step in steps:
        if step.kind == "blocks":
            period = math.lcm(period or 1, round(factor * step.stride))
        elif step.kind in ("window", "fold"):
            factor *= step.stride
    return period


def size_rule(steps: Sequence[SizeStep], span: int = 1024) -> SizeRule:
    """Find the closed form of ``steps`` over every size from the minimum to ``span``."""
    lo = min_size(steps)
    # sizes a reshape cannot fold into whole blocks give no output: they are not inputs
    pairs = [(n, o) for n in range(lo, lo + span) if (o := chain_size(steps, n)) > 0]
    multiple = math.gcd(*(n for n, _ in pairs)) if pairs else 1
    factor = total_stride(steps)
    period = windows_period(steps)
    if period and pairs and period != multiple:
        taken = tuple(sorted({n % period for n, _ in pairs}))
        rule = size_rule([st for st in steps if st.kind != "blocks"], span)
        return replace(rule, minimum=lo, multiple=multiple, period=period, remainders=taken)
    if any(s.kind == "fixed" for s in steps) and len({o for _, o in pairs}) == 1:
        return SizeRule(str(pairs[0][1]), factor, "fixed", lo, multiple)
    stride = round(factor)
    if stride >= 1 and abs(stride - factor) < 1e-9:
        for rounding, a, b in _closed_forms(stride):
            op = math.ceil if rounding == "ceil" else math.floor
            if all(op((n + a) / stride) + b == o for n, o in pairs):
                form = _format_form(rounding, stride, a, b)
                return SizeRule(form, factor, rounding, lo, multiple)
    return SizeRule(_composed(steps), factor, "other", lo, multiple)


def _closed_forms(s: int) -> list[tuple[str, int, int]]:
    """Forms ``ceil((x + a)/s) + b`` and ``floor(...)``, simplest first."""
    forms = []
    for a in sorted(range(-2 * s, 2 * s + 1), key=abs):
        for b in (0, 1, -1, 2, -2):
            forms += [("ceil", a, b), ("floor", a, b)]
    return forms


def _format_form(rounding: str, s: int, a: int, b: int) -> str:
    def signed(v: int) -> str:
        return f" + {v}" if v > 0 else f" - {-v}" if v < 0 else ""

    if s == 1:
        return "{x}" + signed(a + b)
    num = "{x}" if a == 0 else "({x}" + signed(a) + ")"
    return f"{rounding}({num}/{s})" + signed(b)


def _composed(steps: Sequence[SizeStep]) -> str:
    return " | ".join(step.describe() for step in steps) or "{x}"
