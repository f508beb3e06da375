"""The check that a generated file stands alone: imported, and its class constructed, in
a fresh interpreter that sees only the file's folder and the installed packages.

The interpreter can be started ahead (:func:`fresh_interpreter_ahead`), before the file
exists, so that its import of torch overlaps the work that makes the file. This module
imports no torch itself, so a command can start it first thing.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bbswap.backbones.guard import current_limit
from bbswap.errors import VerificationError

# Run by ``python -I`` (no current directory, no PYTHONPATH, no user site on sys.path).
# It imports torch at once, so that an interpreter started ahead has it ready, then reads
# its job from stdin as one line of JSON, [file, folder, class]: the folder becomes the working
# directory and goes first on sys.path, bbswap cannot be imported, and the file is
# imported and its class constructed (on the CPU: the first use of the meta device costs
# more than building a backbone's weights).
_FRESH_SCRIPT = """\
import importlib.abc, importlib.util, json, os, sys
try:
    import torch
except ImportError:
    pass  # the file's own import of torch then says so
path, folder, name = json.loads(sys.stdin.readline())
os.chdir(folder)
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "bbswap" or fullname.startswith("bbswap."):
            raise ImportError(f"{fullname} is not available to a generated file")
sys.meta_path.insert(0, Block())
sys.path.insert(0, folder)
spec = importlib.util.spec_from_file_location("bbswap_fresh_check", path)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
getattr(module, name)()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # done: skip the interpreter's teardown, which costs torch most of a second
"""


class FreshInterpreter:
    """A ``python -I`` process for :func:`fresh_import`, started as soon as it is made so
    that it imports torch while the caller goes on working; it runs one job."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-c", _FRESH_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # what the file prints says nothing about it
            stderr=subprocess.PIPE,
            text=True,
        )

    def submit(self, path: Path, class_name: str) -> None:
        """Hand over the job: import ``path`` and construct ``class_name()``."""
        job = json.dumps([str(path.resolve()), str(path.resolve().parent), class_name])
        stdin = self._process.stdin
        if stdin is None:  # pragma: no cover - made with stdin=PIPE above
            raise RuntimeError("the fresh interpreter has no stdin")
        with contextlib.suppress(BrokenPipeError):  # it ended early: its stderr says why
            stdin.write(job + "\n")  # one line: json.dumps escapes any newline
            stdin.flush()

    def wait(self, limit: float | None) -> tuple[int, str]:
        """The job's exit status and stderr. Raises subprocess.TimeoutExpired after
        ``limit`` seconds (the process is ended)."""
        try:
            _, err = self._process.communicate(timeout=limit)
        finally:
            self.close()
        return self._process.returncode, err

    def close(self) -> None:
        """End the process if it still runs (a job not given, or one that timed out)."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.communicate()


_AHEAD: contextvars.ContextVar[FreshInterpreter | None] = contextvars.ContextVar(
    "bbswap_fresh_interpreter", default=None
)


@contextlib.contextmanager
def fresh_interpreter_ahead(wanted: bool = True) -> Iterator[None]:
    """Start the interpreter of the next :func:`fresh_import` now (when ``wanted``), so
    that its import of torch overlaps the work before the file exists; ended on exit if
    no check took it."""
    if not wanted:
        yield
        return
    interpreter = FreshInterpreter()
    token = _AHEAD.set(interpreter)
    try:
        yield
    finally:
        _AHEAD.reset(token)
        interpreter.close()


@dataclass(frozen=True)
class FreshImport:
    """A fresh-interpreter check under way (from :func:`start_fresh_import`)."""

    interpreter: FreshInterpreter
    class_name: str
    what: str
    hint: str

    def wait(self) -> None:
        """Wait for the check; raises VerificationError if it failed."""
        limit = current_limit()
        try:
            status, err = self.interpreter.wait(limit)
        except subprocess.TimeoutExpired:
            raise VerificationError(
                f"importing {self.what} in a fresh interpreter ran longer than {limit:g} s"
            ) from None
        if status != 0:
            lines = [line.strip() for line in err.strip().splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit status {status}"
            raise VerificationError(
                f"{self.what} does not stand alone: importing it and constructing "
                f"{self.class_name}() in a fresh interpreter (only its folder and the "
                f"installed packages on sys.path) failed: {last}{self.hint}"
            )


def start_fresh_import(path: Path, class_name: str, what: str = "", hint: str = "") -> FreshImport:
    """Start :func:`fresh_import`'s check and return at once; ``.wait()`` gives its
    outcome, so other checks can run meanwhile."""
    interpreter = _AHEAD.get() or FreshInterpreter()
    _AHEAD.set(None)
    interpreter.submit(path, class_name)
    return FreshImport(interpreter, class_name, what or str(path), hint)


def fresh_import(path: Path, class_name: str, what: str = "", hint: str = "") -> None:
    """Import ``path`` and construct ``class_name()`` in a fresh interpreter whose
    ``sys.path`` holds only the file's folder and the installed packages, run in that
    folder, with bbswap blocked: what the file needs is then measured, not assumed (a
    module this process has imported proves nothing). The interpreter started by
    :func:`fresh_interpreter_ahead`, if any, is taken. Raises VerificationError, naming
    the file as ``what`` (default: its path) and ending with ``hint``."""
    start_fresh_import(path, class_name, what, hint).wait()
