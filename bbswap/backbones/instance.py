"""A model instance as a backbone: what ``fit``, ``apply_recipe`` and ``export`` make of
an ``nn.Module`` given where a spec would be.

The instance itself is never changed. Tracing and surgery work on copies of it: on the
meta device a copy whose parameters and buffers are meta tensors of the same shapes (no
weight is copied), else a deep copy moved to the CPU. The copies do not carry the
instance's hooks: the code bbswap writes and checks is the modules' own.

Emitting a file means writing the call that builds the source backbone, so the instance's
builder is looked for among those that make the same model (the same class, the same
module tree as ``repr`` shows it and the same parameter and buffer shapes): the zoo entries
and torchvision builders of the class's own module, the timm architecture its
``pretrained_cfg`` names, and the class itself called with ``kwargs`` (and ``in_chans``
when it takes them). The first that matches says where the emitted file's code comes from,
as its spec would (``tv:resnet18``, ``path/to/file.py:Net``). When none does, the instance
can still be traced and patched, and emitting it is refused with the reason.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bbswap.backbones.guard import user_code
from bbswap.backbones.registry import Backbone, BackboneKind, resolve
from bbswap.errors import BBSwapError, InvalidArgument, ModelError
from bbswap.tracing.tracer import build_on_meta
from bbswap.zoo import ZOO


@dataclass(frozen=True)
class InstanceBackbone(Backbone):
    """A backbone given as a model instance. ``unknown`` says why no builder of it was
    found (then it is traced and patched, but not emitted); "" when one was."""

    unknown: str = ""


@dataclass(frozen=True)
class _Builder:
    """A way to build the instance's model again, as a spec would name it."""

    kind: BackboneKind
    spec: str
    name: str
    source: str
    attr: str
    kwargs: dict[str, Any]
    build: Callable[[], nn.Module]
    module: str = ""  # the import name of the module that defines ``attr`` (user code)


def as_backbone(spec: str | Backbone | nn.Module, kwargs: dict[str, Any] | None) -> Backbone:
    """A spec resolved, a :class:`Backbone` as it is, or a model instance wrapped."""
    if isinstance(spec, nn.Module):
        return instance_backbone(spec, kwargs)
    if isinstance(spec, Backbone):
        return spec
    if not isinstance(spec, str):
        raise InvalidArgument(
            f"{{spec}} must be a backbone spec, a Backbone or an nn.Module, got "
            f"{type(spec).__name__}",
            params=("spec",),
        )
    return resolve(spec, kwargs)


def instance_backbone(model: nn.Module, kwargs: dict[str, Any] | None = None) -> Backbone:
    """``model`` as a backbone whose builds are copies of it; ``kwargs`` are the arguments
    it was constructed with, for the constructor call an emitted file writes."""
    in_chans = _first_conv_in_channels(model)

    def factory(**_: Any) -> nn.Module:
        return meta_copy(model) if torch.empty(()).is_meta else real_copy(model)

    found = _identify(model, dict(kwargs or {}), in_chans)
    if isinstance(found, str):
        name = type(model).__name__
        source = type(model).__module__
        kind, unknown = BackboneKind.INSTANCE, found
        return InstanceBackbone(
            name,
            kind,
            name,
            factory,
            dict(kwargs or {}),
            in_chans,
            source=source,
            attr=name,
            unknown=unknown,
        )
    return InstanceBackbone(
        found.spec,
        found.kind,
        found.name,
        factory,
        found.kwargs,
        in_chans,
        source=found.source,
        attr=found.attr,
        module=found.module,
    )


def require_emittable(backbone: Backbone) -> None:
    """Refuse to emit an instance whose builder is unknown, saying why."""
    if isinstance(backbone, InstanceBackbone) and backbone.unknown:
        raise ModelError(f"cannot emit the {backbone.name} instance: {backbone.unknown}")


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device: every parameter and buffer a meta tensor of
    its shape (shared ones stay shared), nothing else copied but the modules; no hooks."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None and id(t) not in memo:
                    meta = t.detach().to("meta")
                    memo[id(t)] = (
                        nn.Parameter(meta, requires_grad=t.requires_grad)
                        if isinstance(t, nn.Parameter)
                        else meta
                    )
    return _without_hooks(_deep_copy(model, memo))


