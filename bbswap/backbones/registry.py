"""One resolver for every backbone spec.

A spec is one of:

- a zoo name (``resnet50``, ``densenet100``; ``bbswap list`` shows them),
- ``tv:NAME``: a torchvision.models builder, built without weights (with its DEFAULT
  weights when resolved with ``pretrained=True``),
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)`` (``pretrained=True`` when
  resolved so); NAME may be timm's ``local-dir:/path/to/folder`` or ``hf-hub:org/name``,
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

import dataclasses
import difflib
import enum
import fnmatch
import importlib
import inspect
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from bbswap.backbones.guard import user_code
from bbswap.backbones.loading import code_paths, import_user_file, import_user_module, resolve_ref
from bbswap.backbones.weights import WeightsSource, source_of
from bbswap.errors import (
    BackboneNotFound,
    BBSwapError,
    InvalidArgument,
    MissingDependency,
    ModelError,
    choices,
)
from bbswap.parsing import PyRef
from bbswap.surgery.intermediates_grid import IntermediatesGrid, call_arguments
from bbswap.surgery.vit_grid import token_grid
from bbswap.tracing.vit_grid import grid_of, recognise
from bbswap.zoo import ZOO


class BackboneKind(str, enum.Enum):
    """Where a backbone's code comes from."""

    ZOO = "zoo"  # bbswap's own zoo
    TV = "tv"  # a torchvision builder
    TIMM = "timm"  # timm.create_model
    FILE = "file"  # a user's file, by path
    MODULE = "module"  # a user's module, by import name
    INSTANCE = "instance"  # a model instance whose builder is not known

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class BuilderWeights:
    """How a ``tv:`` or ``timm:`` backbone gets its builder's own (pretrained) weights."""

    factory: Callable[..., nn.Module]  # the builder, asked for its weights (fetched, cached)
    locate: Callable[[nn.Module], WeightsSource]  # the file they came from, once built


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone spec: how to build it and what is known about it.

    ``pretrained`` asks :func:`bbswap.codegen.export.export` for the builder's own weights
    (:meth:`build_pretrained`); tracing builds the architecture alone (:meth:`build`).
    """

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
    pretrained: bool = False  # the builder's own weights are asked for
    builder_weights: BuilderWeights | None = field(default=None, repr=False, compare=False)
    # the input H and W the model is traced at by default: 224x224, or the one size a timm
    # model is built for (its config's ``input_size`` where it says ``fixed_input_size``)
    own_size: tuple[int, int] = (224, 224)
    # a timm model whose features are tokens, laid on their grid by its own
    # ``forward_intermediates`` (bbswap.surgery.intermediates_grid)
    tokens_by_intermediates: bool = False

    def build(self, in_chans: int | None = None) -> nn.Module:
        """Call the factory; ``in_chans`` is passed on when the factory takes it."""
        return self._call(self.factory, in_chans)

    def build_pretrained(self, in_chans: int | None = None) -> tuple[nn.Module, WeightsSource]:
        """Build with the builder's own weights (torchvision or timm fetches and caches
        them); returns the model and where its weights came from."""
        weights = self.with_pretrained().builder_weights
        assert weights is not None  # with_pretrained raised otherwise
        try:
            model = self._call(weights.factory, in_chans)
        except BBSwapError:
            raise
        except Exception as error:  # no cache and no network, a corrupt file, ...
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelError(
                f"cannot load the pretrained weights of {self.spec}: {type(error).__name__}: "
                f"{first}"
            ) from error
        return model, weights.locate(model)

    def with_pretrained(self) -> Backbone:
        """This backbone, asking for its builder's own weights; only ``tv:`` and ``timm:``
        backbones have them."""
        if self.builder_weights is None:
            raise InvalidArgument(
                f"{{pretrained}} is for tv: and timm: specs (the builder's own weights); "
                f"{self.spec} has none: load a checkpoint with {{weights}} CKPT instead",
                params=("pretrained", "weights"),
            )
        return self if self.pretrained else dataclasses.replace(self, pretrained=True)

    def _call(self, factory: Callable[..., nn.Module], in_chans: int | None) -> nn.Module:
        kwargs = {k: self.objects.get(k, v) for k, v in self.kwargs.items()}
        if in_chans is not None and self.takes_in_chans and "in_chans" not in kwargs:
            kwargs["in_chans"] = in_chans
        try:
            with code_paths(self.paths), user_code(f"the constructor of {self.spec}"):
                model = factory(**kwargs)
        except TypeError as error:
            raise ModelError(f"cannot build {self.spec}: {error}") from error
        if not isinstance(model, nn.Module):
            raise ModelError(f"{self.spec} returned {type(model).__name__}, not a torch.nn.Module")
        if self.kind in (BackboneKind.TV, BackboneKind.TIMM):
            model = token_grid(model)  # a plain ViT: its tokens on their grid
        if self.tokens_by_intermediates and grid_of(model) is None:
            model = IntermediatesGrid(model)
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


def resolve(
    spec: str, kwargs: dict[str, Any] | None = None, *, pretrained: bool = False
) -> Backbone:
    """Resolve a backbone spec to a :class:`Backbone`, which knows how to build it and
    where its code comes from; nothing is built (a user's file or module is imported).

    Args:
        spec: A zoo name (``"resnet50"``), ``"tv:NAME"``, ``"timm:NAME"``,
            ``"path/to/file.py:Name"`` or ``"package.module:Name"``.
        kwargs: Constructor arguments, passed to the builder on every build;
            ``pretrained=True`` among them means the same as ``pretrained``. A
            :class:`~bbswap.parsing.PyRef` (``py:dotted.name``) is resolved once the
            backbone's own code is imported.
        pretrained: For ``tv:`` and ``timm:`` specs only: the builder's own weights are
            carried when the backbone is exported.

    Returns:
        The :class:`Backbone`.

    Raises:
        BackboneNotFound: Nothing by that name; the message lists near matches.

    Example::

        backbone = bbswap.resolve("models/densenet.py:DenseNet", {"growth_rate": 24})
        model = backbone.build(in_chans=1)
    """
    kwargs = dict(kwargs or {})
    spec = spec.strip()
    if spec.startswith(("tv:", "timm:")):
        pretrained = _pretrained_kwarg(kwargs, pretrained)
    backbone = _with_objects(_resolve(spec, kwargs))
    return backbone.with_pretrained() if pretrained else backbone


def _with_objects(backbone: Backbone) -> Backbone:
    """The backbone with the objects its ``py:`` arguments name, imported with its own
    code's folders on ``sys.path``."""
    refs = {k: v for k, v in backbone.kwargs.items() if isinstance(v, PyRef)}
    if not refs:
        return backbone
    paths = backbone.paths or (str(Path.cwd()),)
    objects = {k: resolve_ref(k, ref, paths, backbone.paths) for k, ref in refs.items()}
    return replace(backbone, paths=paths, objects=objects)


def _resolve(spec: str, kwargs: dict[str, Any]) -> Backbone:
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
    """The backbones ``bbswap list`` shows: zoo entries matching an fnmatch pattern, and
    torchvision's or timm's models for a pattern starting ``tv:`` or ``timm:``.

    Args:
        pattern: An fnmatch pattern: ``"*"`` (the zoo), ``"resnet*"``, ``"tv:*"``,
            ``"timm:resnet*"``.

    Returns:
        A list of :class:`ListedBackbone` (``spec``, ``family``, ``in_chans``,
        ``description``).

    Example::

        [b.spec for b in bbswap.list_backbones("resnet*")]    # ['resnet18', ..., 'resnet152']
    """
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


def _pretrained_kwarg(kwargs: dict[str, Any], pretrained: bool) -> bool:
    """Take ``pretrained`` out of a tv:/timm: spec's constructor arguments: bbswap passes
    it to the builder itself, so ``pretrained=True`` there is ``pretrained`` here."""
    if "pretrained" not in kwargs:
        return pretrained
    value = kwargs.pop("pretrained")
    if not isinstance(value, bool):
        raise InvalidArgument(
            f"constructor argument pretrained={value!r} must be True or False "
            "(or use {pretrained})",
            params=("pretrained",),
        )
    return pretrained or value


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
    if "weights" in kwargs:
        raise InvalidArgument(
            f"constructor argument weights= is not passed to {spec}: bbswap builds it with "
            "weights=None; use {pretrained} for the builder's DEFAULT weights, or {weights} "
            "CKPT for a checkpoint",
            params=("pretrained", "weights"),
        )
    builder = tv.models.get_model_builder(name)

    def factory(**kw: Any) -> nn.Module:
        with warnings.catch_warnings():
            # googlenet and inception_v3 announce a future change of their default
            # initialisation, which concerns pretrained-free builds like this one
            warnings.filterwarnings("ignore", "The default weight initialization", FutureWarning)
            return builder(weights=None, **kw)

    def with_weights(**kw: Any) -> nn.Module:
        # the model the emitted file builds (weights=None), with the DEFAULT weights loaded
        # as the builder loads them: the settings some builders change for their weights
        # (inception_v3's transform_input) stay the caller's, so the file matches
        model = factory(**kw)
        weights = tv.models.get_model_weights(name).DEFAULT
        model.load_state_dict(weights.get_state_dict(progress=True, check_hash=True))
        return model

    def locate(model: nn.Module) -> WeightsSource:
        del model  # torchvision keeps the file under its URL's name in torch's hub cache
        weights = tv.models.get_model_weights(name).DEFAULT
        return source_of(f"torchvision {weights}", _hub_file(weights.url))

    source = builder.__module__
    found = BuilderWeights(with_weights, locate)
    return Backbone(
        spec,
        BackboneKind.TV,
        name,
        factory,
        kwargs,
        3,
        source=source,
        attr=name,
        builder_weights=found,
    )


def _hub_file(url: str) -> Path:
    """Where torch's hub cache keeps the file of ``url`` ($TORCH_HOME/hub/checkpoints)."""
    from urllib.parse import urlparse

    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _timm(spec: str, kwargs: dict[str, Any]) -> Backbone:
    """``timm:NAME``; for timm's ``local-dir:FOLDER`` and ``hf-hub:ORG/NAME`` the model is
    the architecture their config.json names, with its arguments (so an emitted file builds
    it without that folder or the hub), and the weights are the folder's or the hub's."""
    timm = _require("timm", "timm:")
    name = spec[5:]
    origin, _, model_id = name.partition(":")
    arch, saved = name, dict[str, Any]()
    if origin in _TIMM_SOURCES:
        if not model_id:
            raise BackboneNotFound(
                f"{spec}: nothing after '{origin}:' (e.g. {_TIMM_SOURCES[origin]})"
            )
        arch, saved = _timm_config(timm, origin, model_id, spec)
    if not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + n for n in near)}?" if near else ""
        raise BackboneNotFound(f"unknown timm model '{arch}'{hint} (run `bbswap list 'timm:*'`)")

    def factory(**kw: Any) -> nn.Module:
        return timm.create_model(arch, pretrained=False, **kw)

    def with_weights(**kw: Any) -> nn.Module:
        return timm.create_model(name, pretrained=True, **kw)

    found = BuilderWeights(with_weights, _timm_weights_file)
    kind, takes = BackboneKind.TIMM, True
    asked = {**saved, **kwargs}
    cfg = timm.models.get_pretrained_cfg(arch)
    fixed = cfg is not None and bool(getattr(cfg, "fixed_input_size", False))
    built = {**asked, **(_timm_dynamic(timm, arch, asked) if fixed else {})}
    size = _timm_size(cfg.input_size, asked) if fixed else (224, 224)
    return Backbone(
        spec,
        kind,
        arch,
        factory,
        built,
        3,
        takes,
        source="timm",
        attr=arch,
        builder_weights=found,
        own_size=size,
        tokens_by_intermediates=_timm_tokens(timm, arch, built, size),
    )


