"""Verification of an emitted file: shapes on the meta device, values on real tensors.

The checks of ``export`` take every shape fact (``output_size`` at twelve sizes and more,
which sizes the source backbone takes) from runs on the meta device, and run real tensors
only where values are compared, at two small odd sizes. These tests show that the checks
still catch what real runs at every size caught: files tampered with after emission (an
``output_size`` wrong at one size of the sweep, a forward whose shape is wrong at one
size, values off by 1e-3, a tensor too many, a forward that behaves otherwise on meta)
all fail; files the meta device cannot take whole (a buffer outside the state dict, a
constructor that computes with data) are still checked, on real tensors; and of a
backbone that takes only even sizes, the odd ones are skipped because the source fails
there too, while a size only the file fails at is an error.

The tampering is appended to the emitted source, so the file's own code is unchanged
and the change is plain to read here.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from recipe_helpers import kwargs_for, one_thread, randomize_batchnorm, recipe

import bbswap.verify.checks as checks
from bbswap.backbones.registry import resolve
from bbswap.codegen.export import check_emitted, check_sizes, export
from bbswap.codegen.module_file import Emitted, emit
from bbswap.errors import ModelError, VerificationError
from bbswap.surgery.apply import ApplyResult, apply_recipe, source_input
from bbswap.tracing.meta_run import on_meta
from bbswap.verify.file import check_file

SMALL = recipe(
    {"op": "truncate", "after": "layer3"},
    {"op": "project", "channels": 32},
    name="resnet18-small",
)
SPEC, INPUT = "resnet18", "1x3x32x32"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from one_thread()


@pytest.fixture(scope="module")
def patched() -> ApplyResult:
    """resnet18 cut after layer3 and projected to 32 channels, with random weights."""
    backbone = resolve(SPEC, kwargs_for(SPEC))
    _, chans = source_input(backbone, SMALL, INPUT)
    torch.manual_seed(0)
    model = backbone.build(in_chans=chans)
    randomize_batchnorm(model, 0)
    return apply_recipe(backbone, SMALL, INPUT, model=model)


@pytest.fixture(scope="module")
def emitted(patched: ApplyResult) -> Emitted:
    return emit(patched)


def tampered(emitted: Emitted, code: str) -> Emitted:
    """The emitted file with ``code`` appended; ``Cls`` in it is the patched class."""
    extra = textwrap.dedent(code).replace("Cls", emitted.class_name)
    return dataclasses.replace(emitted, source=emitted.source + "\n\n" + extra)


def failure(emitted: Emitted, patched: ApplyResult) -> checks.Check:
    report = check_emitted(emitted, patched)
    bad = report.first_failure()
    assert bad is not None, report.checks
    return bad


def shape_only_size(patched: ApplyResult) -> tuple[int, int]:
    """A size of the sweep at which no real tensor runs: only a meta run sees it."""
    compared, swept = check_sizes(patched.after)
    return max(z for z in swept if z not in compared)


# -- what a correct file costs ----------------------------------------------------------------


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[int, ...]]]:
    """The input shapes of every real run and every meta run the checks make."""
    seen: dict[str, list[tuple[int, ...]]] = {"real": [], "meta": []}

    def recording(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(model: torch.nn.Module, shape: Any, *args: Any) -> Any:
            seen[name].append(tuple(shape))
            return original(model, shape, *args)

        return wrapper

    monkeypatch.setattr(checks, "run", recording("real", checks.run))
    monkeypatch.setattr(checks, "run_meta", recording("meta", checks.run_meta))
    return seen


def test_a_correct_file_runs_real_tensors_only_where_values_are_compared(emitted, patched, runs):
    report = check_emitted(emitted, patched)
    assert report.ok, report.checks
    compared, swept = check_sizes(patched.after)
    sizes = list(dict.fromkeys([*compared, *swept]))
    assert len(sizes) >= 12 and len(compared) == 2
    assert all(h % 2 and w % 2 for h, w in compared)  # odd sizes, both axes
    c = patched.after.input_shape[1]
    # the file and the patched model once each at each compared size, nothing else
    assert sorted(runs["real"]) == sorted([(1, c, *z) for z in compared] * 2)
    assert runs["meta"] == [(1, c, *z) for z in sizes]
    by_name = {check.name: check for check in report.checks}
    assert by_name["output_size"].detail == f"matches the model's output at {len(sizes)} sizes"
    assert by_name["weights"].ok and "strict=True" in by_name["weights"].detail


def test_the_weights_are_held_once(emitted, patched, tmp_path):
    """A file built on the meta device takes the patched model's tensors themselves."""
    file = tmp_path / "shared.py"
    file.write_text(emitted.source, encoding="utf-8")
    model = checks.construct(checks.import_file(file), emitted.class_name, "it", meta=True)
    assert on_meta(model)
    state = patched.model.state_dict()
    compared, swept = check_sizes(patched.after)
    report = checks.verify_model(
        model, "it", in_chans=3, reference=patched.model, compare_sizes=compared,
        sweep=swept, state=state,
    )  # fmt: skip
    assert report.ok, report.checks
    mine = model.state_dict()
    assert list(mine) == list(state)
    assert all(mine[k].data_ptr() == state[k].data_ptr() for k in state if state[k].numel())


