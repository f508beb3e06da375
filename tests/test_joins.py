"""Stride changes at joins: strided branches in different modules that read the same map
and meet at an add or a cat (NASNet's reduction cell and the next cell's factorized
reduction of the previous output; Inception-style parallel branches) change together.

- ``units``: each reduction point on the features' path carries the reductions parallel
  to it in other modules;
- ``fit`` in mode 'stride': every candidate is exact, and a plan applied to the fixture
  gives, value by value, the fixture built with that reduction at stride 1 (same weights);
- the default mode: the written file gives ceil(H/S) at odd sizes and passes ``verify``.

Fixtures: tests/fixtures/join_models.py. Real forwards run on one intra-op thread.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import cli, import_plain, ok
from recipe_helpers import one_thread
from torch import nn

import bbswap
from bbswap.backbones.registry import resolve
from bbswap.search.fit import FitResult, Unit, fit, units
from bbswap.tracing.tracer import trace

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
pytestmark = pytest.mark.usefixtures("frozen_progress_clock")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "join_models.py"
JOINS = f"{FIXTURES}:ParallelJoins"
NASNET = f"{FIXTURES}:NASNetLike"
SIZES = [(1, 1), (7, 9), (31, 33), (64, 64), (65, 127)]


@functools.cache
def fitted(spec: str, **kwargs: Any) -> FitResult:
    return fit(spec, **kwargs)


def seeded(spec: str, **kwargs: Any) -> nn.Module:
    """The fixture on CPU in eval mode, seeded weights and batch-norm statistics."""
    torch.manual_seed(0)
    model = resolve(spec, kwargs).build()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        (JOINS, ["stem", "left + right", "conv_branch + pool_branch"]),
        (NASNET, ["stem", "cell_1 + cell_2", "cell_3 + cell_4"]),
    ],
)
def test_units_carry_the_parallel_reductions(spec, names):
    backbone = resolve(spec)
    traced, _ = trace(backbone.build, (1, 3, 64, 64), name=spec)
    found = units(traced, traced.features)
    assert [u.name for u in found] == names
    assert all(u.stride == (2, 2) for u in found)


@pytest.mark.parametrize(
    ("spec", "stride", "label", "strides"),
    [
        (JOINS, 4, "left + right: stride 1", (1, 2)),
        (JOINS, 4, "conv_branch + pool_branch: stride 1", (2, 1)),
        (JOINS, 2, "left + right: stride 1, conv_branch + pool_branch: stride 1", (1, 1)),
        (NASNET, 4, "cell_1 + cell_2: stride 1", (1, 2)),
        (NASNET, 4, "cell_3 + cell_4: stride 1", (2, 1)),
        (NASNET, 2, "cell_1 + cell_2: stride 1, cell_3 + cell_4: stride 1", (1, 1)),
    ],
)
def test_stride_mode_equals_the_model_built_at_stride_1(spec, stride, label, strides):
    found = fitted(spec, channels=16, stride=stride, mode="stride")
    assert all(c.ok for c in found.candidates), found.candidates
    chosen = next(c for c in found.candidates if c.label == label)
    source = seeded(spec)
    patched = bbswap.apply_recipe(spec, chosen.recipe, "1x3x64x64", model=source).model.eval()
    reference = seeded(spec, strides=strides)
    reference.load_state_dict(source.state_dict())
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        with torch.no_grad():
            got, want = patched(x), reference(x)
        assert got.shape[-2:] == (math.ceil(h / stride), math.ceil(w / stride))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_source_is_left_as_it_was():
    source = seeded(NASNET)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    chosen = fitted(NASNET, channels=16, stride=2, mode="stride").winner
    bbswap.apply_recipe(NASNET, chosen.recipe, "1x3x64x64", model=source)
    assert source.cell_1.comb_0_left.depthwise.stride == (2, 2)
    assert source.cell_2.conv_prev.path_1[0].stride == 2
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize(("spec", "stride"), [(NASNET, 4), (NASNET, 2), (JOINS, 2)])
def test_fit_writes_a_file_that_verifies(spec, stride, tmp_path):
    out = tmp_path / "joined.py"
    data = json.loads(
        ok(cli("fit", spec, "--channels", 24, "--stride", stride, "-o", out, "--json")).stdout
    )
    winner = data["candidates"][0]
    assert winner["exact"] and " + " in winner["label"]
    written = data["written"]
    assert all(c["ok"] for c in written["checks"])
    model = getattr(import_plain(out), written["class_name"])().eval()
    for h, w in SIZES:
        with torch.no_grad():
            y = model(torch.randn(1, 3, h, w))
        assert tuple(y.shape) == (1, 24, math.ceil(h / stride), math.ceil(w / stride))
    target = f"{out}:{written['class_name']}"
    check = ("verify", target, "--channels", 24, "--stride", stride, "--sizes", "33x47,61x97")
    result = ok(cli(*check))
    assert "FAILED" not in result.stdout


def test_many_branches_of_one_module_are_named_by_it():
    branches = tuple(f"cell_stem_1.comb_iter_{i}" for i in range(1, 5))
    unit = Unit("cell_stem_1.comb_iter_0", (2, 2), 3, (*branches, "cell_0"))
    assert unit.name == "cell_stem_1 (5 branches) + cell_0"
    assert Unit("left", (2, 2), 1, ("right",)).name == "left + right"
    assert Unit("layer2", (2, 2), 1).name == "layer2"
