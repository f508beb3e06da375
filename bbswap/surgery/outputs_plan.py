"""The plan of a patched backbone that returns what a ``--like`` backbone returns.

``fit --like`` of a backbone whose forward returns a tuple, a list or a dict (DeepLab's
``(x, low_level)``) reproduces each of them. Its plan is an :class:`OutputsPlan`: the
fitted output itself, and for each other output the module of the patched backbone whose
output is at the same size at every probe (a *tap*), projected by a 1x1 conv + BN when
its channels differ. An encoder of ``(img, img_mask)`` that returns ``(features, mask)``
also gets the mask: a second parameter, sliced as the like-backbone slices its own.
:func:`~bbswap.surgery.several_outputs.with_outputs` makes the model of a plan.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bbswap.tracing.mask import MaskInput, MaskRule
from bbswap.tracing.outputs import OutputKey

Size = tuple[int, int]


class OutputRole(str, enum.Enum):
    """What one output of the plan is made of."""

    FEATURES = "features"  # the fitted output itself
    TAP = "tap"  # a module's output on the way to it (projected when channels differ)
    MASK = "mask"  # the mask input, sliced

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PlannedOutput:
    """One output of the like-backbone and how the patched backbone makes it."""

    key: OutputKey
    role: OutputRole
    channels: int  # the like-backbone's channels (0 for a mask)
    stride: Size
    sizes: tuple[tuple[Size, Size], ...] = ()  # (input H x W, output H x W) at every probe
    tap: str = ""  # the patched backbone's module whose output it is (role TAP)
    tap_channels: int = 0  # that module's channels
    rule: MaskRule | None = None  # role MASK: the slice of the mask input

    @property
    def projected(self) -> bool:
        """Whether a 1x1 conv + BN brings the tap to the like-backbone's channels."""
        return self.role is OutputRole.TAP and self.tap_channels != self.channels

    def describe(self, mask_name: str = "mask") -> str:
        """``low_level: 24 channels at 1/4 (features.3)``, ``1: the mask, img_mask[:, 0::16,
        0::16]`` (the mask input called ``mask_name``)."""
        stride = (
            str(self.stride[0])
            if self.stride[0] == self.stride[1]
            else "x".join(map(str, self.stride))
        )
        if self.role is OutputRole.MASK and self.rule is not None:
            return f"{self.key}: the mask, {self.rule.describe(mask_name)}"
        text = f"{self.key}: {self.channels} channels at 1/{stride}"
        if self.role is OutputRole.FEATURES:
            return text + " (the fitted output)"
        project = f", projected from {self.tap_channels}" if self.projected else ""
        return text + f" ({self.tap}{project})"


@dataclass(frozen=True)
class OutputsPlan:
    """Everything the like-backbone returns, in its structure, and its mask input."""

    like: str
    returns: str  # "tuple", "list" or "dict"
    outputs: tuple[PlannedOutput, ...]
    mask_input: MaskInput | None = None  # a forward of (img, img_mask)

    @property
    def features(self) -> PlannedOutput:
        return next(o for o in self.outputs if o.role is OutputRole.FEATURES)

    @property
    def mask(self) -> PlannedOutput | None:
        return next((o for o in self.outputs if o.role is OutputRole.MASK), None)

    def describe(self) -> str:
        """``a tuple of 2 as LIKE returns it: x: ...; low_level: ...``."""
        items = "; ".join(o.describe(self.mask_name) for o in self.outputs)
        return f"a {self.returns} of {len(self.outputs)} as {self.like} returns it: {items}"

    @property
    def mask_name(self) -> str:
        return self.mask_input.mask if self.mask_input is not None else "mask"

    def signature(self) -> str:
        """The forward's parameters: ``img, img_mask``, or ``x``."""
        return f"{self.mask_input.image}, {self.mask_input.mask}" if self.mask_input else "x"


def projection_name(key: OutputKey) -> str:
    """The name of the projection of output ``key`` (``proj_low_level``)."""
    return "proj_" + "".join(c if c.isalnum() or c == "_" else "_" for c in str(key))
