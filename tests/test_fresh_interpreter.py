"""The fresh-interpreter check of an emitted file, started ahead of the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bbswap.errors import VerificationError
from bbswap.verify import fresh
from bbswap.verify.fresh import FreshInterpreter, fresh_import, fresh_interpreter_ahead

GOOD = "import torch\nfrom torch import nn\n\nclass Net(nn.Module):\n    pass\n"


def test_verify_fresh_imports_no_torch() -> None:
    """A command can start the interpreter before it imports torch itself."""
    code = "import sys, bbswap.verify.fresh; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[FreshInterpreter]:
    """Every fresh interpreter started during the test, in order."""
    started: list[FreshInterpreter] = []

    class Counted(FreshInterpreter):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(fresh, "FreshInterpreter", Counted)
    return started


def test_the_interpreter_started_ahead_is_the_one_that_checks(
    tmp_path: Path, made: list[FreshInterpreter]
) -> None:
    file = tmp_path / "net.py"
    with fresh_interpreter_ahead():
        assert len(made) == 1  # started before the file exists
        file.write_text(GOOD)
        fresh_import(file, "Net")
        assert len(made) == 1
        fresh_import(file, "Net")  # a second check starts its own
        assert len(made) == 2
    assert all(m._process.poll() is not None for m in made)


def test_an_interpreter_started_ahead_still_blocks_bbswap(tmp_path: Path) -> None:
    file = tmp_path / "net.py"
    with fresh_interpreter_ahead():
        file.write_text("import bbswap\n" + GOOD)
        with pytest.raises(VerificationError, match="bbswap is not available"):
            fresh_import(file, "Net")


def test_it_runs_in_the_files_folder_with_that_folder_first_on_sys_path(tmp_path: Path) -> None:
    (tmp_path / "helper_mod.py").write_text("VALUE = 3\n")
    (tmp_path / "data.txt").write_text("x")
    file = tmp_path / "net.py"
    file.write_text(
        "import os\nimport helper_mod\nassert os.path.exists('data.txt')\n"
        "assert helper_mod.VALUE == 3\n" + GOOD
    )
    with fresh_interpreter_ahead():
        fresh_import(file, "Net")


def test_a_constructor_that_fails_fails_the_check(tmp_path: Path) -> None:
    file = tmp_path / "net.py"
    file.write_text(
        GOOD + "\nclass Bad(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        raise RuntimeError('no such layer')\n"
    )
    with pytest.raises(VerificationError, match="no such layer"):
        fresh_import(file, "Bad")


def test_an_unused_interpreter_is_ended(made: list[FreshInterpreter]) -> None:
    with fresh_interpreter_ahead():
        pass
    with fresh_interpreter_ahead(wanted=False):
        pass
    assert len(made) == 1
    assert made[0]._process.poll() is not None
