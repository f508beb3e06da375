"""The recipe ops by name: what ``bbswap ops`` lists and what a recipe's ``op`` selects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bbswap.errors import RecipeError, choices
from bbswap.recipes.channels import InChannels, Project
from bbswap.recipes.patch import Patch
from bbswap.recipes.schema import Field, Op
from bbswap.recipes.strides import Exact, Stride
from bbswap.recipes.structure import Dropout, Pool, Truncate
from bbswap.recipes.taps import Tap

OPS: dict[str, type[Op]] = {
    cls.op_kind.value: cls
    for cls in (InChannels, Patch, Stride, Exact, Truncate, Project, Pool, Dropout, Tap)
}


def make_op(name: str, **params: Any) -> Op:
    """An op built the way a recipe file's op is read: defaults filled, values checked.

    Args:
        name: The op (``bbswap ops`` lists them): ``"in_channels"``, ``"patch"``,
            ``"stride"``, ``"exact"``, ``"truncate"``, ``"project"``, ``"pool"``,
            ``"dropout"`` or ``"tap"``.
        **params: The op's fields, as in a recipe's ``[[ops]]`` table (a tuple is taken
            as a list; ``None`` as left out).

    Returns:
        The :class:`~bbswap.recipes.schema.Op`.

    Example::

        ops = (bbswap.make_op("stride", at="layer4", stride=1, mode="dilate"),
               bbswap.make_op("project", channels=256))
        recipe = bbswap.Recipe("resnet18-s16", ops, backbone="resnet18")
    """
    if name not in OPS:
        raise RecipeError(f"unknown op {name!r} (valid: {choices(sorted(OPS))})")
    raw = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items() if v is not None}
    return OPS[name].from_table(raw, f"op {name}")


def op_from_table(raw: Any, where: str) -> Op:
    """The op of one ``[[ops]]`` table of a recipe file."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: must be a table, got {raw!r}")
    name = raw.get("op")
    if name is None:
        raise RecipeError(f"{where}.op: missing (one of {choices(sorted(OPS))})")
    if name not in OPS:
        raise RecipeError(f"{where}.op: unknown op {name!r} (valid: {choices(sorted(OPS))})")
    return OPS[name].from_table(raw, f"{where} ({name})")


@dataclass(frozen=True)
class OpInfo:
    """One recipe op as ``bbswap ops`` lists it: its name, what it does, its fields."""

    name: str
    summary: str
    fields: tuple[Field, ...]


def describe_ops() -> list[OpInfo]:
    """Every recipe op with its summary and declared fields, for ``bbswap ops``."""
    return [OpInfo(name, cls.summary, cls.fields) for name, cls in OPS.items()]
