"""Output files as one transaction: checked first, all or nothing, exclusive without
--force, the user's umask, no temporary file left behind."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
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


# -- a run that is stopped: the old pair of files or the new one, never a mix ----------------

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "named_models.py"
RECIPE = 'name = "r{n}"\n[[ops]]\nop = "project"\nchannels = {c}\n'


def _bbswap() -> str:
    return str(Path(sys.executable).parent / "bbswap")


def _apply(folder: Path, n: int) -> subprocess.Popen:
    recipe = folder / f"r{n}.toml"
    recipe.write_text(RECIPE.format(n=n, c=8 * n))
    args = [_bbswap(), "apply", f"{FIXTURE}:Tagged", str(recipe), "--input", "1x3x32x32"]
    args += ["-o", str(folder / "out.py"), "--weights", str(folder / "w.pth"), "--force"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _pair(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "out.py").read_bytes(), (folder / "out.pth").read_bytes()


def test_a_stopped_run_leaves_the_old_pair_or_the_new_one(tmp_path: Path) -> None:
    import torch

    sys.path.insert(0, str(FIXTURE.parent))
    try:
        from named_models import Tagged
    finally:
        sys.path.remove(str(FIXTURE.parent))
    torch.save(Tagged().state_dict(), tmp_path / "w.pth")
    assert _apply(tmp_path, 2).wait() == 0
    new = _pair(tmp_path)
    assert _apply(tmp_path, 1).wait() == 0
    old = _pair(tmp_path)
    assert old != new
    rng = random.Random(0)
    for _ in range(4):
        run = _apply(tmp_path, 2)
        time.sleep(rng.uniform(0.5, 6.0))
        run.send_signal(signal.SIGTERM)
        code = run.wait()
        now = _pair(tmp_path)
        assert now in (old, new), "a mix of old and new files"
        assert _leftovers(tmp_path) == []
        assert run.stderr is not None and b"Traceback" not in run.stderr.read()
        # 0: done before the signal; 143: stopped by the handler; -15: stopped before it
        # was installed (while torch was still being imported)
        assert code in (0, 143, -signal.SIGTERM)
        if now == new:  # start again from the old pair
            assert _apply(tmp_path, 1).wait() == 0