# -- files that must fail -------------------------------------------------------------------


def test_an_output_size_wrong_at_one_size_of_the_sweep_fails(emitted, patched):
    h, w = shape_only_size(patched)
    bad = tampered(
        emitted,
        f"""
        _right = Cls.output_size


        def _one_off(h, w):
            oh, ow = _right(h, w)
            return (oh + 1, ow) if (h, w) == ({h}, {w}) else (oh, ow)


        Cls.output_size = staticmethod(_one_off)
        """,
    )
    found = failure(bad, patched)
    right = patched.after.output_size(h, w)
    assert found.name == "output_size"
    assert found.detail == (
        f"output_size({h}, {w}) says {right[0] + 1}x{right[1]} "
        f"but the model gives {right[0]}x{right[1]}"
    )


def test_a_forward_whose_shape_is_wrong_at_one_size_fails(emitted, patched):
    """Only a meta run sees this size: the meta runs are what catch it."""
    h, w = shape_only_size(patched)
    bad = tampered(
        emitted,
        f"""
        _forward = Cls.forward


        def _cropped(self, x):
            y = _forward(self, x)
            return y[..., :-1] if tuple(x.shape[-2:]) == ({h}, {w}) else y


        Cls.forward = _cropped
        """,
    )
    found = failure(bad, patched)
    right = patched.after.output_size(h, w)
    assert found.name == "output_size"
    assert f"output_size({h}, {w}) says {right[0]}x{right[1]}" in found.detail
    assert found.detail.endswith(f"the model gives {right[0]}x{right[1] - 1}")


def test_values_that_differ_fail(emitted, patched):
    bad = tampered(
        emitted,
        """
        _forward = Cls.forward
        Cls.forward = lambda self, x: _forward(self, x) + 1e-3
        """,
    )
    found = failure(bad, patched)
    assert found.name == "outputs"
    assert found.detail.startswith("max |difference| 1.00e-03 over ")


def test_a_tensor_too_many_fails_the_strict_load(emitted, patched):
    bad = tampered(
        emitted,
        """
        _init = Cls.__init__


        def _more(self):
            _init(self)
            self.extra = torch.nn.Parameter(torch.zeros(3))


        Cls.__init__ = _more
        """,
    )
    found = failure(bad, patched)
    assert found.name == "weights"
    assert "do not load" in found.detail and '"extra"' in found.detail


def test_a_forward_that_differs_on_the_meta_device_fails(emitted, patched):
    bad = tampered(
        emitted,
        """
        _forward = Cls.forward


        def _other_on_meta(self, x):
            y = _forward(self, x)
            return y[..., :-1] if x.is_meta else y


        Cls.forward = _other_on_meta
        """,
    )
    found = failure(bad, patched)
    assert found.name == "shapes"
    assert "on real tensors but" in found.detail and "on the meta device" in found.detail


def test_bbswap_verify_still_fails_a_wrong_output_size(emitted, patched, tmp_path):
    """``bbswap verify`` (no reference): shapes on meta, one real run to check them."""
    h, w = shape_only_size(patched)
    bad = tampered(
        emitted,
        f"""
        _right = Cls.output_size
        Cls.output_size = staticmethod(
            lambda h, w: (0, 0) if (h, w) == ({h}, {w}) else _right(h, w)
        )
        """,
    )
    file = tmp_path / "bad.py"
    file.write_text(bad.source, encoding="utf-8")
    report = check_file(f"{file}:{emitted.class_name}", sizes=f"33x45,{h}x{w}")
    found = report.first_failure()
    assert found is not None and found.name == "output_size"
    assert f"output_size({h}, {w}) says 0x0" in found.detail


