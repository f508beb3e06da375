"""Write a patched backbone as one standalone, readable Python file.

The file holds, in order: a docstring stating its contract (source backbone, the
recipe in full, traced shapes, params, MACs, size rule); the imports; the source
backbone's code, bundled from the file that defines it (only the definitions it
needs); one class per rewritten forward; and the patched class, whose ``__init__``
builds the source backbone and applies every edit as an explicit statement with a
comment naming its recipe op, and whose ``forward`` is one statement per call. With
carried weights it also records the weights file's name and SHA-256, and the patched class
gets a loader that refuses any file of other bytes (:mod:`bbswap.codegen.weights_code`).
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import textwrap
import unicodedata
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, cast

from torch import fx, nn

from bbswap import __version__
from bbswap.backbones.instance import require_emittable
from bbswap.backbones.loading import is_user_module
from bbswap.backbones.registry import Backbone
from bbswap.backbones.weights import WeightsSource
from bbswap.codegen.bundling import Bundled, bundle_code
from bbswap.codegen.outputs_code import outputs_lines, projection_comment
from bbswap.codegen.size_code import output_size_code, outputs_size_code
from bbswap.codegen.source import (
    Imports,
    forward_source,
    identifier,
    imported_names,
    literal,
    string,
    wrap,
)
from bbswap.codegen.taps_code import (
    docstring_lines,
    feature_info_lines,
    output_infos,
    outputs_head,
)
from bbswap.codegen.text import Place, as_source, is_plain_name
from bbswap.codegen.weights_code import IMPORTS, LOADER, WeightsCode, weights_code
from bbswap.errors import InvalidArgument, SurgeryError
from bbswap.parsing import PyRef
from bbswap.recipes.schema import OpKind
from bbswap.recipes.structure import Dropout
from bbswap.recipes.toml_io import recipe_to_toml
from bbswap.surgery import layout, same
from bbswap.surgery.apply import ApplyResult
from bbswap.surgery.core import (
    Edit,
    EditKind,
    OwnerRewrite,
    child_name,
    fx_name,
    module_at,
    parent_path,
)
from bbswap.surgery.fx_trace import trace_children_as_leaves
from bbswap.surgery.intermediates_grid import MODEL, IntermediatesGrid
from bbswap.surgery.layout import LAYOUT_CLASSES
from bbswap.surgery.same import SAME_CLASSES
from bbswap.tracing.tracer import Trace, describe_factor
from bbswap.tracing.vit_grid import grid_note, grid_of

_FAMILIES = {
    "resnet": "ResNet",
    "densenet": "DenseNet",
    "vgg": "VGG",
    "mobilenet": "MobileNet",
    "convnext": "ConvNeXt",
    "efficientnet": "EfficientNet",
}


def count(n: int) -> str:
    return f"{n:,}"


def shape(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims)


def default_class_name(backbone: str, channels: int, downsample: tuple[float, float]) -> str:
    """``resnet50``, 684, (16, 16) -> ``ResNet50C684S16``."""
    name = backbone.split(":")[-1]
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", name) if p]
    words = []
    for part in parts:
        for prefix, cased in _FAMILIES.items():
            if part.lower().startswith(prefix):
                part = cased + part[len(prefix) :]
                break
        words.append(part[:1].upper() + part[1:])
    stride = describe_factor(downsample).replace("/", "_")
    return identifier("".join(words) + f"C{channels}S{stride}")


def default_features_name(backbone: str, after: Trace) -> str:
    """``resnet50`` with outputs at 1/8, 1/16, 1/32 -> ``ResNet50FeaturesS8S16S32``."""
    base = default_class_name(backbone, 0, (1, 1)).removesuffix("C0S1")
    strides = "".join("S" + describe_factor(o.downsample).replace("/", "_") for o in after.outputs)
    return identifier(f"{base}Features{strides}")


@dataclass(frozen=True)
class Emitted:
    source: str
    class_name: str
    import_reason: str = ""  # why the source backbone is imported, not bundled; "" if bundled
    imported: tuple[tuple[str, str], ...] = ()  # user modules imported, not bundled: why

    def __repr__(self) -> str:
        """``Emitted(class ResNet50C684S16, 112 lines)``: not the source itself."""
        return f"Emitted(class {self.class_name}, {self.source.count(chr(10))} lines)"


def _require_class_name(name: str) -> None:
    shown = f"'{as_source(name, Place.COMMENT)}'"
    if not name:
        raise SurgeryError(
            "{class_name} is empty; give a Python identifier", params=("class_name",)
        )
    normal = unicodedata.normalize("NFKC", name)
    if name.isidentifier() and normal != name:
        raise SurgeryError(
            f"{{class_name}} {shown} is not written as Python reads it: Python reads the name "
            f"as '{as_source(normal, Place.COMMENT)}'; use that spelling",
            params=("class_name",),
        )
    if not is_plain_name(name):
        raise SurgeryError(
            f"{{class_name}} {shown} is not a Python identifier", params=("class_name",)
        )


def emit(
    result: ApplyResult,
    *,
    class_name: str | None = None,
    dropin: bool = False,
    import_mode: bool = False,
    weights: tuple[str, str] | None = None,
    weights_source: WeightsSource | None = None,
) -> Emitted:
    """The source of a standalone module for a patched backbone, in memory; nothing is
    checked or written (:func:`~bbswap.codegen.export.export` does both).

    Args:
        result: What :func:`~bbswap.surgery.apply.apply_recipe` returned.
        class_name: The emitted class's name; default from the backbone and the target
            (``ResNet50C684S16``).
        dropin: Give the class a constructor that accepts and ignores any arguments.
        import_mode: Import the source backbone from its package instead of bundling it.
        weights: The weights file's name and SHA-256: the file records them and gains a
            loader that refuses any file of other bytes.
        weights_source: Where the source backbone's weights came from; the docstring
            records it.

    Returns:
        An :class:`Emitted`: the ``source`` text and the ``class_name``.

    Example::

        result = bbswap.apply_recipe("resnet50", bbswap.load_recipe("r.toml"))
        print(bbswap.emit(result, class_name="Backbone").source)
    """
    require_emittable(result.backbone)
    after = result.after
    name = class_name
    if name is None and result.recipe.taps:
        name = default_features_name(result.backbone.name, after)
    if name is None:
        name = default_class_name(result.backbone.name, after.output_shape[1], after.downsample)
    _require_class_name(name)
    imports = Imports()
    present = {type(m) for m in result.surgery.model.modules()}
    code = _source_code(
        result.backbone, imports, import_mode, present, result.before.input_shape[1]
    )
    body_source, builder, local = code.code, code.builder, set(code.local)
    patched = result.model
    per_size = _same_classes(patched, imports, local)
    helpers, wrappers = _edited_classes(result, patched, imports, local)
    several = bool(result.recipe.taps)
    if several:
        chain, size_method = outputs_size_code(result.after, [i.name for i in output_infos(result)])
    else:
        chain, size_method = output_size_code(result.after)
    loader = weights_code(name, *weights) if weights is not None else None
    root = _root_class(result, patched, name, builder, wrappers, imports, local, dropin, loader)
    root += "\n\n" + _indent(size_method, 4)
    if name in _defined_names(imports, local, wrappers) | (loader.names if loader else set()):
        raise SurgeryError(
            f"--class-name '{name}' is already a name in the emitted file (a bundled, "
            "generated or imported definition); choose another name"
        )
    if loader is not None:
        _claim_names(loader, imports, local, wrappers)
        root += "\n\n" + _indent(loader.method, 4)
    doc = _docstring(result, name, code, imports, dropin, weights, weights_source)
    parts = [body_source] if body_source else []
    parts += [*per_size, *helpers, *filter(None, [chain, loader.constants if loader else None])]
    text = "\n\n\n".join(p.strip("\n") for p in [*parts, root])
    # isort's rule, as ruff applies it: two blank lines after the imports before a
    # definition, one before any other statement (or comment)
    gap = "\n\n\n" if text.startswith(("class ", "def ", "async def ", "@")) else "\n\n"
    text = doc + "\n\n" + imports.render() + gap + text + "\n"
    return Emitted(text, name, code.reason, code.imported)


_OWN_NAMES = {"Step", "_CHAIN_H", "_CHAIN_W", "_through"}  # the output_size code may define them


def _defined_names(imports: Imports, local: set[str], wrappers: dict[str, str]) -> set[str]:
    """The top-level names the emitted file defines or imports, besides the patched class."""
    names = local | set(wrappers.values()) | _OWN_NAMES
    names |= {f"{table}_{i}" for table in ("_CHAIN_H", "_CHAIN_W") for i in range(64)}
    for line in imports.lines:
        names.update(imported_names(ast.parse(line).body[0]))
    return names


def _claim_names(
    loader: WeightsCode, imports: Imports, local: set[str], wrappers: dict[str, str]
) -> None:
    """Add the loader's imports, refusing a name the rest of the file already gives another
    meaning (the same import, made by the bundled code too, is no clash)."""
    taken = _defined_names(imports, local, wrappers)
    for taken_name in sorted(loader.names & taken):
        if IMPORTS.get(taken_name) not in imports.lines:
            raise SurgeryError(
                f"the emitted file's weights loader needs the top-level name {taken_name}, "
                "which the bundled code already defines"
            )
    for line in IMPORTS.values():
        imports.add(line)


# -- the source backbone ----------------------------------------------------------------------


@dataclass(frozen=True)
class _SourceCode:
    """The source backbone's part of an emitted file."""

    code: str  # the bundled definitions ("" when the backbone is imported)
    builder: str  # the call that builds the source backbone
    local: frozenset[str]  # the top-level names the bundled code defines
    note: str  # what the file bundles or imports, for the docstring
    reason: str = ""  # in --import mode, why the backbone is imported
    imported: tuple[tuple[str, str], ...] = ()  # user modules imported, not bundled: why


