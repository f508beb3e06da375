"""The support matrix: which backbones reach which targets, and why not.

:func:`matrix` expands one or more spec patterns (``tv:*``, ``timm:resnet*``, zoo names),
then, for each backbone, inspects it on the meta device with its own input channels (those
of its first conv, for a file of the user's) and runs :func:`bbswap.search.fit.fit` for every
stride asked (to ``in_chans`` input channels, when given). With ``verify`` (the default),
each winning plan is also built with random weights, emitted to a temporary file and checked
by round trip, as ``bbswap fit -o`` does; without it, only the meta-device steps run, in
seconds per backbone.

One backbone's failure never stops the sweep: its row says what failed in a few words.
"""

from __future__ import annotations

import fnmatch
import multiprocessing
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bbswap.backbones.registry import Backbone, list_backbones, resolve
from bbswap.errors import BBSwapError, InvalidArgument, NotACNN, OneInputSize, TargetError
from bbswap.kinds import Returns, Rounding
from bbswap.parsing import FeatureTarget, parse_input, parse_target, parse_targets

STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class Cell:
    """One backbone at one target stride."""

    stride: int
    ok: bool
    macs: int | None = None  # of the winning plan
    plan: str = ""  # its edits, as fit labels them
    rule: str = ""  # "ceil" or "floor": the output size rule it follows
    verified: bool | None = None  # None: not asked
    reason: str = ""  # a few words, when not ok
    detail: str = ""  # the whole error message
    bug: bool = False  # the error was not a user error (not a BBSwapError)
    targets: tuple[FeatureTarget, ...] = ()  # a cell of several targets (``stride``: the deepest)
    one_size: bool = False  # failed because the model takes one input size (OneInputSize)
    # failed because no candidate reaches the target (TargetError): so in any process
    searched: bool = False


@dataclass(frozen=True)
class Row:
    """One backbone: its own output and a cell per target stride."""

    spec: str
    channels: int | None = None  # of the source's feature map
    downsample: tuple[float, float] | None = None
    cells: tuple[Cell, ...] = ()
    emitted: bool = False  # a winning plan was emitted (with ``verify``)
    import_reason: str = ""  # why the emitted file imports the source backbone; "" bundled
    reason: str = ""  # why the backbone itself failed (refused, cannot be built)
    detail: str = ""
    seconds: float = 0.0

    # no size rule holds for it: a fixed positional embedding, ... (NotACNN when traced), or
    # one input size only, which fails every cell (OneInputSize)
    refused: bool = False
    in_chans: int | None = None  # the input channels it was inspected with: its own

    @property
    def ok(self) -> bool:
        return not self.reason and bool(self.cells) and all(c.ok for c in self.cells)

    @property
    def refused_in_part(self) -> bool:
        """Every cell reached its target but those refused because the model takes one
        input size (a target only a cut before the stage that ties it could reach):
        a true reason at each of those, and a fit at every other."""
        return (
            not self.refused
            and not self.reason
            and any(c.one_size for c in self.cells)
            and all(c.ok or c.one_size for c in self.cells)
        )

    @property
    def failed(self) -> bool:
        """It misses a target for a reason other than a refusal."""
        return not (self.ok or self.refused or self.refused_in_part)

    @property
    def emit_mode(self) -> str:
        """How the emitted file gets the backbone's code: "bundled" or "--import";
        "" when nothing was emitted."""
        if not self.emitted:
            return ""
        return "--import" if self.import_reason else "bundled"

    @property
    def emit(self) -> str:
        """The mode with its reason: "bundled" or "--import (<why>)"."""
        mode = self.emit_mode
        return f"{mode} ({self.import_reason})" if self.import_reason else mode


