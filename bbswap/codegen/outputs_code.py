"""What an emitted file says about the several outputs it returns (and its mask).

A file fitted ``--like`` a backbone that returns several outputs states them in its
docstring, each with where it comes from; its forward is written from the patched model's
graph (:mod:`bbswap.surgery.several_outputs`), so nothing else here writes code.
"""

from __future__ import annotations

from bbswap.surgery.outputs_plan import OutputsPlan, projection_name


def outputs_lines(plan: OutputsPlan, name: str) -> list[str]:
    """The docstring's lines on the outputs: the call, then one line per output."""
    pad = " " * 17
    lines = [
        f"Returns:         {name}()({plan.signature()}) returns a {plan.returns} "
        f"of {len(plan.outputs)}, as",
        f"{pad}{plan.like} does:",
    ]
    lines += [f"{pad}{o.describe(plan.mask_name)}" for o in plan.outputs]
    if plan.mask is not None:
        lines.append(f"{pad}(the slice the like-backbone's own forward makes, found by tracing it)")
    return lines


def projection_comment(plan: OutputsPlan, child: str) -> str:
    """The comment above a projection the plan adds."""
    for o in plan.outputs:
        if o.projected and child.startswith(projection_name(o.key)):
            return (
                f"output {o.key!r}: {o.tap}'s {o.tap_channels} channels projected to {o.channels}"
            )
    return f"{child}: a projection of another output"
