"""Ops that change channels: ``in_channels`` (the stem conv's input) and ``project``
(a 1x1 conv + BatchNorm appended to the output)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bbswap.errors import RecipeError, SurgeryError, choices
from bbswap.recipes.schema import MAX_CHANNELS, Field, Op, OpKind
from bbswap.surgery.core import Surgery, module_at, new_module
from bbswap.tracing.spatial_ops import pair
from bbswap.tracing.tracer import SpatialOp, Trace

STRATEGIES = ("sum", "mean", "repeat", "select", "random")


def stem_conv(trace: Trace, at: str | None) -> SpatialOp:
    convs = [o for o in trace.ops if o.op == "conv" and o.kind == "module"]
    if at is not None:
        for o in convs:
            if o.id == at:
                return o
        raise RecipeError(f"'{at}' is not a conv module (convs: {choices(o.id for o in convs)})")
    if not convs:
        raise SurgeryError("the model has no conv module to change the input channels of")
    return convs[0]


def adapt_weight(
    weight: torch.Tensor, channels: int, strategy: str, select: tuple[int, ...] | None
) -> torch.Tensor:
    """A stem conv's weight for ``channels`` input channels from one for ``weight.shape[1]``."""
    source = weight.shape[1]
    if strategy == "sum":
        return weight.sum(dim=1, keepdim=True)
    if strategy == "mean":
        return weight.mean(dim=1, keepdim=True)
    if strategy == "repeat":
        index = torch.tensor([i % source for i in range(channels)], device=weight.device)
        return weight.index_select(1, index) * (source / channels)
    if strategy == "select" and select is not None:
        return weight.index_select(1, torch.tensor(list(select), device=weight.device))
    raise ValueError(strategy)


def _conv_like(conv: nn.Conv2d, channels: int) -> tuple[Callable[[], nn.Conv2d], str]:
    """A maker of ``conv`` with other input channels, and its source for the emitted file."""
    source = (
        f"nn.Conv2d({channels}, {conv.out_channels}, kernel_size={conv.kernel_size}, "
        f"stride={conv.stride}, padding={conv.padding!r}, dilation={conv.dilation}, "
        f"bias={conv.bias is not None})"
    )

    def make() -> nn.Conv2d:
        return nn.Conv2d(
            channels,
            conv.out_channels,
            pair(conv.kernel_size),
            pair(conv.stride),
            conv.padding if isinstance(conv.padding, str) else pair(conv.padding),
            pair(conv.dilation),
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )

    return make, source


@dataclass(frozen=True)
class InChannels(Op, kind=OpKind.IN_CHANNELS):
    """change the stem conv's input channels, adapting its weights"""

    fields = (
        Field(
            "channels", "int", "new input channels", required=True, minimum=1, maximum=MAX_CHANNELS
        ),
        Field("strategy", "str", "how weights are adapted", choices=STRATEGIES),
        Field(
            "select",
            "ints",
            "source channels to keep, for strategy = 'select'",
            minimum=0,
            maximum=MAX_CHANNELS,
        ),
        Field("at", "str", "the conv to change (default: the first conv)"),
    )
    channels: int
    strategy: str | None = None
    select: tuple[int, ...] | None = None
    at: str | None = None

    @property
    def chosen_strategy(self) -> str:
        """The strategy given, or the default for the channel count."""
        return self.strategy or ("sum" if self.channels == 1 else "repeat")

    def validate(self, trace: Trace, where: str) -> None:
        try:
            conv = stem_conv(trace, self.at)
        except RecipeError as error:
            raise RecipeError(f"{where}.at: {error}") from None
        source, strategy = conv.in_shape[1], self.chosen_strategy
        if strategy in ("sum", "mean") and self.channels != 1:
            raise RecipeError(
                f"{where}.strategy: '{strategy}' makes 1 channel, but channels = "
                f"{self.channels} (use repeat, select or random)"
            )
        if strategy != "select":
            return
        if self.select is None or len(self.select) != self.channels:
            raise RecipeError(
                f"{where}.select: strategy 'select' needs a list of {self.channels} source "
                f"channel indices, got {list(self.select) if self.select else None}"
            )
        bad = [i for i in self.select if i >= source]
        if bad:
            raise RecipeError(
                f"{where}.select: index {bad[0]} is out of range for {source} source channels"
            )

    def apply(self, surgery: Surgery, where: str) -> None:
        target = stem_conv(surgery.trace, self.at)
        conv = module_at(surgery.model, target.id)
        if not isinstance(conv, nn.Conv2d):  # stem_conv returns conv modules only
            raise SurgeryError(f"{where}: {target.id} is not an nn.Conv2d")
        if conv.groups != 1:
            raise SurgeryError(
                f"{where}: {target.id} is a grouped conv; its input channels are fixed"
            )
        strategy = self.chosen_strategy
        make, source = _conv_like(conv, self.channels)
        new = new_module(make, conv.weight.device)
        if not conv.weight.is_meta and strategy != "random":
            with torch.no_grad():
                new.weight.copy_(adapt_weight(conv.weight, self.channels, strategy, self.select))
                if conv.bias is not None and new.bias is not None:
                    new.bias.copy_(conv.bias)
        new_value = f"{self.channels} ({strategy})"
        surgery.replace(target.id, new, source, conv.in_channels, new_value, "in_channels")
        surgery.in_chans = self.channels


# name -> (the module, its source for the emitted file); "none" adds nothing
ACTIVATIONS: dict[str, tuple[Callable[[], nn.Module], str] | None] = {
    "none": None,
    "relu": (lambda: nn.ReLU(inplace=True), "nn.ReLU(inplace=True)"),
    "relu6": (lambda: nn.ReLU6(inplace=True), "nn.ReLU6(inplace=True)"),
    "silu": (lambda: nn.SiLU(inplace=True), "nn.SiLU(inplace=True)"),
    "gelu": (nn.GELU, "nn.GELU()"),
}


def need_spatial(surgery: Surgery, where: str, what: str) -> None:
    if not surgery.out_spatial:
        raise SurgeryError(
            f"{where}: {what} needs a spatial output, but the model's output is not NCHW "
            "(a classifier head?); add a truncate op before it"
        )


@dataclass(frozen=True)
class Project(Op, kind=OpKind.PROJECT):
    """append a 1x1 conv (no bias) + BatchNorm (+ activation) to C channels"""

    fields = (
        Field("channels", "int", "output channels", required=True, minimum=1, maximum=MAX_CHANNELS),
        Field(
            "activation",
            "str",
            "activation after the BatchNorm",
            default="none",
            choices=tuple(ACTIVATIONS),
        ),
    )
    channels: int
    activation: str = "none"

    def apply(self, surgery: Surgery, where: str) -> None:
        need_spatial(surgery, where, "project")
        cin, cout = surgery.out_channels, self.channels

        def conv() -> nn.Module:
            m = nn.Conv2d(cin, cout, kernel_size=1, bias=False)
            if not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            return m

        conv_source = f"nn.Conv2d({cin}, {cout}, kernel_size=1, bias=False)"
        surgery.append_output("", "proj", new_module(conv, surgery.device), conv_source)
        bn = new_module(lambda: nn.BatchNorm2d(cout), surgery.device)
        surgery.append_output("", "proj_bn", bn, f"nn.BatchNorm2d({cout})")
        act = ACTIVATIONS[self.activation]
        if act is not None:
            make, source = act
            surgery.append_output("", "proj_act", make(), source)
        surgery.out_channels = cout
