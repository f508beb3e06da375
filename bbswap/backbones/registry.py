"""One resolver for every backbone spec.

A spec is one of:

- a zoo name (``resnet50``, ``densenet100``; ``bbswap list`` shows them),
- ``tv:NAME``: a torchvision.models builder, built without weights,
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)``,
- ``path/to/file.py:Name`` or ``package.module:Name``: an ``nn.Module`` class or a
  factory function of the user's, called with the ``--kw`` arguments.

:func:`resolve` turns a spec into a :class:`Backbone`, which knows how to build the
model and where its code comes from; it builds nothing itself.

The user's code is imported as Python would run it (:mod:`bbswap.backbones.loading`):
a file inside a package as part of that package, with the current directory on
``sys.path`` as ``python -m`` puts it. A ``py:dotted.name`` constructor argument
(:class:`bbswap.parsing.PyRef`) is resolved here, to the object that name imports.
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import importlib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from bbswap.backbones.guard import user_code
from bbswap.backbones.loading import code_paths, import_user_file, import_user_module, resolve_ref
from bbswap.errors import BackboneNotFound, MissingDependency, ModelError, choices
from bbswap.parsing import PyRef
from bbswap.zoo import ZOO


class BackboneKind(str, enum.Enum):
    """Where a backbone's code comes from."""

    ZOO = "zoo"  # bbswap's own zoo
    TV = "tv"  # a torchvision builder
    TIMM = "timm"  # timm.create_model
    FILE = "file"  # a user's file, by path
    MODULE = "module"  # a user's module, by import name

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone spec: how to build it and what is known about it."""

    spec: str
    kind: BackboneKind
    name: str
    factory: Callable[..., nn.Module] = field(repr=False, compare=False)
    kwargs: dict[str, Any] = field(default_factory=dict)
    in_chans: int | None = None  # default input channels, when known without building
    takes_in_chans: bool = False  # whether the factory accepts ``in_chans``
    head: tuple[str, ...] = ()  # top-level stages that form a classifier head
    source: str = ""  # module name or file path the code comes from
    attr: str = ""  # class or function name in ``source``
    module: str = ""  # the import name of the module that defines ``attr`` (user code)
    paths: tuple[str, ...] = ()  # folders on sys.path while the user's code runs
    # the objects the ``py:`` arguments among ``kwargs`` name, by argument
    objects: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def build(self, in_chans: int | None = None) -> nn.Module:
        """Call the factory; ``in_chans`` is passed on when the factory takes it."""
        kwargs = {k: self.objects.get(k, v) for k, v in self.kwargs.items()}
        if in_chans is not None and self.takes_in_chans and "in_chans" not in kwargs:
            kwargs["in_chans"] = in_chans
        try:
            with code_paths(self.paths), user_code(f"the constructor of {self.spec}"):
                model = self.factory(**kwargs)
        except TypeError as error:
            raise ModelError(f"cannot build {self.spec}: {error}") from error
        if not isinstance(model, nn.Module):
            raise ModelError(f"{self.spec} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    @property
    def default_in_chans(self) -> int | None:
        return self.kwargs.get("in_chans", self.in_chans)


@dataclass(frozen=True)
class ListedBackbone:
    spec: str
    family: str
    in_chans: int | None
    description: str


def resolve(spec: str, kwargs: dict[str, Any] | None = None) -> Backbone:
    """Resolve a backbone spec; raise :class:`BackboneNotFound` with near matches. The
    ``py:`` arguments are resolved once the backbone's own code is imported."""
    backbone = _resolve(spec, dict(kwargs or {}))
    refs = {k: v for k, v in backbone.kwargs.items() if isinstance(v, PyRef)}
    if not refs:
        return backbone
    paths = backbone.paths or (str(Path.cwd()),)
    objects = {k: resolve_ref(k, ref, paths, backbone.paths) for k, ref in refs.items()}
    return replace(backbone, paths=paths, objects=objects)


