"""``bbswap inspect --cross-check``: the figures beside bbswap's are thop's and torchinfo's
own (each compared here with a direct call of the library on a real CPU model), bbswap's
are the recorded reference figures, and the rows say what each counter misses. thop and
torchinfo are imported only for a cross-check."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import thop
import torch
import torchinfo
from cli_helpers import cli, ok
from recipe_helpers import one_thread
from torch.utils.flop_counter import FlopCounterMode

from bbswap.backbones.registry import resolve
from bbswap.tracing.cross_check import Count, Counter, CrossCheck, cross_check

TESTS = Path(__file__).parent
ROOT = TESTS.parent
REFERENCE = json.loads((TESTS / "fixtures" / "reference_backbones.json").read_text())["models"]
FUNCTIONAL = f"{TESTS / 'fixtures' / 'functional_models.py'}:FunctionalOps"
NEEDS_ITEM = f"{TESTS / 'fixtures' / 'bad_models.py'}:NeedsItem"

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def _rows(check: CrossCheck) -> dict[Counter, Count]:
    assert [c.counter for c in check.counts] == list(Counter)
    return {c.counter: c for c in check.counts}


def _cpu_model(spec: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return resolve(spec).build().eval()


def _direct(spec: str, shape: tuple[int, ...]) -> dict[Counter, tuple[int, int]]:
    """(params, MACs) from thop.profile and torchinfo.summary called on real CPU models."""
    x = torch.zeros(shape)
    macs, params = thop.profile(_cpu_model(spec), inputs=(x,), verbose=False)
    summary = torchinfo.summary(_cpu_model(spec), input_data=[x], verbose=0, device="cpu")
    return {
        Counter.THOP: (int(params), int(macs)),
        Counter.TORCHINFO: (int(summary.total_params), int(summary.total_mult_adds)),
    }


@pytest.mark.parametrize("spec", ["resnet18", "tv:resnet18"])
def test_resnet18_figures_are_each_librarys_own_and_bbswaps_the_reference(spec):
    check = cross_check(spec, "1x3x224x224")
    rows = _rows(check)
    reference = REFERENCE["resnet18"]
    assert reference["input"] == [1, 3, 224, 224]
    ours = rows[Counter.BBSWAP]
    assert (ours.params, ours.macs) == (reference["params"], reference["macs"])
    for counter, figures in _direct(spec, (1, 3, 224, 224)).items():
        row = rows[counter]
        assert (row.params, row.macs) == figures, counter
        assert row.device == "meta" and row.input_shape == (1, 3, 224, 224)
        assert (row.bbswap_params, row.bbswap_macs) == (ours.params, ours.macs)
        assert row.macs_difference == figures[1] - reference["macs"]
        assert row.misses and not row.error
    # thop adds BatchNorm and the head's pooling; torchinfo the fc bias and BN affine
    assert rows[Counter.THOP].macs > ours.macs
    assert check.functional_macs == 0


def test_a_model_with_functional_ops_shows_what_each_counter_misses():
    check = cross_check(FUNCTIONAL, "1x3x32x32")
    rows = _rows(check)
    model = _cpu_model(FUNCTIONAL)
    with FlopCounterMode(display=False) as flops:
        model(torch.zeros(1, 3, 32, 32))
    ours = rows[Counter.BBSWAP]
    assert ours.macs == flops.get_total_flops() // 2
    assert ours.params == sum(p.numel() for p in model.parameters())
    for counter, figures in _direct(FUNCTIONAL, (1, 3, 32, 32)).items():
        assert (rows[counter].params, rows[counter].macs) == figures, counter
    functional_conv = 32 * 16 * 3 * 3 * 16 * 16  # F.conv2d: out channels x in x k x k x H x W
    matmul = 32 * 10
    assert check.functional_macs == functional_conv + matmul
    # thop counts the conv module and the matmul, not the functional conv
    assert ours.macs - rows[Counter.THOP].macs == functional_conv
    assert "functional convolutions" in rows[Counter.THOP].misses
    # torchinfo counts the conv module only, with its bias, and no functional call
    conv_bias = 16 * 32 * 32
    assert rows[Counter.TORCHINFO].macs - conv_bias == ours.macs - check.functional_macs
    assert "every functional call" in rows[Counter.TORCHINFO].misses


def test_a_model_that_cannot_run_on_meta_is_counted_on_a_small_real_input():
    check = cross_check(NEEDS_ITEM, "1x3x512x512")
    rows = _rows(check)
    assert rows[Counter.BBSWAP].device == "cpu"  # bbswap's own trace fell back, too
    assert rows[Counter.BBSWAP].input_shape == (1, 3, 512, 512)
    small = (1, 3, 224, 224)
    model = _cpu_model(NEEDS_ITEM)
    with FlopCounterMode(display=False) as flops:
        model(torch.zeros(small))
    for counter, figures in _direct(NEEDS_ITEM, small).items():
        row = rows[counter]
        assert (row.device, row.input_shape) == ("cpu", small), counter
        assert (row.params, row.macs) == figures, counter
        assert row.bbswap_macs == flops.get_total_flops() // 2


def test_the_command_prints_the_figures_and_what_each_misses_and_in_json():
    shape = (1, 3, 64, 64)
    direct = _direct("resnet18", shape)
    data = json.loads(
        ok(cli("inspect", "resnet18", "--input", "1x3x64x64", "--json", "--cross-check")).stdout
    )
    assert data["schema"] == "bbswap.inspect/1"
    block = data["cross_check"]
    assert block["input"] == list(shape)
    assert [c["counter"] for c in block["counts"]] == ["bbswap", "thop", "torchinfo"]
    ours, *others = block["counts"]
    assert (ours["params"], ours["macs"]) == (data["params"], data["macs"])
    for row in others:
        assert (row["params"], row["macs"]) == direct[Counter(row["counter"])]
        assert row["device"] == "meta" and row["error"] is None and row["misses"]
    text = ok(cli("inspect", "resnet18", "--input", "1x3x64x64", "--cross-check")).stdout
    assert "cross-check  input 1x3x64x64" in text
    for counter, (params, macs) in direct.items():
        assert f"{params:,}" in text and f"{macs:,}" in text
        line = next(x for x in text.splitlines() if x.startswith(f"{counter}: "))
        assert "misses" in line
    assert "bbswap finds 0 MACs in functional calls" in text


_IMPORTED = textwrap.dedent(
    """
    import sys
    from typer.testing import CliRunner
    from bbswap.cli.app import app

    result = CliRunner().invoke(app, sys.argv[1:])
    assert result.exit_code == 0, result.output
    print("thop" in sys.modules, "torchinfo" in sys.modules)
    """
)


@pytest.mark.parametrize(
    ("extra", "imported"), [((), "False False"), (("--cross-check",), "True True")]
)
def test_thop_and_torchinfo_are_imported_only_for_a_cross_check(extra, imported):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["inspect", "resnet18", "--input", "1x3x64x64", *extra]
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTED, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == imported


def test_no_module_imports_them_or_the_cross_check_at_its_top_level():
    """So that no command but ``inspect --cross-check`` pays for them (the quick start's
    ``fit -o`` among them)."""
    lazy = {"thop", "torchinfo", "bbswap.tracing.cross_check"}
    for path in sorted((ROOT / "bbswap").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # the module's own statements, not those in functions
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not lazy & set(names), (path, names)
