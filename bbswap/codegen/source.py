"""Python source from torch.fx graphs and from the modules a patched model needs.

``forward_source`` writes a graph's forward as one statement per node with an import
table (``F.`` for torch.nn.functional, ``torch.`` for torch, infix operators);
``top_level`` and ``carried_definitions`` find in a module's source the top-level
definitions a name needs, which :mod:`bbswap.codegen.bundling` copies into an emitted
file so that it stands alone.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import keyword
import math
import operator
import sys
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import _jit_internal, fx, nn

from bbswap.codegen.text import Place, as_source, is_plain_name
from bbswap.errors import SurgeryError
from bbswap.surgery.core import fx_name

_INFIX = {
    operator.add: "+",
    operator.sub: "-",
    operator.mul: "*",
    operator.truediv: "/",
    operator.floordiv: "//",
    operator.matmul: "@",
    operator.pow: "**",
}


_SAME_IMPORT = {
    "import torch.nn as nn": "from torch import nn",
    "from torch.nn import functional as F": "import torch.nn.functional as F",
}


@dataclass
class Imports:
    """The import table of a generated file."""

    lines: set[str] = field(default_factory=lambda: {"import torch", "from torch import nn"})

    def add(self, line: str) -> None:
        self.lines.add(_SAME_IMPORT.get(line, line))

    def render(self) -> str:
        """Standard library first, then the rest, each as isort orders them."""
        groups: list[list[str]] = [[], []]
        for line in self.lines:
            top = line.split()[1].split(".")[0]
            groups[0 if top in sys.stdlib_module_names else 1].append(line)
        blocks = []
        for group in groups:
            plain = sorted(x for x in group if x.startswith("import "))
            froms = sorted(x for x in group if x.startswith("from "))
            if group:
                blocks.append("\n".join(plain + froms))
        return "\n\n".join(blocks)


def attr_path(base: str, target: str) -> str:
    """``self`` + ``layer1.0.conv1`` -> ``self.layer1[0].conv1`` for indexable children."""
    out = base
    for part in target.split("."):
        if part.isdigit():
            out = f"{out}[{part}]"
        else:
            out = f"{out}.{part}" if is_plain_name(part) else f"getattr({out}, {string(part)})"
    return out


def module_access(base: str, target: str) -> str:
    """Access for a submodule call in a forward: ``getattr`` for numeric names
    (a generic module is not indexable, and TorchScript needs a constant name)."""
    out = base
    for part in target.split("."):
        plain = is_plain_name(part)
        out = f"{out}.{part}" if plain else f"getattr({out}, {string(part)})"
    return out


def literal(value: Any, imports: Imports) -> str:
    """Source for a constant argument of a graph node."""
    if isinstance(value, fx.Node):
        return value.name
    if isinstance(value, (list, tuple)):
        items = [literal(v, imports) for v in value]
        if isinstance(value, tuple):
            return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
        return f"[{', '.join(items)}]"
    if isinstance(value, dict):
        pairs = (f"{literal(k, imports)}: {literal(v, imports)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, slice):
        parts = [literal(p, imports) if p is not None else "" for p in (value.start, value.stop)]
        step = f":{literal(value.step, imports)}" if value.step is not None else ""
        return f"{parts[0]}:{parts[1]}{step}"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        imports.add("import math")
        return "math.inf" if value > 0 else "-math.inf" if math.isinf(value) else "math.nan"
    if value is Ellipsis:
        return "..."
    if isinstance(value, str):
        return string(value)
    if isinstance(value, (int, float, bool, type(None))):
        return repr(value)
    raise SurgeryError(f"cannot write the constant {value!r} ({type(value).__name__}) as source")


def _call_args(node: fx.Node, imports: Imports, skip: int = 0) -> str:
    args = [literal(a, imports) for a in node.args[skip:]]
    defaults = _defaults(node.target) if node.op == "call_function" else {}
    args += [
        f"{k}={literal(v, imports)}"
        for k, v in node.kwargs.items()
        if not (k in defaults and _same(v, defaults[k]))
    ]
    return ", ".join(args)


def _defaults(target: Any) -> dict[str, Any]:
    """The default values of a Python function's keyword arguments ({} for a builtin,
    whose calls fx records as written)."""
    dispatched = _jit_internal.boolean_dispatched.get(target)
    if dispatched is not None:  # F.max_pool2d & co: both branches take the same arguments
        target = dispatched["if_false"]
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _same(value: Any, default: Any) -> bool:
    """Whether an argument repeats its default (``0`` is not ``False`` here)."""
    if isinstance(value, fx.Node):
        return False
    return type(value) is type(default) and value == default


def function_ref(target: Any, imports: Imports, local: set[str]) -> str:
    """How generated code names a called function."""
    name = fx_name(target)
    module = getattr(target, "__module__", None) or ""
    functional = target in _FUNCTIONAL_IDS or module in ("torch.nn.functional", "torch._C._nn")
    if functional and hasattr(F, name):
        imports.add("import torch.nn.functional as F")
        return f"F.{name}"
    from_torch = getattr(torch, name, None) is target or module in (
        "torch",
        "torch._C._VariableFunctions",
    )
    if from_torch and hasattr(torch, name):
        return f"torch.{name}"
    if module == "math":
        imports.add("import math")
        return f"math.{name}"
    if getattr(builtins, name, None) is target:
        return name
    if name in local:
        return name
    if module == "operator":
        imports.add("import operator")
        return f"operator.{name}"
    if module.split(".")[0] == "timm" and getattr(sys.modules.get(module), name, None) is target:
        imports.add(f"import {module}")  # a timm model's file imports timm anyway
        return f"{module}.{name}"  # qualified: the call's result is named as the function
    raise SurgeryError(
        f"cannot name the function {module}.{name} in generated code (it is neither from "
        "torch nor bundled)"
    )


_FUNCTIONAL_IDS = {F.max_pool2d, F.adaptive_max_pool2d, F.max_pool1d, F.max_pool3d}


def forward_source(
    graph: fx.Graph,
    imports: Imports,
    local: set[str],
    comments: dict[str, str] | None = None,
    owner: nn.Module | None = None,
) -> str:
    """A ``def forward`` for ``graph``: one statement per node; annotated with its return
    type when ``owner`` (the module whose submodules the graph calls) shows it."""
    comments = comments or {}
    params: list[str] = []
    body: list[str] = []
    for node in graph.nodes:
        note = (
            f"  # {as_source(comments[node.name], Place.COMMENT)}" if node.name in comments else ""
        )
        if node.op == "placeholder":
            params.append(f"{node.name}: torch.Tensor")
        elif node.op == "get_attr":
            body.append(f"{node.name} = {attr_path('self', str(node.target))}{note}")
        elif node.op == "call_module":
            call = module_access("self", str(node.target))
            body.append(f"{node.name} = {call}({_call_args(node, imports)}){note}")
        elif node.op == "call_method":
            obj = literal(node.args[0], imports)
            if not is_plain_name(str(node.target)):
                raise SurgeryError(f"cannot write a call of the method {node.target!r}")
            body.append(f"{node.name} = {obj}.{node.target}({_call_args(node, imports, 1)}){note}")
        elif node.op == "call_function":
            body.append(f"{node.name} = {_function_call(node, imports, local)}{note}")
        elif node.op == "output":
            body.append(f"return {literal(node.args[0], imports)}")
    signature = ", ".join(["self", *params])
    returns = return_type(graph, owner) if owner is not None else ""
    arrow = f" -> {returns}" if returns else ""
    head = f"def forward({signature}){arrow}:"
    if len(head) > 96:  # as ruff writes a signature too long for the class's indentation
        head = f"def forward(\n    {signature}\n){arrow}:"
    return head + "\n" + "\n".join(wrap(line, 4, 96) for line in body)


# -- return types ---------------------------------------------------------------------------

# Tensor methods that return one tensor, and torch functions that may return several
_TENSOR_METHODS = frozenset(
    {
        "view", "reshape", "flatten", "permute", "transpose", "contiguous", "mean", "sum",
        "add", "sub", "mul", "div", "sigmoid", "relu", "softmax", "unsqueeze", "squeeze",
        "expand", "expand_as", "repeat", "clone", "float", "to", "type_as", "narrow", "flip",
        "pow", "sqrt", "exp", "log", "abs", "neg", "clamp", "view_as", "masked_fill", "tanh",
        "gelu", "matmul", "bmm",
    }
)  # fmt: skip
_NOT_ONE_TENSOR = frozenset(
    {
        "split", "chunk", "unbind", "tensor_split", "max", "min", "sort", "topk", "meshgrid",
        "broadcast_tensors", "unique", "max_pool1d_with_indices", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "size",
    }
)  # fmt: skip


def return_type(graph: fx.Graph, owner: nn.Module) -> str:
    """``torch.Tensor`` (or a tuple or list of them) when the graph's output surely is
    one; "" when that is not known."""
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    if isinstance(out, fx.Node):
        return "torch.Tensor" if _is_tensor(out, owner) else ""
    if (
        isinstance(out, (tuple, list))
        and out
        and all(isinstance(a, fx.Node) and _is_tensor(a, owner) for a in out)
    ):
        if isinstance(out, list):
            return "list[torch.Tensor]"
        return "tuple[" + ", ".join("torch.Tensor" for _ in out) + "]"
    values = list(out.values()) if isinstance(out, dict) else []
    if values and all(isinstance(a, fx.Node) and _is_tensor(a, owner) for a in values):
        return "dict[str, torch.Tensor]"
    return ""


def _is_tensor(node: fx.Node, owner: nn.Module) -> bool:
    if node.op == "placeholder":
        return True  # every parameter is annotated torch.Tensor
    if node.op == "get_attr":
        return isinstance(_attr(owner, str(node.target)), torch.Tensor)
    if node.op == "call_method":
        return str(node.target) in _TENSOR_METHODS
    if node.op == "call_module":
        return _module_returns_tensor(owner.get_submodule(str(node.target)))
    if node.op != "call_function":
        return False
    target = node.target
    if target is operator.getitem:
        obj = node.args[0]
        return isinstance(obj, fx.Node) and _is_tensor(obj, owner)
    if target in _INFIX:
        return any(isinstance(a, fx.Node) and _is_tensor(a, owner) for a in node.args)
    name = fx_name(target)
    module = getattr(target, "__module__", None) or ""
    torch_function = (
        module.startswith("torch")
        or target in _FUNCTIONAL_IDS
        or any(getattr(m, name, None) is target for m in (torch, F))
    )
    return torch_function and name not in _NOT_ONE_TENSOR and not node.kwargs.get("return_indices")


def _attr(owner: nn.Module, target: str) -> Any:
    obj: Any = owner
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _module_returns_tensor(module: nn.Module) -> bool:
    if isinstance(module, fx.GraphModule):
        return return_type(module.graph, module) == "torch.Tensor"
    if isinstance(module, nn.Sequential):
        children = list(module)
        return not children or _module_returns_tensor(children[-1])
    cls = type(module)
    if cls.__module__.startswith("torch.nn.modules."):
        unsure = (nn.MultiheadAttention, nn.RNNBase, nn.ModuleList, nn.ModuleDict)
        return not isinstance(module, unsure) and not getattr(module, "return_indices", False)
    try:
        hints = typing.get_type_hints(cls.forward)
    except Exception:  # a forward's annotations may name anything, or fail to resolve
        return False
    return hints.get("return") is torch.Tensor


def _function_call(node: fx.Node, imports: Imports, local: set[str]) -> str:
    target = node.target
    if target in _INFIX and len(node.args) == 2 and not node.kwargs:
        a, b = (literal(x, imports) for x in node.args)
        return f"{a} {_INFIX[target]} {b}"
    if target is operator.getitem:
        obj, index = node.args
        if isinstance(index, tuple):
            inner = ", ".join(literal(i, imports) for i in index)
        else:
            inner = literal(index, imports)
        return f"{literal(obj, imports)}[{inner}]"
    if target is getattr:
        obj, name = node.args
        name = str(name)
        if not is_plain_name(name):
            return f"getattr({literal(obj, imports)}, {string(name)})"
        return f"{literal(obj, imports)}.{name}"
    return f"{function_ref(target, imports, local)}({_call_args(node, imports)})"


def identifier(text: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in text)
    if not out or out[0].isdigit() or keyword.iskeyword(out):
        out = "_" + out
    return out


# -- bundling ---------------------------------------------------------------------------------


def top_level(tree: ast.Module) -> dict[str, ast.stmt]:
    defs: dict[str, ast.stmt] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            defs[stmt.name] = stmt
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    defs[t.id] = stmt
    return defs


def imported_names(stmt: ast.stmt) -> list[str]:
    """The names an import statement binds."""
    if isinstance(stmt, ast.Import):
        return [(a.asname or a.name).split(".")[0] for a in stmt.names]
    if isinstance(stmt, ast.ImportFrom):
        return [a.asname or a.name for a in stmt.names]
    return []


class _References(ast.NodeVisitor):
    """The names a definition uses as code, apart from those in its annotations."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.annotations: list[ast.expr] = []

    def visit_Name(self, node: ast.Name) -> None:
        self.names.add(node.id)

    def visit_arg(self, node: ast.arg) -> None:
        if node.annotation is not None:
            self.annotations.append(node.annotation)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if node.returns is not None:
            self.annotations.append(node.returns)
        for child in [*node.decorator_list, node.args, *node.body]:
            self.visit(child)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.annotations.append(node.annotation)
        for child in (node.target, node.value):
            if child is not None:
                self.visit(child)