def real_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` on the CPU, with its weights and without its hooks."""
    if not has_weights(model):
        raise ModelError(
            f"the {type(model).__name__} instance is on the meta device: it has no weights to "
            "copy; build it on the CPU (or load a checkpoint into it) first"
        )
    return _without_hooks(_deep_copy(model, {})).to("cpu")


def has_weights(model: nn.Module) -> bool:
    """Whether no parameter or buffer of ``model`` is on the meta device."""
    return not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _deep_copy(model: nn.Module, memo: dict[int, Any]) -> nn.Module:
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:  # whatever the user's module holds that cannot be copied
        raise ModelError(
            f"cannot copy the {type(model).__name__} instance: {type(error).__name__}: {error}"
        ) from error


_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _without_hooks(model: nn.Module) -> nn.Module:
    for module in model.modules():
        for name in _HOOKS:
            table = getattr(module, name, None)
            if isinstance(table, dict):
                table.clear()
    return model


def _first_conv_in_channels(model: nn.Module) -> int | None:
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _identify(model: nn.Module, kwargs: dict[str, Any], in_chans: int | None) -> _Builder | str:
    """The first builder that makes the same model, or why there is none."""
    tried = []
    for builder in _builders(type(model), model, kwargs, in_chans):
        try:
            with user_code(f"the constructor of {builder.spec}"):
                other = build_on_meta(builder.build)
        except BBSwapError:
            raise
        except Exception:  # a builder that cannot be called so is not this model's
            other = None
        if other is not None and same_model(model, other):
            return builder
        tried.append(builder.spec)
    return _no_builder(type(model), tried)


def _no_builder(cls: type, tried: list[str]) -> str:
    shown = ", ".join(tried[:3]) + (f" and {len(tried) - 3} more" if len(tried) > 3 else "")
    tried_text = f"none of {shown} builds the same model" if tried else "no builder is known"
    where = _class_origin(cls)
    if where is None:
        return (
            f"{tried_text}, and its class {cls.__qualname__} is not defined at the top of a "
            "file; define it in a file and give kwargs, or pass the spec path/to/file.py:Name"
        )
    return (
        f"{tried_text}; pass kwargs (the arguments it was constructed with), or its spec "
        f"(a zoo name, tv:NAME, timm:NAME, {where[1]}:NAME)"
    )


def same_model(a: nn.Module, b: nn.Module) -> bool:
    """The same class, the same module tree (its ``repr``) and the same tensor shapes."""
    if type(a) is not type(b) or repr(a) != repr(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)


def _builders(
    cls: type, model: nn.Module, kwargs: dict[str, Any], in_chans: int | None
) -> Iterator[_Builder]:
    module = cls.__module__
    if module.startswith("bbswap.zoo."):
        yield from _zoo_builders(module, kwargs, in_chans)
    elif module.startswith("torchvision.models"):
        yield from _tv_builders(module, kwargs)
    elif module.startswith("timm."):
        yield from _timm_builders(model, kwargs, in_chans)
    origin = _class_origin(cls)
    if origin is not None:
        kind, source = origin
        kw = dict(kwargs)
        if in_chans is not None and "in_chans" not in kw and _accepts(cls, "in_chans"):
            kw["in_chans"] = in_chans
        spec = f"{source}:{cls.__name__}"
        call = lambda: cls(**kw)  # noqa: E731  # the builder's one call, named for the line
        yield _Builder(kind, spec, cls.__name__, source, cls.__name__, kw, call, cls.__module__)


def _zoo_builders(module: str, kwargs: dict[str, Any], in_chans: int | None) -> Iterator[_Builder]:
    for entry in ZOO.values():
        family, func = entry.builder.split(":")
        if f"bbswap.zoo.{family}" != module:
            continue
        build = getattr(importlib.import_module(module), func)
        kw = {**kwargs, "in_chans": kwargs.get("in_chans", in_chans or entry.in_chans)}
        call = _bound(build, kw)
        yield _Builder(BackboneKind.ZOO, entry.name, entry.name, module, func, kw, call)


def _tv_builders(module: str, kwargs: dict[str, Any]) -> Iterator[_Builder]:
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        build = torchvision.models.get_model_builder(name)
        if build.__module__ == module:
            call = _bound(build, {"weights": None, **kwargs})
            yield _Builder(BackboneKind.TV, f"tv:{name}", name, module, name, kwargs, call)


def _timm_builders(
    model: nn.Module, kwargs: dict[str, Any], in_chans: int | None
) -> Iterator[_Builder]:
    import timm

    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(name, str) or not timm.is_model(name):
        return
    kw = dict(kwargs)
    if in_chans is not None:
        kw.setdefault("in_chans", in_chans)
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and not isinstance(classes, bool):
        kw.setdefault("num_classes", classes)
    call = _bound(timm.create_model, {"model_name": name, "pretrained": False, **kw})
    yield _Builder(BackboneKind.TIMM, f"timm:{name}", name, "timm", name, kw, call)


def _bound(func: Callable[..., nn.Module], kw: dict[str, Any]) -> Callable[[], nn.Module]:
    return lambda: func(**kw)


def _class_origin(cls: type) -> tuple[BackboneKind, str] | None:
    """Where a spec would find ``cls``: a file path or an importable module name; None for
    a class that is not a top-level name of a module with a file."""
    module = sys.modules.get(cls.__module__)
    if module is None or getattr(module, cls.__name__, None) is not cls:
        return None
    file = getattr(module, "__file__", None)
    if cls.__module__ == "__main__" or cls.__module__.startswith("bbswap_user_"):
        return (BackboneKind.FILE, _shown_path(file)) if file else None
    return (BackboneKind.MODULE, cls.__module__) if file else None


def _shown_path(file: str) -> str:
    path = Path(file)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