def _source_code(
    backbone: Backbone, imports: Imports, import_mode: bool, present: set[type], in_chans: int
) -> _SourceCode:
    """Bundled (or imported) code of the source backbone and of the objects its ``py:``
    arguments name: the code, the builder call, the names it defines, a note for the
    docstring and, in --import mode, why."""
    entry = _entry_module(backbone, import_mode)
    bundled = _bundle(backbone, imports, entry, present)
    args = _builder_args(backbone, in_chans, bundled, imports)
    call = f"{backbone.attr}({args})"
    imported = tuple(sorted(bundled.imported.items()))
    local = bundled.names
    code = "\n\n\n".join(bundled.sources)
    if backbone.kind == "tv":
        # torchvision's builders hang on its weights registry and presets: import them
        imports.add(f"from torchvision.models import {backbone.name}")
        tv_args = ", ".join(["weights=None", *filter(None, [args])])
        reason = "torchvision's builders depend on its weights registry, which is not bundled"
        note = f"imports {backbone.name} from torchvision.models (--import mode: {reason})"
        builder = f"{backbone.name}({tv_args})"
        return _SourceCode(code, builder, local | {backbone.name}, note, reason, imported)
    if backbone.kind == "timm":
        imports.add("import timm")
        timm_args = ", ".join([string(backbone.name), "pretrained=False", *filter(None, [args])])
        reason = "timm's model registry is not bundled"
        note = f"builds the model with timm.create_model (--import mode: {reason})"
        builder = f"timm.create_model({timm_args})"
        return _SourceCode(code, builder, local, note, reason, imported)
    if import_mode:
        origin = backbone.source
        imports.add(f"from {origin} import {backbone.attr}")
        note = f"imports {backbone.attr} from {origin} (--import mode)"
        reason = "--import given"
        return _SourceCode(code, call, local | {backbone.attr}, note, reason, imported)
    assert entry is not None  # a zoo, file or module backbone outside --import mode
    origins = [_origin(backbone, m) for m in bundled.modules]  # module names
    note = f"bundles {backbone.attr} and what it needs from {_join_words(origins)}"
    return _SourceCode(code, call, local, note, "", imported)


