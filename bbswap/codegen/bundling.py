"""Copy the code a model needs into its emitted file, from every module it comes from.

The roots are definitions of the source backbone's modules: its class or builder, the
classes of the modules in the built model, the objects passed as ``py:`` arguments.
Each module's needed top-level definitions are copied in their order in the file. A name
they use that the module imports is followed into the module that defines it when
``follow`` says that module is to be bundled (the user's own code, bbswap's zoo), and
otherwise stays an import: absolute, and only of the names used. Modules come in the
order Python runs them: a module after those it takes definitions from.

A module of the user's that bundling cannot follow (its source is unavailable, the code
uses it as a module, ``pkg.mod.Name``, or the name is no plain top-level definition
there) stays an import and is listed with the reason, for the docstring. When two modules
define one name, or a module imports a name the file already gives another meaning, the
later one is renamed in the code copied from that module.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import math
import operator
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bbswap.codegen.source import (
    Imports,
    Span,
    carried_definitions,
    definition_text,
    imported_names,
    span_of,
    top_level,
)
from bbswap.errors import SurgeryError

# the names generated code uses besides the bundled ones, and what they mean
_GENERATED = {"torch": torch, "nn": nn, "F": F, "math": math, "operator": operator}
_MISSING = object()


@dataclass(frozen=True)
class Bundled:
    """The copied definitions and what the file must still import."""

    sources: tuple[str, ...]  # the definitions' source, modules in the order Python runs them
    names: frozenset[str]  # the top-level names they define
    modules: tuple[str, ...]  # the modules copied from, in the order asked
    imported: dict[str, str]  # module of the user's -> why it is imported, not bundled
    named: dict[int, str] = field(default_factory=dict)  # id(object) -> its name in the file

    def name_of(self, obj: Any) -> str | None:
        """The name a bundled object has in the file."""
        return self.named.get(id(obj))


@dataclass
class _Module:
    module: ModuleType
    source: str
    defs: dict[str, ast.stmt]
    bindings: dict[str, ast.Import | ast.ImportFrom]  # name -> the import that binds it
    wanted: set[str] = field(default_factory=set)
    needed: set[str] = field(default_factory=set)
    annotation_edits: dict[int, list[tuple[ast.expr, str]]] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)  # name here -> name in the file
    followed: set[str] = field(default_factory=set)  # import bindings already handled
    deps: list[str] = field(default_factory=list)  # modules it takes definitions from
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (alias, name in the file)

    @property
    def words(self) -> set[str]:
        """Every identifier the module's source spells, which a new name must avoid."""
        return set(re.findall(r"[A-Za-z_]\w*", self.source))