@dataclass(frozen=True)
class Matrix:
    patterns: tuple[str, ...]
    strides: tuple[int, ...]
    channels: int | None
    verify: bool
    rounding: str
    rows: tuple[Row, ...]
    targets: tuple[FeatureTarget, ...] = ()  # one more cell per row: all of them at once
    returns: str = "list"  # what holds them; "" for one target and no returns asked

    def __repr__(self) -> str:
        """``Matrix(resnet18 tv:alexnet; strides 8, 16, 32; 2 of 2 backbones reach every
        target, 0 refused)``."""
        strides = ", ".join(map(str, self.strides))
        return (
            f"Matrix({' '.join(self.patterns)}; strides {strides}; {self.passed} of {self.cnns} "
            f"backbones reach every target, {len(self.rows) - self.cnns} refused)"
        )

    @property
    def passed(self) -> int:
        return sum(r.ok for r in self.rows)

    @property
    def partly(self) -> int:
        """Rows that reach every target but those refused as of one input size."""
        return sum(r.refused_in_part for r in self.rows)

    @property
    def failed(self) -> tuple[Row, ...]:
        """Rows that miss a target for a reason other than a refusal."""
        return tuple(r for r in self.rows if r.failed)

    @property
    def cnns(self) -> int:
        """Rows that follow a size rule: all but those refused for following none."""
        return sum(not r.refused for r in self.rows)


def expand(patterns: Sequence[str]) -> list[str]:
    """The specs the patterns name, in order, each once; a pattern without wildcards is
    taken as a spec as it stands (and resolved, so a typo fails here)."""
    specs: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            found = [b.spec for b in list_backbones(pattern) if fnmatch.fnmatch(b.spec, pattern)]
            if not found:
                raise InvalidArgument(
                    f"pattern '{pattern}' matches no backbone (see `bbswap list`)"
                )
            specs += found
        else:
            resolve(pattern)
            specs.append(pattern)
    return list(dict.fromkeys(specs))


def matrix(
    patterns: str | Sequence[str],
    *,
    strides: Sequence[int] = STRIDES,
    channels: int | None = None,
    verify: bool = True,
    rounding: Rounding | str = Rounding.ANY,
    input_shape: str | None = None,
    in_chans: int | None = None,
    debug: bool = False,
    progress: Callable[[int, int, str | None], None] | None = None,
    targets: Sequence[FeatureTarget | str] | None = None,
    returns: Returns | str | None = None,
    jobs: int = 1,
) -> Matrix:
    """Try every backbone the patterns name at every stride: inspect and fit on the meta
    device, then (with ``verify``) emit each winning plan with random weights to a
    temporary file and verify it by round trip. One backbone's failure is its row's
    reason; it never stops the sweep.

    Args:
        patterns: Backbone specs or fnmatch patterns (``"tv:*"``, ``"timm:resnet*"``), one
            or a sequence.
        strides: The target strides.
        channels: The target channels; default each backbone's own.
        verify: Emit and verify each winning plan (slower); ``False`` runs the meta-device
            steps only.
        rounding: The size rule: ``"any"`` (ceil or floor), ``"ceil"`` or ``"floor"``.
        input_shape: The dummy input, ``"NxCxHxW"`` or ``"HxW"``; default each
            backbone's own size (224x224, or the one size a timm model is built for).
        in_chans: Adapt every plan's stem to this many input channels (as ``fit`` does);
            each backbone is inspected with its own input channels either way.
        debug: Raise the first unexpected error (a bug) instead of reporting it in a cell.
        progress: Called as ``progress(done, total, spec)`` as each backbone begins
            (``spec`` its name, ``done`` the number finished) and once at the end
            (``spec`` None).
        targets: Several targets (``"[NAME=]STRIDE:CHANNELS"`` or
            :class:`~bbswap.parsing.FeatureTarget`): each row gets one more cell, the fit
            to all of them at once (``strides`` may then be empty).
        returns: What holds the outputs of that fit: ``"list"`` (the default for several),
            ``"tuple"`` or ``"dict"``. One target with no ``returns`` is fitted as ``fit``
            fits it: one output, the tensor itself.
        jobs: Worker processes that try backbones side by side (0: one per core); the
            rows are the same, in the same order, as with 1 (in this process).

    Returns:
        A :class:`Matrix`: one :class:`Row` per backbone, one :class:`Cell` per stride.

    Example::

        table = bbswap.matrix(["tv:resnet*", "tv:vit_b_16"], strides=(16,), channels=256,
                              verify=False)
        [(row.spec, row.refused, [c.macs for c in row.cells]) for row in table.rows]
    """
    pats = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    several = parse_targets([parse_target(t) for t in targets or []])
    if returns is not None:
        held = Returns.parse(returns, "returns").value
    else:
        held = "" if len(several) == 1 else Returns.LIST.value
    if (not strides and not several) or (strides and min(strides) < 1):
        raise InvalidArgument(
            f"{{strides}} must list positive strides, got {list(strides)}", params=("strides",)
        )
    if channels is not None and channels < 1:
        raise InvalidArgument(
            f"{{channels}} must be positive, got {channels}", params=("channels",)
        )
    if in_chans is not None and in_chans < 1:
        raise InvalidArgument(
            f"{{in_chans}} must be positive, got {in_chans}", params=("in_chans",)
        )
    if jobs < 0:
        raise InvalidArgument(
            f"{{jobs}} must be 0 (one per core) or more, got {jobs}", params=("jobs",)
        )
    rule = Rounding.parse(rounding, "rounding").value
    if input_shape is not None:
        parse_input(input_shape, 3)  # a malformed input shape is the user's error, not a row's
    specs = expand(pats)
    task = _Task(tuple(strides), channels, verify, rule, (input_shape, in_chans, several, held))
    workers = min(jobs or os.cpu_count() or 1, len(specs))
    if workers > 1:
        rows = _rows_in_workers(specs, task, debug, workers, progress)
    else:
        rows = []
        for i, spec in enumerate(specs):
            if progress is not None:
                progress(i, len(specs), spec)
            rows.append(_row(spec, *task.args, debug))
    if progress is not None:
        progress(len(specs), len(specs), None)
    return Matrix(pats, tuple(strides), channels, verify, rule, tuple(rows), several, held)


