"""Three timm models of unlike build (a CLIP ResNet with an attention pool, a NAS net of
cells, a convolution/attention hybrid) fitted to 128 channels at 1/8: the search finds the
same plan each time, its size rule is ceil(H/8) x ceil(W/8), and the written file keeps it
at odd sizes in an interpreter without bbswap."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bbswap.codegen.export import export
from bbswap.search.fit import fit, winner_recipe

pytest.importorskip("timm")

WINNERS = {
    "timm:resnet50_clip": (
        "stages.2: stride 1, stages.3: stride 1, exact ceil at stem.pool, stages.1.0.conv2_kxk.aa"
    ),
    "timm:pnasnet5large": "conv_0: stride 1, cell_8 + cell_9: stride 1",
    "timm:edgenext_x_small": (
        "stages.2: stride 1, stages.3: stride 1, exact ceil at stem.0, stages.1.downsample.1"
    ),
}


@pytest.mark.parametrize("spec", sorted(WINNERS))
def test_the_plan_for_128_channels_at_one_8th(spec: str) -> None:
    found = fit(spec, channels=128, stride=8)
    winner = found.winner
    assert winner.ok
    assert winner.label == WINNERS[spec]
    assert winner.trace.output_shape == (1, 128, 28, 28)
    rules = [rule.format(axis) for rule, axis in zip(winner.trace.size_rules(), "HW")]
    assert rules == ["H -> ceil(H/8)", "W -> ceil(W/8)"]


SIZES = ((33, 35), (47, 33), (64, 97))


def test_the_written_clip_resnet_keeps_one_8th_at_odd_sizes(tmp_path: Path) -> None:
    spec = "timm:resnet50_clip"
    found = fit(spec, channels=128, stride=8)
    out = tmp_path / "clip_backbone.py"
    exported = export(spec, winner_recipe(found), out)
    code = (
        "import sys; sys.path.insert(0, '.'); sys.modules['bbswap'] = None\n"
        "import torch, clip_backbone\n"
        f"m = clip_backbone.{exported.emitted.class_name}().eval()\n"
        "with torch.no_grad():\n"
        f"    for h, w in {SIZES!r}:\n"
        "        print(tuple(m(torch.randn(1, 3, h, w)).shape))\n"
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    want = [str((1, 128, math.ceil(h / 8), math.ceil(w / 8))) for h, w in SIZES]
    assert run.stdout.split("\n")[:-1] == want
