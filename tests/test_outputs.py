"""Output files as one transaction: checked first, all or nothing, exclusive without
--force, the user's umask, no temporary file left behind."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from bbswap.codegen.outputs import check_output, write_files
from bbswap.errors import InvalidArgument


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_files_are_written_together_with_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_files({tmp_path / "a.pth": b"w", tmp_path / "a.py": b"x = 1\n"}, force=False)
    finally:
        os.umask(old)
    assert (tmp_path / "a.py").read_bytes() == b"x = 1\n"
    assert stat.S_IMODE((tmp_path / "a.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a.pth").stat().st_mode) == 0o644
    assert _leftovers(tmp_path) == []


def test_an_existing_file_is_kept_without_force_and_nothing_else_is_written(tmp_path) -> None:
    (tmp_path / "a.py").write_text("old")
    with pytest.raises(InvalidArgument, match="exists; pass --force"):
        write_files({tmp_path / "a.pth": b"new", tmp_path / "a.py": b"new"}, force=False)
    assert (tmp_path / "a.py").read_text() == "old"
    assert not (tmp_path / "a.pth").exists()
    assert _leftovers(tmp_path) == []


def test_force_replaces_both(tmp_path: Path) -> None:
    for name in ("a.py", "a.pth"):
        (tmp_path / name).write_text("old")
    write_files({tmp_path / "a.pth": b"new", tmp_path / "a.py": b"new"}, force=True)
    assert {p.read_text() for p in tmp_path.iterdir()} == {"new"}


def test_of_concurrent_writers_to_a_new_path_exactly_one_wins(tmp_path: Path) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def writer(n: int) -> None:
        barrier.wait()
        try:
            write_files({tmp_path / "a.py": f"writer {n}".encode()}, force=False)
            outcomes.append(f"won {n}")
        except InvalidArgument:
            outcomes.append("lost")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 3
    assert (tmp_path / "a.py").read_text() == "writer " + winners[0].split()[1]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["missing-folder", "file-as-folder", "directory", "unwritable"])
def test_unwritable_paths_are_refused_before_any_work(tmp_path: Path, case: str) -> None:
    (tmp_path / "f").write_text("a file")
    (tmp_path / "d.py").mkdir()
    path = {
        "missing-folder": tmp_path / "missing" / "a.py",
        "file-as-folder": tmp_path / "f" / "a.py",
        "directory": tmp_path / "d.py",
        "unwritable": Path("/proc") / "a.py",  # not writable, even for root
    }[case]
    with pytest.raises(InvalidArgument) as refused:
        check_output(path, force=False, what="-o")
    assert str(path) in str(refused.value)
