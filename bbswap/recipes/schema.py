"""The recipe schema: an op is a frozen dataclass with declared, checked fields.

A recipe looks like this::

    name = "seed-hmer-resnet50"
    description = "..."
    backbone = "resnet50"
    input = "1x1x128x316"

    [[ops]]
    op = "stride"
    at = "layer2"
    stride = 1

Each op class (one module per family: :mod:`.channels`, :mod:`.strides`,
:mod:`.structure`) declares its TOML fields as :class:`Field` rows and holds their
values as attributes. Constructing one checks the fields' form (types, ranges, choices)
and normalises them (``stride = 1`` becomes ``(1, 1)``); checking the names of stages and
reduction points needs the backbone's trace and is the op's ``validate``, run before
the model is touched.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from bbswap.errors import RecipeError, choices

if TYPE_CHECKING:
    from bbswap.surgery.core import Surgery
    from bbswap.tracing.tracer import Trace

FieldKind = Literal["int", "float", "bool", "str", "pair", "ints"]
# "pair": an int or [h, w], held as (h, w); "ints": a non-empty list of ints, held as a tuple


class OpKind(str, enum.Enum):
    """The recipe ops; the value is the ``op = "..."`` of a TOML table."""

    IN_CHANNELS = "in_channels"
    PATCH = "patch"
    STRIDE = "stride"
    EXACT = "exact"
    TRUNCATE = "truncate"
    PROJECT = "project"
    POOL = "pool"
    DROPOUT = "dropout"
    TAP = "tap"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class Field:
    """One declared field of an op."""

    name: str
    kind: FieldKind
    help: str
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None  # exclusive upper bound


RETURNS = ("list", "tuple", "dict")  # what a recipe with tap ops returns

# Sane bounds for integer fields, so a 20-digit value is refused before any work
MAX_CHANNELS = 1 << 16
MAX_STRIDE = 1 << 10


OpT = TypeVar("OpT", bound="Op")


@dataclass(frozen=True)
class Op:
    """One step of a recipe. Subclasses declare ``op_kind``, ``summary`` and ``fields`` and
    hold one attribute per field; construction checks and normalises them."""

    op_kind: ClassVar[OpKind]
    summary: ClassVar[str]
    fields: ClassVar[tuple[Field, ...]]

    def __init_subclass__(cls, kind: OpKind | None = None, **rest: Any) -> None:
        """``class Stride(Op, kind=OpKind.STRIDE)``; the class docstring is the summary
        that ``bbswap ops`` shows."""
        super().__init_subclass__(**rest)
        if kind is not None:
            cls.op_kind = kind
            cls.summary = " ".join((cls.__doc__ or "").split())

    def __post_init__(self) -> None:
        checked = check_params(self.fields, self.params, f"op {self.op_kind}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_table(cls: type[OpT], raw: Mapping[str, Any], where: str) -> OpT:
        """The op a recipe's ``[[ops]]`` table describes; errors name ``where``."""
        return cls(**check_params(cls.fields, raw, where))

    @property
    def op(self) -> str:
        """The op's name, as a recipe file spells it."""
        return self.op_kind.value

    @property
    def params(self) -> dict[str, Any]:
        """The fields' values, in their declared order."""
        return {f.name: getattr(self, f.name) for f in dataclass_fields(self)}

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op}
        for key, value in self.params.items():
            if value is None:
                continue
            if isinstance(value, tuple):
                value = value[0] if len(value) == 2 and value[0] == value[1] else list(value)
            out[key] = value
        return out

    def validate(self, trace: Trace, where: str) -> None:
        """Check what the op names against the source backbone's trace."""
        del trace, where

    def apply(self, surgery: Surgery, where: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Recipe:
    """A named, ordered list of ops for a backbone, as a recipe file holds it.

    Args:
        name: The recipe's name (the emitted file's docstring quotes it).
        ops: The ops, applied in order (:func:`~bbswap.recipes.registry.make_op`).
        backbone: The spec it was written for; informative.
        description: A sentence on what it does.
        input: The traced input, ``"NxCxHxW"``; the default of ``apply_recipe``.
        source: The file it was read from, for messages.
        source_output: Which output of a forward that returns several tensors the ops
            work on: an index or a dict key (None: the one with the largest downsample).
        kw: The backbone's constructor arguments (the ``[kw]`` table); a ``py:`` value is
            a :class:`~bbswap.parsing.PyRef`.
        returns: With tap ops, what holds the outputs: ``"list"`` (the default),
            ``"tuple"`` or ``"dict"``.

    Example::

        ops = (bbswap.make_op("stride", at="layer4", stride=1),
               bbswap.make_op("truncate", after="layer4"))
        bbswap.apply_recipe("resnet18", bbswap.Recipe("s16", ops)).after.downsample
        # (16.0, 16.0)
    """

    name: str
    ops: tuple[Op, ...]
    backbone: str = ""
    description: str = ""
    input: str = ""
    source: str = ""  # the file it was read from, for messages
    # which output of a forward that returns several tensors the recipe works on: an
    # index or a dict key (None: the one with the largest downsample)
    source_output: int | str | None = None
    # the backbone's constructor arguments (``[kw]``); a ``py:`` value is a PyRef
    kw: dict[str, Any] = field(default_factory=dict)
    # with tap ops: what holds the outputs, "list" (the default), "tuple" or "dict"
    returns: str | None = None

    def __post_init__(self) -> None:
        """Tap ops replace the single output, which project and pool ops act on."""
        prefix = f"{self.source}: " if self.source else ""
        kinds = [op.op_kind for op in self.ops]
        if self.returns is not None and self.returns not in RETURNS:
            raise RecipeError(f"{prefix}returns {self.returns!r} is not one of {choices(RETURNS)}")
        if OpKind.TAP not in kinds:
            if self.returns is not None:
                raise RecipeError(f"{prefix}returns goes with tap ops; the recipe has none")
            return
        for index, kind in enumerate(kinds):
            if kind in (OpKind.PROJECT, OpKind.POOL):
                raise RecipeError(
                    f"{self.where(index)}: a recipe with tap ops returns the taps; give each "
                    "tap its channels instead of a project or pool op"
                )

    @property
    def taps(self) -> tuple[Op, ...]:
        """The tap ops, in the order of the outputs."""
        return tuple(op for op in self.ops if op.op_kind == OpKind.TAP)

    def where(self, index: int, key: str | None = None) -> str:
        """How an error message names a field: ``file: ops[2] (stride).at``."""
        prefix = f"{self.source}: " if self.source else ""
        op = self.ops[index].op if index < len(self.ops) else "?"
        return f"{prefix}ops[{index}] ({op})" + (f".{key}" if key else "")


def check_params(schema: Sequence[Field], raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check an op's fields; return them with defaults filled in."""
    known = {f.name for f in schema}
    extra = sorted(set(raw) - known - {"op"})
    if extra:
        raise RecipeError(
            f"{where}: unknown field '{extra[0]}' (valid: {choices(sorted(known)) or 'none'})"
        )
    params: dict[str, Any] = {}
    for f in schema:
        if f.name not in raw or (raw[f.name] is None and not f.required):
            if f.required:
                raise RecipeError(f"{where}.{f.name}: missing ({f.help})")
            params[f.name] = f.default
            continue
        params[f.name] = _check_value(f, raw[f.name], f"{where}.{f.name}")
    return params


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)


def _check_value(f: Field, value: Any, where: str) -> Any:
    def bad(expected: str) -> RecipeError:
        return RecipeError(f"{where}: expected {expected}, got {value!r}")

    if f.kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if f.kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        if f.choices and value not in f.choices:
            raise RecipeError(f"{where}: {value!r} is not one of {choices(f.choices)}")
        return str.__str__(value)  # a plain string, also for a str enum
    if f.kind == "int":
        if not _is_int(value):
            raise bad("an integer")
        _check_range(f, value, where)
        return value
    if f.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        _check_range(f, float(value), where)
        return float(value)
    if f.kind == "pair":
        items = [value, value] if _is_int(value) else value
        if not _int_list(items) or len(items) != 2:
            raise bad("an integer or a pair [h, w] of integers")
        for v in items:
            _check_range(f, v, where)
        return (items[0], items[1])
    if not _int_list(value) or not value:  # "ints"
        raise bad("a non-empty list of integers")
    for v in value:
        _check_range(f, v, where)
    return tuple(value)


def _check_range(f: Field, value: float, where: str) -> None:
    if f.minimum is not None and value < f.minimum:
        raise RecipeError(f"{where}: {value} is below the minimum {f.minimum:g}")
    if f.maximum is not None and value >= f.maximum:
        limit = int(f.maximum) if float(f.maximum).is_integer() else f.maximum
        raise RecipeError(f"{where}: {value} must be below {limit}")
