"""Checks that a generated (or hand-edited) backbone file is what it claims to be.

The file is imported in a fresh namespace in which ``bbswap`` cannot be imported and
constructed on the meta device. Every shape fact comes from runs there, which allocate
nothing: its output shape at each size, checked against its own ``output_size``, a target
channel count, downsample factor or another backbone's sizes. Real CPU tensors run only
where values are compared, against a reference model (the in-memory patched model when
emitting, whose weights the file takes as they are, strictly, without a copy), or at one
size otherwise, and their shapes must agree with the meta runs. A file that cannot be
built or run on the meta device runs on real tensors instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.util
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from bbswap.backbones.guard import user_code
from bbswap.errors import InvalidArgument, ModelError, VerificationError
from bbswap.tracing.mask import all_ones_mask, mask_input
from bbswap.tracing.meta_run import any_on_meta, meta_copy, on_meta, run_on_meta
from bbswap.tracing.tracer import build_on_meta

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


def _first_line(error: BaseException) -> str:
    """The gist of an error in one line; a heading ending in ':' (load_state_dict's)
    takes the line after it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def construct(module: ModuleType, class_name: str, where: str, *, meta: bool = False) -> nn.Module:
    """An instance of the file's class; with ``meta``, built on the meta device (no
    weights allocated or initialised) when its constructor runs there, else on the CPU."""
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        found = sorted(
            k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
        )
        raise InvalidArgument(
            f"{where} has no nn.Module class '{class_name}' (classes: {', '.join(found)})"
        )
    if meta:
        built = _construct_on_meta(cls, class_name)
        if built is not None:
            return built
    try:
        with user_code(f"{class_name}()"), without_bbswap():
            return cls()
    except Exception as error:
        raise VerificationError(
            f"constructing {class_name}() failed: {type(error).__name__}: {_first_line(error)}"
        ) from error


def _construct_on_meta(cls: type[nn.Module], class_name: str) -> nn.Module | None:
    """The class built on the meta device, or None when its constructor needs real data
    (or leaves a tensor off the meta device): it is then built on the CPU."""
    try:
        with user_code(f"{class_name}()"), without_bbswap():
            model = build_on_meta(cls)
    except ModelError:
        raise
    except Exception:  # a constructor that computes with real data
        return None
    return model if on_meta(model) else None


def _first_output(out: Any) -> torch.Tensor:
    """A model's (first tensor) output."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        raise VerificationError(f"the model returned {type(out).__name__}, not a tensor")
    return out


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for a real run: the runs here are small, so a second thread
    gains little, while with other processes busy on the cores OpenMP's waiting threads
    make a small conv ten times slower or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(model: nn.Module, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The model's (first tensor) output for a seeded random input, in eval mode."""
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    with (
        torch.no_grad(),
        one_thread(),
        user_code("the model's forward"),
        warnings.catch_warnings(),
    ):
        # torch's notes on how it runs a layer (an even kernel with padding='same' copies
        # its input) say nothing about the check's result
        warnings.simplefilter("ignore", UserWarning)
        # an encoder of (img, img_mask) is run with a mask of no padding
        out = model(x, *([all_ones_mask(x)] if mask_input(model) is not None else []))
    return _first_output(out)


def run_meta(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """The model's (first tensor) output on the meta device: only its shape is real."""
    with user_code("the model's forward"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = run_on_meta(model, shape)
    return _first_output(out)


def _fails(model: nn.Module, in_chans: int, size: Size, channels: int | None = None) -> bool:
    """Whether the model's forward fails at this size: on the meta device for a model
    built there, else on real tensors. With ``channels``, a map of other channels is a
    failure too (a ViT hybrid that lays its tokens on a grid computed from the size by
    another rounding than its CNN's gives whatever channels the reshape leaves)."""
    try:
        if on_meta(model):
            out = run_meta(model, (1, in_chans, *size))
        else:
            out = run(model, (1, in_chans, *size))
    except ModelError:  # an exit, an interrupt or the time limit: nothing was checked
        raise
    except Exception:  # any failure of the model's forward at this size
        return True
    return channels is not None and out.dim() == 4 and out.shape[1] != channels


def meta_shapes(
    model: nn.Module, in_chans: int, sizes: Sequence[Size]
) -> dict[Size, tuple[int, ...]]:
    """The output shape at each size from a run on the meta device, for a model built
    there (none otherwise); a size whose meta run fails is left out, for real tensors to
    decide (torch cannot run every op on meta)."""
    if not on_meta(model):
        return {}
    model.eval()
    shapes = {}
    for h, w in sizes:
        try:
            shapes[(h, w)] = tuple(run_meta(model, (1, in_chans, h, w)).shape)
        except ModelError:  # an exit, an interrupt or the time limit
            raise
        except Exception:  # this size, or this model, fails on meta: real tensors decide
            continue
    return shapes


def compare_outputs(
    candidate: nn.Module, reference: nn.Module, in_chans: int, sizes: Sequence[Size]
) -> tuple[Check, dict[Size, tuple[int, ...]]]:
    """Both models in eval mode give the same outputs at every size (max abs
    difference); and the candidate's output shape at each size."""
    worst, where = 0.0, ""
    shapes: dict[Size, tuple[int, ...]] = {}
    for h, w in sizes:
        a = run(candidate, (1, in_chans, h, w))
        b = run(reference, (1, in_chans, h, w))
        shapes[(h, w)] = tuple(a.shape)
        if a.shape != b.shape:
            detail = (
                f"at {h}x{w} the file gives {_dims(a.shape)}, the patched model {_dims(b.shape)}"
            )
            return Check("outputs", False, detail), shapes
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        if diff > worst or math.isnan(diff):
            worst, where = diff, f"{h}x{w}"
    ok = worst <= TOLERANCE
    sizes_text = ", ".join(f"{h}x{w}" for h, w in sizes)
    detail = f"max |difference| {worst:.2e} over {sizes_text}" + (
        "" if ok else f" (worst at {where})"
    )
    return Check("outputs", ok, detail), shapes


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def output_shapes(
    model: nn.Module, in_chans: int, sizes: Sequence[Size]
) -> dict[Size, tuple[int, ...]]:
    """The output shape at each size on real tensors."""
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
    return Check("output_size", True, f"matches the model's output at {len(shapes)} sizes")


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


def load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], what: str, *, assign: bool = False
) -> Check:
    """Load ``state`` with strict=True; with ``assign`` (a model built on the meta
    device) its tensors become the model's own, so the weights are held once."""
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as error:
        return Check("weights", False, f"{what} do not load: {_first_line(error)}")
    return Check("weights", True, f"{len(state)} tensors from {what} load with strict=True")


def _on_real_tensors(
    model: nn.Module,
    state: dict[str, torch.Tensor] | None,
    rebuild: Callable[[], nn.Module] | None,
) -> tuple[nn.Module, Check | None]:
    """The file's model on real tensors, given ``state`` (the weights check, if any). A
    model built on the meta device takes the weights in place; it is built again on the
    CPU (``rebuild``) when it has no weights to take or keeps a tensor that the state
    does not hold (a buffer left out of ``state_dict``)."""
    if on_meta(model):
        if state is not None:
            check = load_weights(model, state, "the carried weights", assign=True)
            if not check.ok or not any_on_meta(model):
                return model, check
        if rebuild is None:
            raise VerificationError("the model was built on the meta device and cannot run")
        model = rebuild()
    if state is None:
        return model, None
    return model, load_weights(model, state, "the carried weights")


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
    reference: nn.Module,
    source: nn.Module,
    in_chans: int,
    failing: Sequence[Size],
    good: Size | None = None,
) -> list[Size]:
    """Of the sizes the file fails at, those the patched model and the source backbone
    fail at too (DLA and HRNet take only multiples of 32); the source fails where it
    gives other channels than at ``good``, a size the file runs at. A size the source
    takes and the file does not is kept, so that its failure is reported."""
    channels = None
    if good is not None:
        try:
            out = run_meta(source, (1, in_chans, *good)) if on_meta(source) else None
            out = out if out is not None else run(source, (1, in_chans, *good))
            channels = out.shape[1] if out.dim() == 4 else None
        except ModelError:
            raise
        except Exception:  # the source does not run at the file's size: no channels known
            channels = None
    return [
        size
        for size in failing
        if _fails(source, in_chans, size, channels) and _fails(reference, in_chans, size)
    ]


