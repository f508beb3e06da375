"""Checks that a generated (or hand-edited) backbone file is what it claims to be.

The file is imported in a fresh namespace in which ``bbswap`` cannot be imported,
constructed, given weights, and run on real CPU tensors: against a reference model
(the in-memory patched model when emitting), against its own ``output_size``, and
against a target channel count, downsample factor or another backbone's sizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.util
import math
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from bbswap.backbones.guard import current_limit, user_code
from bbswap.errors import InvalidArgument, ModelError, VerificationError
from bbswap.tracing.mask import all_ones_mask, mask_input

Size = tuple[int, int]
TOLERANCE = 1e-5


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    target: str
    checks: tuple[Check, ...]

    def __repr__(self) -> str:
        """``VerifyReport(backbone.py:Net, ok, 4 checks)``, or the first failed check."""
        failed = self.first_failure()
        state = "ok" if failed is None else f"failed {failed.name}"
        return f"VerifyReport({self.target}, {state}, {len(self.checks)} checks)"

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)


class _BlockBbswap(importlib.abc.MetaPathFinder):
    """Make ``import bbswap`` fail, so a generated file proves it stands alone."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "bbswap" or fullname.startswith("bbswap."):
            raise ImportError(f"{fullname} is not available to a generated file")
        return None


@contextlib.contextmanager
def without_bbswap() -> Iterator[None]:
    hidden = {k: v for k, v in sys.modules.items() if k == "bbswap" or k.startswith("bbswap.")}
    for key in hidden:
        del sys.modules[key]
    blocker = _BlockBbswap()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(hidden)


def import_file(path: Path, isolated: bool = True) -> ModuleType:
    """Import a Python file under a fresh module name."""
    if not path.is_file():
        raise InvalidArgument(f"file not found: {path}")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    name = f"bbswap_checked_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InvalidArgument(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and TorchScript look classes up here
    try:
        blocked = without_bbswap() if isolated else contextlib.nullcontext()
        with user_code(f"importing {path}"), blocked:
            spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise VerificationError(
            f"importing {path} failed: {type(error).__name__}: {_first_line(error)}"
        ) from error
    return module


# Run by ``python -I`` (no current directory, no PYTHONPATH, no user site on sys.path):
# the file's folder goes first on sys.path, bbswap cannot be imported, and the file is
# imported and its class constructed. argv: the file, its folder, the class.
_FRESH_SCRIPT = """\
import importlib.abc, importlib.util, sys
path, folder, name = sys.argv[1:4]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "bbswap" or fullname.startswith("bbswap."):
            raise ImportError(f"{fullname} is not available to a generated file")
sys.meta_path.insert(0, Block())
sys.path.insert(0, folder)
spec = importlib.util.spec_from_file_location("bbswap_fresh_check", path)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
getattr(module, name)()
"""


