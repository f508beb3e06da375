"""Surgery recipes: TOML files that name a backbone and an ordered list of ops.

A recipe looks like this::

    name = "seed-hmer-resnet50"
    description = "..."
    backbone = "resnet50"
    input = "1x1x128x316"

    [[ops]]
    op = "stride"
    at = "layer2"
    stride = 1

Reading checks the file's form (fields, types, ranges) against each op's declared
fields; checking names of stages and reduction points needs the backbone's trace and
happens in :mod:`bbswap.surgery.core` before the model is touched.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bbswap.errors import RecipeError, choices

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Field:
    """One declared field of an op."""

    name: str
    kind: str  # "int", "float", "bool", "str", "pair" (int or [h, w]), "ints" (list of int)
    help: str
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None  # exclusive upper bound for floats


@dataclass(frozen=True)
class Op:
    """One step of a recipe: the op's name and its checked parameters."""

    op: str
    params: Mapping[str, Any]

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


@dataclass(frozen=True)
class Recipe:
    name: str
    ops: tuple[Op, ...]
    backbone: str = ""
    description: str = ""
    input: str = ""
    source: str = ""  # the file it was read from, for messages

    def where(self, index: int, key: str | None = None) -> str:
        """How an error message names a field: ``file: ops[2] (stride).at``."""
        prefix = f"{self.source}: " if self.source else ""
        op = self.ops[index].op if index < len(self.ops) else "?"
        return f"{prefix}ops[{index}] ({op})" + (f".{key}" if key else "")


_TOP_FIELDS = {"name", "description", "backbone", "input", "ops"}


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML: {error}") from None
    return recipe_from_dict(data, str(path))


def recipe_from_dict(data: Mapping[str, Any], source: str = "") -> Recipe:
    from bbswap.recipes.ops import OPS

    prefix = f"{source}: " if source else ""
    unknown = sorted(set(data) - _TOP_FIELDS)
    if unknown:
        raise RecipeError(
            f"{prefix}unknown top-level field '{unknown[0]}' "
            f"(valid: {choices(sorted(_TOP_FIELDS))})"
        )
    for key in ("name", "description", "backbone", "input"):
        if key in data and not isinstance(data[key], str):
            raise RecipeError(f"{prefix}{key} must be a string, got {data[key]!r}")
    if "name" not in data:
        raise RecipeError(f"{prefix}missing field 'name'")
    raw_ops = data.get("ops", [])
    if not isinstance(raw_ops, list) or not raw_ops:
        raise RecipeError(f"{prefix}a recipe needs at least one [[ops]] table")
    ops = []
    for index, raw in enumerate(raw_ops):
        where = f"{prefix}ops[{index}]"
        if not isinstance(raw, dict):
            raise RecipeError(f"{where}: must be a table, got {raw!r}")
        name = raw.get("op")
        if name is None:
            raise RecipeError(f"{where}.op: missing (one of {choices(sorted(OPS))})")
        if name not in OPS:
            raise RecipeError(f"{where}.op: unknown op {name!r} (valid: {choices(sorted(OPS))})")
        ops.append(Op(name, check_params(OPS[name].fields, raw, f"{where} ({name})")))
    return Recipe(
        name=data["name"],
        ops=tuple(ops),
        backbone=data.get("backbone", ""),
        description=data.get("description", ""),
        input=data.get("input", ""),
        source=source,
    )


def make_op(name: str, **params: Any) -> Op:
    """An op built the way a recipe file's op is read (defaults filled, values checked)."""
    from bbswap.recipes.ops import OPS

    raw = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items() if v is not None}
    return Op(name, check_params(OPS[name].fields, raw, f"op {name}"))


def check_params(fields: Sequence[Field], raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check an op's fields; return them with defaults filled in."""
    known = {f.name for f in fields}
    extra = sorted(set(raw) - known - {"op"})
    if extra:
        raise RecipeError(
            f"{where}: unknown field '{extra[0]}' (valid: {choices(sorted(known)) or 'none'})"
        )
    params: dict[str, Any] = {}
    for f in fields:
        if f.name not in raw:
            if f.required:
                raise RecipeError(f"{where}.{f.name}: missing ({f.help})")
            params[f.name] = f.default
            continue
        params[f.name] = _check_value(f, raw[f.name], f"{where}.{f.name}")
    return params


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
        return value
    if f.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        _check_range(f, value, where)
        return value
    if f.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        _check_range(f, float(value), where)
        return float(value)
    if f.kind == "pair":
        items = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
        if (
            not isinstance(items, list)
            or len(items) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in items)
        ):
            raise bad("an integer or a pair [h, w] of integers")
        for v in items:
            _check_range(f, v, where)
        return (items[0], items[1])
    if f.kind == "ints":
        if (
            not isinstance(value, list)
            or not value
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
        ):
            raise bad("a non-empty list of integers")
        for v in value:
            _check_range(f, v, where)
        return tuple(value)
    raise AssertionError(f"field kind {f.kind}")  # a bug in an op's declaration


def _check_range(f: Field, value: float, where: str) -> None:
    if f.minimum is not None and value < f.minimum:
        raise RecipeError(f"{where}: {value} is below the minimum {f.minimum:g}")
    if f.maximum is not None and value >= f.maximum:
        raise RecipeError(f"{where}: {value} must be below {f.maximum:g}")


def recipe_to_toml(recipe: Recipe, header: str = "") -> str:
    """Serialise a recipe as its files are written: top-level fields, then one
    ``[[ops]]`` table per op; ``header`` becomes a leading comment block."""
    top: dict[str, Any] = {"name": recipe.name}
    for key in ("description", "backbone", "input"):
        if getattr(recipe, key):
            top[key] = getattr(recipe, key)
    parts = ["".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + _toml(top)]
    parts += ["[[ops]]\n" + _toml(op.to_toml()) for op in recipe.ops]
    return "\n".join(parts)


def _toml(table: dict[str, Any]) -> str:
    """Flat ``key = value`` lines, each value written by tomli-w."""
    import tomli_w

    return "".join(_one_line_arrays(tomli_w.dumps({k: v})) for k, v in table.items())


def _one_line_arrays(text: str) -> str:
    """tomli-w writes every array one item per line; short arrays of numbers read better
    on one line."""

    def join(match: re.Match[str]) -> str:
        items = [item.strip().rstrip(",") for item in match.group(1).splitlines()]
        return "[" + ", ".join(items) + "]"

    return re.sub(r"\[\n((?:[ ]+-?[0-9.]+,\n)+)\]", join, text)