def _stand_ins(
    reference: nn.Module, source: Callable[[], nn.Module], in_chans: int, good: Size | None
) -> tuple[nn.Module, nn.Module]:
    """The patched model and the source backbone to try the file's failing sizes on: on
    the meta device if they run there at ``good`` (a size the file runs at on meta), so
    that a failure there is the size's and not the device's; else on real tensors."""
    twin = meta_copy(reference)
    if good is None or not on_meta(twin) or _fails(twin, in_chans, good):
        twin = reference
    try:
        built: nn.Module | None = build_on_meta(source)
    except ModelError:
        raise
    except Exception:  # a constructor that needs real data
        built = None
    if built is None or good is None or not on_meta(built) or _fails(built, in_chans, good):
        built = source()
    return twin, built


def _try_shapes(
    model: nn.Module, in_chans: int, sizes: Sequence[Size]
) -> tuple[dict[Size, tuple[int, ...]], dict[Size, Exception]]:
    """Real runs at ``sizes``: the output shapes, and the errors where the model fails."""
    shapes, errors = {}, {}
    for h, w in sizes:
        try:
            shapes[(h, w)] = tuple(run(model, (1, in_chans, h, w)).shape)
        except (ModelError, VerificationError):  # an exit, the time limit, not a tensor
            raise
        except Exception as error:  # any failure of the model's forward at this size
            errors[(h, w)] = error
    return shapes, errors