def _entry_module(backbone: Backbone, import_mode: bool) -> ModuleType | None:
    """The module whose definitions are bundled; None when the backbone is imported."""
    if backbone.kind in ("tv", "timm"):
        return None
    if import_mode:
        if backbone.kind != "module":
            raise InvalidArgument(
                f"--import needs a package.module:Name backbone; {backbone.spec} is "
                + ("a zoo model, always bundled" if backbone.kind == "zoo" else "a file path")
            )
        return None
    name = backbone.module or backbone.source
    module = sys.modules.get(name)
    return module if module is not None else importlib.import_module(name)


def _bundle(
    backbone: Backbone, imports: Imports, entry: ModuleType | None, present: set[type]
) -> Bundled:
    """The entry's definition and what it needs, the classes of the built model from the
    modules bundled, and the objects of the ``py:`` arguments that are the user's code."""

    def follow(module: ModuleType) -> bool:
        return (
            module is entry or is_user_module(module) or module.__name__.startswith("bbswap.zoo.")
        )

    wanted = [(entry, backbone.attr)] if entry is not None else []
    optional = []
    for cls in sorted(present, key=lambda c: (c.__module__, c.__qualname__)):
        module = sys.modules.get(cls.__module__)
        if module is not None and follow(module) and cls.__qualname__ == cls.__name__:
            optional.append((module, cls.__name__))
    for key, value in sorted(backbone.kwargs.items()):
        ref = backbone.objects.get(key)
        home = sys.modules.get(getattr(ref, "__module__", "") or "")
        name = getattr(ref, "__name__", None)
        top = isinstance(name, str) and getattr(ref, "__qualname__", None) == name
        if isinstance(value, PyRef) and home is not None and follow(home) and top:
            wanted.append((home, str(name)))
    return bundle_code(wanted, imports, follow, optional)


def _origin(backbone: Backbone, module: str) -> str:
    """How the docstring names a module bundled from: a file backbone's own by file name."""
    if backbone.kind == "file" and module == backbone.module:
        return backbone.source.replace("\\", "/").rsplit("/", 1)[-1]
    return module


def _join_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _builder_args(backbone: Backbone, in_chans: int, bundled: Bundled, imports: Imports) -> str:
    """The constructor arguments as source: literals, and the names of ``py:`` objects
    (bundled, or imported from where the argument named them)."""
    out = []
    for key, value in sorted(_build_kwargs(backbone, in_chans).items()):
        if isinstance(value, PyRef):
            obj = backbone.objects[key]
            text = bundled.name_of(obj) or _ref_source(value, bundled, imports)
        else:
            text = _safe_literal(key, value)
        if not is_plain_name(key):
            raise SurgeryError(f"constructor argument {key!r} is not a Python name")
        out.append(f"{key}={text}")
    return ", ".join(out)


def _ref_source(ref: PyRef, bundled: Bundled, imports: Imports) -> str:
    """``nn.BatchNorm2d`` for ``py:torch.nn.BatchNorm2d``; ``from pkg import Name`` and
    ``Name`` for another package's object."""
    parts = ref.path.split(".")
    used = next(i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in sys.modules)
    module, rest = ".".join(parts[:used]), parts[used:]
    short = {"torch": "torch", "torch.nn": "nn", "torch.nn.functional": "F"}.get(module)
    if short is not None:
        if short == "F":
            imports.add("import torch.nn.functional as F")
        return ".".join([short, *rest])
    if rest[0] in bundled.names:
        raise SurgeryError(
            f"the py: argument {ref} is named {rest[0]}, which the bundled code defines too"
        )
    imports.add(f"from {module} import {rest[0]}")
    return ".".join(rest)


def _build_kwargs(backbone: Backbone, in_chans: int) -> dict[str, Any]:
    """The source backbone's constructor arguments, ``in_chans`` those it was traced with
    (the input's, when no op changes them)."""
    kwargs = dict(backbone.kwargs)
    if backbone.takes_in_chans and "in_chans" not in kwargs:
        kwargs["in_chans"] = in_chans
    return kwargs


def _safe_literal(key: str, value: Any) -> str:
    """A constructor argument as source, only if it is a plain literal."""
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        same = False
    if not same:
        raise SurgeryError(f"constructor argument {key}={text[:40]} cannot be written as a literal")
    return text


def _same_classes(model: nn.Module, imports: Imports, local: set[str]) -> list[str]:
    """The classes of the modules an op made pad each input by its size, copied with what
    they use from :mod:`bbswap.surgery.same` (and those that put an NHWC map back in NCHW
    order, from :mod:`bbswap.surgery.layout`); their names join ``local``."""
    used = sorted({type(m).__name__ for m in model.modules() if type(m) in SAME_CLASSES.values()})
    orders = sorted({type(m).__name__ for m in model.modules() if type(m) in LAYOUT_CLASSES})
    if not used and not orders:
        return []
    wanted = [(same, name) for name in used] + [(layout, name) for name in orders]
    b = bundle_code(wanted, imports, lambda module: module in (same, layout))
    clash = sorted(b.names & local)
    if clash:
        raise SurgeryError(
            f"the emitted file needs the top-level name {clash[0]} for its padding per input "
            "size, which the bundled code already defines"
        )
    local |= b.names
    return list(b.sources)


