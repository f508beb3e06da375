"""Space-to-depth stems and anti-aliased downsampling, as in TResNet.

- a reshape that folds 4x4 pixel blocks into channels (``view``/``permute``/``view``, no
  torch op that reduces) is a reduction point of its own: the trace reports the true
  downsample, and the size rule holds for the sizes the reshape accepts (multiples of 4);
- a blur that pads its input (reflect) and then convolves unpadded: at stride 1 the conv
  keeps padding 0, since the pad before it already gives 'same' sizes; reflect padding
  needs an input larger than the pad, which sets the smallest input;
- its filter is a non-persistent buffer, which the emitted file keeps out of the
  state_dict, so the source's own checkpoint loads with strict=True.

Fixture: tests/fixtures/fold_models.py. Real forwards run on one intra-op thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, import_plain, ok
from recipe_helpers import one_thread

from bbswap.backbones.registry import resolve
from bbswap.recipes.strides import pre_padding, restride
from bbswap.tracing.sizes import SizeStep, size_rule
from bbswap.tracing.tracer import trace
from bbswap.verify.checks import _first_line

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fold_models.py"
TRESNET = f"{FIXTURES}:TResNetLike"
MULTIPLES = [(12, 12), (12, 28), (16, 16), (36, 20), (64, 96), (100, 52)]
pytestmark = pytest.mark.usefixtures("frozen_progress_clock")


def traced(h: int = 64, w: int = 96):
    return trace(resolve(TRESNET).build, (1, 3, h, w), name=TRESNET)


def test_fold_step_needs_whole_blocks():
    step = SizeStep("fold", 4, 4)
    assert [step.out_size(n) for n in (4, 5, 7, 8, 30, 32)] == [1, 0, 0, 2, 0, 8]
    rule = size_rule([step, SizeStep("window", 3, 2, 1, 1, False, False)])
    assert (rule.expression, rule.multiple, rule.minimum) == ("ceil({x}/8)", 4, 4)
    assert rule.format("H") == "H -> ceil(H/8) (H a multiple of 4)"
    plain = size_rule([SizeStep("window", 3, 2, 1, 1, False, False)])
    assert plain.multiple == 1 and plain.format("W") == "W -> ceil(W/2)"


def test_space_to_depth_is_a_reduction_point():
    t, _ = traced()
    fold = t.op("s2d.view()#1")
    assert (fold.op, fold.kind, fold.kernel, fold.stride) == (
        "space-to-depth",
        "functional",
        (4, 4),
        (4, 4),
    )
    assert (fold.in_shape, fold.out_shape) == ((1, 3, 64, 96), (1, 48, 16, 24))
    features = t.features
    assert features is not None and features.path == "layer2"
    assert features.downsample == (16.0, 16.0)
    assert features.out_shape == (1, 64, 4, 6)
    rule_h, rule_w = t.size_rules(features.chain)
    assert rule_h.format("H") == "H -> ceil(H/16) (H a multiple of 4)"
    assert rule_w.multiple == 4


def test_size_rule_matches_the_real_model():
    t, _ = traced()
    model = resolve(TRESNET).build().eval()
    body = torch.nn.Sequential(model.s2d, model.stem, torch.nn.ReLU(), model.layer1, model.layer2)
    chain = t.features.chain
    with torch.no_grad():
        for h, w in MULTIPLES:
            out = body(torch.randn(1, 3, h, w))
            assert (
                tuple(out.shape[-2:])
                == t.output_size(h, w, chain)
                == (
                    math.ceil(h / 16),
                    math.ceil(w / 16),
                )
            ), (h, w)
        with pytest.raises(RuntimeError):  # 30 is not a multiple of 4: the view fails
            body(torch.randn(1, 3, 30, 32))
        with pytest.raises(RuntimeError):  # 8 leaves layer2's blur a 1x1 map to reflect
            body(torch.randn(1, 3, 8, 16))
    assert t.output_size(30, 32, chain)[0] == 0
    assert t.output_size(8, 16, chain)[0] == 0
    assert t.min_input() == (12, 12)


def test_a_pre_padded_conv_keeps_padding_zero_at_stride_1():
    t, _ = traced()
    blur = t.op("layer2.aa.conv2d()")
    assert pre_padding(t, blur) == (1, 1)
    assert pre_padding(t, t.op("layer2.down.0")) == (0, 0)
    now = {"kernel_size": (3, 3), "stride": (2, 2), "padding": (0, 0), "dilation": (1, 1)}
    assert restride(blur, now, (1, 1), "here", (1, 1))["padding"] == (0, 0)
    assert restride(blur, now, (1, 1), "here")["padding"] == (1, 1)  # no pad before it


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("fold") / "tres8.py"
    args = ("fit", TRESNET, "--channels", 64, "--stride", 8, "--input", "1x3x64x96")
    result = ok(cli(*args, "-o", out, "--json"))
    return out, json.loads(result.stdout)


def test_fit_halves_the_stride_beside_the_blur(written):
    _, data = written
    winner = data["candidates"][0]
    assert winner["exact"] and winner["rule"] == "ceil"
    assert {"op": "stride", "at": "layer2", "stride": 1, "mode": "dilate"} in winner["ops"]
    assert winner["output"] == [1, 64, 8, 12]
    checks = {c["name"]: c for c in data["written"]["checks"]}
    assert all(c["ok"] for c in checks.values()), checks
    # sizes are drawn from the multiples of 4 above the smallest input: none is skipped
    assert "sizes" not in checks
    assert checks["output_size"]["detail"].startswith("matches the model's output at ")


def test_emitted_file_loads_the_source_checkpoint_and_follows_the_rule(written):
    out, data = written
    source = resolve(TRESNET).build()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert not any(k.endswith("filt") for k in state)  # the blur's filter is not saved
    text = out.read_text()
    assert 'self.register_buffer("filt", base.filt, persistent=False)' in text  # the edited blur
    assert "n = n + p if n >= value else 0" in text  # reflect padding's smallest input
    assert 'elif kind == "fold":' in text
    cls = getattr(import_plain(out), data["written"]["class_name"])
    model = cls()
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        for h, w in MULTIPLES:
            want = (math.ceil(h / 8), math.ceil(w / 8))
            assert cls.output_size(h, w) == want
            assert tuple(model(torch.randn(1, 3, h, w)).shape) == (1, 64, *want), (h, w)
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 3, 30, 32))
    assert cls.output_size(30, 32)[0] == 0


def test_load_state_dict_errors_keep_their_second_line():
    error = RuntimeError(
        'Error(s) in loading state_dict for M:\n\tMissing key(s) in state_dict: "a".'
    )
    assert (
        _first_line(error)
        == 'Error(s) in loading state_dict for M: Missing key(s) in state_dict: "a".'
    )
    assert _first_line(RuntimeError("one\ntwo")) == "one"


def test_cli_inspect_shows_the_fold(tmp_path):
    result = ok(cli("inspect", TRESNET, "--input", "1x3x64x96"))
    row = next(line for line in result.stdout.splitlines() if "s2d.view()#1" in line).split()
    assert row[:6] == ["s2d.view()#1", "F.view", "space-to-depth", "4", "4", "0"]
    assert "whole" in row and row[-3:] == ["64x96", "->", "16x24"]
    assert "H -> ceil(H/16) (H a multiple of 4)" in result.stdout


def test_inspect_json_names_the_fold():
    data = json.loads(ok(cli("inspect", TRESNET, "--input", "1x3x64x96", "--json")).stdout)
    fold = data["reductions"][0]
    assert (fold["id"], fold["op"], fold["rounding"]) == ("s2d.view()#1", "space-to-depth", "whole")
    assert (fold["input_hw"], fold["output_hw"]) == ([64, 96], [16, 24])
    assert data["size_rule"]["h"] == "H -> ceil(H/16) (H a multiple of 4)"