def _agreement(
    meta: dict[Size, tuple[int, ...]], real: dict[Size, tuple[int, ...]]
) -> Check | None:
    """A failed check where a meta run and a real one give different shapes."""
    for (h, w), shape in real.items():
        if (h, w) in meta and meta[(h, w)] != shape:
            return Check(
                "shapes",
                False,
                f"at {h}x{w} the output is {_dims(shape)} on real tensors but "
                f"{_dims(meta[(h, w)])} on the meta device",
            )
    return None


def _smallest(sizes: Sequence[Size]) -> list[Size]:
    """The smallest of ``sizes`` by area, as a list (empty when there is none)."""
    return [min(sizes, key=lambda z: (z[0] * z[1], z))] if sizes else []


def _failed(target: str, error: BaseException) -> ModelError:
    return ModelError(f"running {target} failed: {type(error).__name__}: {_first_line(error)}")


@dataclass(frozen=True)
class _Sizes:
    """The sizes to compare values at and those to check shapes at."""

    compare: tuple[Size, ...]
    sweep: tuple[Size, ...]

    @property
    def all(self) -> list[Size]:
        return list(dict.fromkeys([*self.compare, *self.sweep]))

    def without(self, skipped: Sequence[Size]) -> _Sizes:
        """These sizes less ``skipped``; values are compared at the smallest size left
        when no size to compare them at is."""
        sweep = tuple(z for z in self.sweep if z not in skipped)
        compare = tuple(z for z in self.compare if z not in skipped)
        left = [z for z in self.all if z not in skipped]
        return _Sizes(compare or tuple(_smallest(left)), sweep)


def verify_model(
    model: nn.Module,
    target: str,
    *,
    in_chans: int,
    rebuild: Callable[[], nn.Module] | None = None,
    reference: nn.Module | None = None,
    compare_sizes: Sequence[Size] = (),
    sweep: Sequence[Size] = (),
    state: dict[str, torch.Tensor] | None = None,
    channels: int | None = None,
    stride: Size | None = None,
    rounding: str = "ceil",
    like: tuple[str, dict[Size, tuple[int, int]]] | None = None,
    source: Callable[[], nn.Module] | None = None,
    targets: Sequence[tuple[Size, int]] = (),
) -> VerifyReport:
    """Run the checks that apply; the models are put in eval mode.

    ``model`` is the file's model, built on the meta device if it could be (``rebuild``
    builds it on the CPU). Its output shape at every size comes from a meta run, where
    nothing is allocated; real tensors run where values are compared (``compare_sizes``,
    against ``reference``), where a meta run fails, and at the smallest size when no
    other real run is made, so that the meta runs are checked against a real one. With a
    ``source`` (a builder of the unpatched backbone), sizes that the file, the patched
    model and the source all fail at are skipped; when that leaves no size to compare
    values at, they are compared at the smallest size left.
    """
    checks: list[Check] = [Check("import", True, "imports and constructs without bbswap")]
    plan = _Sizes(tuple(compare_sizes), tuple(sweep))
    meta = meta_shapes(model, in_chans, plan.all)
    model, loaded = _on_real_tensors(model, state, rebuild)
    checks += [loaded] if loaded is not None else []
    if loaded is not None and not loaded.ok:
        return VerifyReport(target, tuple(checks))
    for m in (model, reference):
        if m is not None:
            m.eval()
    if returns_several(model):
        several = check_several(model, in_chans, sweep, reference, compare_sizes, targets, rounding)
        return VerifyReport(target, (*checks, *several))
    plan, real, skipping = _real_runs(model, target, in_chans, plan, meta, reference, source)
    checks += [skipping] if skipping is not None else []
    if skipping is not None and not skipping.ok:
        return VerifyReport(target, tuple(checks))
    if reference is not None:
        compared, values = _compare(model, reference, in_chans, plan.compare, target)
        checks.append(compared)
        real |= values
    checks += [c for c in [_agreement(meta, real)] if c is not None]
    shapes = {z: real[z] if z in real else meta[z] for z in plan.all}
    checks += _shape_checks(model, shapes, reference is not None, channels, stride, rounding, like)
    return VerifyReport(target, tuple(checks))