# -- rewritten forwards -----------------------------------------------------------------------


def _edited_classes(
    result: ApplyResult, patched: nn.Module, imports: Imports, local: set[str]
) -> tuple[list[str], dict[str, str]]:
    """One class per distinct rewritten forward (the model's own excepted); returns the
    class sources and, per owner path, the class that wraps it."""
    by_code: dict[str, str] = {}
    sources: list[str] = []
    wrappers: dict[str, str] = {}
    owners = sorted(
        (o for o in result.surgery.rewrites if o and _present(patched, o)),
        key=lambda p: (-p.count("."), p),
    )
    for owner in owners:
        gm = module_at(patched, owner)
        if not isinstance(gm, fx.GraphModule):
            raise SurgeryError(f"{owner} was not rewritten")  # a bug: finish() makes them
        rw = result.surgery.rewrites[owner]
        comments = _comments(gm.graph, rw)
        forward = forward_source(gm.graph, imports, local, comments, gm)
        adopt = _adopt_lines(gm, "base")
        key = forward + "\n".join(adopt)
        if key not in by_code:
            base = type(module_at(result.surgery.model, owner)).__name__
            what = "Dropout" if all(_is_dropout(gm, n) for n, _ in rw.append) and rw.append else ""
            cls = _unique(f"{base}{what or 'Edited'}", set(by_code.values()) | local)
            by_code[key] = cls
            ops = sorted({e.op_index for e in rw.calls} | {i for _, i in rw.append})
            doc = _doc_line(f"{base} with its forward rewritten by recipe op(s) {_join(ops)}.")
            sources.append(_class_source(cls, doc, "base: nn.Module", adopt, forward))
        wrappers[owner] = by_code[key]
    return sources, wrappers


def _comments(graph: fx.Graph, rw: OwnerRewrite) -> dict[str, str]:
    """Node name -> the recipe op that made or edited it, for the forward's comments."""
    notes = {name: f"op {i}" for name, i in rw.append}
    for edit in rw.calls:
        calls = [
            n for n in graph.nodes if n.op == "call_function" and fx_name(n.target) == edit.func
        ]
        if edit.call < len(calls):
            notes[calls[edit.call].name] = f"op {edit.op_index}: {', '.join(edit.values)} edited"
    return notes


def _present(model: nn.Module, path: str) -> bool:
    """Whether ``path`` is still in the patched model (a truncate op drops what follows)."""
    try:
        module_at(model, path)
    except AttributeError:
        return False
    return True


def _is_dropout(gm: nn.Module, name: str) -> bool:
    return isinstance(getattr(gm, name, None), nn.Dropout)


def _join(items: list[int]) -> str:
    return ", ".join(str(i) for i in items)


def _unique(name: str, taken: set[str]) -> str:
    out, n = name, 2
    while out in taken:
        out = f"{name}{n}"
        n += 1
    return out


def _adopt_lines(module: nn.Module, base: str) -> list[str]:
    lines = []
    for name in module._modules:
        lines.append(
            _assign(
                "self",
                name,
                f"{base}.{name}" if is_plain_name(name) else f"getattr({base}, {string(name)})",
            )
        )
    for name, _ in module.named_parameters(recurse=False):
        lines.append(_assign_attr("self", name, _get_attr(base, name)))
    for name, _ in module.named_buffers(recurse=False):
        lines.append(_buffer_line(module, name, base))
    return lines


def _buffer_line(module: nn.Module, name: str, base: str) -> str:
    """Re-register a buffer of ``base``, keeping it out of the state_dict if it was."""
    kept = name not in module._non_persistent_buffers_set
    extra = "" if kept else ", persistent=False"
    return f"self.register_buffer({string(name)}, {_get_attr(base, name)}{extra})"


def _assign(obj: str, name: str, value: str) -> str:
    if is_plain_name(name):
        return f"{obj}.{name} = {value}"
    return f"{obj}.add_module({string(name)}, {value})"


def _get_attr(obj: str, name: str) -> str:
    return f"{obj}.{name}" if is_plain_name(name) else f"getattr({obj}, {string(name)})"


def _assign_attr(obj: str, name: str, value: str) -> str:
    if is_plain_name(name):
        return f"{obj}.{name} = {value}"
    return f"setattr({obj}, {string(name)}, {value})"


def _doc_line(text: str) -> str:
    """A one-line docstring holding ``text`` as data."""
    return f'"""{as_source(text, Place.DOCSTRING)}"""'


def _class_doc(head: str, tail: str, indent: int = 4, more: tuple[str, ...] = ()) -> str:
    """A docstring of ``head`` and ``tail``: on one line when it fits in 100 columns, else
    ``tail`` on a second line; ``more`` lines, if any, follow as a paragraph. Outside text
    is never wrapped: it is data, kept whole."""
    one = f"{head} {tail}"
    if not more and indent + len(as_source(one, Place.DOCSTRING)) + 6 <= 100:
        return _doc_line(one)
    pad = " " * indent
    lines = [head, tail, *(["", *more] if more else [])]
    text = "\n".join(pad + as_source(line, Place.DOCSTRING) if line else "" for line in lines)
    return f'"""{text[indent:]}\n{pad}"""'


def _class_source(name: str, doc: str, init_args: str, init_body: list[str], forward: str) -> str:
    init = "\n".join(wrap(line, 8) for line in ["super().__init__()", *init_body])
    return (
        f"class {name}(nn.Module):\n"
        f"    {doc}\n\n"
        f"    def __init__(self, {init_args}) -> None:\n" + init + "\n\n" + _indent(forward, 4)
    )


