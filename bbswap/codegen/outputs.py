"""Writing output files as one transaction.

Every output path is checked before any work (:func:`check_output`); the files are then
staged as temporary files beside their targets and renamed into place together, with
SIGINT, SIGTERM and SIGHUP held back during the renames, so a run that is stopped leaves
either the old files or the new ones. Without ``force`` each file is created
exclusively (a hard link, which fails if the name exists), so of several runs writing
the same new path exactly one wins. Files get the mode the user's umask gives, and no
temporary file is left behind, on an error or a signal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from bbswap.errors import InvalidArgument

_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def check_output(path: Path, force: bool, what: str) -> None:
    """Refuse, before any work, an output path that cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise InvalidArgument(f"{what} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise InvalidArgument(f"{what} {path}: {parent} is not a folder")
    if path.is_dir():
        raise InvalidArgument(f"{what} {path}: is a folder; give a file name")
    if path.exists() and not force:
        raise InvalidArgument(f"{path} exists; pass --force to overwrite it")
    try:  # the one sure test: make (and drop) a file there
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise InvalidArgument(f"{what} {path}: cannot write in {parent}: {reason}") from None


def _mode() -> int:
    """The mode a new file gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold back the usual stop signals; those that arrive are delivered at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stage(path: Path, data: bytes) -> Path:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise InvalidArgument(_os_message(error, path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode())
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise InvalidArgument(_os_message(error, path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _place(tmp: Path, path: Path, force: bool) -> None:
    if force:
        os.replace(tmp, path)
        return
    os.link(tmp, path)  # fails with EEXIST if another run created it first
    tmp.unlink()


def write_files(files: dict[Path, bytes], force: bool) -> None:
    """Write every file or none: staged first, then renamed into place together."""
    staged: dict[Path, Path] = {}
    placed: list[Path] = []
    try:
        for path, data in files.items():
            staged[path] = _stage(path, data)
        with _signals_held():
            try:
                for path, tmp in staged.items():
                    _place(tmp, path, force)
                    placed.append(path)
            except FileExistsError as error:
                for path in placed:  # ours, just created: the other run's files stay
                    path.unlink(missing_ok=True)
                raise InvalidArgument(
                    f"{error.filename or path} exists; pass --force to overwrite it"
                ) from None
    except OSError as error:
        raise InvalidArgument(_os_message(error, Path(error.filename or "?"))) from None
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def _os_message(error: OSError, path: Path) -> str:
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return f"cannot write {path}: {reason}"