def _timm_tokens(
    timm: ModuleType, arch: str, kwargs: dict[str, Any], size: tuple[int, int]
) -> bool:
    """Whether a timm model's ``forward_features`` returns tokens (N, L, C) where its
    ``forward_intermediates`` returns the last block's map (N, C, H', W'): EVA, BEiT,
    XCiT, the rotary ViTs, at its own size and at twice it. Built and run on the meta
    device; a plain ViT, which bbswap lays on its grid itself, is not one."""
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **kwargs)
            if recognise(model) is not None or not hasattr(model, "forward_intermediates"):
                return False
            x = torch.empty(1, int(kwargs.get("in_chans", 3)), *size)
            tokens = model.eval().forward_features(x)
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
                return False
            maps = model.forward_intermediates(x, **call_arguments(model))
            # at twice the size too: a model that takes one size (MLP-Mixer, a fixed
            # position embedding) is left as it is, and refused for what ties it
            twice = model.forward_intermediates(
                torch.empty(1, x.shape[1], 2 * size[0], 2 * size[1]), **call_arguments(model)
            )
    except Exception:  # the plain build or forward fails too, and the trace reports it
        return False
    return all(isinstance(m, list) and m and m[-1].dim() == 4 for m in (maps, twice))


def _timm_dynamic(timm: ModuleType, arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"dynamic_img_size": True}`` for a timm model built for one input size whose
    class can take any (timm's own switch: Swin's windows padded and masked per size, an
    EVA's or a CaiT's position embedding interpolated to each grid); {} for any other, and
    for a plain ViT, which bbswap lays on its grid itself. The switch adds no weights, and
    at the size the model is built for it changes no value."""
    if "dynamic_img_size" in kwargs:
        return {}
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, dynamic_img_size=True, **kwargs)
    except Exception:  # its class has no such argument (TypeError), or the plain build
        return {}  # fails too and reports it
    return {} if recognise(model) is not None else {"dynamic_img_size": True}


def _timm_size(config_size: Any, kwargs: dict[str, Any]) -> tuple[int, int]:
    """The one input size a timm model is built for (its config says
    ``fixed_input_size``: a ViT's position embedding, a Swin's windows): the ``img_size``
    asked for, else its config's ``input_size``; 224x224 if neither is a size."""
    size = kwargs.get("img_size", tuple(config_size)[-2:])
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return (int(size[0]), int(size[1]))
    return (224, 224)


