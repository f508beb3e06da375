"""Shared test machinery: golden files and warning filters.

Golden files live in ``tests/goldens``. A test calls ``golden("name.txt", text)``; the
text must equal the file byte for byte (UTF-8, newlines as given). Run
``pytest --update-goldens`` to write or overwrite the files a run compares against,
then review the diff with git before committing it.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

GOLDENS = Path(__file__).parent / "goldens"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="write or overwrite the golden files in tests/goldens instead of comparing",
    )


def pytest_configure(config: pytest.Config) -> None:
    # test_zoo scripts every zoo model; torch deprecates torch.jit.script.
    config.addinivalue_line(
        "filterwarnings", r"ignore:`torch\.jit\.script` is deprecated:DeprecationWarning"
    )


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_golden(name: str, text: str, *, update: bool, root: Path = GOLDENS) -> None:
    """Compare ``text`` with ``root / name``; write it instead when ``update``."""
    path = root / name
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
            path.write_bytes(text.encode("utf-8"))
        return
    if not path.is_file():
        pytest.fail(
            f"golden file {_relative(path)} is missing; run `pytest --update-goldens` to "
            "create it, then review and commit it",
            pytrace=False,
        )
    expected = path.read_bytes().decode("utf-8")
    if expected != text:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"{_relative(path)} (golden)",
                tofile=f"{name} (this run)",
            )
        )
        if not diff:  # the texts differ only in line endings or a final newline
            diff = f"golden: {expected!r}\nthis run: {text!r}"
        pytest.fail(
            f"output differs from golden file {_relative(path)}; if the change is intended, "
            f"run `pytest --update-goldens` and review the diff\n{diff}",
            pytrace=False,
        )


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """``golden("name.txt", text)``: assert ``text`` equals ``tests/goldens/name.txt``.

    With ``--update-goldens`` the file is written (or overwritten) instead. ``name`` may
    contain sub-folders, e.g. ``golden("emit/resnet18.py", source)``.
    """
    update = bool(request.config.getoption("--update-goldens"))

    def check(name: str, text: str) -> None:
        check_golden(name, text, update=update)

    return check


@pytest.fixture(autouse=True, scope="session")
def _no_terminal_size() -> Iterator[None]:
    """Tables are checked as a pipe prints them (160 columns, not wrapped); pytest-xdist's
    workers set COLUMNS=80 and LINES=24, which Rich would follow. Session-wide, so that
    module fixtures that run the CLI see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("COLUMNS", raising=False)
        patch.delenv("LINES", raising=False)
        yield


@pytest.fixture
def frozen_progress_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """No status line or progress bar, however slow the machine: they appear only after
    bbswap.cli.progress.DELAY seconds, which this makes as long as a timer can wait (see
    tests/test_fit.py)."""
    import bbswap.cli.progress

    monkeypatch.setattr(bbswap.cli.progress, "DELAY", threading.TIMEOUT_MAX)