_Given = tuple[str | None, int | None, tuple[FeatureTarget, ...], str]


@dataclass(frozen=True)
class _Task:
    """What every row of a sweep is asked, as :func:`_row` takes it after the spec."""

    strides: tuple[int, ...]
    channels: int | None
    verify: bool
    rounding: str
    given: _Given

    @property
    def args(self) -> tuple[tuple[int, ...], int | None, bool, str, _Given]:
        return (self.strides, self.channels, self.verify, self.rounding, self.given)


def _rows_in_workers(
    specs: list[str],
    task: _Task,
    debug: bool,
    workers: int,
    progress: Callable[[int, int, str | None], None] | None,
) -> list[Row]:
    """The rows, tried by ``workers`` fresh processes (spawned: no thread pool of this one
    is carried over) that share the cores, one torch thread each; in the order of
    ``specs``. ``progress`` names the first backbone not yet done as each one ends.

    A worker goes on from one backbone to the next, so what one backbone leaves behind
    (memory its allocator keeps, a library's global state) can make a later one fail
    there. Every row that failed, refusals aside, is therefore tried once more, each in a
    process of its own, and that row stands: a sweep's failures are the backbones' own.

    A worker that dies (killed for memory, say) takes its pool down: the backbones the
    pool was trying then (the first ``workers`` not done) are tried again alone, the
    rest go on in a new pool, and a backbone whose worker dies when it is alone fails its
    row with that reason. A row tried again that still fails otherwise than by the search
    (a model too large to build beside another, say) is tried a last time with no other
    process at work."""
    if progress is not None:
        progress(0, len(specs), specs[0])
    rows: dict[int, Row] = {}
    alone: list[int] = []  # being tried when a pool died: each gets a process of its own
    todo = dict(enumerate(specs))
    while todo:
        done, lost = _pool_rows(todo, task, debug, [workers], progress, len(specs), len(rows))
        rows.update(done)
        alone += lost[:workers]
        todo = {i: specs[i] for i in lost[workers:]}
    failed = [i for i, row in rows.items() if row.failed]
    again = [(i, specs[i]) for i in sorted({*alone, *failed})]
    for k in range(0, len(again), workers):  # ``workers`` at a time, a process for each
        batch = dict(again[k : k + workers])
        done, lost = _pool_rows(batch, task, debug, [1] * len(batch), None, 0, 0)
        rows.update(done)
        rows.update({i: _died(specs[i]) for i in lost})
    if workers > 1:  # the last try of a row that may have lacked the memory another held
        for i, spec in again:
            if _not_of_the_search(rows[i]):
                done, lost = _pool_rows({i: spec}, task, debug, [1], None, 0, 0)
                rows.update(done)
                rows.update({i: _died(spec) for i in lost})
    return [rows[i] for i in range(len(specs))]


def _not_of_the_search(row: Row) -> bool:
    """Whether a row failed otherwise than by the search finding no plan (which fails the
    same in any process): its model not built or run (a billion-parameter model, say,
    whose allocation failed while another process held memory), its file not verified,
    or its worker died."""
    if not row.failed:
        return False
    return bool(row.reason) or any(not (c.ok or c.searched) for c in row.cells)


