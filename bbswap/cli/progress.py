"""What a long command is doing, on stderr while it runs.

A status line names the phase the library reports (:class:`bbswap.kinds.Phase`), with
the count of candidates evaluated while ``fit`` evaluates them; ``matrix`` has a bar that
names the backbone it is on. Either appears only on a terminal, only once the command has
run for :data:`DELAY` seconds, and is gone when the command ends: piped, or with
``--json``, nothing is written.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.status import Status

from bbswap.kinds import Phase

DELAY = 1.0  # seconds before anything is shown: a quick command shows nothing

PHASES = {
    Phase.TRACE: "tracing the backbone on the meta device",
    Phase.CANDIDATES: "evaluating candidates",
    Phase.BUILD: "building the patched backbone with its weights",
    Phase.EMIT: "writing its source",
    Phase.VERIFY: "verifying the file: a fresh import compared with the patched model",
}


class Activity:
    """The status line of a running command; its methods are the library's callbacks."""

    def __init__(self, status: Status) -> None:
        self._status = status

    def phase(self, phase: Phase) -> None:
        """``on_phase``: a phase begins."""
        self._status.update(PHASES[phase])

    def step(self, done: int, total: int) -> None:
        """``progress`` of ``fit``: ``done`` of ``total`` candidates evaluated."""
        self._status.update(f"{PHASES[Phase.CANDIDATES]}: {done} of {total}")


class _Later:
    """A Rich live display (a status line, a progress bar) started after :data:`DELAY`
    seconds, unless the block it covers is over by then; stopped when it is."""

    def __init__(self, live: Status | Progress) -> None:
        self._live = live
        self._timer = threading.Timer(DELAY, live.start)
        self._timer.daemon = True

    def __enter__(self) -> None:
        self._timer.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        self._timer.join()  # a display being started is started before it is stopped
        self._live.stop()


def _shown(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def activity(quiet: bool, first: Phase | None = None) -> Iterator[Activity | None]:
    """A status line for the block (None when ``quiet`` or stderr is not a terminal),
    naming ``first`` until the library reports a phase."""
    if not _shown(quiet):
        yield None
        return
    text = PHASES[first] if first is not None else "working"
    status = Status(text, console=Console(stderr=True), spinner="dots")
    with _Later(status):
        yield Activity(status)


@contextlib.contextmanager
def backbone_bar(quiet: bool) -> Iterator[Callable[[int, int, str | None], None] | None]:
    """A bar for ``matrix``: how many backbones are done and which one it is on."""
    if not _shown(quiet):
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("trying backbones", total=None)

    def update(done: int, total: int, spec: str | None) -> None:
        where = f"trying {escape(spec)}" if spec is not None else "done"
        bar.update(task, completed=done, total=total, description=where)

    with _Later(bar):
        yield update