def _indent(text: str, n: int) -> str:
    pad = " " * n
    return "\n".join(pad + line if line else line for line in text.splitlines())


# -- the patched class --------------------------------------------------------------------------


def _path_expr(model: nn.Module, base: str, path: str) -> str:
    """Source that reaches ``path`` from ``base`` (indexing Sequential and ModuleList).
    The file's ``body`` is what its builder returns: for an :class:`IntermediatesGrid`,
    the timm model the grid holds."""
    if isinstance(model, IntermediatesGrid) and path.split(".")[0] == MODEL:
        model, path = model.body, path[len(MODEL) + 1 :]
    out, module = base, model
    for part in path.split(".") if path else []:
        indexable = isinstance(module, (nn.Sequential, nn.ModuleList))
        out = f"{out}[{part}]" if part.isdigit() and indexable else _get_attr(out, part)
        module = module._modules[part]  # type: ignore[assignment]  # present by construction
    return out


def _set_expr(model: nn.Module, base: str, path: str, value: str) -> str:
    parent = module_at(model, parent_path(path))
    name = child_name(path)
    target = _path_expr(model, base, parent_path(path))
    if name.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
        return f"{target}[{name}] = {value}"
    return _assign_attr(target, name, value)


@dataclass
class _OpLines:
    """What the patched class's ``__init__`` says about one recipe op, by where it goes."""

    header: str  # "op 1: stride (at='layer4', ...)"
    statements: list[tuple[str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # edits inside a rewritten forward
    dropped: list[str] = field(default_factory=list)  # what a truncation leaves out
    appended: list[str] = field(default_factory=list)  # new top-level modules

    # a statement is (kind, path, attribute, value source); kind "attr" sets an attribute,
    # "module" puts a module at ``path``, "raw" is the line itself (in ``value``)


def _plan(result: ApplyResult) -> dict[int, _OpLines]:
    """Every recipe op's lines, each edit in its place; a value set again later is kept
    only where it is set last (a module put at a path also ends what came before there)."""
    new = result.surgery.new_modules
    plan = {
        i: _OpLines(f"op {i}: {op.op} " + _op_summary(op.params))
        for i, op in enumerate(result.recipe.ops)
    }
    by_op: dict[int, list[Edit]] = {}
    for e in result.edits:
        by_op.setdefault(e.op_index, []).append(e)
    for index, edits in by_op.items():
        lines, op = plan[index], result.recipe.ops[index]
        if isinstance(op, Dropout):
            model = result.surgery.model
            lines.statements += [("raw", "", "", t) for t in _dropout_loop(op, edits, model, new)]
            continue
        for e in edits:
            if e.kind is EditKind.REMOVE:
                lines.dropped.append(e.path)
            elif e.path in new and "." not in e.path and e.kind is EditKind.APPEND:
                lines.appended.append(e.path)  # built where the children are adopted
            elif e.path in new and e.kind is not EditKind.SET:
                _supersede(plan, e.path, "")
                lines.statements.append(("module", e.path, "", new[e.path]))
            elif e.kind is EditKind.CALL:
                change = f"{e.attribute} {e.old} -> {e.new}"
                if lines.notes and lines.notes[-1].startswith(e.path + ": "):
                    lines.notes[-1] += f", {change}"  # another argument of the same call
                else:
                    lines.notes.append(f"{e.path}: {change}")
            else:
                _supersede(plan, e.path, e.attribute)
                lines.statements.append(("attr", e.path, e.attribute, literal(e.value, Imports())))
    return plan


def _supersede(plan: dict[int, _OpLines], path: str, attribute: str) -> None:
    """Drop the earlier statements a new one at ``path`` makes pointless."""
    for lines in plan.values():
        lines.statements = [
            st
            for st in lines.statements
            if st[0] == "raw"
            or not (
                (st[1] == path and st[2] == attribute)
                or (not attribute and (st[1] == path or st[1].startswith(path + ".")))
            )
        ]


def _edit_lines(
    result: ApplyResult, plan: dict[int, _OpLines], wrappers: dict[str, str], shown: set[int]
) -> list[str]:
    """The statements that turn the source backbone into the patched one; ``shown``
    collects the ops whose full header has been written."""
    model = result.surgery.model  # has every edit's path, with the names they got
    lines: list[str] = []
    for index, op in plan.items():
        if op.statements or (op.notes and not wrappers):
            lines += _comments_for(_head(op, index, shown))
            lines += _statement_lines(model, op.statements)
            lines += [_comment(f"{note} (in the forward)") for note in op.notes if not wrappers]
        elif result.recipe.ops[index].op_kind == OpKind.TAP:
            continue  # the forward returns its module's output: no statement here
        elif not (op.notes or op.dropped or op.appended):
            lines += _comments_for(f"{_head(op, index, shown)}: nothing left to change")
    if wrappers:
        lines.append("# blocks whose forward the recipe rewrote")
        for index, op in plan.items():
            if op.notes:
                lines += _comments_for(f"{_head(op, index, shown)}, in the forward:")
                lines += [line for note in op.notes for line in _comments_for(note)]
        lines += _wrapper_lines(model, wrappers)
    return lines


def _wrapper_lines(model: nn.Module, wrappers: dict[str, str]) -> list[str]:
    """``body.x = Cls(body.x)`` per rewritten block; three or more consecutive blocks of
    one Sequential wrapped by the same class as a loop over their indices."""
    runs: list[tuple[str, str, list[int]]] = []  # (container or owner, class, indices)
    for owner, cls in wrappers.items():
        where = _split_at_index(model, owner)
        if where and not where[2]:
            container, index = where[0], where[1]
            last = runs[-1] if runs else None
            if last and last[:2] == (container, cls) and last[2] and last[2][-1] + 1 == index:
                last[2].append(index)
                continue
            runs.append((container, cls, [index]))
        else:
            runs.append((owner, cls, []))
    lines = []
    for path, cls, indices in runs:
        if len(indices) >= 3:
            seq = _path_expr(model, "body", path)
            end = len(cast("nn.Sequential", module_at(model, path)))
            stop = f"len({seq})" if indices[-1] + 1 == end else str(indices[-1] + 1)
            lines += [f"for i in range({indices[0]}, {stop}):", f"    {seq}[i] = {cls}({seq}[i])"]
            continue
        for owner in [f"{path}.{i}" if path else str(i) for i in indices] or [path]:
            value = f"{cls}({_path_expr(model, 'body', owner)})"
            lines.append(_set_expr(model, "body", owner, value))
    return lines


def _head(op: _OpLines, index: int, shown: set[int]) -> str:
    """The op's full header the first time, ``op N`` after that."""
    if index in shown:
        return f"op {index}"
    shown.add(index)
    return op.header


def _comments_for(text: str, width: int = 90) -> list[str]:
    """``text`` as comment lines of at most ``width`` characters after the ``# ``."""
    body = as_source(text, Place.COMMENT)
    return [
        "# " + line
        for line in textwrap.wrap(body, width, break_on_hyphens=False, break_long_words=False)
    ]


def _split_at_index(model: nn.Module, path: str) -> tuple[str, int, str] | None:
    """``layer3.4.conv2`` -> (``layer3``, 4, ``conv2``): the first indexable step."""
    parts = path.split(".")
    module = model
    for i, part in enumerate(parts):
        if part.isdigit() and isinstance(module, (nn.Sequential, nn.ModuleList)):
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1 :])
        module = module._modules[part]  # type: ignore[assignment]  # present by construction
    return None