def _died(spec: str) -> Row:
    """The row of a backbone whose worker process died while it was tried alone."""
    return Row(
        spec,
        reason="worker died",
        detail=(
            "its worker process died (killed, perhaps for memory) while it was tried in a "
            "process of its own"
        ),
    )


def _pool_rows(
    specs: dict[int, str],
    task: _Task,
    debug: bool,
    pools: list[int],
    progress: Callable[[int, int, str | None], None] | None,
    total: int,
    finished: int,
) -> tuple[dict[int, Row], list[int]]:
    """The rows of ``specs`` (by their place in the sweep) from pools of workers, as many
    workers in each as ``pools`` says (``[1, 1]``: two pools of one, each given one
    backbone); the free memory is shared among all of them. Also the places, in order,
    of the backbones a pool that died left without a row (a worker killed for memory,
    say): never a wait without end. ``finished``: rows of the sweep done before these,
    for ``progress``. The first unexpected error with ``debug`` ends the sweep, as it
    does serially."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from bbswap.backbones.guard import current_limit

    workers = sum(pools)
    threads = max(1, (os.cpu_count() or 1) // workers)
    memory = _available_memory()
    executors = [
        ProcessPoolExecutor(
            n,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(threads, current_limit(), memory // workers if memory else None),
        )
        for n in pools
    ]
    rows: dict[int, Row] = {}
    lost: list[int] = []
    try:
        numbered = {
            executors[k % len(executors)].submit(_row_in_worker, s, task, debug): i
            for k, (i, s) in enumerate(specs.items())
        }
        pending = set(numbered)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if isinstance(future.exception(), BrokenProcessPool):
                    lost.append(numbered[future])
                else:
                    rows[numbered[future]] = future.result()
            left = [s for k, s in specs.items() if k not in rows and k not in lost]
            if progress is not None and left:
                progress(finished + len(rows), total, left[0])
    finally:
        for pool in executors:
            processes = getattr(pool, "_processes", None) or {}
            for process in list(processes.values()):
                process.terminate()  # an error or a stop signal: no worker goes on running
            pool.shutdown(wait=True, cancel_futures=True)
    return rows, sorted(lost)


_worker_limit: list[float | None] = [None]


def _available_memory() -> int | None:
    """The bytes of memory this machine has free now (Linux), or None where unknown."""
    try:
        lines = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key == "MemAvailable" and value.split()[-1:] == ["kB"]:
            return int(value.split()[0]) * 1024
    return None


def _start_worker(threads: int, limit: float | None, memory: int | None) -> None:
    """A worker's torch threads, the time limit the sweep gives user code a stage, and
    its share of the free memory: past it an allocation fails in that worker (a failed
    candidate, or its row's reason) instead of the system killing a worker, which would
    end the whole sweep."""
    import torch

    torch.set_num_threads(threads)
    _worker_limit[0] = limit
    if memory is not None:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard == resource.RLIM_INFINITY or memory < hard:
            resource.setrlimit(resource.RLIMIT_DATA, (memory, hard))


def _row_in_worker(spec: str, task: _Task, debug: bool) -> Row:
    from bbswap.backbones.guard import time_limit

    with time_limit(_worker_limit[0]):
        return _row(spec, *task.args, debug)


OUT_OF_MEMORY = "out of memory"  # a cell's reason: the sweep's machine had too little


def brief(error: BaseException) -> tuple[str, str]:
    """A few words and the whole message of an error (worded as ``bbswap fit`` says it);
    running out of memory is that; anything else not a user error is a bug."""
    if isinstance(error, BBSwapError):
        return error.brief, " ".join(error.as_flags().split())
    message = " ".join(str(error).split())
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    if isinstance(error, MemoryError):
        return OUT_OF_MEMORY, f"{type(error).__name__}: {message or 'out of memory'}{at}"
    return f"bug: {type(error).__name__}", f"{type(error).__name__}: {message}{at}"


def _row(
    spec: str,
    strides: tuple[int, ...],
    channels: int | None,
    verify: bool,
    rounding: str,
    given: _Given,
    debug: bool,
) -> Row:
    """One backbone's row; ``given`` holds the input shape and the input channels asked,
    and the targets of the several-targets cell (none: no such cell) and what holds them."""
    from bbswap.tracing.inspection import choose_input, inspect_backbone

    start = time.perf_counter()
    input_shape, in_chans = given[:2]
    try:
        backbone = resolve(spec)
        # its own input channels: those of its first conv when the registry does not know
        shape, _ = choose_input(backbone, input_shape, keep_own=True, fallback=in_chans or 3)
        report = inspect_backbone(backbone, shape)
    except Exception as error:  # one backbone's failure is a row, not the end of the sweep
        if debug:
            raise
        reason, detail = brief(error)
        refused = isinstance(error, NotACNN)
        return Row(
            spec, reason=reason, detail=detail, seconds=time.perf_counter() - start, refused=refused
        )
    stage = report.features
    # its channels as its layout holds them (the last dim of an NHWC map)
    width = stage.channels if stage is not None else report.trace.output_shape[1]
    down = stage.downsample if stage is not None else report.trace.downsample
    cells, emitted = [], None
    for stride in [*strides, *([0] if given[2] else [])]:
        cell, how = _cell(backbone, stride, channels or width, verify, rounding, given)
        if debug and cell.bug:
            raise RuntimeError(f"{spec} at stride {stride}: {cell.detail}")
        cells.append(cell)
        emitted = how if emitted is None else emitted
    seconds = time.perf_counter() - start
    own = shape[1]
    refused = all(c.one_size for c in cells) and bool(cells)
    if emitted is None:
        return Row(spec, width, down, tuple(cells), seconds=seconds, refused=refused, in_chans=own)
    return Row(
        spec,
        width,
        down,
        tuple(cells),
        True,
        emitted,
        seconds=seconds,
        refused=refused,
        in_chans=own,
    )


def _cell(
    backbone: Backbone,
    stride: int,
    channels: int,
    verify: bool,
    rounding: str,
    given: tuple[str | None, int | None, tuple[FeatureTarget, ...], str],
) -> tuple[Cell, str | None]:
    """The cell, and why its emitted file imports the backbone ("" if bundled, None if not
    emitted); ``stride`` 0 is the cell of ``given``'s several targets."""
    from bbswap.search.fit import fit, winner_input, winner_recipe

    input_shape, in_chans, several, returns = given
    aim: dict[str, Any] = {"channels": channels, "stride": stride}
    together = stride == 0  # the cell of the several targets
    if together:
        one = several[0]  # one target, no returns asked: fit's shorthand, one output
        aim = (
            {"targets": several, "returns": returns}
            if returns
            else {"channels": one.channels, "stride": one.stride}
        )
        stride = max(t.stride[0] for t in several)
    taps = several if together else ()
    try:
        found = fit(backbone, rounding=rounding, input_shape=input_shape, in_chans=in_chans, **aim)
    except Exception as error:  # reported in the cell
        reason, detail = brief(error)
        bug = not isinstance(error, (BBSwapError, MemoryError))
        failed = Cell(
            stride,
            False,
            reason=reason,
            detail=detail,
            bug=bug,
            targets=taps,
            one_size=isinstance(error, OneInputSize),
            searched=isinstance(error, TargetError),
        )
        return failed, None
    w = found.winner
    rule = w.rule or found.target.rounding
    cell = Cell(stride, True, w.trace.macs, w.label, rule, targets=taps)
    if not verify:
        return cell, None
    text = winner_input(found)
    try:
        import_reason = _export(backbone, winner_recipe(found, text), text)
    except Exception as error:  # reported in the cell
        reason, detail = brief(error)
        bug = not isinstance(error, (BBSwapError, MemoryError))
        failed = Cell(
            stride, False, cell.macs, cell.plan, cell.rule, False, reason, detail, bug, taps
        )
        return failed, None
    return Cell(stride, True, cell.macs, cell.plan, cell.rule, True, targets=taps), import_reason


def _export(backbone: Backbone, recipe: Any, input_text: str) -> str:
    """Emit and verify one plan in a temporary folder; return why the file imports the
    source backbone ("" when it bundles its code)."""
    from bbswap.codegen.export import export

    with tempfile.TemporaryDirectory() as tmp:
        done = export(backbone, recipe, Path(tmp) / "backbone.py", input_shape=input_text)
    return done.emitted.import_reason or ""