def fresh_import(path: Path, class_name: str, what: str = "", hint: str = "") -> None:
    """Import ``path`` and construct ``class_name()`` in a fresh interpreter whose
    ``sys.path`` holds only the file's folder and the installed packages, run in that
    folder, with bbswap blocked: what the file needs is then measured, not assumed (a
    module this process has imported proves nothing). Raises VerificationError, naming
    the file as ``what`` (default: its path) and ending with ``hint``."""
    what = what or str(path)
    folder = path.resolve().parent
    args = [sys.executable, "-I", "-c", _FRESH_SCRIPT, str(path.resolve()), str(folder)]
    limit = current_limit()
    try:
        done = subprocess.run(
            [*args, class_name], cwd=folder, capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired:
        raise VerificationError(
            f"importing {what} in a fresh interpreter ran longer than {limit:g} s"
        ) from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise VerificationError(
            f"{what} does not stand alone: importing it and constructing {class_name}() in a "
            f"fresh interpreter (only its folder and the installed packages on sys.path) "
            f"failed: {last}{hint}"
        )


def _first_line(error: BaseException) -> str:
    """The gist of an error in one line; a heading ending in ':' (load_state_dict's)
    takes the line after it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def construct(module: ModuleType, class_name: str, where: str) -> nn.Module:
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        found = sorted(
            k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
        )
        raise InvalidArgument(
            f"{where} has no nn.Module class '{class_name}' (classes: {', '.join(found)})"
        )
    try:
        with user_code(f"{class_name}()"), without_bbswap():
            return cls()
    except Exception as error:
        raise VerificationError(
            f"constructing {class_name}() failed: {type(error).__name__}: {_first_line(error)}"
        ) from error


def run(model: nn.Module, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The model's (first tensor) output for a seeded random input, in eval mode."""
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    with torch.no_grad(), user_code("the model's forward"), warnings.catch_warnings():
        # torch's notes on how it runs a layer (an even kernel with padding='same' copies
        # its input) say nothing about the check's result
        warnings.simplefilter("ignore", UserWarning)
        # an encoder of (img, img_mask) is run with a mask of no padding
        out = model(x, *([all_ones_mask(x)] if mask_input(model) is not None else []))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        raise VerificationError(f"the model returned {type(out).__name__}, not a tensor")
    return out


def _fails(model: nn.Module, in_chans: int, size: Size) -> bool:
    try:
        run(model, (1, in_chans, *size))
    except ModelError:  # an exit, an interrupt or the time limit: nothing was checked
        raise
    except Exception:  # any failure of the model's forward at this size
        return True
    return False


def accepted_sizes(
    candidate: nn.Module,
    reference: nn.Module | None,
    source: nn.Module | None,
    in_chans: int,
    sizes: Sequence[Size],
) -> tuple[list[Size], list[Size]]:
    """The sizes to check, and those skipped: where the file, the patched model and the
    source backbone all fail alike (DLA and HRNet take only multiples of 32). A size the
    source takes and the file does not is kept, so that its failure is reported."""
    keep, skipped = [], []
    for size in sizes:
        if (
            reference is not None
            and source is not None
            and _fails(candidate, in_chans, size)
            and _fails(reference, in_chans, size)
            and _fails(source, in_chans, size)
        ):
            skipped.append(size)
        else:
            keep.append(size)
    return keep, skipped


def compare_outputs(
    candidate: nn.Module, reference: nn.Module, in_chans: int, sizes: Sequence[Size]
) -> Check:
    """Both models in eval mode give the same outputs at every size (max abs difference)."""
    worst, where = 0.0, ""
    for h, w in sizes:
        a = run(candidate, (1, in_chans, h, w))
        b = run(reference, (1, in_chans, h, w))
        if a.shape != b.shape:
            return Check(
                "outputs",
                False,
                f"at {h}x{w} the file gives {_dims(a.shape)}, the patched model {_dims(b.shape)}",
            )
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        if diff > worst or math.isnan(diff):
            worst, where = diff, f"{h}x{w}"
    ok = worst <= TOLERANCE
    sizes_text = ", ".join(f"{h}x{w}" for h, w in sizes)
    detail = f"max |difference| {worst:.2e} over {sizes_text}" + (
        "" if ok else f" (worst at {where})"
    )
    return Check("outputs", ok, detail)


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def output_shapes(
    model: nn.Module, in_chans: int, sizes: Sequence[Size]
) -> dict[Size, tuple[int, ...]]:
    return {(h, w): tuple(run(model, (1, in_chans, h, w)).shape) for h, w in sizes}


def check_output_size(model: nn.Module, shapes: dict[Size, tuple[int, ...]]) -> Check:
    method = getattr(type(model), "output_size", None)
    if method is None:
        return Check("output_size", False, "the class has no output_size(h, w) method")
    for (h, w), out in shapes.items():
        said = tuple(method(h, w))
        real = tuple(out[-2:])
        if said != real:
            return Check(
                "output_size",
                False,
                f"output_size({h}, {w}) says {_dims(said)} but the model gives {_dims(real)}",
            )
    return Check("output_size", True, f"matches the real output at {len(shapes)} sizes")


def check_channels(shapes: dict[Size, tuple[int, ...]], channels: int) -> Check:
    for (h, w), out in shapes.items():
        if len(out) < 2 or out[1] != channels:
            return Check(
                "channels", False, f"at {h}x{w} the output is {_dims(out)}, not {channels} channels"
            )
    return Check("channels", True, f"{channels} channels at every size")


def check_stride(
    shapes: dict[Size, tuple[int, ...]], stride: Size, rounding: str = "ceil"
) -> Check:
    """The output is rule(H/S) x rule(W/S) at every size; ``any``: ceil or floor throughout."""
    sh, sw = stride
    rules = ("ceil", "floor") if rounding == "any" else (rounding,)
    first = ""
    for rule in rules:
        op = math.ceil if rule == "ceil" else math.floor
        for (h, w), out in shapes.items():
            want = (op(h / sh), op(w / sw))
            if len(out) != 4 or tuple(out[-2:]) != want:
                first = first or (
                    f"at {h}x{w} the output is {_dims(out)}; "
                    f"{rule}(H/{sh}) x {rule}(W/{sw}) is {_dims(want)}"
                )
                break
        else:
            return Check("stride", True, f"{rule}(H/{sh}) x {rule}(W/{sw}) at {len(shapes)} sizes")
    return Check("stride", False, first)


def check_like(
    shapes: dict[Size, tuple[int, ...]], like: dict[Size, tuple[int, int]], name: str
) -> Check:
    for size, out in shapes.items():
        if tuple(out[-2:]) != like[size]:
            return Check(
                "like",
                False,
                f"at {size[0]}x{size[1]} the output is {_dims(out[-2:])}, "
                f"{name} gives {_dims(like[size])}",
            )
    return Check("like", True, f"same output size as {name} at {len(shapes)} sizes")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> Check:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        return Check("weights", False, f"{what} do not load: {_first_line(error)}")
    return Check("weights", True, f"{len(state)} tensors from {what} load with strict=True")


def round_up(size: Size, multiple: Size) -> Size:
    """``size`` rounded up, per axis, to a multiple of ``multiple``."""
    return (-(-size[0] // multiple[0]) * multiple[0], -(-size[1] // multiple[1]) * multiple[1])


def sweep_sizes(minimum: Size, count: int = 10, multiple: Size = (1, 1)) -> list[Size]:
    """Small sizes for shape checks, odd and even, from the smallest valid input up (the
    next multiples for a backbone that takes only multiples of some size)."""
    mh, mw = minimum
    steps = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89][:count]
    sizes = [(mh + s, mw + (s * 3) % 37 + (s % 2)) for s in steps]
    return list(dict.fromkeys(round_up(size, multiple) for size in sizes))


def _skip_failing_sizes(
    model: nn.Module,
    reference: nn.Module,
    source: nn.Module,
    in_chans: int,
    compare_sizes: Sequence[Size],
    sweep: Sequence[Size],
) -> tuple[list[Size], list[Size], Check] | None:
    """The sizes left to compare and sweep once those the source backbone fails at too
    are dropped, and the check that says so; None when none is dropped."""
    sizes = list(dict.fromkeys([*compare_sizes, *sweep]))
    _, skipped = accepted_sizes(model, reference, source, in_chans, sizes)
    if not skipped:
        return None
    compared = [z for z in compare_sizes if z not in skipped]
    swept = [z for z in sweep if z not in skipped]
    listed = ", ".join(f"{h}x{w}" for h, w in skipped)
    detail = f"skipped {listed}: the source backbone fails there too"
    return compared, swept, Check("sizes", bool(compared) and bool(swept), detail)


def verify_model(
    model: nn.Module,
    target: str,
    *,
    in_chans: int,
    reference: nn.Module | None = None,
    compare_sizes: Sequence[Size] = (),
    sweep: Sequence[Size] = (),
    state: dict[str, torch.Tensor] | None = None,
    channels: int | None = None,
    stride: Size | None = None,
    rounding: str = "ceil",
    like: tuple[str, dict[Size, tuple[int, int]]] | None = None,
    source: nn.Module | None = None,
) -> VerifyReport:
    """Run the checks that apply; the model is put in eval mode. With a ``source`` (the
    unpatched backbone, in eval mode), sizes it fails at as the file does are skipped."""
    checks: list[Check] = [Check("import", True, "imports and constructs without bbswap")]
    if state is not None:
        checks.append(load_weights(model, state, "the carried weights"))
        if not checks[-1].ok:
            return VerifyReport(target, tuple(checks))
    model.eval()
    if reference is not None and source is not None:
        reference.eval()
        skipped = _skip_failing_sizes(model, reference, source, in_chans, compare_sizes, sweep)
        if skipped is not None:
            compare_sizes, sweep, check = skipped
            checks.append(check)
            if not check.ok:
                return VerifyReport(target, tuple(checks))
    try:
        if reference is not None:
            reference.eval()
            checks.append(compare_outputs(model, reference, in_chans, compare_sizes))
        shapes = output_shapes(model, in_chans, sweep)
    except VerificationError:
        raise
    except Exception as error:
        raise ModelError(
            f"running {target} failed: {type(error).__name__}: {_first_line(error)}"
        ) from error
    spatial = all(len(s) == 4 for s in shapes.values())
    if spatial and (hasattr(type(model), "output_size") or reference is not None):
        checks.append(check_output_size(model, shapes))
    if channels is not None:
        checks.append(check_channels(shapes, channels))
    if stride is not None:
        checks.append(check_stride(shapes, stride, rounding))
    if like is not None:
        checks.append(check_like(shapes, like[1], like[0]))
    return VerifyReport(target, tuple(checks))


def require(report: VerifyReport) -> None:
    bad = report.first_failure()
    if bad is not None:
        raise VerificationError(f"verification of {report.target} failed: {bad.name}: {bad.detail}")
