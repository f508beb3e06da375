"""A guard around the user's own code: importing a model file, its constructor, its
forward, and the emitted file's.

User code may call ``sys.exit()``, raise ``KeyboardInterrupt`` or never return. Under
:func:`user_code` the first two become a :class:`ModelError` naming what was running,
and a time limit (:func:`time_limit`, 300 s by default; the CLI's ``--timeout``) stops
code that runs too long, again as a ``ModelError`` that names the stage it reached.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from bbswap.errors import ModelError

DEFAULT_TIMEOUT = 300.0
_limit: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "bbswap_time_limit", default=DEFAULT_TIMEOUT
)
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "bbswap_deadline", default=None
)


class TimedOut(BaseException):
    """Raised inside user code when its time is up (a BaseException, so that the user's
    own ``except Exception`` cannot swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Give user code run in this block at most ``seconds`` (None: no limit) per stage."""
    if seconds is not None and seconds <= 0:
        raise ModelError(f"the time limit must be a positive number of seconds, got {seconds:g}")
    token = _limit.set(seconds)
    try:
        yield
    finally:
        _limit.reset(token)


def current_limit() -> float | None:
    """The time limit a stage of user code gets here (None: no limit)."""
    return _limit.get()


REPEAT = 0.5  # seconds between the repeats of a time limit's stop, once it is due


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise TimedOut


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """SIGALRM after ``seconds`` in the main thread, a timer elsewhere. A guard inside
    another keeps the outer deadline when that is sooner."""
    outer = _deadline.get()
    now = time.monotonic()
    end = now + seconds if seconds is not None else None
    if outer is not None and (end is None or outer < end):
        end = outer
    if end is None:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        with _thread_alarm(end - now):
            yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    token = _deadline.set(end)
    # and again every REPEAT seconds: a TimedOut raised where Python swallows it (a
    # finalizer, a garbage-collector callback) must not let the code run on unchecked
    signal.setitimer(signal.ITIMER_REAL, max(end - now, 1e-3), REPEAT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _deadline.reset(token)
        signal.signal(signal.SIGALRM, previous)
        if outer is not None:  # the outer guard's alarm goes on
            signal.setitimer(signal.ITIMER_REAL, max(outer - time.monotonic(), 1e-3), REPEAT)


@contextlib.contextmanager
def _thread_alarm(seconds: float) -> Iterator[None]:
    """Outside the main thread no signal can be used: a timer raises TimedOut in this
    thread instead (at its next bytecode, so a Python loop is stopped)."""
    ident, lock, done = threading.get_ident(), threading.Lock(), [False]

    finished = threading.Event()

    def stop() -> None:
        # raised again every REPEAT seconds until the block is over: one that lands where
        # Python swallows it (a finalizer, a garbage-collector callback) is not the last
        if finished.wait(max(seconds, 1e-3)):
            return
        while True:
            with lock:  # never once the block is over
                if done[0]:
                    return
                exc = ctypes.py_object(TimedOut)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), exc)
            if finished.wait(REPEAT):
                return

    timer = threading.Thread(target=stop, daemon=True)
    timer.start()
    try:
        yield
    finally:
        with lock:
            done[0] = True
        finished.set()


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run the user's code described by ``what`` (``the forward of resnet.py:ResNet``)."""
    seconds = _limit.get()
    try:
        with _alarm(seconds):
            yield
    except TimedOut:
        raise ModelError(
            f"{what} ran longer than the time limit of {seconds:g} s and was stopped "
            "(pass a larger --timeout if it is only slow)",
            brief="timed out",
        ) from None
    except SystemExit as error:
        raise ModelError(f"{what} called sys.exit({error.code!r})", brief="exits") from None
    except KeyboardInterrupt:
        raise ModelError(f"{what} raised KeyboardInterrupt", brief="interrupted") from None