def _statement_lines(model: nn.Module, statements: list[tuple[str, str, str, str]]) -> list[str]:
    """The statements as source; a run of three or more consecutive blocks of one
    Sequential that get the very same settings becomes a loop over a slice of it."""
    groups: list[tuple[tuple[str, int] | None, list[tuple[str, str, str, str]]]] = []
    for st in statements:
        where = _split_at_index(model, st[1]) if st[0] != "raw" else None
        key = (where[0], where[1]) if where and where[2] else None
        if key is not None and groups and groups[-1][0] == key:
            groups[-1][1].append(st)
        else:
            groups.append((key, [st]))
    lines: list[str] = []
    i = 0
    while i < len(groups):
        j = i + 1
        while j < len(groups) and _same_settings(model, groups[j - 1], groups[j]):
            j += 1
        if j - i >= 3:
            lines += _loop(model, groups[i:j])
        else:
            lines += [_statement(model, st) for _, sts in groups[i:j] for st in sts]
        i = j
    return lines


def _relative(model: nn.Module, key: tuple[str, int], st: tuple[str, str, str, str]) -> tuple:
    prefix = f"{key[0]}.{key[1]}." if key[0] else f"{key[1]}."
    return (st[0], st[1][len(prefix) :], st[2], st[3])


def _same_settings(model: nn.Module, a: tuple, b: tuple) -> bool:
    (ka, sa), (kb, sb) = a, b
    if ka is None or kb is None or ka[0] != kb[0] or kb[1] != ka[1] + 1:
        return False
    return [_relative(model, ka, x) for x in sa] == [_relative(model, kb, x) for x in sb]


def _loop(model: nn.Module, groups: list[tuple]) -> list[str]:
    (container, first), last = groups[0][0], groups[-1][0][1]
    seq = cast("nn.Sequential", module_at(model, container))  # indexable: _split_at_index
    end = "" if last + 1 == len(seq) else str(last + 1)
    block = seq[first]
    lines = [f"for block in {_path_expr(model, 'body', container)}[{first}:{end}]:"]
    for kind, rest, attr, value in (_relative(model, groups[0][0], x) for x in groups[0][1]):
        if kind == "attr":
            lines.append("    " + _assign_attr(_path_expr(block, "block", rest), attr, value))
        else:
            lines.append("    " + _set_expr(block, "block", rest, value))
    return lines


def _statement(model: nn.Module, st: tuple[str, str, str, str]) -> str:
    kind, path, attr, value = st
    if kind == "raw":
        return value
    if kind == "module":
        return _set_expr(model, "body", path, value)
    return _assign_attr(_path_expr(model, "body", path), attr, value)


def _dropout_loop(
    op: Dropout, edits: list[Edit], model: nn.Module, new: dict[str, str]
) -> list[str]:
    """``block.dropout = nn.Dropout(p)`` for every block of the op's class, as a loop."""
    names = {child_name(e.path) for e in edits}
    if len(names) != 1:  # a block already had a 'dropout' attribute: spell each one out
        return [_set_expr(model, "body", e.path, new[e.path]) for e in edits]
    cls = op.block
    # the op leaves the model itself out, even when it is of that class (a root Sequential)
    blocks = "body.modules()" if type(model).__name__ != cls else "list(body.modules())[1:]"
    return [
        f"for block in [m for m in {blocks} if type(m).__name__ == {string(cls)}]:",
        "    " + _assign_attr("block", names.pop(), new[edits[0].path]),
    ]


def _comment(text: str) -> str:
    return "# " + as_source(text, Place.COMMENT)


def _op_summary(params: Any) -> str:
    shown = {k: v for k, v in params.items() if v is not None}
    text = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v!r}" for k, v in shown.items())
    return f"({text})"


