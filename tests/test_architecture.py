"""The package's shape, checked on its syntax trees.

- one subpackage per step of the data flow, at most six modules at the top of ``bbswap/``;
- no import cycle between modules, counting imports inside functions;
- no private name (``_x``) imported from another module;
- no function over 60 lines, its docstring not counted; a CLI command (a function under
  ``@app.command``) at most 25.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bbswap"
STEPS = {"backbones", "tracing", "recipes", "surgery", "search", "codegen", "verify", "cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in ``module``."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module).split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            yield base, [a.name for a in node.names], node.lineno


def _internal(target: str) -> str | None:
    """The bbswap module an import reaches (a submodule imported by name included)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, names, _ in _imports(module):
            if not target.startswith("bbswap"):
                continue
            reached = {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES}
            found = _internal(target)
            if found and not (reached and found == target and MODULES[found].name == "__init__.py"):
                reached.add(found)
            edges[module] |= {r for r in reached if r != module}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt == "bbswap":  # the lazy API table imports nothing at import time
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_one_subpackage_per_step_and_few_top_level_modules() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages >= STEPS
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top


def test_no_import_cycle() -> None:
    assert _cycle(_graph()) is None


def test_no_private_name_crosses_a_module_border() -> None:
    crossings = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, names, line in _imports(module)
        if target.startswith("bbswap")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert crossings == []


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _is_command(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for deco in func.decorator_list:
        call = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(call, ast.Attribute) and call.attr == "command":
            return True
    return False


def _length(func: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Its lines, its docstring not counted: parameters and examples are documented in full."""
    lines = (func.end_lineno or func.lineno) - func.lineno + 1
    first = func.body[0]
    value = first.value if isinstance(first, ast.Expr) else None
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        lines -= (first.end_lineno or first.lineno) - first.lineno + 1
    return lines


@pytest.mark.parametrize("module", sorted(m for m in MODULES if ".zoo" not in m))
def test_functions_are_short(module: str) -> None:
    long = [
        f"{func.name} ({_length(func)} lines)"
        for func in _functions(TREES[module])
        if _length(func) > (25 if _is_command(func) else 60)
    ]
    assert long == []


def test_the_checker_sees_cycles_and_private_imports() -> None:
    """The checks above would fail on a cycle or a private import (a self-test)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from bbswap.x import _y\n")
    found = [n.names[0].name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found == ["_y"]


def test_the_length_counts_code_not_the_docstring() -> None:
    source = 'def f(a):\n    """Doc.\n\n    Args:\n        a: A.\n    """\n    b = a\n    return b'
    tree = ast.parse(source)
    func = next(_functions(tree))
    assert _length(func) == 3  # the def line and two statements
