"""The outputs of a forward that returns several tensors, and the choice of one of them.

A backbone that returns a tuple, a list or a dict of feature maps (DeepLab's
``(features, low_level_features)``) has one :class:`Output` per tensor in it, keyed by
its index or its dict key. Surgery works on one of them: the one asked for, by default
the spatial one with the largest downsample (the deepest features).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bbswap.errors import InvalidArgument, choices

Shape = tuple[int, ...]
OutputKey = int | str


@dataclass(frozen=True)
class Output:
    """One tensor of what the forward returns."""

    key: OutputKey  # its index in the tuple or list, or its dict key
    shape: Shape
    downsample: tuple[float, float]
    receptive_field: tuple[int, int]
    chain: tuple[str, ...]  # ids of the size-changing ops that led to it

    @property
    def spatial(self) -> bool:
        return len(self.shape) == 4

    @property
    def channels(self) -> int:
        return self.shape[1] if len(self.shape) >= 2 else self.shape[-1] if self.shape else 1


Describe = Callable[[torch.Tensor], tuple[tuple[float, float], tuple[int, int], tuple[str, ...]]]


def returned(out: Any) -> tuple[str, list[tuple[OutputKey, torch.Tensor]]] | None:
    """What a forward returned, when it is several tensors: its kind (``tuple``, ``list``,
    ``dict``) and its tensors by key; None for one tensor or anything else."""
    if isinstance(out, dict):
        items = [(k, v) for k, v in out.items() if isinstance(k, (str, int))]
        kind = "dict"
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
        kind = "list" if isinstance(out, list) else "tuple"
    else:
        return None
    tensors = [(k, v) for k, v in items if isinstance(v, torch.Tensor)]
    return (kind, tensors) if tensors else None


def describe_outputs(
    tensors: list[tuple[OutputKey, torch.Tensor]], describe: Describe
) -> tuple[Output, ...]:
    return tuple(Output(key, tuple(t.shape), *describe(t)) for key, t in tensors)


def default_output(outputs: tuple[Output, ...]) -> Output:
    """The spatial output with the largest downsample (the first of equals); the one with
    the largest downsample when none is spatial."""
    pool = [o for o in outputs if o.spatial] or list(outputs)
    return max(pool, key=lambda o: o.downsample[0] * o.downsample[1])


def choose_output(
    outputs: tuple[Output, ...], kind: str, wanted: OutputKey | None, name: str
) -> Output:
    """The output ``wanted`` names (an index, a dict key, or an index's digits); the
    default one for None. A name that is none of them is a one-line error."""
    if wanted is None:
        return default_output(outputs)
    by_key = {o.key: o for o in outputs}
    found = by_key.get(wanted)
    if found is None and isinstance(wanted, str) and wanted.isdigit() and kind != "dict":
        found = by_key.get(int(wanted))
    if found is None and isinstance(wanted, int) and kind == "dict":
        found = by_key.get(str(wanted))
    if found is not None and not isinstance(wanted, bool):
        return found
    what = "indices" if kind != "dict" else "keys"
    raise InvalidArgument(
        f"{{source_output}} {wanted!r} is not an output of {name}: its forward returns a "
        f"{kind} of {len(outputs)} tensors (valid {what}: "
        f"{choices(str(o.key) for o in outputs)})",
        params=("source_output",),
    )


def refuse_single(wanted: OutputKey | None, name: str) -> None:
    """A choice of output for a forward that returns one tensor is a mistake."""
    if wanted is not None:
        raise InvalidArgument(
            f"{{source_output}} {wanted!r} given, but the forward of {name} returns one "
            "tensor; leave it out",
            params=("source_output",),
        )
