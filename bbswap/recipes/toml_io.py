"""Recipe files: read and check a TOML file, write a recipe back as one.

A recipe may record the backbone's constructor arguments in a ``[kw]`` table, a
``py:`` value as its string (``BatchNorm = "py:torch.nn.BatchNorm2d"``). Read from a
recipe, such a value imports nothing (a shared recipe must never run code): it names
only what is already imported, see :mod:`bbswap.backbones.loading`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bbswap.errors import BBSwapError, RecipeError, choices
from bbswap.parsing import PY_PREFIX, PyRef, parse_py_ref, read_small_text
from bbswap.recipes.registry import op_from_table
from bbswap.recipes.schema import Recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_TOP_FIELDS = {"name", "description", "backbone", "input", "source_output", "returns", "kw", "ops"}
_IDENT = re.compile(r"^[A-Za-z_]\w*$")


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a larger file is not one


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file (TOML): every field's form is checked here; the names
    it gives (stages, reduction points) are checked against the backbone when applied.

    Args:
        path: The ``.toml`` file.

    Returns:
        The :class:`~bbswap.recipes.schema.Recipe`.

    Raises:
        RecipeError: The file is missing or malformed; the message names the op's index,
            the field, the bad value and the valid choices.

    Example::

        recipe = bbswap.load_recipe("recipes/seed-hmer-resnet50.toml")
        recipe.name, [op.op for op in recipe.ops]   # ('seed-hmer-resnet50', ['in_channels', ...])
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = read_small_text(path, MAX_RECIPE_BYTES)
    except ValueError as error:
        raise RecipeError(f"recipe {error}; not a recipe") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML: {error}") from None
    except RecursionError:
        raise RecipeError(f"{path}: not valid TOML: nested too deeply") from None
    return recipe_from_dict(data, str(path))


def recipe_from_dict(data: Mapping[str, Any], source: str = "") -> Recipe:
    """A recipe from a TOML document's data; errors name ``source`` and the field."""
    prefix = f"{source}: " if source else ""
    unknown = sorted(set(data) - _TOP_FIELDS)
    if unknown:
        raise RecipeError(
            f"{prefix}unknown top-level field '{unknown[0]}' "
            f"(valid: {choices(sorted(_TOP_FIELDS))})"
        )
    for key in ("name", "description", "backbone", "input", "returns"):
        if key in data and not isinstance(data[key], str):
            raise RecipeError(f"{prefix}{key} must be a string, got {data[key]!r}")
    if "name" not in data:
        raise RecipeError(f"{prefix}missing field 'name'")
    output = data.get("source_output")
    if output is not None and not (
        isinstance(output, str) or (type(output) is int and output >= 0)
    ):
        raise RecipeError(
            f"{prefix}source_output must be an output's index (0, 1, ...) or its dict key, "
            f"got {output!r}"
        )
    raw_ops = data.get("ops", [])
    if not isinstance(raw_ops, list) or not raw_ops:
        raise RecipeError(f"{prefix}a recipe needs at least one [[ops]] table")
    ops = tuple(op_from_table(raw, f"{prefix}ops[{i}]") for i, raw in enumerate(raw_ops))
    return Recipe(
        name=data["name"],
        ops=ops,
        backbone=data.get("backbone", ""),
        description=data.get("description", ""),
        input=data.get("input", ""),
        source=source,
        source_output=output,
        returns=data.get("returns"),
        kw=kw_from_table(data.get("kw", {}), prefix),
    )


def kw_from_table(table: Any, prefix: str = "") -> dict[str, Any]:
    """A recipe's ``[kw]`` table as constructor arguments; a ``py:`` string becomes a
    :class:`PyRef` that may not import (see the module docstring)."""
    if not isinstance(table, dict):
        raise RecipeError(f"{prefix}kw must be a table of constructor arguments, got {table!r}")
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if not _IDENT.match(key):
            raise RecipeError(f"{prefix}kw: '{key}' is not a Python name")
        _check_plain(value, f"{prefix}kw.{key}")
        if isinstance(value, str) and value.startswith(PY_PREFIX):
            try:
                value = parse_py_ref(key, value, may_import=False)
            except BBSwapError as error:
                raise RecipeError(f"{prefix}kw.{key}: {error}") from None
        kwargs[key] = value
    return kwargs


def _check_plain(value: Any, where: str) -> None:
    """Only the values a command-line literal can give: no TOML dates and times."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, (str, int, float, bool)):
        raise RecipeError(f"{where}: {type(value).__name__} values are not constructor arguments")


def kw_to_table(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments as TOML values: a :class:`PyRef` as its ``py:`` string, a
    tuple as an array. What TOML cannot hold (None, objects) is refused by name."""
    return {key: _toml_value(value, key) for key, value in kwargs.items()}


def _toml_value(value: Any, where: str) -> Any:
    if isinstance(value, PyRef):
        return str(value)
    if isinstance(value, str) and value.startswith(PY_PREFIX):
        raise RecipeError(
            f"constructor argument {where}={value!r} is a string that a recipe would read "
            "as a py: name; it cannot be recorded"
        )
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_toml_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _toml_value(v, f"{where}.{k}") for k, v in value.items()}
    raise RecipeError(
        f"constructor argument {where}={str(value)[:40]} cannot be recorded in a recipe "
        "(TOML holds strings, numbers, booleans, arrays and tables; name an object as "
        "py:dotted.name)"
    )


def recipe_to_toml(recipe: Recipe, header: str = "") -> str:
    """Serialise a recipe as its files are written: top-level fields, then one
    ``[[ops]]`` table per op. :func:`load_recipe` reads it back to an equal recipe.

    Args:
        recipe: The recipe.
        header: Text for a leading comment block (each line prefixed with ``# ``).

    Returns:
        The TOML text.

    Example::

        text = bbswap.recipe_to_toml(bbswap.winner_recipe(found), "the winner of a fit")
    """
    top: dict[str, Any] = {"name": recipe.name}
    for key in ("description", "backbone", "input"):
        if getattr(recipe, key):
            top[key] = getattr(recipe, key)
    if recipe.source_output is not None:
        top["source_output"] = recipe.source_output
    if recipe.returns is not None:
        top["returns"] = recipe.returns
    parts = ["".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + _toml(top)]
    if recipe.kw:
        parts.append(_kw_toml(kw_to_table(recipe.kw)))
    parts += ["[[ops]]\n" + _toml(op.to_toml()) for op in recipe.ops]
    return "\n".join(parts)


def _toml(table: dict[str, Any]) -> str:
    """Flat ``key = value`` lines, each value written by tomli-w."""
    import tomli_w

    return "".join(_one_line_arrays(tomli_w.dumps({k: v})) for k, v in table.items())


def _kw_toml(table: dict[str, Any]) -> str:
    """The ``[kw]`` table: plain values first, then a sub-table per dict value."""
    import tomli_w

    return _one_line_arrays(tomli_w.dumps({"kw": table}))


def _one_line_arrays(text: str) -> str:
    """tomli-w writes every array one item per line; short arrays of numbers read better
    on one line."""

    def join(match: re.Match[str]) -> str:
        items = [item.strip().rstrip(",") for item in match.group(1).splitlines()]
        return "[" + ", ".join(items) + "]"

    return re.sub(r"\[\n((?:[ ]+-?[0-9.]+,\n)+)\]", join, text)
