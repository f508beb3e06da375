"""The contract of an emitted backbone that returns several outputs (a recipe's taps).

The class states it as data, as timm's ``features_only`` models do: ``feature_info``, one
dict per output with timm's keys (``num_chs``, ``reduction``, ``module``) and ``name``,
the output's key; and the docstrings list each output with its size rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from bbswap.codegen.source import string
from bbswap.surgery.apply import ApplyResult
from bbswap.tracing.tracer import describe_factor


@dataclass(frozen=True)
class OutputInfo:
    """One output of the emitted class, as ``feature_info`` and the docstrings give it."""

    name: str  # its key: the target's name, else the tapped module's path
    module: str  # the module whose output it is (the projection's BatchNorm, if projected)
    channels: int
    reduction: tuple[int, int]
    shape: tuple[int, ...]  # at the traced input
    rule: str  # "H -> ceil(H/8), W -> ceil(W/8)"


def output_infos(result: ApplyResult) -> list[OutputInfo]:
    """The outputs of a patched backbone whose recipe has taps, in their order."""
    after = result.after
    taps = result.surgery.rewrite("").taps
    infos = []
    for tap, out in zip(taps, after.outputs):
        rules = after.size_rules(out.chain)
        infos.append(
            OutputInfo(
                name=tap.key,
                module=tap.modules[-1] if tap.modules else tap.at,
                channels=out.channels,
                reduction=(round(out.downsample[0]), round(out.downsample[1])),
                shape=out.shape,
                rule=f"{rules[0].format('H')}, {rules[1].format('W')}",
            )
        )
    return infos


def feature_info_lines(infos: list[OutputInfo]) -> list[str]:
    """The class attribute, one dict per output (timm's keys, and the output's name)."""
    lines = ["# one entry per output, in order: timm's feature_info keys, and the output's key"]
    lines.append("feature_info = [")
    for info in infos:
        h, w = info.reduction
        reduction = str(h) if h == w else f"[{h}, {w}]"
        lines.append(
            f'    {{"num_chs": {info.channels}, "reduction": {reduction}, '
            f'"module": {string(info.module)}, "name": {string(info.name)}}},'
        )
    lines.append("]")
    return lines


def outputs_head(returns: str, infos: list[OutputInfo]) -> tuple[str, tuple[str, ...]]:
    """The class docstring's second line (what it returns), and a line per output."""
    each = tuple(
        f"{i.name}: {i.channels} channels at 1/{describe_factor(i.reduction)}" for i in infos
    )
    return (
        f"a {returns} of {len(infos)} outputs (feature_info and output_size state them):",
        each,
    )


def docstring_lines(returns: str, infos: list[OutputInfo], name: str) -> list[str]:
    """The module docstring's lines on the outputs (in place of one output's size rule)."""
    lines = [f"Outputs:         a {returns} of {len(infos)}, in this order ({name}.feature_info):"]
    for i in infos:
        shape = "x".join(map(str, i.shape))
        lines.append(" " * 17 + f"{i.name}: {shape} at 1/{describe_factor(i.reduction)}, {i.rule}")
    lines.append(" " * 17 + f"({name}.output_size(h, w) gives each output's size exactly)")
    return lines
