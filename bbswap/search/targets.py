"""Several targets: where a fit taps a backbone for each output, and whether it holds.

A fit to several targets (an FPN's 1/8, 1/16 and 1/32, DeepLab's 1/4 and 1/16) changes
the strides for the deepest of them, as a one-target fit does; then each target takes the
last top-level stage at its stride, up to the deepest one (the path to the deepest
output), and a ``tap`` op returns it, projected when its channels differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bbswap.errors import InvalidArgument
from bbswap.kinds import Returns
from bbswap.parsing import FeatureTarget
from bbswap.recipes.schema import Op
from bbswap.recipes.taps import Tap
from bbswap.tracing.tracer import Stage, Trace

Size = tuple[int, int]


@dataclass(frozen=True)
class Taps:
    """Where each target is tapped in one candidate, or why it cannot be."""

    stages: tuple[Stage, ...] = ()  # one per target, in the targets' order
    missing: str = ""  # why not: the first target no stage is at


def deepest(targets: Sequence[FeatureTarget]) -> FeatureTarget:
    """The target with the largest downsample (the first of equals)."""
    return max(targets, key=lambda t: t.stride[0] * t.stride[1])


def check_targets(targets: Sequence[FeatureTarget], returns: Returns) -> None:
    """Targets a dict can key: two unnamed targets at one stride would both be keyed by
    the module they tap."""
    if returns != Returns.DICT:
        return
    seen: dict[Size, FeatureTarget] = {}
    for t in targets:
        if t.name is not None:
            continue
        if t.stride in seen:
            raise InvalidArgument(
                f"{{returns}} dict: {{targets}} {seen[t.stride].describe()} and {t.describe()} "
                "would both be keyed by the module they tap; name them, e.g. p4=16:256",
                params=("returns", "targets"),
            )
        seen[t.stride] = t


def _at(stage: Stage) -> Size:
    return (round(stage.downsample[0]), round(stage.downsample[1]))


def tap_stages(after: Trace, targets: Sequence[FeatureTarget], upto: str | None = None) -> Taps:
    """The stage each target taps in ``after`` (a trace with the stride changes made): the
    last top-level spatial stage at its stride, no later than the deepest target's (which
    is the last at its stride, or ``upto``)."""
    rows = [s for s in after.stages if not s.functional and "." not in s.path and s.spatial]
    low = deepest(targets)
    at_low = [i for i, s in enumerate(rows) if _at(s) == low.stride]
    if upto is not None:
        at_low = [i for i in at_low if rows[i].path == upto]
    if not at_low:
        return Taps(missing=f"no top-level stage is at 1/{_fmt(low.stride)}")
    rows = rows[: at_low[-1] + 1]
    found = []
    for t in targets:
        hits = [s for s in rows if _at(s) == t.stride]
        if not hits:
            return Taps(
                missing=f"no top-level stage is at 1/{_fmt(t.stride)} for {t.describe()} "
                f"(stages: {', '.join(f'{s.path} 1/{_fmt(_at(s))}' for s in rows)})"
            )
        found.append(hits[-1])
    return Taps(tuple(found))


def _fmt(size: Size) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def tap_ops(targets: Sequence[FeatureTarget], taps: Taps) -> list[Op]:
    """One ``tap`` op per target, with its channels (a projection when they differ)."""
    return [Tap(at=s.path, channels=t.channels, name=t.name) for t, s in zip(targets, taps.stages)]


def output_misses(
    after: Trace, targets: Sequence[FeatureTarget], rule: str, probes: Sequence[Size]
) -> list[tuple[Size, Size, Size]]:
    """(input, got, wanted) at each probe where an output's size breaks ``rule``; the
    first output that misses at a probe is the one reported."""
    misses = []
    for h, w in probes:
        for t, out in zip(targets, after.outputs):
            want = _want(h, w, t.stride, rule)
            if min(want) <= 0:
                continue  # floor(H/S) of an input below S: no output wanted there
            got = after.output_size(h, w, out.chain)
            if got != want:
                misses.append(((h, w), got, want))
                break
    return misses


def _want(h: int, w: int, stride: Size, rule: str) -> Size:
    if rule == "floor":
        return (h // stride[0], w // stride[1])
    return (math.ceil(h / stride[0]), math.ceil(w / stride[1]))


def wrong_outputs(after: Trace, targets: Sequence[FeatureTarget]) -> str:
    """Why the patched model's outputs are not the targets' (count, channels); "" if they are."""
    if len(after.outputs) != len(targets):
        return f"{len(after.outputs)} outputs, not {len(targets)}"
    for i, (t, out) in enumerate(zip(targets, after.outputs)):
        if not out.spatial or out.channels != t.channels:
            return f"output {i} is {'x'.join(map(str, out.shape))}, not {t.channels} channels"
    return ""


def describe(targets: Sequence[FeatureTarget], returns: Returns) -> str:
    """``a dict of p3=8:256, p4=16:256, p5=32:256``."""
    return f"a {returns.value} of {', '.join(t.describe() for t in targets)}"