class _Bundler:
    def __init__(self, imports: Imports, follow: Callable[[ModuleType], bool]) -> None:
        self.imports = imports
        self.follow = follow
        self.modules: dict[str, _Module] = {}
        self.failed: dict[str, str] = {}  # module -> why it cannot be bundled
        self.imported: dict[str, str] = {}
        self.bound: dict[str, Any] = dict(_GENERATED)  # name in the file -> its object
        self.named: dict[tuple[str, str], str] = {}  # (module, name) -> name in the file
        self.pending: list[str] = []

    # -- asking for definitions

    def want(self, module: ModuleType, name: str) -> str | None:
        """Bundle ``name`` of ``module``; its name in the file, or None (see ``failed``)."""
        info = self.info(module)
        if info is None:
            return None
        if name in info.defs:
            info.wanted.add(name)
            if info.module.__name__ not in self.pending:
                self.pending.append(info.module.__name__)
            return self._allocate(info, name)
        if name in info.bindings:  # a name the module imports (a package's re-export)
            return self._follow(info, name)
        self.failed[module.__name__] = f"{name} is no plain top-level definition there"
        return None

    def info(self, module: ModuleType) -> _Module | None:
        key = module.__name__
        if key in self.modules:
            return self.modules[key]
        if key in self.failed:
            return None
        try:
            source = inspect.getsource(module)
            tree = ast.parse(source)
        except (OSError, TypeError, SyntaxError) as error:
            self.failed[key] = f"its source is not available ({type(error).__name__})"
            return None
        bindings = {
            name: stmt
            for stmt in tree.body
            if isinstance(stmt, (ast.Import, ast.ImportFrom))
            for name in imported_names(stmt)
        }
        self.modules[key] = _Module(module, source, top_level(tree), bindings)
        return self.modules[key]

    def _allocate(self, info: _Module, name: str) -> str:
        """The name a definition gets in the file: its own unless another object has it."""
        key = (info.module.__name__, name)
        if key not in self.named:
            obj = vars(info.module).get(name, _MISSING)
            chosen = self._free(name, obj, info)
            self.bound[chosen] = obj
            self.named[key] = chosen
            if chosen != name:
                info.renames[name] = chosen
        return self.named[key]

    def _free(self, name: str, obj: Any, info: _Module) -> str:
        """``name``, unless the file gives it another object: then a name the code of
        ``info`` (where it is renamed) does not use for anything, ``name_module``."""
        if self.bound.get(name, obj) is obj:
            return name
        base = f"{name}_{info.module.__name__.rsplit('.', 1)[-1]}"
        chosen, n = base, 2
        while (chosen in self.bound and self.bound[chosen] is not obj) or chosen in info.words:
            chosen, n = f"{base}{n}", n + 1
        return chosen

    # -- following imports

    def run(self) -> None:
        while self.pending:
            info = self.modules[self.pending.pop(0)]
            needed, edits = carried_definitions(info.source, info.defs, sorted(info.wanted))
            new = needed - info.needed
            info.needed, info.annotation_edits = needed, edits
            for name in sorted(new):
                self._allocate(info, name)
            used = {
                node.id
                for name in new
                for node in ast.walk(info.defs[name])
                if isinstance(node, ast.Name) and node.id in info.bindings
            }
            for name in sorted(used - set(info.defs)):
                self._follow(info, name)

    def _follow(self, info: _Module, name: str) -> str:
        """Bundle what an import binding of ``info`` names, or import it; its name in the
        file, which the code copied from ``info`` uses (renamed when it differs)."""
        if name in info.followed:
            return info.renames.get(name, name)
        info.followed.add(name)
        stmt = info.bindings[name]
        value = vars(info.module).get(name, _MISSING)
        target = self._target(info, stmt, name, value)
        chosen: str | None = None
        if target is not None and self.follow(target[0]):
            chosen = self.want(*target)
            if chosen is not None:
                if target[0].__name__ not in info.deps:
                    info.deps.append(target[0].__name__)
                return self._bind(info, name, chosen, value, self.modules[target[0].__name__])
            why = self.failed.get(target[0].__name__, "it cannot be bundled")
            self.imported.setdefault(target[0].__name__, why)
        elif inspect.ismodule(value) and self.follow(value):
            self.imported.setdefault(value.__name__, f"{info.module.__name__} uses it as a module")
        chosen = self._import(info, stmt, name, value)
        if chosen != name:
            info.renames[name] = chosen
        return chosen

    def _bind(self, info: _Module, name: str, chosen: str, value: Any, home: _Module) -> str:
        """The import binding ``name`` of ``info`` names a definition bundled as
        ``chosen``: an alias after that definition (``name = chosen``) when ``name`` is
        free in the file, else the code of ``info`` renamed to use ``chosen``."""
        if chosen == name:
            return name
        if self.bound.get(name, value) is value:
            self.bound[name] = value
            if (name, chosen) not in home.aliases:
                home.aliases.append((name, chosen))
            return name
        if chosen in info.words:
            raise SurgeryError(
                f"cannot bundle {info.module.__name__}: it imports {name}, a name the emitted "
                f"file gives another definition, and it uses {chosen} itself"
            )
        info.renames[name] = chosen
        return chosen

    def _target(
        self, info: _Module, stmt: ast.stmt, name: str, value: Any
    ) -> tuple[ModuleType, str] | None:
        """The module that defines what ``name`` names, and the name there; None for a
        module object (``import pkg.mod``, ``from pkg import mod``)."""
        if isinstance(stmt, ast.Import) or value is _MISSING or inspect.ismodule(value):
            return None
        top = inspect.isclass(value) or inspect.isfunction(value)
        if top and getattr(value, "__qualname__", "") == value.__name__:
            home = sys.modules.get(value.__module__)
            if home is not None:
                return home, value.__name__
        assert isinstance(stmt, ast.ImportFrom)  # ast.Import returned above
        alias = next(a for a in stmt.names if (a.asname or a.name) == name)
        home = sys.modules.get(_absolute(info.module, stmt))
        return (home, alias.name) if home is not None else None

    def _import(self, info: _Module, stmt: ast.stmt, name: str, value: Any) -> str:
        """An absolute import of ``name`` alone, under another name if the file gives
        ``name`` another meaning."""
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            return name
        chosen = self._free(name, value, info) if value is not _MISSING else name
        self.bound[chosen] = value
        if isinstance(stmt, ast.Import):
            alias = next(a for a in stmt.names if (a.asname or a.name).split(".")[0] == name)
            as_name = alias.asname or (chosen if chosen != name else None)
            node: ast.stmt = ast.Import([ast.alias(alias.name, as_name)])
        else:
            assert isinstance(stmt, ast.ImportFrom)  # bindings hold only import statements
            alias = next(a for a in stmt.names if (a.asname or a.name) == name)
            as_name = chosen if chosen != alias.name else None
            node = ast.ImportFrom(_absolute(info.module, stmt), [ast.alias(alias.name, as_name)], 0)
        self.imports.add(ast.unparse(node))
        return chosen

    # -- the result

    def sources(self) -> list[str]:
        order: list[str] = []

        def visit(key: str, seen: set[str]) -> None:
            if key in order or key in seen:
                return
            seen.add(key)
            for dep in self.modules[key].deps:
                visit(dep, seen)
            order.append(key)

        for key in self.modules:
            visit(key, set())
        return [text for key in order for text in _module_texts(self.modules[key])]