def _union_members(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union_members(node.left) + _union_members(node.right)
    return [node]


def _annotation_edits(
    source: str, annotation: ast.expr, absent: set[str]
) -> tuple[list[tuple[ast.expr, str]], set[str]]:
    """Rewrites of the ``A | B`` unions in an annotation that leave out the names in
    ``absent``; returns them and the absent names still used (that no rewrite removes)."""
    edits: list[tuple[ast.expr, str]] = []
    todo: list[ast.AST] = [annotation]
    still: set[str] = set()
    while todo:
        node = todo.pop()
        members = _union_members(node) if isinstance(node, ast.expr) else [node]
        if len(members) > 1:
            kept = [m for m in members if not (isinstance(m, ast.Name) and m.id in absent)]
            if kept and len(kept) < len(members):
                text = " | ".join(ast.get_source_segment(source, m) or "" for m in kept)
                edits.append((node, text))  # type: ignore[arg-type]  # members > 1: a BinOp
                todo += kept
                continue
            todo += members
            continue
        if isinstance(node, ast.Name) and node.id in absent:
            still.add(node.id)
        todo += list(ast.iter_child_nodes(node))
    return edits, still


def _closure(defs: dict[str, ast.stmt], roots: Iterable[str]) -> set[str]:
    """The definitions ``roots`` use as code, followed from one to the next."""
    needed: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        refs = _References()
        refs.visit(defs[name])
        todo += [n for n in refs.names if n in defs and n not in needed]
    return needed


def carried_definitions(
    source: str, defs: dict[str, ast.stmt], roots: list[str]
) -> tuple[set[str], dict[int, list[tuple[ast.expr, str]]]]:
    """The definitions to carry and, per carried statement, the rewrites of annotations
    that name a definition left behind (``type[BasicBlock | Bottleneck]`` in a file with
    no BasicBlock). A definition an annotation needs in a way no rewrite removes is
    carried after all."""
    while True:
        needed = _closure(defs, roots)
        rewrites: dict[int, list[tuple[ast.expr, str]]] = {}
        missing: set[str] = set()
        for name in needed:
            refs = _References()
            refs.visit(defs[name])
            for annotation in refs.annotations:
                absent = {
                    n.id
                    for n in ast.walk(annotation)
                    if isinstance(n, ast.Name) and n.id in defs and n.id not in needed
                }
                if absent:
                    edits, still = _annotation_edits(source, annotation, absent)
                    rewrites.setdefault(id(defs[name]), []).extend(edits)
                    missing |= still
        if not missing:
            return needed, rewrites
        roots = [*roots, *sorted(missing)]


def offset(lines: list[str], first: int, line: int, col: int) -> int:
    """The character offset in the chunk starting at line ``first`` of ast's (line, byte
    column) position."""
    before = sum(len(text) + 1 for text in lines[first - 1 : line - 1])
    return before + len(lines[line - 1].encode("utf-8")[:col].decode("utf-8"))


Span = tuple[int, int, int, int]  # ast's (line, byte column, end line, end byte column)


def span_of(node: ast.expr) -> Span:
    return (node.lineno, node.col_offset, node.end_lineno or node.lineno, node.end_col_offset or 0)


def definition_text(lines: list[str], top: ast.stmt, edits: dict[Span, str]) -> str:
    """The source of a top-level statement (with its decorators), each span in ``edits``
    replaced by its text."""
    start = min([top.lineno] + [d.lineno for d in getattr(top, "decorator_list", [])])
    end = top.end_lineno or top.lineno
    text = "\n".join(lines[start - 1 : end])
    spans = {
        (offset(lines, start, a, b), offset(lines, start, c, d)): new
        for (a, b, c, d), new in edits.items()
    }
    for (a, b), new in sorted(spans.items(), reverse=True):
        text = text[:a] + new + text[b:]
    return text


def string(value: str) -> str:
    """A string literal in double quotes, as the formatter writes them."""
    return as_source(value, Place.STRING)


def _split_args(inner: str) -> list[str]:
    args, depth, quote, start = [], 0, "", 0
    escaped = False
    for i, c in enumerate(inner):
        if quote:
            quote, escaped = _in_string(quote, escaped, c)
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(inner[start:i].strip())
            start = i + 1
    tail = inner[start:].strip()
    if tail:
        args.append(tail)
    return args


def _in_string(quote: str, escaped: bool, c: str) -> tuple[str, bool]:
    """One character inside a string literal: the open quote (or "" once closed) and
    whether the next character is escaped."""
    if escaped:
        return quote, False
    if c == "\\":
        return quote, True
    return ("" if c == quote else quote), False


def _split_comment(stmt: str) -> tuple[str, str]:
    """``code  # note`` -> (``code``, ``  # note``), the ``#`` outside any string literal."""
    quote, escaped = "", False
    for i, c in enumerate(stmt):
        if quote:
            quote, escaped = _in_string(quote, escaped, c)
        elif c in "\"'":
            quote = c
        elif stmt.startswith("  # ", i):
            return stmt[:i], stmt[i:]
    return stmt, ""


def wrap(stmt: str, indent: int, limit: int = 100) -> str:
    """Indent a statement, splitting a too-long final call the way ruff format does."""
    pad = " " * indent
    code, comment = _split_comment(stmt)
    if len(pad + stmt) <= limit or not code.rstrip().endswith(")"):
        return pad + stmt
    depth, open_at = 0, -1
    for i in range(len(code) - 1, -1, -1):
        if code[i] == ")":
            depth += 1
        elif code[i] == "(":
            depth -= 1
            if depth == 0:
                open_at = i
                break
    if open_at <= 0:
        return pad + stmt
    head, args = code[: open_at + 1], _split_args(code[open_at + 1 : -1])
    one = f"{pad}    {', '.join(args)}"
    if len(one) <= limit:
        return f"{pad}{head}{comment}\n{one}\n{pad})"
    lines = "\n".join(f"{pad}    {a}," for a in args)
    return f"{pad}{head}{comment}\n{lines}\n{pad})"
