"""Write a patched backbone as one standalone, readable Python file.

The file holds, in order: a docstring stating its contract (source backbone, the
recipe in full, traced shapes, params, MACs, size rule); the imports; the source
backbone's code, bundled from the file that defines it (only the definitions it
needs); one class per rewritten forward; and the patched class, whose ``__init__``
builds the source backbone and applies every edit as an explicit statement with a
comment naming its recipe op, and whose ``forward`` is one statement per call.
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from bbswap import __version__
from bbswap.backbones.registry import Backbone
from bbswap.codegen.size_code import output_size_code
from bbswap.codegen.source import (
    Imports,
    bundle,
    file_source,
    forward_source,
    identifier,
    imported_names,
    literal,
    module_source,
    string,
    wrap,
)
from bbswap.codegen.text import Place, as_source, is_plain_name
from bbswap.errors import InvalidArgument, SurgeryError
from bbswap.recipes.schema import recipe_to_toml
from bbswap.surgery.apply import ApplyResult
from bbswap.surgery.core import (
    Edit,
    OwnerRewrite,
    child_name,
    fx_name,
    module_at,
    parent_path,
    trace_children_as_leaves,
)
from bbswap.tracing.tracer import describe_factor

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


@dataclass(frozen=True)
class Emitted:
    source: str
    class_name: str
    import_reason: str = ""  # why the source backbone is imported, not bundled; "" if bundled


def emit(
    result: ApplyResult,
    *,
    class_name: str | None = None,
    dropin: bool = False,
    import_mode: bool = False,
) -> Emitted:
    """The source of a standalone module for a patched backbone."""
    after = result.after
    name = class_name or default_class_name(
        result.backbone.name, after.output_shape[1], after.downsample
    )
    if not is_plain_name(name):
        raise SurgeryError(f"--class-name '{name}' is not a Python identifier")
    imports = Imports()
    body_source, builder, local, note, reason = _source_code(result.backbone, imports, import_mode)
    patched = result.model
    helpers, wrappers = _edited_classes(result, patched, imports, local)
    chain, size_method = output_size_code(result.after)
    root = _root_class(result, patched, name, builder, wrappers, imports, local, dropin)
    root += "\n\n" + _indent(size_method, 4)
    if name in _defined_names(imports, local, wrappers):
        raise SurgeryError(
            f"--class-name '{name}' is already a name in the emitted file (a bundled, "
            "generated or imported definition); choose another name"
        )
    doc = _docstring(result, name, note, dropin)
    parts = [body_source] if body_source else []
    parts += [*helpers, *filter(None, [chain]), root]
    code = "\n\n\n".join(p.strip("\n") for p in parts)
    # isort's rule, as ruff applies it: two blank lines after the imports before a
    # definition, one before any other statement (or comment)
    gap = "\n\n\n" if code.startswith(("class ", "def ", "async def ", "@")) else "\n\n"
    text = doc + "\n\n" + imports.render() + gap + code + "\n"
    return Emitted(text, name, reason)


_OWN_NAMES = {"Step", "_CHAIN_H", "_CHAIN_W", "_through"}  # the output_size code may define them


def _defined_names(imports: Imports, local: set[str], wrappers: dict[str, str]) -> set[str]:
    """The top-level names the emitted file defines or imports, besides the patched class."""
    names = local | set(wrappers.values()) | _OWN_NAMES
    for line in imports.lines:
        names.update(imported_names(ast.parse(line).body[0]))
    return names


# -- the source backbone ----------------------------------------------------------------------


def _source_code(
    backbone: Backbone, imports: Imports, import_mode: bool
) -> tuple[str, str, set[str], str, str]:
    """Bundled (or imported) code of the source backbone; returns the code, the builder
    call, the names it defines, a note for the docstring and, in --import mode, why."""
    args = ", ".join(
        f"{k}={_safe_literal(k, v)}" for k, v in sorted(_build_kwargs(backbone).items())
    )
    call = f"{backbone.attr}({args})"
    if backbone.kind == "tv":
        # torchvision's builders hang on its weights registry and presets: import them
        imports.add(f"from torchvision.models import {backbone.name}")
        tv_args = ", ".join(["weights=None", *filter(None, [args])])
        reason = "torchvision's builders depend on its weights registry, which is not bundled"
        note = f"imports {backbone.name} from torchvision.models (--import mode: {reason})"
        return "", f"{backbone.name}({tv_args})", {backbone.name}, note, reason
    if backbone.kind == "timm":
        imports.add("import timm")
        timm_args = ", ".join([string(backbone.name), "pretrained=False", *filter(None, [args])])
        reason = "timm's model registry is not bundled"
        note = f"builds the model with timm.create_model (--import mode: {reason})"
        return "", f"timm.create_model({timm_args})", set(), note, reason
    if import_mode:
        if backbone.kind != "module":
            raise InvalidArgument(
                f"--import needs a package.module:Name backbone; {backbone.spec} is "
                + ("a zoo model, always bundled" if backbone.kind == "zoo" else "a file path")
            )
        origin = backbone.source
        imports.add(f"from {origin} import {backbone.attr}")
        note = f"imports {backbone.attr} from {origin} (--import mode)"
        return "", call, {backbone.attr}, note, "--import given"
    if backbone.kind == "file":
        text, origin = file_source(backbone.source), backbone.source.replace("\\", "/")
        origin = origin.rsplit("/", 1)[-1]
    else:
        text, origin = module_source(importlib.import_module(backbone.source)), backbone.source
    b = bundle(text, [backbone.attr], origin, imports)
    note = f"bundles {backbone.attr} and what it needs from {origin}"
    return "\n\n\n".join(b.sources), call, b.names, note, ""


def _build_kwargs(backbone: Backbone) -> dict[str, Any]:
    kwargs = dict(backbone.kwargs)
    if backbone.takes_in_chans and "in_chans" not in kwargs and backbone.in_chans is not None:
        kwargs["in_chans"] = backbone.in_chans
    return kwargs


def _safe_literal(key: str, value: Any) -> str:
    """A constructor argument as source, only if it is a plain literal."""
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        same = False
    if not same or not is_plain_name(key):
        raise SurgeryError(f"constructor argument {key}={text[:40]} cannot be written as a literal")
    return text


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
    """Source that reaches ``path`` from ``base`` (indexing Sequential and ModuleList)."""
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


def _edit_lines(result: ApplyResult, wrappers: dict[str, str]) -> list[str]:
    """The statements that turn the source backbone into the patched one."""
    model = result.surgery.model  # has every edit's path, with the names they got
    lines: list[str] = []
    by_op: dict[int, list[Edit]] = {}
    for e in result.edits:
        by_op.setdefault(e.op_index, []).append(e)
    for index, edits in by_op.items():
        op = result.recipe.ops[index]
        lines.append(_comment(f"op {index}: {op.op} " + _op_summary(op.params)))
        removed = [e.path for e in edits if e.attribute == "(removed)"]
        if op.op == "dropout":
            lines += _dropout_loop(op, edits, model, result.surgery.new_modules)
            continue
        for e in edits:
            if e.attribute == "(removed)":
                continue
            if (
                e.path in result.surgery.new_modules
                and "." not in e.path
                and e.attribute == "(appended)"
            ):
                continue  # a new top-level module: built where the children are adopted
            if e.path in result.surgery.new_modules:
                lines.append(_set_expr(model, "body", e.path, result.surgery.new_modules[e.path]))
            elif e.path.endswith(")") or ")#" in e.path:
                lines.append(
                    _comment(f"{e.path}: {e.attribute} {e.old} -> {e.new} (in the forward)")
                )
            else:
                target = _path_expr(model, "body", e.path)
                lines.append(_assign_attr(target, e.attribute, literal(e.value, Imports())))
        if removed:
            lines.append(
                _comment(f"the forward stops after {op['after']}; dropped: {', '.join(removed)}")
            )
    if wrappers:
        lines.append("# blocks whose forward the recipe rewrote")
        for owner, cls in wrappers.items():
            lines.append(
                _set_expr(model, "body", owner, f"{cls}({_path_expr(model, 'body', owner)})")
            )
    return lines


def _dropout_loop(op: Any, edits: list[Edit], model: nn.Module, new: dict[str, str]) -> list[str]:
    """``block.dropout = nn.Dropout(p)`` for every block of the op's class, as a loop."""
    names = {child_name(e.path) for e in edits}
    if len(names) != 1:  # a block already had a 'dropout' attribute: spell each one out
        return [_set_expr(model, "body", e.path, new[e.path]) for e in edits]
    cls = op["block"]
    return [
        f"for block in [m for m in body.modules() if type(m).__name__ == {string(cls)}]:",
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
) -> str:
    rw = result.surgery.rewrites.get("")
    if isinstance(patched, fx.GraphModule) and rw is not None:
        graph = patched.graph
        comments = _comments(graph, rw)
    else:
        graph = _trace_root(patched)
        comments = {}
    forward = forward_source(graph, imports, local, comments, patched)
    body = [f"body = {builder}", *_edit_lines(result, wrappers), *_adopt_root(result, patched)]
    if dropin:
        init_args = ", *args: Any, **kwargs: Any"
        imports.add("from typing import Any")
        body.insert(0, "del args, kwargs  # a drop-in: the host's own arguments are ignored")
    else:
        init_args = ""
    rules = result.after.size_rules()
    doc = _doc_line(
        f"{result.backbone.spec} patched by recipe {result.recipe.name}: "
        f"{result.after.output_shape[1]} channels at 1/{describe_factor(result.after.downsample)}; "
        f"{rules[0].format('H')}, {rules[1].format('W')}."
    )
    init = "\n".join(wrap(line, 8) for line in ["super().__init__()", *body])
    return (
        f"class {name}(nn.Module):\n"
        f"    {doc}\n\n"
        f"    def __init__(self{init_args}) -> None:\n" + init + "\n\n" + _indent(forward, 4)
    )