# the model sources timm's create_model takes before a name, with an example of each
_TIMM_SOURCES = {"local-dir": "timm:local-dir:/path/to/folder", "hf-hub": "timm:hf-hub:org/name"}


def _timm_config(
    timm: ModuleType, origin: str, model_id: str, spec: str
) -> tuple[str, dict[str, Any]]:
    """The architecture and saved model arguments of a local-dir folder or hf-hub repo."""
    if origin == "hf-hub":
        try:
            _, arch, saved = timm.models.load_model_config_from_hf(model_id)
        except Exception as error:  # the hub client raises many types (offline, not found)
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise BackboneNotFound(
                f"cannot read config.json of {spec} (from the hub or its cache): {first}"
            ) from None
        return str(arch), dict(saved or {})
    config = Path(model_id) / "config.json"
    if not config.is_file():
        raise BackboneNotFound(
            f"{spec}: {config} not found (timm's local-dir: needs a folder holding "
            "config.json and the weights, as timm's push_to_hf_hub writes them)"
        )
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        arch, saved = data["architecture"], data.get("model_args") or {}
    except (ValueError, KeyError, TypeError) as error:
        raise BackboneNotFound(
            f"{spec}: {config} is not a timm config (no 'architecture': {error})"
        ) from None
    if not isinstance(arch, str) or not isinstance(saved, dict):
        raise BackboneNotFound(f"{spec}: {config} is not a timm config")
    return arch, saved