# -- files the meta device cannot take: checked on real tensors -----------------------------


def test_a_buffer_outside_the_state_dict_is_built_on_the_cpu(emitted, patched, runs):
    good = tampered(
        emitted,
        """
        _init = Cls.__init__
        _forward = Cls.forward


        def _with_scale(self):
            _init(self)
            self.register_buffer("scale", torch.ones(1), persistent=False)


        Cls.__init__ = _with_scale
        Cls.forward = lambda self, x: _forward(self, x) * self.scale
        """,
    )
    report = check_emitted(good, patched)
    assert report.ok, report.checks
    compared, swept = check_sizes(patched.after)
    assert len(runs["meta"]) == len(set(compared) | set(swept))  # shapes still on meta


def test_a_constructor_that_computes_with_data_is_built_on_the_cpu(emitted, patched, runs):
    good = tampered(
        emitted,
        """
        _init = Cls.__init__


        def _counting(self):
            _init(self)
            self.offsets = torch.arange(3)
            self.count = int(self.offsets.sum())


        Cls.__init__ = _counting
        """,
    )
    report = check_emitted(good, patched)
    assert report.ok, report.checks
    compared, swept = check_sizes(patched.after)
    sizes = set(compared) | set(swept)
    assert runs["meta"] == []  # built on the CPU: every shape from a real run
    assert {r[-2:] for r in runs["real"]} == sizes
    by_name = {check.name: check for check in report.checks}
    assert by_name["output_size"].detail == f"matches the model's output at {len(sizes)} sizes"


EVEN_ONLY = '''
import torch
from torch import nn


class EvenOnly(nn.Module):
    """Joins its input with an upsampled half-size branch: takes only even sizes."""

    def __init__(self, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2.0)
        self.out = nn.Conv2d(16, 16, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.up(self.down(x))], dim=1)
        return self.out(x)
'''


def test_sizes_the_source_fails_at_too_are_skipped(tmp_path):
    """Odd sizes fail in the source as in the file: skipped, and the values compared at
    an even size instead of the small odd ones."""
    source = tmp_path / "even_only.py"
    source.write_text(EVEN_ONLY, encoding="utf-8")
    rec = recipe({"op": "project", "channels": 4}, name="even-only")
    done = export(f"{source}:EvenOnly", rec, tmp_path / "even.py", input_shape="1x3x32x32")
    assert done.report.ok, done.report.checks
    by_name = {check.name: check for check in done.report.checks}
    compared, swept = check_sizes(done.result.after)
    odd = [z for z in dict.fromkeys([*compared, *swept]) if z[0] % 2 or z[1] % 2]
    assert odd and set(compared) <= set(odd)
    listed = ", ".join(f"{h}x{w}" for h, w in odd)
    assert by_name["sizes"].detail == f"skipped {listed}: the source backbone fails there too"
    at = by_name["outputs"].detail.split(" over ")[1].split(", ")
    assert at and not set(at) & {f"{h}x{w}" for h, w in odd}


def test_a_size_only_the_file_fails_at_is_reported(emitted, patched):
    h, w = shape_only_size(patched)
    bad = tampered(
        emitted,
        f"""
        _forward = Cls.forward


        def _refusing(self, x):
            if tuple(x.shape[-2:]) == ({h}, {w}):
                raise ValueError("not this size")
            return _forward(self, x)


        Cls.forward = _refusing
        """,
    )
    with pytest.raises(ModelError, match="ValueError: not this size"):
        check_emitted(bad, patched, source=lambda: resolve(SPEC, kwargs_for(SPEC)).build())


def test_export_writes_nothing_for_a_file_that_fails(tmp_path, monkeypatch):
    """The same checks guard what ``export`` writes (here: values off at every size)."""
    monkeypatch.setattr(checks, "TOLERANCE", -1.0)
    out = tmp_path / "never.py"
    with pytest.raises(VerificationError, match="outputs"):
        export(SPEC, SMALL, out, input_shape=INPUT, kwargs=kwargs_for(SPEC))
    assert list(Path(tmp_path).iterdir()) == []
