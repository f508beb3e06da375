"""Helpers shared by the command-line tests (a helper module, not a test file)."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import traceback
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from bbswap.cli.app import app

_serial = itertools.count()


def cli(*args: Any) -> Any:
    """Run ``bbswap ARGS...`` in-process; arguments may be numbers."""
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result: Any) -> Any:
    """Exit status 0 and nothing on stderr; a bug's traceback (not a user error's exit)
    goes in the message."""
    error = result.exception
    where = ""
    if error is not None and not isinstance(error, SystemExit):
        where = "".join(traceback.format_exception(error))
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, where)
    assert result.stderr == ""
    return result


def import_plain(path: Path) -> Any:
    """Import a written file as a module of its own, as a user's project would."""
    name = f"written_{path.stem}_{next(_serial)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_one_line_error(
    result: Any, *fragments: str, report: bool = False, status: int = 2
) -> str:
    """Exit ``status`` (2, a usage error; 1, a verification that fails) and exactly one
    ``bbswap: error: ...`` line on stderr with no traceback, naming every one of
    ``fragments``; returns that line. Nothing on stdout, unless ``report``: ``bbswap
    verify`` prints its table of checks before failing."""
    assert result.exit_code == status, (
        result.exit_code,
        result.stdout,
        result.stderr,
        result.exception,
    )
    if not report:
        assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stderr.endswith("\n")
    line = lines[0]
    assert line.startswith("bbswap: error: "), line
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line
