"""The fixed sets of values bbswap's options take, as string enums.

The command line offers each as a choice (``[macs|depth|rf]``); the library accepts a
member or its string, and :meth:`Choice.parse` refuses anything else in one message.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from bbswap.errors import InvalidArgument

C = TypeVar("C", bound="Choice")


class Choice(str, enum.Enum):
    """A string enum whose members print as their value."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(m.value) for m in cls)

    @classmethod
    def parse(cls: type[C], value: str, param: str) -> C:
        """The member named ``value``; ``param`` names the argument in the error."""
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgument(
                f"{{{param}}} '{value}' is not one of {', '.join(cls.values())}", params=(param,)
            ) from None


class Mode(Choice):
    """How a removed stride is made up for: dilate what follows, or not."""

    DILATE = "dilate"
    STRIDE = "stride"


class Rounding(Choice):
    """The output size rule a stride target accepts."""

    CEIL = "ceil"
    FLOOR = "floor"
    ANY = "any"  # either


class Prefer(Choice):
    """How fit ranks the exact candidates."""

    MACS = "macs"
    DEPTH = "depth"
    RF = "rf"


class Layout(Choice):
    """How a traced tensor holds the image grid it came from."""

    NCHW = "nchw"  # channels, then height and width
    NHWC = "nhwc"  # height and width, then channels (Swin, ConvNeXt-style blocks)
    TOKENS = "tokens"  # N x L x C with L = H*W of the grid (PVT, EfficientViT, MobileViT)
    CHANNELS_TOKENS = "channels-tokens"  # N x C x L (a flattened NCHW map)
    NONE = "none"  # no grid axis known (weights, windows, attention scores, vectors)


class Device(Choice):
    """Where a trace ran: the meta device, fake tensors, or real CPU tensors (a fallback)."""

    META = "meta"
    FAKE = "fake"
    CPU = "cpu"


class Phase(Choice):
    """The steps of a long run, reported to an ``on_phase`` callback as each begins."""

    TRACE = "trace"  # the source backbone on the meta device
    CANDIDATES = "candidates"  # fit: each candidate plan applied and checked
    BUILD = "build"  # the patched backbone with real weights
    EMIT = "emit"  # its source written
    VERIFY = "verify"  # the source imported afresh and compared with the patched model


class Returns(Choice):
    """What a backbone fitted to several targets returns (timm's ``features_only`` gives
    a list)."""

    LIST = "list"
    TUPLE = "tuple"
    DICT = "dict"
