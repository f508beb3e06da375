"""Helpers shared by the command-line tests (a helper module, not a test file)."""

from __future__ import annotations

from typing import Any


def assert_one_line_error(result: Any, *fragments: str, report: bool = False) -> str:
    """Exit status 2 and exactly one ``bbswap: error: ...`` line on stderr with no
    traceback, naming every one of ``fragments``; returns that line. Nothing on stdout,
    unless ``report``: ``bbswap verify`` prints its table of checks before failing."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
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