def _real_runs(
    model: nn.Module,
    target: str,
    in_chans: int,
    plan: _Sizes,
    meta: dict[Size, tuple[int, ...]],
    reference: nn.Module | None,
    source: Callable[[], nn.Module] | None,
) -> tuple[_Sizes, dict[Size, tuple[int, ...]], Check | None]:
    """Real runs where the meta runs gave no shape (at the smallest size when they gave
    every one and nothing else runs for real); sizes the source fails at too are dropped
    from ``plan``, any other failure is the file's error. The sizes left, the real shapes
    and the check that names the sizes skipped (None when none is)."""
    unknown = [z for z in plan.all if z not in meta]
    if not unknown and reference is None:
        unknown = _smallest(plan.all)
    real, errors = _try_shapes(model, in_chans, unknown)
    check = None
    if errors and reference is not None and source is not None:
        good = next(iter(meta), None)
        stand_ins = _stand_ins(reference, source, in_chans, good)
        skipped = _skip_failing_sizes(*stand_ins, in_chans, list(errors), good)
        if skipped:
            plan = plan.without(skipped)
            check = _sizes_check(skipped, plan.compare, plan.sweep)
        errors = {z: e for z, e in errors.items() if z not in skipped}
    if errors:
        raise _failed(target, next(iter(errors.values())))
    return plan, real, check


def _compare(
    model: nn.Module, reference: nn.Module, in_chans: int, sizes: Sequence[Size], target: str
) -> tuple[Check, dict[Size, tuple[int, ...]]]:
    try:
        return compare_outputs(model, reference, in_chans, sizes)
    except (ModelError, VerificationError):
        raise
    except Exception as error:  # a forward that fails on real tensors
        raise _failed(target, error) from error


def _sizes_check(skipped: Sequence[Size], compared: Sequence[Size], swept: Sequence[Size]) -> Check:
    listed = ", ".join(f"{h}x{w}" for h, w in skipped)
    detail = f"skipped {listed}: the source backbone fails there too"
    return Check("sizes", bool(compared) and bool(swept), detail)


def _shape_checks(
    model: nn.Module,
    shapes: dict[Size, tuple[int, ...]],
    has_reference: bool,
    channels: int | None,
    stride: Size | None,
    rounding: str,
    like: tuple[str, dict[Size, tuple[int, int]]] | None,
) -> list[Check]:
    checks = []
    spatial = all(len(s) == 4 for s in shapes.values())
    if spatial and (hasattr(type(model), "output_size") or has_reference):
        checks.append(check_output_size(model, shapes))
    if channels is not None:
        checks.append(check_channels(shapes, channels))
    if stride is not None:
        checks.append(check_stride(shapes, stride, rounding))
    if like is not None:
        name, sizes = like
        checks.append(check_like({z: s for z, s in shapes.items() if z in sizes}, sizes, name))
    return checks


def require(report: VerifyReport) -> None:
    bad = report.first_failure()
    if bad is not None:
        raise VerificationError(f"verification of {report.target} failed: {bad.name}: {bad.detail}")


# -- a backbone that returns several outputs ----------------------------------------------------
# (an emitted class with ``feature_info``: every output is compared and checked)


def returns_several(model: nn.Module) -> bool:
    """Whether the class states several outputs (``feature_info``, timm's convention)."""
    info = getattr(type(model), "feature_info", None)
    return isinstance(info, list) and all(isinstance(i, dict) for i in info)


def run_all(model: nn.Module, shape: Sequence[int], seed: int = 0) -> list[torch.Tensor]:
    """Every tensor the model returns for a seeded random input (eval mode), in order."""
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    with torch.no_grad(), user_code("the model's forward"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = model(x)
    items = list(out.values()) if isinstance(out, dict) else out
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in items):
        raise VerificationError(f"the model returned {type(out).__name__}, not tensors")
    return list(items)


