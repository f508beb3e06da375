"""Parsing of argument values: input shapes, size lists, strides, targets, ``--kw`` arguments.

Errors name the Python parameter as ``{name}`` (see :class:`bbswap.errors.BBSwapError`),
so the command line can word them with its flags.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bbswap.errors import InvalidArgument

_WORD = re.compile(r"^[A-Za-z_][\w.\-/]*$")
_IDENT = re.compile(r"^[A-Za-z_]\w*$")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", re.ASCII)
PY_PREFIX = "py:"
MAX_DIM = 1 << 16  # a sane bound on a size, a channel count or a stride


def parse_dims(text: str, param: str, what: str = "") -> tuple[int, ...]:
    """Integers joined by 'x'; ``param`` (and ``what`` after it) names the value in errors."""
    name = f"{{{param}}}{what}"
    if len(text) > 100:
        raise InvalidArgument(
            f"malformed {name} '{text[:40]}...': longer than 100 characters", params=(param,)
        )
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise InvalidArgument(
            f"malformed {name} '{text}': expected integers joined by 'x'", params=(param,)
        ) from None
    if any(d <= 0 for d in dims):
        raise InvalidArgument(
            f"malformed {name} '{text}': every dimension must be positive", params=(param,)
        )
    if any(d > MAX_DIM for d in dims):
        raise InvalidArgument(
            f"{name} '{text}': every dimension must be at most {MAX_DIM}", params=(param,)
        )
    return dims


def parse_input(text: str, in_chans: int | None) -> tuple[int, int, int, int]:
    """``NxCxHxW`` or ``HxW`` (N=1, C = the model's input channels)."""
    dims = parse_dims(text, "input_shape")
    if len(dims) == 4:
        return (dims[0], dims[1], dims[2], dims[3])
    if len(dims) == 2:
        if in_chans is None:
            raise InvalidArgument(
                f"{{input_shape}} '{text}' gives no channel count and the model's input "
                "channels are unknown; give it as NxCxHxW",
                params=("input_shape",),
            )
        return (1, in_chans, dims[0], dims[1])
    raise InvalidArgument(
        f"malformed {{input_shape}} '{text}': expected NxCxHxW or HxW, e.g. 1x3x224x224",
        params=("input_shape",),
    )


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """A comma-separated list of ``HxW`` sizes."""
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        dims = parse_dims(item, "sizes", " entry")
        if len(dims) != 2:
            raise InvalidArgument(
                f"malformed {{sizes}} entry '{item}': expected HxW, e.g. 33x97", params=("sizes",)
            )
        sizes.append((dims[0], dims[1]))
    if not sizes:
        raise InvalidArgument("{sizes} is empty: give sizes like 33x97,117x293", params=("sizes",))
    return sizes


MAX_DATA_BYTES = 1 << 20  # a config file is a few kilobytes
MAX_YAML_ALIASES = 100  # enough for any config; an alias bomb has millions
MAX_LITERAL_CHARS = 10_000


def read_small_text(path: Path, limit: int = MAX_DATA_BYTES) -> str:
    """A UTF-8 text file of at most ``limit`` bytes; a ValueError says what is wrong
    (the caller words it as its own error)."""
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    if len(raw) > limit:
        raise ValueError(f"{path} is larger than {limit >> 10} KiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start})") from None


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a document with more than a few aliases."""
    import yaml

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=Loader)  # a SafeLoader subclass


def load_data_file(path_text: str, what: str) -> Any:
    """The content of a YAML or JSON file."""
    path = Path(path_text)
    if not path.is_file():
        raise InvalidArgument(f"{what}: file not found: {path_text}")
    try:
        text = read_small_text(path)
    except ValueError as error:
        raise InvalidArgument(f"{what}: {error}") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        if path.suffix.lower() in (".yaml", ".yml"):
            return _load_yaml(text)
    except Exception as error:  # yaml and json raise their own error types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidArgument(f"{what}: cannot parse {path_text}: {first}") from error
    raise InvalidArgument(f"{what}: {path_text} is neither .yaml, .yml nor .json")


@dataclass(frozen=True)
class PyRef:
    """A constructor argument that is a Python object named by its dotted path
    (``--kw BatchNorm=py:torch.nn.BatchNorm2d``): found by importing, never by ``eval``.

    The path is kept as written, so that a recipe records it and an emitted file names
    it; :mod:`bbswap.backbones.registry` resolves it when the backbone is built.
    ``may_import`` is False for a value read from a recipe: a shared recipe must never run
    code, so such a value names only what is already imported (see the registry)."""

    path: str
    may_import: bool = field(default=True, compare=False)

    def __str__(self) -> str:
        return PY_PREFIX + self.path


def parse_py_ref(key: str, text: str, may_import: bool = True) -> PyRef:
    """``py:package.module.Name`` as a :class:`PyRef`; ``key`` names it in errors."""
    path = text[len(PY_PREFIX) :].strip()
    if not _DOTTED.fullmatch(path):
        raise InvalidArgument(
            f"malformed py: value for '{key}': {path!r} is not a dotted Python path such "
            "as py:torch.nn.BatchNorm2d"
        )
    return PyRef(path, may_import)


def parse_kw(items: list[str] | None, option: str = "--kw") -> dict[str, Any]:
    """``key=value`` pairs: a Python literal, a bare word (a string), ``@file.yaml``, or
    ``py:dotted.name`` (the object that name imports, as a :class:`PyRef`); errors name
    ``option``, the flag the pairs were given with."""
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _IDENT.match(key):
            raise InvalidArgument(
                f"malformed {option} '{item}': expected key=value with key a Python name, "
                f"e.g. {option} growth_rate=24, {option} params=@config.yaml or "
                f"{option} BatchNorm=py:torch.nn.BatchNorm2d"
            )
        kwargs[key] = parse_kw_value(key, value.strip(), option)
    return kwargs


def parse_kw_value(key: str, value: str, option: str = "--kw") -> Any:
    if value.startswith(PY_PREFIX):
        return parse_py_ref(key, value)
    if value.startswith("@"):
        return load_data_file(value[1:], f"{option} {key}")
    if len(value) > MAX_LITERAL_CHARS:
        raise InvalidArgument(
            f"{option} value for '{key}' is longer than {MAX_LITERAL_CHARS} characters; "
            "put it in a file and pass @file.yaml"
        )
    try:
        return ast.literal_eval(value)
    except (RecursionError, MemoryError):
        raise InvalidArgument(f"{option} value for '{key}' is nested too deeply") from None
    except (ValueError, SyntaxError):
        if _WORD.match(value):
            return value
        raise InvalidArgument(
            f"malformed {option} value for '{key}': {value!r} is neither a Python literal, "
            "a bare word, @file nor py:dotted.name"
        ) from None


def parse_stride(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """``16``, ``"16"``, ``"32x4"`` or ``(32, 4)`` as (H, W) factors."""
    if isinstance(text, int):
        text = str(text)
    if isinstance(text, tuple):
        return (int(text[0]), int(text[1]))
    dims = parse_dims(text, "stride")
    if len(dims) == 1:
        return (dims[0], dims[0])
    if len(dims) == 2:
        return (dims[0], dims[1])
    raise InvalidArgument(
        f"malformed {{stride}} '{text}': expected 16 or HxW such as 32x4", params=("stride",)
    )


def parse_strides(text: str) -> list[int]:
    """``8,16,32`` -> [8, 16, 32] (square strides, for ``bbswap matrix``)."""
    out = []
    for part in text.split(",") if text else []:
        part = part.strip()
        if not (part.isascii() and part.isdigit()) or int(part) < 1:
            raise InvalidArgument(
                f"malformed {{strides}} '{text}': expected positive integers separated by "
                "commas, e.g. 8,16,32",
                params=("strides",),
            )
        out.append(int(part))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class FeatureTarget:
    """One output a fit must produce: ``channels`` channels at 1/``stride``.

    Args:
        stride: The downsample, as (H, W) factors (``parse_target`` reads ``16`` as (16, 16)).
        channels: The output channels; a tap with other channels gets a 1x1 conv + BN.
        name: The output's key when the patched backbone returns a dict; default the
            tapped module's path.

    Example::

        bbswap.FeatureTarget((8, 8), 256, "p3")
        bbswap.parse_target("p3=8:256")          # the same
    """

    stride: tuple[int, int]
    channels: int
    name: str | None = None

    def __post_init__(self) -> None:
        stride = parse_stride(self.stride)
        object.__setattr__(self, "stride", stride)
        if min(stride) < 1 or max(stride) > MAX_DIM:
            raise InvalidArgument(
                f"{{targets}} stride {self.stride} must be between 1 and {MAX_DIM}",
                params=("targets",),
            )
        if isinstance(self.channels, bool) or not isinstance(self.channels, int):
            raise InvalidArgument(
                f"{{targets}} channels must be an integer, got {self.channels!r}",
                params=("targets",),
            )
        if not 1 <= self.channels <= MAX_DIM:
            raise InvalidArgument(
                f"{{targets}} channels must be between 1 and {MAX_DIM}, got {self.channels}",
                params=("targets",),
            )
        if self.name is not None and not _NAME.match(self.name):
            raise InvalidArgument(
                f"{{targets}} name {self.name!r} must be a word of letters, digits, '_', '.' "
                "or '-' starting with a letter or '_'",
                params=("targets",),
            )

    def describe(self) -> str:
        """``p3=8:256``, as ``--target`` takes it."""
        stride = (
            str(self.stride[0])
            if self.stride[0] == self.stride[1]
            else "x".join(map(str, self.stride))
        )
        return f"{self.name + '=' if self.name else ''}{stride}:{self.channels}"


_NAME = re.compile(r"^[A-Za-z_][\w.\-]{0,63}$")


def parse_target(text: str | FeatureTarget) -> FeatureTarget:
    """``[NAME=]STRIDE:CHANNELS`` (``p3=8:256``, ``16:2048``, ``32x4:512``) as a target."""
    if isinstance(text, FeatureTarget):
        return text
    name, sep, rest = text.strip().rpartition("=")
    stride, colon, channels = rest.partition(":")
    hint = "expected [NAME=]STRIDE:CHANNELS, e.g. p3=8:256 or 16:2048"
    if not colon or not stride or not channels or (sep and not name):
        raise InvalidArgument(f"malformed {{targets}} '{text}': {hint}", params=("targets",))
    if not (channels.isascii() and channels.isdigit()):
        raise InvalidArgument(
            f"malformed {{targets}} '{text}': the channels '{channels}' are not a positive "
            f"integer; {hint}",
            params=("targets",),
        )
    try:
        size = parse_stride(stride)
    except InvalidArgument:
        raise InvalidArgument(
            f"malformed {{targets}} '{text}': the stride '{stride}' is not 16 or HxW; {hint}",
            params=("targets",),
        ) from None
    return FeatureTarget(size, int(channels), name or None)


def parse_targets(items: list[str] | list[FeatureTarget] | None) -> tuple[FeatureTarget, ...]:
    """Several targets; two with the same name are a mistake."""
    targets = tuple(parse_target(t) for t in items or [])
    names = [t.name for t in targets if t.name is not None]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidArgument(
            f"{{targets}} name '{twice[0]}' is given twice; each output needs its own name",
            params=("targets",),
        )
    return targets