# the files timm takes from a local-dir folder, in the order it looks for them
_LOCAL_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm_weights_file(model: nn.Module) -> WeightsSource:
    """The file timm loaded a model's weights from, read off its ``pretrained_cfg``."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    tag = ".".join(filter(None, [str(cfg.get("architecture") or ""), cfg.get("tag")]))
    if cfg.get("source") == "local-dir" or (cfg.get("file") and Path(cfg["file"]).is_dir()):
        folder = Path(cfg["file"])
        return source_of(f"timm {tag} from local-dir:{folder}", _local_dir_file(folder))
    if cfg.get("file"):
        return source_of(f"timm {tag} from {cfg['file']}", Path(cfg["file"]))
    if cfg.get("hf_hub_id"):
        return source_of(f"timm {tag} from hf-hub:{cfg['hf_hub_id']}", _hub_cached(cfg))
    if cfg.get("url"):
        return source_of(f"timm {tag} from {cfg['url']}", _hub_file(str(cfg["url"])))
    return WeightsSource(f"timm {tag}", None, None)


def _local_dir_file(folder: Path) -> Path:
    """The checkpoint timm reads from a local-dir folder: a preferred name, else the first
    file of the first suffix found (the folder itself when there is none)."""
    for file_name in _LOCAL_DIR_FILES:
        if (folder / file_name).is_file():
            return folder / file_name
    for suffix in (".safetensors", ".pth", ".pth.tar", ".bin"):
        files = sorted(folder.glob(f"*{suffix}"))
        if files:
            return files[0]
    return folder


def _hub_cached(cfg: dict[str, Any]) -> Path | None:
    """The Hugging Face cache's copy of the weights file of ``cfg['hf_hub_id']``."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = str(cfg["hf_hub_id"]).partition("@")
    names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else _HUB_FILES
    for file_name in names:
        found = try_to_load_from_cache(repo, file_name, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


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