def check_several(
    model: nn.Module,
    in_chans: int,
    sweep: Sequence[Size],
    reference: nn.Module | None = None,
    compare_sizes: Sequence[Size] = (),
    targets: Sequence[tuple[Size, int]] = (),
    rounding: str = "ceil",
) -> list[Check]:
    """The checks of every output: the same values as ``reference``; the sizes
    ``output_size`` gives; the channels ``feature_info`` states; each of ``targets``
    ((stride, channels), one per output) with the ``rounding`` rule."""
    checks = []
    if reference is not None:
        checks.append(_compare_all(model, reference, in_chans, compare_sizes))
        if not checks[-1].ok:
            return checks
    shapes = {
        (h, w): [tuple(t.shape) for t in run_all(model, (1, in_chans, h, w))] for h, w in sweep
    }
    checks.append(_sizes_said(model, shapes))
    info = type(model).feature_info  # type: ignore[attr-defined]  # returns_several saw it
    checks.append(_channels_stated(info, shapes))
    if targets:
        checks.append(_targets_met(shapes, targets, rounding))
    return checks


def _compare_all(
    model: nn.Module, reference: nn.Module, in_chans: int, sizes: Sequence[Size]
) -> Check:
    worst, where = 0.0, ""
    count = 0
    for h, w in sizes:
        got, want = run_all(model, (1, in_chans, h, w)), run_all(reference, (1, in_chans, h, w))
        count = len(want)
        if [a.shape for a in got] != [b.shape for b in want]:
            return Check(
                "outputs",
                False,
                f"at {h}x{w} the file gives {', '.join(_dims(a.shape) for a in got)}, the "
                f"patched model {', '.join(_dims(b.shape) for b in want)}",
            )
        for a, b in zip(got, want):
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            if diff > worst or math.isnan(diff):
                worst, where = diff, f"{h}x{w}"
    ok = worst <= TOLERANCE
    sizes_text = ", ".join(f"{h}x{w}" for h, w in sizes)
    detail = f"max |difference| {worst:.2e} in {count} outputs over {sizes_text}" + (
        "" if ok else f" (worst at {where})"
    )
    return Check("outputs", ok, detail)


def _sizes_said(model: nn.Module, shapes: dict[Size, list[tuple[int, ...]]]) -> Check:
    method = getattr(type(model), "output_size", None)
    if method is None:
        return Check("output_size", False, "the class has no output_size(h, w) method")
    for (h, w), outs in shapes.items():
        said = [tuple(s) for s in method(h, w)]
        real = [tuple(o[-2:]) for o in outs]
        if said != real:
            return Check(
                "output_size",
                False,
                f"output_size({h}, {w}) says {', '.join(map(_dims, said))} but the model "
                f"gives {', '.join(map(_dims, real))}",
            )
    n = len(next(iter(shapes.values()), []))
    return Check("output_size", True, f"matches all {n} outputs at {len(shapes)} sizes")


def _channels_stated(
    info: list[dict[str, Any]], shapes: dict[Size, list[tuple[int, ...]]]
) -> Check:
    stated = [i.get("num_chs") for i in info]
    for (h, w), outs in shapes.items():
        real = [o[1] if len(o) == 4 else None for o in outs]
        if real != stated:
            return Check(
                "feature_info",
                False,
                f"at {h}x{w} the outputs have {real} channels; feature_info says {stated}",
            )
    return Check("feature_info", True, f"channels {stated} at every size, as stated")


def _targets_met(
    shapes: dict[Size, list[tuple[int, ...]]], targets: Sequence[tuple[Size, int]], rounding: str
) -> Check:
    """Output i has target i's channels and follows its stride's rule (one rule for all)."""
    rules = ("ceil", "floor") if rounding == "any" else (rounding,)
    first = ""
    for rule in rules:
        op = math.ceil if rule == "ceil" else math.floor
        bad = ""
        for (h, w), outs in shapes.items():
            if len(outs) != len(targets):
                bad = f"the model gives {len(outs)} outputs, not {len(targets)}"
                break
            for i, (out, ((sh, sw), chans)) in enumerate(zip(outs, targets)):
                want = (1, chans, op(h / sh), op(w / sw))
                if len(out) != 4 or tuple(out[1:]) != want[1:]:
                    bad = (
                        f"at {h}x{w} output {i} is {_dims(out[1:])}; {chans} channels at "
                        f"{rule}(H/{sh}) x {rule}(W/{sw}) is {_dims(want[1:])}"
                    )
                    break
            if bad:
                break
        if not bad:
            return Check(
                "targets", True, f"{len(targets)} outputs at their channels and {rule} sizes"
            )
        first = first or bad
    return Check("targets", False, first)