def _absolute(module: ModuleType, stmt: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from ... import`` statement names."""
    if not stmt.level:
        return stmt.module or ""
    relative = "." * stmt.level + (stmt.module or "")
    try:
        return importlib.util.resolve_name(relative, module.__package__)
    except (ImportError, ValueError) as error:
        raise SurgeryError(
            f"cannot resolve 'from {relative} import' in {module.__name__}: {error}"
        ) from None


def _module_texts(info: _Module) -> list[str]:
    """The needed definitions of one module, in their order, names renamed as needed."""
    lines = info.source.splitlines()
    texts, seen = [], set()
    for top in ast.parse(info.source).body:
        names = [n for n, d in info.defs.items() if n in info.needed and _same(d, top)]
        if not names or (top.lineno, top.col_offset) in seen:
            continue
        seen.add((top.lineno, top.col_offset))
        stmt = info.defs[names[0]]
        edits = {span_of(node): text for node, text in info.annotation_edits.get(id(stmt), [])}
        for span, text in _rename_spans(stmt, info.renames, lines).items():
            if not any(_inside(span, other) for other in edits):
                edits[span] = text
        texts.append(definition_text(lines, stmt, edits))
    texts += [f"{alias} = {name}" for alias, name in info.aliases]
    return texts


def _same(a: ast.stmt, b: ast.stmt) -> bool:
    return (a.lineno, a.col_offset) == (b.lineno, b.col_offset)


def _inside(span: Span, outer: Span) -> bool:
    return outer[:2] <= span[:2] and span[2:] <= outer[2:]


def _rename_spans(stmt: ast.stmt, renames: dict[str, str], lines: list[str]) -> dict[Span, str]:
    """Where the code of ``stmt`` names a renamed top-level name (not where a function or
    class binds it for itself), and the definition's own name if it is renamed."""
    if not renames:
        return {}
    finder = _GlobalNames(set(renames))
    finder.visit(stmt)
    spans = {span_of(node): renames[node.id] for node in finder.found}
    defined = getattr(stmt, "name", None)
    if isinstance(defined, str) and defined in renames:
        line = lines[stmt.lineno - 1].encode("utf-8")
        at = line.index(defined.encode("utf-8"), stmt.col_offset)
        spans[(stmt.lineno, at, stmt.lineno, at + len(defined.encode("utf-8")))] = renames[defined]
    return spans


class _GlobalNames(ast.NodeVisitor):
    """The ``Name`` nodes among ``names`` that refer to the module's top level: not
    those inside a function or class that binds the same name itself."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.shadowed: list[set[str]] = []
        self.found: list[ast.Name] = []

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in self.names and not any(node.id in s for s in self.shadowed):
            self.found.append(node)

    def _scope(self, node: ast.AST, body: Iterable[ast.AST], outer: Iterable[ast.AST]) -> None:
        for child in outer:  # decorators, defaults, bases: evaluated outside
            self.visit(child)
        self.shadowed.append(_bound_in(node) & self.names)
        for child in body:
            self.visit(child)
        self.shadowed.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        defaults = [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
        self._scope(node, node.body, [*node.decorator_list, *defaults])

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._scope(node, [node.body], node.args.defaults)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        outer = [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]
        self._scope(node, node.body, outer)


def _bound_in(scope: ast.AST) -> set[str]:
    """The names a function, lambda or class body binds itself (arguments, assignments,
    imports, nested definitions), less those it declares global."""
    bound: set[str] = set()
    declared: set[str] = set()
    args = getattr(scope, "args", None)
    if isinstance(args, ast.arguments):
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        bound |= {a.arg for a in every if a is not None}
    body = scope.body if isinstance(scope.body, list) else [scope.body]  # type: ignore[attr-defined]  # every scope node has a body
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            continue  # its own scope
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= set(imported_names(node))
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            declared |= set(node.names)
        elif isinstance(node, ast.Lambda):
            continue
        todo += list(ast.iter_child_nodes(node))
    return bound - declared


def bundle_code(
    wanted: Iterable[tuple[ModuleType, str]],
    imports: Imports,
    follow: Callable[[ModuleType], bool],
    optional: Iterable[tuple[ModuleType, str]] = (),
) -> Bundled:
    """Bundle the definitions ``wanted`` (module, top-level name) and what they need,
    and those of ``optional`` that are top-level definitions of a module ``follow``
    accepts; the imports the copied code needs go into ``imports``."""
    bundler = _Bundler(imports, follow)
    named: dict[int, str] = {}
    for module, name in wanted:
        chosen = bundler.want(module, name)
        if chosen is None:
            why = bundler.failed.get(module.__name__, "it cannot be bundled")
            raise SurgeryError(f"cannot bundle {name} from {module.__name__}: {why}")
        named[id(vars(module)[name])] = chosen
    for module, name in optional:
        info = bundler.modules.get(module.__name__)
        if info is None and follow(module):
            info = bundler.info(module)
        if info is not None and name in info.defs:
            named[id(vars(module)[name])] = bundler.want(module, name) or name
    bundler.run()
    names = frozenset(bundler.named.values())
    modules = tuple(k for k, info in bundler.modules.items() if info.needed)
    sources = tuple(bundler.sources())
    return Bundled(sources, names, modules, dict(bundler.imported), named)