def _resolve(spec: str, kwargs: dict[str, Any]) -> Backbone:
    spec = spec.strip()
    if spec.startswith("tv:"):
        return _torchvision(spec, kwargs)
    if spec.startswith("timm:"):
        return _timm(spec, kwargs)
    if ":" in spec:
        return _user(spec, kwargs)
    if spec in ZOO:
        entry = ZOO[spec]
        module_name, func = entry.builder.split(":")
        module = importlib.import_module(f"bbswap.zoo.{module_name}")
        return Backbone(
            spec=spec,
            kind=BackboneKind.ZOO,
            name=spec,
            factory=getattr(module, func),
            kwargs=kwargs,
            in_chans=entry.in_chans,
            takes_in_chans=True,
            head=entry.head,
            source=module.__name__,
            attr=func,
        )
    near = difflib.get_close_matches(spec, list(ZOO), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise BackboneNotFound(
        f"unknown backbone '{spec}'{hint} (zoo: {choices(sorted(ZOO))}; run `bbswap list`, "
        "or use tv:NAME, timm:NAME, path/to/file.py:Class or package.module:Class)"
    )


def list_backbones(pattern: str = "*") -> list[ListedBackbone]:
    """Zoo entries matching an fnmatch pattern; ``tv:*`` / ``timm:*`` list those packages."""
    rows = [
        ListedBackbone(e.name, e.family, e.in_chans, e.description)
        for e in ZOO.values()
        if fnmatch.fnmatch(e.name, pattern)
    ]
    if pattern.startswith("tv:"):
        tv = _require("torchvision", "tv:")
        rows += [
            ListedBackbone(f"tv:{n}", "torchvision", 3, "torchvision.models builder")
            for n in tv.models.list_models(module=tv.models)
            if fnmatch.fnmatch(f"tv:{n}", pattern)
        ]
    elif pattern.startswith("timm:"):
        timm = _require("timm", "timm:")
        rows += [
            ListedBackbone(f"timm:{n}", "timm", 3, "timm.create_model")
            for n in timm.list_models(pattern[5:])
        ]
    return rows


def _require(package: str, prefix: str) -> ModuleType:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingDependency(
            f"'{prefix}' specs need {package}: pip install 'bbswap[{package}]' "
            f"(or pip install {package})"
        ) from None


def _torchvision(spec: str, kwargs: dict[str, Any]) -> Backbone:
    tv = _require("torchvision", "tv:")
    name = spec[3:]
    names = tv.models.list_models(module=tv.models)
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join('tv:' + n for n in near)}?" if near else ""
        raise BackboneNotFound(
            f"unknown torchvision model '{name}'{hint} (run `bbswap list 'tv:*'`)"
        )
    builder = tv.models.get_model_builder(name)

    def factory(**kw: Any) -> nn.Module:
        with warnings.catch_warnings():
            # googlenet and inception_v3 announce a future change of their default
            # initialisation, which concerns pretrained-free builds like this one
            warnings.filterwarnings("ignore", "The default weight initialization", FutureWarning)
            return builder(weights=None, **kw)

    source = builder.__module__
    return Backbone(spec, BackboneKind.TV, name, factory, kwargs, 3, source=source, attr=name)


def _timm(spec: str, kwargs: dict[str, Any]) -> Backbone:
    timm = _require("timm", "timm:")
    name = spec[5:]
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + n for n in near)}?" if near else ""
        raise BackboneNotFound(f"unknown timm model '{name}'{hint} (run `bbswap list 'timm:*'`)")

    def factory(**kw: Any) -> nn.Module:
        return timm.create_model(name, pretrained=False, **kw)

    kind, takes = BackboneKind.TIMM, True
    return Backbone(spec, kind, name, factory, kwargs, 3, takes, source="timm", attr=name)


def _user(spec: str, kwargs: dict[str, Any]) -> Backbone:
    where, _, attr = spec.rpartition(":")
    if not attr or not where:
        raise BackboneNotFound(
            f"malformed backbone spec '{spec}': expected path/to/file.py:Name or "
            "package.module:Name"
        )
    if where.endswith(".py") or "/" in where or "\\" in where:
        loaded = import_user_file(Path(where))
        kind = BackboneKind.FILE
    else:
        loaded = import_user_module(where)
        kind = BackboneKind.MODULE
    module = loaded.module
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        found = _buildable_names(module)
        near = difflib.get_close_matches(attr, found, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise BackboneNotFound(
            f"'{attr}' is not in {where}{hint} (nn.Module classes and functions there: "
            f"{choices(found) or 'none'})"
        )
    takes = _accepts(factory, "in_chans")
    return Backbone(
        spec=spec,
        kind=kind,
        name=attr,
        factory=factory,
        kwargs=kwargs,
        in_chans=_int_default(factory, "in_chans"),
        takes_in_chans=takes,
        source=where,
        attr=attr,
        module=module.__name__,
        paths=loaded.paths,
    )


def _buildable_names(module: ModuleType) -> list[str]:
    names = []
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        is_module_class = inspect.isclass(value) and issubclass(value, nn.Module)
        is_local_function = inspect.isfunction(value) and value.__module__ == module.__name__
        if is_module_class or is_local_function:
            names.append(key)
    return sorted(names)


def _int_default(func: Callable[..., Any], name: str) -> int | None:
    """The integer default of parameter ``name`` (``in_chans: int = 3``), if it has one."""
    try:
        param = inspect.signature(func).parameters.get(name)
    except (TypeError, ValueError):
        return None
    default = param.default if param is not None else None
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params
