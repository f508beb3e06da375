"""The ``tap`` op: a backbone that returns several feature maps.

Each ``tap`` op names a module whose output the patched backbone returns, in the order of
the ops, and optionally the channels it must have (a 1x1 conv + BatchNorm projects it when
they differ) and its name (its key when the recipe's top-level ``returns = "dict"``). A
recipe with taps returns them instead of the model's own output; ``project`` and ``pool``
ops, which act on that single output, do not go with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from bbswap.errors import RecipeError, SurgeryError, choices
from bbswap.recipes.schema import MAX_CHANNELS, Field, Op, OpKind
from bbswap.surgery.core import Surgery, new_module
from bbswap.tracing.tracer import Trace


def tap_key(at: str, name: str | None) -> str:
    """The output's dict key: its name, else the tapped module's path."""
    return name if name is not None else at


def _child_base(key: str) -> str:
    """A child-name stem for the projection of output ``key``: ``layer2`` -> ``layer2``,
    ``features.6`` -> ``features_6``."""
    base = re.sub(r"\W", "_", key)
    return base if base[:1].isalpha() or base[:1] == "_" else f"out_{base}"


@dataclass(frozen=True)
class Tap(Op, kind=OpKind.TAP):
    """return a stage's output as one of several, projected to C channels when they differ"""

    fields = (
        Field("at", "str", "the top-level stage whose output is returned", required=True),
        Field(
            "channels",
            "int",
            "the output channels (a 1x1 conv + BatchNorm is appended when they differ)",
            minimum=1,
            maximum=MAX_CHANNELS,
        ),
        Field("name", "str", 'the output\'s key with returns = "dict" (default: its path)'),
    )
    at: str
    channels: int | None = None
    name: str | None = None

    def validate(self, trace: Trace, where: str) -> None:
        tops = [s.path for s in trace.stages if not s.functional and "." not in s.path]
        if self.at not in tops:
            spatial = [p for p in tops if (trace.stage(p) or trace.stages[0]).spatial]
            nested = " (a tap names a top-level stage)" if self.at in trace.modules else ""
            raise RecipeError(
                f"{where}.at: '{self.at}' is not a top-level stage{nested} "
                f"(stages: {choices(spatial)})"
            )
        stage = trace.stage(self.at)
        if stage is None or not stage.spatial:
            shape = "x".join(map(str, stage.out_shape)) if stage is not None else "nothing"
            raise RecipeError(f"{where}.at: '{self.at}' gives {shape}, not a feature map (NCHW)")

    def apply(self, surgery: Surgery, where: str) -> None:
        stage = surgery.trace.stage(self.at)
        if stage is None:  # validate() saw it in the same trace
            raise SurgeryError(f"{where}.at: '{self.at}' is never called in the forward")
        key = tap_key(self.at, self.name)
        taken = [t.key for t in surgery.rewrite("").taps]
        if key in taken:
            raise RecipeError(
                f"{where}: output key '{key}' is taken by an earlier tap; give each tap of "
                "a dict its own name"
            )
        cin, cout = stage.channels, self.channels
        modules: list[tuple[str, nn.Module, str]] = []
        if cout is not None and cout != cin:
            base = _child_base(key)

            def conv() -> nn.Module:
                m = nn.Conv2d(cin, cout, kernel_size=1, bias=False)
                if not m.weight.is_meta:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                return m

            modules = [
                (
                    f"{base}_proj",
                    new_module(conv, surgery.device),
                    f"nn.Conv2d({cin}, {cout}, kernel_size=1, bias=False)",
                ),
                (
                    f"{base}_proj_bn",
                    new_module(lambda: nn.BatchNorm2d(cout), surgery.device),
                    f"nn.BatchNorm2d({cout})",
                ),
            ]
        surgery.add_tap(self.at, key, modules)