def _root_class(
    result: ApplyResult,
    patched: nn.Module,
    name: str,
    builder: str,
    wrappers: dict[str, str],
    imports: Imports,
    local: set[str],
    dropin: bool,
    loader: WeightsCode | None = None,
) -> str:
    rw = result.surgery.rewrites.get("")
    if isinstance(patched, fx.GraphModule) and rw is not None:
        graph = patched.graph
        comments = _comments(graph, rw)
    else:
        graph = _trace_root(patched)
        comments = {}
    forward = forward_source(graph, imports, local, comments, patched)
    plan, shown = _plan(result), set[int]()
    body = [
        f"body = {builder}",
        *_edit_lines(result, plan, wrappers, shown),
        *_adopt_root(result, patched, plan, shown),
    ]
    if dropin:
        init_args = ", *args: Any, **kwargs: Any"
        imports.add("from typing import Any")
        body.insert(0, "del args, kwargs  # a drop-in: the host's own arguments are ignored")
    else:
        init_args = ""
    rules = result.after.size_rules()
    head = (
        f"{result.after.output_shape[1]} channels at 1/{describe_factor(result.after.downsample)};"
    )
    tail = f"{rules[0].format('H')}, {rules[1].format('W')}."
    contract: list[str] = []
    more = loader.class_doc if loader else ()
    if result.recipe.taps:
        infos = output_infos(result)
        tail, each = outputs_head(result.surgery.rewrite("").returns, infos)
        head = ""
        more = (*each, *(("", *more) if more else ()))
        contract = feature_info_lines(infos)
    doc = _class_doc(
        f"{result.backbone.spec} patched by recipe {result.recipe.name}: {head}".rstrip(),
        tail,
        more=more,
    )
    init = "\n".join(_wrap_nested(line, 8) for line in ["super().__init__()", *body])
    return (
        f"class {name}(nn.Module):\n"
        f"    {doc}\n\n"
        + "".join(f"    {line}\n" for line in contract)
        + ("\n" if contract else "")
        + f"    def __init__(self{init_args}) -> None:\n"
        + init
        + "\n\n"
        + _indent(forward, 4)
    )


def _adopt_root(
    result: ApplyResult, patched: nn.Module, plan: dict[int, _OpLines], shown: set[int]
) -> list[str]:
    """The patched model's own children, parameters and buffers, taken from ``body``; a
    truncation is noted here, an appended module under its op's comment."""
    lines = ["# the source backbone's modules, under their own names (state_dict keys)"]
    lines += _comments_for(_output_note(result, patched, plan))
    for index, op in plan.items():
        if op.dropped:
            after = result.recipe.ops[index]["after"]  # a truncate op's field
            text = f"the forward stops after {after}; dropped: {', '.join(op.dropped)}"
            lines += _comments_for(f"{_head(op, index, shown)}: {text}")
    new = result.surgery.new_modules
    made_by = {path: index for index, op in plan.items() for path in op.appended}
    started: set[int] = set()
    body = result.surgery.model._modules  # what the source backbone (and the ops) hold
    for child in patched._modules:
        if child in made_by and child in new:
            index = made_by[child]
            if index not in started:  # the op's first module
                started.add(index)
                lines += _comments_for(_head(plan[index], index, shown))
            lines.append(_assign("self", child, new[child]))
        elif result.outputs is not None and child in new and child not in body:  # another output's
            lines += _comments_for(projection_comment(result.outputs, child))
            lines.append(_assign("self", child, new[child]))
        elif isinstance(result.surgery.model, IntermediatesGrid) and child == MODEL:
            # the whole timm model, whose forward_intermediates the forward calls
            lines += [IntermediatesGrid.prune_line("body"), _assign("self", child, "body")]
        else:
            lines.append(_assign("self", child, _kept(patched, body, child)))
    for pname, _ in patched.named_parameters(recurse=False):
        lines.append(_assign_attr("self", pname, _get_attr("body", pname)))
    for bname, _ in patched.named_buffers(recurse=False):
        lines.append(_buffer_line(patched, bname, "body"))
    return lines


def _kept(patched: nn.Module, body: dict[str, nn.Module | None], child: str) -> str:
    """The expression of a child taken from ``body``: a ModuleList (or a Sequential looped
    over) cut after its first k blocks (the forward that loops over it stops there) is
    ``body.blocks[:k]``, which keeps the blocks' names and so their state_dict keys."""
    whole, kept = body.get(child), patched._modules[child]
    source = _get_attr("body", child)
    lists = (nn.ModuleList, nn.Sequential)
    # fx holds a container it copies as a plain Module of the children the graph calls
    if not isinstance(whole, lists) or kept is None or isinstance(kept, lists):
        return source
    names = list(kept._modules)
    if len(names) < len(whole) and names == [str(i) for i in range(len(names))]:
        return f"{source}[:{len(names)}]"
    return source


def _output_note(result: ApplyResult, patched: nn.Module, plan: dict[int, _OpLines]) -> str:
    """Which output of a source that returns several this class returns, and the source's
    modules that only the others needed; "" for a source that returns one tensor."""
    before = result.before
    if before.output_key is None:
        return ""
    dropped = {path for op in plan.values() for path in op.dropped}
    unused = [
        c for c in result.surgery.model._modules if c not in patched._modules and c not in dropped
    ]
    note = (
        f"the source's forward returns a {before.returns} of {len(before.outputs)}; this "
        f"class returns its output {before.output_key!r} alone"
    )
    return note + (f", so it no longer runs {', '.join(unused)}" if unused else "")


def _wrap_nested(line: str, indent: int) -> str:
    """``wrap`` for a line that may carry its own indentation (a loop's body)."""
    code = line.lstrip(" ")
    return wrap(code, indent + len(line) - len(code))