def _adopt_root(result: ApplyResult, patched: nn.Module) -> list[str]:
    """The patched model's own children, parameters and buffers, taken from ``body``."""
    lines = ["# the source backbone's modules, under their own names (state_dict keys)"]
    new = {
        e.path: result.surgery.new_modules[e.path]
        for e in result.edits
        if e.attribute == "(appended)"
    }
    for child in patched._modules:
        lines.append(_assign("self", child, new.get(child, _get_attr("body", child))))
    for pname, _ in patched.named_parameters(recurse=False):
        lines.append(_assign_attr("self", pname, _get_attr("body", pname)))
    for bname, _ in patched.named_buffers(recurse=False):
        lines.append(_buffer_line(patched, bname, "body"))
    return lines


def _trace_root(model: nn.Module) -> fx.Graph:
    try:
        return trace_children_as_leaves(model)
    except Exception as error:  # fx raises many kinds of errors on dynamic code
        raise SurgeryError(
            f"cannot write the forward of {type(model).__name__}: not traceable with torch.fx "
            f"({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error


# -- the docstring ------------------------------------------------------------------------------


def _needs(backbone: Backbone, note: str) -> str:
    """What the file imports besides torch: nothing when the source code is bundled."""
    if not note.startswith(("imports", "builds")):
        return "needs only torch"
    package = {"tv": "torchvision", "timm": "timm"}.get(backbone.kind)
    return f"needs torch and {package or backbone.source.split('.')[0]}"


def _docstring(result: ApplyResult, name: str, note: str, dropin: bool) -> str:
    t, before = result.after, result.before
    rules = t.size_rules()
    recipe_text = recipe_to_toml(result.recipe).rstrip()
    lines = [
        f"{name}: {result.backbone.spec} after backbone surgery (recipe {result.recipe.name}).",
        "",
        f"Generated by bbswap {__version__}; {_needs(result.backbone, note)}. This file {note}.",
        "",
        f"Source backbone: {result.backbone.spec}",
        f"Traced input:    {shape(t.input_shape)} -> output {shape(t.output_shape)} "
        f"(the source gave {shape(before.output_shape)} for {shape(before.input_shape)})",
        f"Downsample:      {describe_factor(t.downsample)}",
        f"Size rule:       {rules[0].format('H')}, {rules[1].format('W')} "
        f"({name}.output_size(h, w) computes it exactly)",
        f"Params:          {count(t.params)}",
        f"MACs:            {count(t.macs)} at the traced input",
    ]
    if dropin:
        lines.append(
            f"Drop-in:         {name}(*args, **kwargs) ignores its arguments, so it can replace "
            "the host's class."
        )
    lines += ["", "Recipe:", ""] + [
        "    " + line if line else "" for line in recipe_text.splitlines()
    ]
    body = "\n".join(line.rstrip() for line in lines)
    return f'"""{as_source(body + chr(10), Place.DOCSTRING)}"""'
