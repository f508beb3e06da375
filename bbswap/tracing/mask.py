"""A second, image-sized input: the mask that encoders of handwritten math take.

Encoders in the style of BTTR and CoMER are called as ``encoder(img, img_mask)``, where
``img_mask`` is N x H x W (which pixels are padding), and return ``(features, mask)`` with
the mask sliced down to the features' size (``img_mask[:, 0::16, 0::16]``). A forward
with exactly two required positional parameters is traced with an all-ones mask of the
image's size as the second; the tensors made from it are followed apart from the feature
maps. A chain of strided slices is one strided slice per axis (its :class:`MaskRule`);
anything else made from the mask is named, so that a caller can refuse it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Pair = tuple[int, int]
OutputKey = int | str

# calls that keep a mask's values where they are (a cast, a copy)
_KEEPS_VALUES = frozenset(
    {"to", "bool", "float", "double", "half", "long", "int", "byte", "type", "contiguous",
     "clone", "detach", "type_as"}
)  # fmt: skip


@dataclass(frozen=True)
class MaskRule:
    """``mask[:, start_h::step_h, start_w::step_w]``: what the mask output is made of."""

    start: Pair = (0, 0)
    step: Pair = (1, 1)

    def then(self, start: Pair, step: Pair) -> MaskRule:
        """This rule followed by one more strided slice."""
        return MaskRule(
            (self.start[0] + start[0] * self.step[0], self.start[1] + start[1] * self.step[1]),
            (self.step[0] * step[0], self.step[1] * step[1]),
        )

    def size(self, h: int, w: int) -> Pair:
        """The mask's H and W for an input of ``h`` x ``w``."""
        return (
            len(range(self.start[0], h, self.step[0])),
            len(range(self.start[1], w, self.step[1])),
        )

    def apply(self, mask: torch.Tensor) -> torch.Tensor:
        return mask[:, self.start[0] :: self.step[0], self.start[1] :: self.step[1]]

    def index(self) -> tuple[slice, slice, slice]:
        """The index of the slice, for a graph node."""
        return (
            slice(None),
            slice(self.start[0], None, self.step[0]),
            slice(self.start[1], None, self.step[1]),
        )

    def describe(self, name: str = "mask") -> str:
        """``mask[:, 0::16, 0::16]``."""
        return f"{name}[:, {self.start[0]}::{self.step[0]}, {self.start[1]}::{self.step[1]}]"


@dataclass(frozen=True)
class MaskInput:
    """The names of a forward's two parameters: the image's and the mask's."""

    image: str
    mask: str


@dataclass(frozen=True)
class MaskTrace:
    """What a traced forward did with its mask input."""

    input: MaskInput
    key: OutputKey | None  # the output made from the mask; None: no output is
    rule: MaskRule | None  # None: the mask output is made by another call than slicing
    made_by: str = ""  # that call
    shape: tuple[int, ...] = ()  # the mask output's shape at the traced input
    dtype: str = "bool"  # the dtype of the mask it was traced with


def mask_input(model: nn.Module) -> MaskInput | None:
    """The image and mask parameters of a forward that takes exactly two required
    positional arguments; None for any other forward."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or a C forward: no signature to read
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is p.empty]
    if len(required) != 2:
        return None
    return MaskInput(required[0].name, required[1].name)


def all_ones_mask(x: torch.Tensor) -> torch.Tensor:
    """The mask a model is traced with: N x H x W, every pixel True (no padding)."""
    return torch.ones((x.shape[0], x.shape[-2], x.shape[-1]), dtype=torch.bool, device=x.device)


def slice_step(index: Any, dims: int) -> tuple[Pair, Pair] | None:
    """The (start, step) per H and W axis of a ``tensor[index]`` on an N x H x W tensor,
    when ``index`` keeps N whole and slices H and W from a start with a step; None
    for any other index (an int, a stop, a negative start, a tensor, a new axis)."""
    parts = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in parts:
        at = parts.index(Ellipsis)
        parts[at : at + 1] = [slice(None)] * (dims - len(parts) + 1)
    parts += [slice(None)] * (dims - len(parts))
    if dims != 3 or len(parts) != 3 or not all(isinstance(p, slice) for p in parts):
        return None
    if parts[0] != slice(None):
        return None
    starts, steps = [], []
    for p in parts[1:]:
        start, step = p.start or 0, p.step or 1
        if p.stop is not None or not isinstance(start, int) or not isinstance(step, int):
            return None
        if start < 0 or step < 1:
            return None
        starts.append(start)
        steps.append(step)
    return (starts[0], starts[1]), (steps[0], steps[1])


def follow(rule: MaskRule | None, name: str, args: tuple[Any, ...]) -> tuple[MaskRule | None, str]:
    """The rule of what a call on a mask tensor made, and the call's name when it is no
    slice nor cast (then the rule is None)."""
    if rule is None:
        return None, ""
    if name == "__getitem__" and len(args) == 2 and isinstance(args[0], torch.Tensor):
        found = slice_step(args[1], args[0].dim())
        if found is not None:
            return rule.then(*found), ""
        return None, f"the index [{_shown(args[1])}]"
    if name in _KEEPS_VALUES:
        return rule, ""
    return None, name


def _shown(index: Any) -> str:
    """An index as written in code: ``:, None``, ``..., 0::2``."""
    parts = index if isinstance(index, tuple) else (index,)

    def one(p: Any) -> str:
        if isinstance(p, slice):
            text = f"{'' if p.start is None else p.start}:{'' if p.stop is None else p.stop}"
            return text + (f":{p.step}" if p.step is not None else "")
        return "..." if p is Ellipsis else "a tensor" if isinstance(p, torch.Tensor) else repr(p)

    return ", ".join(one(p) for p in parts)
