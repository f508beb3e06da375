"""Import the user's own code as Python would run it, and resolve ``py:`` arguments.

A file inside a package (its folder and those above hold ``__init__.py``) is imported as
part of that package, ``modeling/backbone/resnet.py`` as ``modeling.backbone.resnet``,
so its relative imports work; a file outside any package under a private name. While
the user's code runs (the import, the constructor) ``sys.path`` starts with the package
root's parent (or the file's folder) and the current directory, as ``python FILE`` and
``python -m`` put them, so the absolute repository imports of research code
(``from modeling.sync_batchnorm import ...``) work from the repository root.

What stays behind, and why: ``sys.path`` is restored once the code has run, but the
imported modules stay in ``sys.modules``. Tracing, copying and bundling the model read
its classes' modules (their source, their globals) long after the import. A package
of the same name imported earlier from another folder (a second repository's
``modeling``) is dropped from ``sys.modules`` first, so that the package imported is the
one the path names.

A ``py:`` value given on the command line imports its module. A recipe is data from
anyone, and importing a module runs its code, so a ``py:`` value read from a recipe
imports nothing: it names an object of a module already imported (by torch or by the
backbone the command line named), and only an ``nn.Module`` class, a function of
``torch.nn.functional`` or a constant (not callable) of the backbone's own code.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import site
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from bbswap.backbones.guard import user_code
from bbswap.errors import BackboneNotFound, BBSwapError, InvalidArgument, ModelError, RecipeError
from bbswap.parsing import PyRef


@dataclass(frozen=True)
class LoadedModule:
    """A user module and the folders its code needs on ``sys.path``."""

    module: ModuleType
    paths: tuple[str, ...]


@contextlib.contextmanager
def code_paths(paths: tuple[str, ...]) -> Iterator[None]:
    """``paths`` at the front of ``sys.path`` for the block; exactly removed after it."""
    added = [p for p in paths if p]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)


def _search_paths(first: Path) -> tuple[str, ...]:
    """``first``, then the current directory (once)."""
    return tuple(dict.fromkeys([str(first), str(Path.cwd().resolve())]))


def package_name(path: Path) -> tuple[Path, str] | None:
    """The folder above the package that holds ``path`` and the file's dotted module
    name (``modeling.backbone.resnet``); None for a file outside any package."""
    path = path.resolve()
    parts = [] if path.name == "__init__.py" else [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file() and folder.name.isidentifier():
        parts.insert(0, folder.name)
        folder = folder.parent
    if folder == path.parent or not all(p.isidentifier() for p in parts):
        return None
    return folder, ".".join(parts)


def import_user_file(path: Path) -> LoadedModule:
    """Import a backbone file: as part of its package when it is in one."""
    if not path.is_file():
        raise BackboneNotFound(f"backbone file not found: {path}")
    package = package_name(path)
    if package is None:
        return _import_standalone(path)
    root, name = package
    paths = _search_paths(root)
    _forget_other(name.split(".")[0], root)
    module = _guarded_import(name, str(path), paths, path.resolve().parent)
    if not _same_file(getattr(module, "__file__", None), path):
        raise BackboneNotFound(
            f"{path} is in package {name.split('.')[0]}, but '{name}' imports "
            f"{getattr(module, '__file__', None) or 'another module'}; run bbswap from {root}"
        )
    return LoadedModule(module, paths)


def import_user_module(name: str) -> LoadedModule:
    """Import ``package.module`` with the current directory first on ``sys.path``."""
    if not all(part.isidentifier() for part in name.split(".")):
        raise BackboneNotFound(f"malformed module name '{name}' (expected package.module)")
    paths = _search_paths(Path.cwd().resolve())
    return LoadedModule(_guarded_import(name, name, paths, Path.cwd().resolve()), paths)


def _same_file(a: str | None, b: Path) -> bool:
    return a is not None and Path(a).resolve() == b.resolve()


def _forget_other(top: str, root: Path) -> None:
    """Drop a package ``top`` imported from another folder than ``root``, with its
    submodules, so that the import finds the one under ``root``."""
    module = sys.modules.get(top)
    if module is None:
        return
    places = [getattr(module, "__file__", None), *list(getattr(module, "__path__", []) or [])]
    if any(p and Path(p).resolve().is_relative_to(root / top) for p in places):
        return
    for key in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
        del sys.modules[key]


def _import_standalone(path: Path) -> LoadedModule:
    resolved = path.resolve()
    name = f"bbswap_user_{abs(hash(str(resolved))):x}_{resolved.stem}"
    paths = _search_paths(resolved.parent)
    if name in sys.modules:
        return LoadedModule(sys.modules[name], paths)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise BackboneNotFound(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        guard = user_code(f"importing {path}")
        with _import_errors(str(path), resolved.parent), code_paths(paths), guard:
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return LoadedModule(module, paths)


def _guarded_import(name: str, what: str, paths: tuple[str, ...], start: Path) -> ModuleType:
    with _import_errors(what, start), code_paths(paths), user_code(f"importing {what}"):
        return importlib.import_module(name)


@contextlib.contextmanager
def _import_errors(what: str, start: Path) -> Iterator[None]:
    """The errors of an import as one-line bbswap errors; a missing module is named,
    with the folder to run from when one above ``start`` holds it."""
    try:
        yield
    except BBSwapError:
        raise
    except ModuleNotFoundError as error:
        missing = error.name or str(error)
        raise BackboneNotFound(
            f"cannot import {what}: no module named '{missing}'{run_from_hint(missing, start)}"
        ) from None
    except ImportError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "ImportError"
        raise BackboneNotFound(f"cannot import {what}: {first}") from None
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelError(f"importing {what} raised {type(error).__name__}: {first}") from error


def run_from_hint(missing: str, start: Path) -> str:
    """Where to run from so that ``missing`` imports: the nearest folder at or above
    ``start`` that holds its top-level package or module, else one just below the
    current directory."""
    top = missing.split(".")[0]
    cwd = Path.cwd().resolve()
    below = sorted(d for d in _subfolders(cwd) if _holds(d, top))
    for folder in [start, *start.parents, *below]:
        if _holds(folder, top):
            if folder == cwd:
                return f" ({folder} holds {top}, but not that module: check the name)"
            return f" (it is in {folder}: run bbswap from that folder)"
    return (
        f" (no folder above {start} holds it: install it, or run bbswap from the folder "
        "that holds it)"
    )


def _holds(folder: Path, top: str) -> bool:
    return (folder / top).is_dir() or (folder / f"{top}.py").is_file()


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except OSError:
        return []


# -- where code comes from ------------------------------------------------------------------


def _installed_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    roots = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    with contextlib.suppress(AttributeError):  # a virtualenv's site module may lack them
        roots += [*site.getsitepackages(), site.getusersitepackages()]
    return tuple(Path(r).resolve() for r in dict.fromkeys(roots) if r)


_INSTALLED = _installed_roots()


def is_user_module(module: ModuleType | None) -> bool:
    """Whether a module is the user's own code: a Python source file outside the standard
    library and the installed packages (and not bbswap's, apart from its zoo)."""
    if module is None:
        return False
    name = module.__name__
    if name == "bbswap" or (name.startswith("bbswap.") and not name.startswith("bbswap.zoo")):
        return False
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py") or name in sys.builtin_module_names:
        return False
    where = Path(file).resolve()
    return not any(where.is_relative_to(root) for root in _INSTALLED)


def _under(module: ModuleType | None, folders: tuple[str, ...]) -> bool:
    file = getattr(module, "__file__", None) if module is not None else None
    if not file or not is_user_module(module):
        return False
    return any(Path(file).resolve().is_relative_to(Path(f)) for f in folders)


# -- py: values ------------------------------------------------------------------------------


def resolve_ref(key: str, ref: PyRef, paths: tuple[str, ...], own: tuple[str, ...]) -> Any:
    """The object ``ref`` names: its longest importable prefix, then attributes. A value
    from a recipe (``may_import`` False) imports nothing and must pass the recipe policy
    (see the module docstring); ``own`` are the folders of the backbone's own code."""
    parts = ref.path.split(".")
    if ref.may_import:
        with _ref_errors(key, ref), code_paths(paths), user_code(f"importing {ref}"):
            module, used = _import_longest(parts)
    else:
        module, used = _imported_longest(key, ref, parts)
    obj: Any = module
    for i, attr in enumerate(parts[used:], start=used):
        if not hasattr(obj, attr):
            where = ".".join(parts[:i])
            raise InvalidArgument(
                f"--kw {key}={ref}: '{where}' has no attribute or submodule '{attr}'",
                params=("kwargs",),
            )
        obj = getattr(obj, attr)
    if not ref.may_import:
        _recipe_policy(key, ref, obj, sys.modules.get(".".join(parts[:used])), own)
    return obj


@contextlib.contextmanager
def _ref_errors(key: str, ref: PyRef) -> Iterator[None]:
    try:
        yield
    except BBSwapError:
        raise
    except ModuleNotFoundError as error:
        missing = error.name or str(error)
        hint = run_from_hint(missing, Path.cwd().resolve())
        raise InvalidArgument(
            f"--kw {key}={ref}: no module named '{missing}'{hint}", params=("kwargs",)
        ) from None
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelError(
            f"--kw {key}={ref}: importing it raised {type(error).__name__}: {first}"
        ) from error


def _import_longest(parts: list[str]) -> tuple[ModuleType, int]:
    """Import ``parts[:1]``, then each longer prefix while it is a module: the last
    module and how many parts it took. A module missing inside one is an error."""
    module = importlib.import_module(parts[0])
    used = 1
    while used < len(parts):
        attr = parts[used]
        if hasattr(module, attr) and not inspect.ismodule(getattr(module, attr)):
            break
        name = ".".join(parts[: used + 1])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            break
        used += 1
    return module, used


def _imported_longest(key: str, ref: PyRef, parts: list[str]) -> tuple[ModuleType, int]:
    for used in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:used]))
        if module is not None:
            return module, used
    raise RecipeError(
        f"recipe kw {key}={ref}: module '{parts[0]}' is not imported, and a recipe imports "
        f"nothing; pass it with --kw {key}={ref} on the command line"
    )


def _recipe_policy(
    key: str, ref: PyRef, obj: Any, module: ModuleType | None, own: tuple[str, ...]
) -> None:
    """Refuse what a recipe may not pass to a constructor (see the module docstring)."""
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return
    if callable(obj) and getattr(obj, "__module__", None) == "torch.nn.functional":
        return
    if not callable(obj) and not inspect.ismodule(obj) and _under(module, own):
        return
    raise RecipeError(
        f"recipe kw {key}={ref} is not allowed: a recipe's py: value names only an "
        "nn.Module class, a torch.nn.functional function or a constant of the backbone's "
        f"own code; pass it with --kw {key}={ref} on the command line"
    )