def _trace_root(model: nn.Module) -> fx.Graph:
    try:
        return trace_children_as_leaves(model)
    except SurgeryError:
        raise
    except Exception as error:  # fx raises many kinds of errors on dynamic code
        raise SurgeryError(
            f"cannot write the forward of {type(model).__name__}: not traceable with torch.fx "
            f"({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error


# -- the docstring ------------------------------------------------------------------------------


def _needs(imports: Imports) -> str:
    """What the file imports besides torch and the standard library, read off its imports."""
    tops = {line.split()[1].split(".")[0] for line in imports.lines}
    others = sorted(t for t in tops if t != "torch" and t not in sys.stdlib_module_names)
    return f"needs torch and {_join_words(others)}" if others else "needs only torch"


def _size_rule_lines(rule: str, name: str) -> list[str]:
    """The size rule and where it is computed; on two lines when one does not fit."""
    head, tail = f"Size rule:       {rule}", f"({name}.output_size(h, w) computes it exactly)"
    if len(head) + 1 + len(tail) <= 100:
        return [f"{head} {tail}"]
    return [head, " " * 17 + tail]


def _generated_by(imports: Imports, note: str) -> list[str]:
    """The line on what made the file and what it needs; too long, it breaks before what
    the file bundles (which stays in one piece when it fits a line) or at the spaces of
    an import's note."""
    line = f"Generated by bbswap {__version__}; {_needs(imports)}. This file {note}."
    if len(line) <= 100:
        return [line]
    if note.startswith("bundles ") and len(note) < 100:
        return [line[: -len(note) - 2], note + "."]
    # an imported source: the note is this module's own words around a module name
    return textwrap.wrap(line, 100, break_long_words=False, break_on_hyphens=False)


def _grid_lines(source: nn.Module) -> list[str]:
    """What the file does with a ViT's tokens, for a ViT laid on its grid."""
    layout = grid_of(source)
    note = layout.note if layout is not None else grid_note(source)
    if note is None:
        return []
    text = f"Token grid:      {note}"
    return textwrap.wrap(text, 100, subsequent_indent=" " * 17, break_on_hyphens=False)


def _imported_lines(imported: tuple[tuple[str, str], ...]) -> list[str]:
    """The user's modules the file imports, not bundled, each with the reason."""
    lines = []
    for i, (module, why) in enumerate(imported):
        head = "Imports:         " if i == 0 else " " * 17
        text = f"{head}{module} (not bundled: {why}); it must be importable"
        lines += textwrap.wrap(text, 100, subsequent_indent=" " * 19, break_long_words=False)
    return lines


def _weights_lines(name: str, weights: tuple[str, str]) -> list[str]:
    """Where the weights are and what loads them; on two lines when one does not fit."""
    head = f"Weights:         {weights[0]}, beside this file (SHA-256 checked);"
    tail = f"{name}.{LOADER}() loads them."
    return [f"{head} {tail}"] if len(head) + 1 + len(tail) <= 100 else [head, " " * 17 + tail]


def _source_lines(source: WeightsSource) -> list[str]:
    """Where the source backbone's weights came from: what chose them, the file read
    (alone on its line, however long) and its SHA-256."""
    lines = [f"Weights from:    {source.origin}"]
    if source.path is not None:
        lines.append(" " * 17 + str(source.path))
    if source.sha256 is not None:
        lines.append(" " * 17 + f"(SHA-256 {source.sha256})")
    return lines


def _source_output_lines(before: Trace) -> list[str]:
    """The output of a source that returns several tensors that the file is made from."""
    if before.output_key is None:
        return []
    keys = ", ".join(repr(o.key) for o in before.outputs)
    return [
        f"Source output:   {before.output_key!r} of the {before.returns} its forward returns "
        f"({keys})"
    ]


def _docstring(
    result: ApplyResult,
    name: str,
    code: _SourceCode,
    imports: Imports,
    dropin: bool,
    weights: tuple[str, str] | None = None,
    source: WeightsSource | None = None,
) -> str:
    t, before = result.after, result.before
    rules = t.size_rules()
    recipe_text = recipe_to_toml(result.recipe).rstrip()
    contract = [
        f"Downsample:      {describe_factor(t.downsample)}",
        *_size_rule_lines(f"{rules[0].format('H')}, {rules[1].format('W')}", name),
    ]
    output = f"output {shape(t.output_shape)}"
    if result.recipe.taps:
        returns = result.surgery.rewrite("").returns
        contract = docstring_lines(returns, output_infos(result), name)
        output = f"{len(t.outputs)} outputs"
    lines = [
        f"{name}: {result.backbone.spec} after backbone surgery (recipe {result.recipe.name}).",
        "",
        *_generated_by(imports, code.note),
        "",
        f"Source backbone: {result.backbone.spec}",
        *_grid_lines(result.surgery.model),
        *_imported_lines(code.imported),
        f"Traced input:    {shape(t.input_shape)} -> {output} "
        f"(the source gave {shape(before.output_shape)} for {shape(before.input_shape)})",
        *_source_output_lines(before),
        *(outputs_lines(result.outputs, name) if result.outputs is not None else []),
        *contract,
        f"Params:          {count(t.params)}",
        f"MACs:            {count(t.macs)} at the traced input",
    ]
    if dropin:
        head = f"Drop-in:         {name}(*args, **kwargs) ignores its arguments,"
        tail = "so it can replace the host's class."
        fits = len(head) + 1 + len(tail) <= 100
        lines += [f"{head} {tail}"] if fits else [head, " " * 17 + tail]
    if source is not None:
        lines += _source_lines(source)
    if weights is not None:
        lines += _weights_lines(name, weights)
    prose = "\n".join(lines)
    # the recipe flush left, as its file is written: it can be copied out as it is
    body = "\n".join(line.rstrip() for line in [prose, "", "Recipe:", "", recipe_text])
    return f'"""{as_source(body + chr(10), Place.DOCSTRING)}"""'
