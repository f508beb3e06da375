"""The ``exact`` op and ``bbswap fit``'s exact variants: reduction points padded (and, for a
pooling, rounded) so that a backbone's output is exactly ceil(H/S) or floor(H/S).

- ``exact_setting``, the per-axis search behind the op, checked against the real torch
  ops it configures (hypothesis), and on known cases;
- the op on an AlexNet-like fixture (conv 11/4 pad 2 and unpadded 3/2 max-pools, whose
  sizes follow neither rule), run for real on CPU at many sizes, odd ones included;
- ``fit`` on that fixture: no plain candidate is exact, the exact variants are, and the
  emitted file round-trips through ``bbswap verify``;
- even kernels (a ConvNeXt-like fixture, 4x4/4 stem and 2x2/2 downsamples): a 2x2 conv goes
  to stride 1 with ``padding='same'``, which gives floor(H/16), never ceil.

Fixtures: tests/fixtures/exact_models.py. Real forwards run on one intra-op thread.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, cli, import_plain, ok
from hypothesis import given, settings
from hypothesis import strategies as st
from recipe_helpers import one_thread
from torch import nn

import bbswap
import bbswap.cli.render
from bbswap.backbones.registry import resolve
from bbswap.errors import RecipeError, SurgeryError
from bbswap.recipes.registry import make_op
from bbswap.recipes.schema import Recipe
from bbswap.recipes.strides import exact_setting
from bbswap.search.fit import FitResult, fit, winner_recipe
from bbswap.surgery import same
from bbswap.surgery.apply import ApplyResult

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "exact_models.py"
ALEXNET = f"{FIXTURES}:AlexNetLike"
CONVNEXT = f"{FIXTURES}:ConvNeXtLike"
NEITHER = f"{FIXTURES}:NeitherRule"
PADDED = f"{FIXTURES}:PaddedStem"
RULES = {"ceil": lambda n, s: math.ceil(n / s), "floor": lambda n, s: n // s}
# odd and even, square and not, from one pixel up; every AlexNet-like size is checked
SIZES = [(h, w) for h in (1, 2, 15, 16, 17, 31, 33, 47, 64, 97, 127) for w in (5, 32, 61, 100)]
SAME_EVEN_KERNEL = "ignore:Using padding='same' with even kernel lengths:UserWarning"


pytestmark = pytest.mark.usefixtures("frozen_progress_clock")


@functools.cache
def fitted(spec: str, **kwargs: Any) -> FitResult:
    return fit(spec, **kwargs)


@functools.cache
def real(spec: str) -> nn.Module:
    """The fixture on CPU with random weights (apply never changes it)."""
    torch.manual_seed(0)
    return resolve(spec).build().eval()


def patched(spec: str, *ops: Any, input_shape: str = "1x3x64x64") -> ApplyResult:
    """The ops applied to a copy of the real CPU model; the copy is in eval mode."""
    result = bbswap.apply_recipe(spec, Recipe("test", ops), input_shape, model=real(spec))
    result.model.eval()
    return result


def out_hw(model: nn.Module, h: int, w: int) -> tuple[int, int]:
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    return tuple(out.shape[-2:])


# -- exact_setting against torch ------------------------------------------------------------------


def torch_op(op: str, kernel: int, stride: int, dilation: int, padding: int, ceil: bool):
    if op == "conv":
        return nn.Conv2d(1, 1, kernel, stride, padding, dilation, bias=False)
    if op == "max-pool":
        return nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil)
    return nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil)


def torch_size(module: nn.Module, h: int, w: int) -> int | None:
    """The real output height at input height ``h`` (and a width ``w`` torch accepts);
    None when torch refuses the size."""
    with torch.no_grad():
        try:
            return module(torch.zeros(1, 1, h, w)).shape[-2]
        except RuntimeError:
            return None


@st.composite
def window_ops(draw: st.DrawFn) -> tuple[str, int, int, int, int, bool, str]:
    op = draw(st.sampled_from(["conv", "max-pool", "avg-pool"]))
    kernel = draw(st.integers(1, 7))
    dilation = 1 if op == "avg-pool" else draw(st.integers(1, 2))
    stride = draw(st.integers(1, 4))
    padding = draw(st.integers(0, kernel // 2))  # the current setting, which it stays near
    ceil = False if op == "conv" else draw(st.booleans())
    rule = draw(st.sampled_from(["ceil", "floor"]))
    return op, kernel, stride, dilation, padding, ceil, rule


@settings(max_examples=250, deadline=None, derandomize=True, database=None)
@given(case=window_ops(), sizes=st.lists(st.integers(0, 80), min_size=3, max_size=6))
def test_exact_setting_gives_the_rule_in_real_torch(case, sizes):
    op, kernel, stride, dilation, padding, ceil, rule = case
    span = dilation * (kernel - 1)
    found = exact_setting(op, kernel, stride, dilation, padding, ceil, rule)
    if found is None:
        # no padding torch accepts, in either rounding mode, gives the rule at every size
        limit = span if op == "conv" else kernel // 2
        for p, c in itertools.product(
            range(limit + 1), (False, True) if op != "conv" else (False,)
        ):
            module = torch_op(op, kernel, stride, dilation, p, c)
            sizes_ok = [
                torch_size(module, h, span + 1) == RULES[rule](h, stride)
                for h in range(span + 1, span + 40)
            ]
            assert not all(sizes_ok), (case, p, c)
        return
    p, c = found
    assert op != "conv" or c is False  # only a pooling rounds
    assert 0 <= p <= (span if op == "conv" else kernel // 2)
    module = torch_op(op, kernel, stride, dilation, p, c)
    for extra in sizes:
        h = span + 1 + extra  # at least the dilated kernel: every such size is accepted
        assert torch_size(module, h, span + 1) == RULES[rule](h, stride), (case, found, h)
    for h in range(1, span + 1):  # smaller ones: refused by torch, or the rule still holds
        got = torch_size(module, h, span + 1)
        assert got is None or got == RULES[rule](h, stride), (case, found, h, got)


KNOWN = [
    # (op, kernel, stride, dilation, padding, ceil, rule) -> (padding, ceil) or None
    (("conv", 11, 4, 1, 2, False, "ceil"), (5, False)),  # AlexNet's stem
    (("conv", 11, 4, 1, 2, False, "floor"), None),  # would need 3.5 pixels
    (("conv", 7, 2, 1, 3, False, "ceil"), (3, False)),  # ResNet's stem is already exact
    (("conv", 3, 2, 1, 1, False, "floor"), None),
    (("conv", 3, 2, 2, 0, False, "ceil"), (2, False)),  # dilated: half the span
    (("conv", 2, 2, 1, 0, False, "floor"), (0, False)),  # ConvNeXt's downsample
    (("conv", 2, 2, 1, 0, False, "ceil"), None),
    (("conv", 4, 4, 1, 0, False, "ceil"), None),
    (("max-pool", 3, 2, 1, 0, False, "ceil"), (1, False)),  # AlexNet's pools
    (("max-pool", 3, 2, 1, 0, False, "floor"), (0, True)),  # ceil_mode gives floor(H/2)
    (("max-pool", 3, 2, 1, 1, False, "ceil"), (1, False)),  # already exact: kept as is
    (("max-pool", 3, 2, 1, 1, True, "ceil"), (1, False)),  # ceil_mode would add a window
    (("max-pool", 2, 2, 1, 0, True, "ceil"), (0, True)),
    (("max-pool", 2, 2, 1, 0, False, "ceil"), (0, True)),
    (("max-pool", 2, 2, 1, 0, True, "floor"), (0, False)),
    (("avg-pool", 2, 2, 1, 0, False, "floor"), (0, False)),
    (("avg-pool", 3, 1, 1, 0, False, "ceil"), (1, False)),
    (("conv", 1, 1, 1, 0, False, "floor"), (0, False)),
]


@pytest.mark.parametrize(("args", "want"), KNOWN, ids=lambda v: "-".join(map(str, v or ["none"])))
def test_exact_setting_known_cases(args, want):
    assert exact_setting(*args) == want


# -- the exact op on an AlexNet-like model ---------------------------------------------------------


def test_alexnet_like_follows_neither_rule_as_it_stands():
    source = bbswap.inspect_backbone(ALEXNET, "1x3x224x224").trace
    assert source.downsample == (32, 32)
    model = real(ALEXNET)
    misses = [
        (h, w)
        for h, w in SIZES
        if h >= 67 and w >= 67 and out_hw(model, h, w) != (math.ceil(h / 32), math.ceil(w / 32))
    ]
    assert misses  # so the exact op below has something to do
    assert out_hw(model, 224, 224) == (6, 6)  # ceil and floor would both say 7


def test_exact_op_makes_alexnet_like_ceil_at_every_size():
    result = patched(ALEXNET, make_op("exact", at="features"))
    edits = [(e.path, e.attribute, e.old, e.new, e.op) for e in result.edits]
    assert edits == [
        ("features.0", "padding", "2", "5", "exact"),
        ("features.2", "padding", "0", "1", "exact"),
        ("features.5", "padding", "0", "1", "exact"),
        ("features.12", "padding", "0", "1", "exact"),
    ]
    assert [r.expression for r in result.after.size_rules()] == ["ceil({x}/32)"] * 2
    for h, w in SIZES:
        want = (math.ceil(h / 32), math.ceil(w / 32))
        assert out_hw(result.model, h, w) == want, (h, w)
        assert result.after.output_size(h, w) == want
    # the caller's model is untouched
    assert real(ALEXNET).features[0].padding == (2, 2)
    assert real(ALEXNET).features[2].padding == 0


@pytest.mark.parametrize("at", ["features.12", "features.5", "features.2"])
def test_stride_then_exact_gives_ceil_h16(at):
    result = patched(
        ALEXNET,
        make_op("stride", at=at, stride=1, mode="stride"),
        make_op("exact", at="features", rule="ceil"),
    )
    assert result.after.downsample == (16, 16)
    for h, w in SIZES:
        want = (math.ceil(h / 16), math.ceil(w / 16))
        assert out_hw(result.model, h, w) == want, (at, h, w)
        assert result.after.output_size(h, w) == want


def test_exact_op_one_point_at_a_time_and_idempotent():
    one = patched(ALEXNET, make_op("exact", at="features.0"))
    assert [(e.path, e.new) for e in one.edits] == [("features.0", "5")]
    assert one.model.features[0].padding == (5, 5)
    assert one.model.features[2].padding == 0  # the rest as it was

    twice = patched(ALEXNET, make_op("exact", at="features"), make_op("exact", at="features"))
    assert [(e.path, e.new) for e in twice.edits] == [
        ("features.0", "5"),
        ("features.2", "1"),
        ("features.5", "1"),
        ("features.12", "1"),
    ]


def test_exact_floor_is_refused_where_no_padding_gives_it():
    with pytest.raises(SurgeryError) as caught:
        patched(ALEXNET, make_op("exact", at="features", rule="floor"))
    message = str(caught.value)
    assert "no padding makes features.0 (kernel 11, stride 4 on H)" in message
    assert "exactly floor(size/4)" in message


def test_exact_op_errors():
    with pytest.raises(RecipeError, match=r"'features\.1' is not a reduction point"):
        patched(ALEXNET, make_op("exact", at="features.1"))  # a ReLU
    with pytest.raises(RecipeError, match=r"'round' is not one of ceil, floor"):
        make_op("exact", at="features", rule="round")
    assert make_op("exact", at="features")["rule"] == "ceil"  # the default


def test_exact_op_in_a_recipe_file_through_the_cli(tmp_path):
    path = tmp_path / "exact.toml"
    path.write_text(
        'name = "alex-exact"\ninput = "1x3x127x161"\n\n[[ops]]\nop = "exact"\nat = "features"\n',
        encoding="utf-8",
    )
    data = json.loads(ok(cli("apply", ALEXNET, path, "--json")).stdout)
    assert data["after"]["output"] == [1, 16, 4, 6]  # ceil(127/32) x ceil(161/32)
    assert data["before"]["output"] == [1, 16, 3, 4]
    assert data["size_rule"] == {"h": "H -> ceil(H/32)", "w": "W -> ceil(W/32)"}
    assert [(e["path"], e["new"]) for e in data["edits"]][:2] == [
        ("features.0", "5"),
        ("features.2", "1"),
    ]
    # below the source's smallest size the source itself cannot be traced
    assert_one_line_error(cli("apply", ALEXNET, path, "--input", "1x3x61x97"), "features.12")


# -- fit: the exact variants ---------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ["any", "ceil"])
def test_fit_finds_an_exact_plan(rounding):
    result = fitted(ALEXNET, channels=32, stride=16, rounding=rounding)
    winner = result.winner
    assert winner.ok and "exact" in winner.label
    assert winner.rule == "ceil"  # the exact variants of this model are ceil
    exact_ops = [op for op in winner.recipe.ops if op.op == "exact"]
    assert exact_ops and all(op["rule"] == "ceil" for op in exact_ops)
    # no plain candidate is exact: the variants are what makes it reachable
    plain = [c for c in result.candidates if "exact" not in c.label]
    assert plain and all(c.misses and not c.ok for c in plain)
    for h, w in result.probes:
        assert winner.trace.output_size(h, w) == (math.ceil(h / 16), math.ceil(w / 16))
    # the winning recipe on the real model
    applied = patched(ALEXNET, *winner_recipe(result, "1x3x224x224").ops)
    for h, w in SIZES[::3]:
        assert out_hw(applied.model, h, w) == (math.ceil(h / 16), math.ceil(w / 16)), (h, w)


def test_fit_floor_fails_on_alexnet_like_naming_rounding():
    result = cli("fit", ALEXNET, "--channels", 32, "--stride", 16, "--rounding", "floor")
    assert_one_line_error(result, "only by rounding", "--rounding ceil")


@pytest.mark.parametrize("rounding", ["ceil", "floor"])
def test_fit_names_no_rounding_that_no_candidate_reaches(rounding):
    # each of its two convs takes only one of the rules: the other rule is no way out
    # either, so the error names the misses and suggests no rounding
    result = cli("fit", NEITHER, "--channels", 8, "--stride", 4, "--rounding", rounding)
    line = assert_one_line_error(result, f"no candidate reaches 8 channels at 1/4, {rounding}")
    assert "--rounding" not in line and "only by rounding" not in line


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("exact")
    out = folder / "x.py"
    result = ok(cli("fit", ALEXNET, "--channels", 32, "--stride", 16, "-o", out, "--json"))
    return out, json.loads(result.stdout)


def test_fit_cli_writes_an_exact_file(alexnet_file):
    out, data = alexnet_file
    winner = data["candidates"][0]
    assert data["target"]["rounding"] == "ceil"
    assert winner["exact"] and winner["rule"] == "ceil" and "exact ceil at" in winner["label"]
    assert {"op": "exact", "at": "features.0", "rule": "ceil"} in winner["ops"]
    assert winner["output"] == [1, 32, 14, 14]
    written = data["written"]
    assert Path(written["path"]) == out and all(c["ok"] for c in written["checks"])
    cls = getattr(import_plain(out), written["class_name"])
    model = cls().eval()
    for h, w in [(1, 1), (31, 33), (61, 97), (127, 100), (17, 255)]:
        want = (math.ceil(h / 16), math.ceil(w / 16))
        assert cls.output_size(h, w) == want
        assert out_hw(model, h, w) == want, (h, w)


def test_verify_passes_the_written_file(alexnet_file):
    out, data = alexnet_file
    target = f"{out}:{data['written']['class_name']}"
    result = ok(
        cli("verify", target, "--channels", 32, "--stride", 16, "--sizes", "33x97,61x61,1x17")
    )
    assert result.stderr == ""
    assert "FAILED" not in result.stdout
    wrong = cli("verify", target, "--channels", 32, "--stride", 32, "--sizes", "33x97")
    assert_one_line_error(wrong, "stride", report=True, status=1)


# -- even kernels: padding='same' and floor(H/S) -------------------------------------------------


@pytest.mark.filterwarnings(SAME_EVEN_KERNEL)
def test_even_kernel_conv_to_stride_1_takes_padding_same():
    result = patched(CONVNEXT, make_op("stride", at="features.2", stride=1, mode="stride"))
    conv = result.model.features[2]
    assert conv.stride == (1, 1) and conv.padding == "same"
    assert ("features.2", "padding", "0", "same") in [
        (e.path, e.attribute, e.old, e.new) for e in result.edits
    ]
    for h, w in SIZES[::2]:
        if h >= 16 and w >= 16:
            assert out_hw(result.model, h, w) == (h // 16, w // 16), (h, w)
    # a 'same' conv keeps stride 1: striding it again is refused
    with pytest.raises(SurgeryError, match=r"features\.2 uses padding='same'"):
        patched(
            CONVNEXT,
            make_op("stride", at="features.2", stride=1, mode="stride"),
            make_op("stride", at="features.2", stride=2, mode="stride"),
        )
    # another stride on a patch conv (kernel = stride = 4, unpadded, so it floors):
    # (4 - 2) / 2 pixels a side keep it flooring at the new stride, a plain Conv2d
    stem = patched(CONVNEXT, make_op("stride", at="features.0", stride=2, mode="stride"))
    conv = stem.model.features[0]
    assert type(conv) is torch.nn.Conv2d and conv.stride == (2, 2) and conv.padding == (1, 1)
    assert [(e.path, e.attribute, e.old, e.new) for e in stem.edits] == [
        ("features.0", "stride", "4", "2"),
        ("features.0", "padding", "0", "1"),
    ]
    for h, w in SIZES[::2]:
        if h >= 2 and w >= 2:
            with torch.no_grad():
                got = conv(torch.randn(1, 3, h, w)).shape[-2:]
            assert tuple(got) == (h // 2, w // 2), (h, w)
    # made to round up, it has no fixed padding that gives ceil(H/2): the conv pads each
    # input by its size
    stem = patched(
        CONVNEXT,
        make_op("stride", at="features.0", stride=2, mode="stride"),
        make_op("exact", at="features.0", rule="ceil"),
    )
    conv = stem.model.features[0]
    assert type(conv).__name__ == "Conv2dSame" and conv.stride == (2, 2) and conv.padding == (0, 0)
    assert conv.weight is not real(CONVNEXT).features[0].weight  # a copy's, not the caller's
    assert torch.equal(conv.weight, real(CONVNEXT).features[0].weight)
    for h, w in SIZES[::2]:
        with torch.no_grad():
            got = conv(torch.randn(1, 3, h, w)).shape[-2:]
        assert tuple(got) == (math.ceil(h / 2), math.ceil(w / 2)), (h, w)


def test_exact_on_even_kernels():
    assert patched(CONVNEXT, make_op("exact", at="features", rule="floor")).edits == ()
    # no fixed padding makes a 4x4/4 or a 2x2/2 conv round up: each pads its input by its size
    result = patched(CONVNEXT, make_op("exact", at="features", rule="ceil"))
    assert [(e.path, e.new) for e in result.edits] == [
        (path, "same per size") for path in ("features.0", "features.2", "features.4", "features.6")
    ]
    assert [r.expression for r in result.after.size_rules()] == ["ceil({x}/32)"] * 2
    for h, w in SIZES:
        want = (math.ceil(h / 32), math.ceil(w / 32))
        assert out_hw(result.model, h, w) == want, (h, w)
        assert result.after.output_size(h, w) == want
    # where the size is whole multiples of the strides there is nothing to pad: the same values
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(result.model(x), real(CONVNEXT)(x))


@pytest.mark.filterwarnings(SAME_EVEN_KERNEL)
def test_fit_even_kernels_with_rounding_any_is_floor():
    result = fitted(CONVNEXT, channels=32, stride=16, rounding="any")
    winner = result.winner
    assert winner.ok and winner.rule == "floor"
    assert winner.label == "features.6: stride 1"
    applied = patched(CONVNEXT, *winner_recipe(result, "1x3x224x224").ops)
    conv = applied.model.features[6]
    assert conv.stride == (1, 1) and conv.padding == "same" and conv.kernel_size == (2, 2)
    sizes = [(16, 16), (17, 31), (33, 47), (61, 97), (64, 64), (100, 255), (31, 33), (127, 129)]
    for h, w in sizes:
        assert out_hw(applied.model, h, w) == (h // 16, w // 16), (h, w)
        assert winner.trace.output_size(h, w) == (h // 16, w // 16)
    assert out_hw(applied.model, 224, 224) == (14, 14)


@pytest.mark.filterwarnings(SAME_EVEN_KERNEL)
def test_fit_even_kernels_cli(tmp_path):
    out = tmp_path / "convnext16.py"
    args = ("fit", CONVNEXT, "--channels", 32, "--stride", 16)
    data = json.loads(ok(cli(*args, "--rounding", "any", "-o", out, "--json")).stdout)
    winner = data["candidates"][0]
    assert data["target"]["rounding"] == "any"
    assert winner["rule"] == "floor" and winner["exact"]
    assert winner["output"] == [1, 32, 14, 14]
    written = data["written"]
    assert all(c["ok"] for c in written["checks"])
    text = out.read_text(encoding="utf-8")
    assert 'padding = "same"' in text and "H -> floor(H/16), W -> floor(W/16)" in text
    cls = getattr(import_plain(out), written["class_name"])
    model = cls().eval()
    for h, w in [(16, 16), (31, 33), (61, 97), (100, 47)]:
        assert cls.output_size(h, w) == (h // 16, w // 16)
        assert out_hw(model, h, w) == (h // 16, w // 16), (h, w)
    target = f"{out}:{written['class_name']}"
    check = ("verify", target, "--channels", 32, "--stride", 16, "--sizes", "33x47,61x97")
    assert "floor(H/16) x floor(W/16) at 2 sizes" in ok(cli(*check, "--rounding", "floor")).stdout
    assert_one_line_error(cli(*check), "stride", "ceil(H/16)", report=True, status=1)
    # ceil: every even window pads its input by its size, in a class the file defines
    ceil = tmp_path / "ceil.py"
    data = json.loads(ok(cli(*args, "-o", ceil, "--json")).stdout)
    winner = data["candidates"][0]
    assert winner["rule"] == "ceil" and "exact ceil at features.0" in winner["label"]
    assert all(c["ok"] for c in data["written"]["checks"])
    text = ceil.read_text(encoding="utf-8")
    assert "class Conv2dSame(nn.Conv2d):" in text and "def same_padding(" in text
    assert "body.features[0] = Conv2dSame(3, 8, kernel_size=4, stride=4)" in text
    cls = getattr(import_plain(ceil), data["written"]["class_name"])
    model = cls().eval()
    for h, w in [(1, 1), (16, 16), (31, 33), (61, 97), (100, 47)]:
        want = (math.ceil(h / 16), math.ceil(w / 16))
        assert cls.output_size(h, w) == want
        assert out_hw(model, h, w) == want, (h, w)
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["ceil.py", "convnext16.py"]


# -- padding per input size: the classes of bbswap.surgery.same ---------------------------------


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    op=st.sampled_from(["conv", "max-pool", "avg-pool"]),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    size=st.tuples(st.integers(1, 23), st.integers(1, 23)),
)
def test_padding_per_size_equals_timms_same_layers(op, kernel, stride, dilation, size):
    # timm's Conv2dSame, MaxPool2dSame and AvgPool2dSame are the reference: same sizes
    # (ceil(size / stride)) and the same values, at every size
    timm_layers = pytest.importorskip("timm.layers.pool2d_same")
    timm_conv = pytest.importorskip("timm.layers.conv2d_same")
    torch.manual_seed(0)
    if op == "conv":
        theirs = timm_conv.Conv2dSame(2, 3, kernel, stride, dilation=dilation)
        ours = same.Conv2dSame(2, 3, kernel, stride, 0, dilation)
        ours.load_state_dict(theirs.state_dict())
    elif op == "max-pool":
        theirs = timm_layers.MaxPool2dSame(kernel, stride, dilation=dilation)
        ours = same.MaxPool2dSame(kernel, stride, dilation)
    else:
        theirs = timm_layers.AvgPool2dSame(kernel, stride)
        ours = same.AvgPool2dSame(kernel, stride)
    x = torch.randn(1, 2, *size)
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert got.shape[-2:] == (math.ceil(size[0] / stride[0]), math.ceil(size[1] / stride[1]))
    if op == "max-pool" and (size[0] < dilation[0] or size[1] < dilation[1]):
        # narrower than the dilation, timm's centred padding can leave a window wholly in
        # its -inf; ours starts each window on a pixel there (the test below): finite, and
        # equal to timm's at every other size
        assert torch.isfinite(got).all()
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(torch.jit.script(ours)(x), ours(x))


def test_the_file_with_padding_per_size_scripts_and_exports(tmp_path):
    out = tmp_path / "convnext_ceil.py"
    data = json.loads(
        ok(cli("fit", CONVNEXT, "--channels", 32, "--stride", 16, "-o", out, "--json")).stdout
    )
    model = getattr(import_plain(out), data["written"]["class_name"])().eval()
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(torch.jit.script(model)(x), want)
        assert torch.equal(torch.export.export(model, (x,)).module()(x), want)


# -- a chain with a pad call --------------------------------------------------------------------


def test_fit_makes_a_chain_with_a_pad_call_exact(tmp_path):
    # the pad call and the conv after it give floor(H/2) together: the conv is left as it
    # is, and only the pool is made to round down
    out = tmp_path / "padded.py"
    args = ("fit", PADDED, "--channels", 16, "--stride", 4)
    data = json.loads(ok(cli(*args, "--rounding", "floor", "-o", out, "--json")).stdout)
    winner = data["candidates"][0]
    assert winner["rule"] == "floor" and winner["label"] == "no stride change, exact floor at pool"
    assert all(c["ok"] for c in data["written"]["checks"])
    cls = getattr(import_plain(out), data["written"]["class_name"])
    model = cls().eval()
    for h, w in [(8, 8), (9, 15), (31, 33), (64, 97), (127, 100)]:
        want = (h // 4, w // 4)
        assert cls.output_size(h, w) == want
        assert out_hw(model, h, w) == want, (h, w)
    # ceil: no padding of the conv makes the pad and the conv round up; floor is reachable
    line = assert_one_line_error(cli(*args))
    assert "--rounding floor" in line
    with pytest.raises(SurgeryError, match=r"exactly ceil\(size/2\) after the pad call before it"):
        patched(PADDED, make_op("exact", at="conv", rule="ceil"))


def test_a_functional_call_that_would_need_padding_per_size_is_refused(tmp_path):
    # F.conv2d with a 2x2/2 window: no fixed padding rounds it up, and a call in a forward
    # cannot pad by the input's size; one line, exit 2, nothing written
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "x"\n\n[[ops]]\nop = "exact"\nat = "conv2d()#1"\n', encoding="utf-8")
    out = tmp_path / "out.py"
    result = cli("apply", NEITHER, recipe, "--input", "1x3x64x64", "-o", out)
    assert_one_line_error(
        result,
        "ops[0] (exact): conv2d()#1 would need padding that depends on the input size",
        "it is a functional call (conv2d)",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    kernel=st.integers(1, 4),
    dilation=st.integers(1, 4),
)
def test_a_same_max_pool_never_has_a_window_wholly_in_its_padding(
    h: int, w: int, kernel: int, dilation: int
) -> None:
    """A 2x2 max pooling kept at stride 1 and dilated by 2 (DLA's level5 downsample once
    level4's stride is gone) sees a 1x1 map at small inputs: a centred split of its
    padding put both taps of the window in the -inf padding, and the next 1x1 conv made
    NaN of it. Each window starts on a pixel: the output is finite, ceil(size) by axis,
    and never below the input's own minimum."""
    from bbswap.surgery.same import MaxPool2dSame

    pool = MaxPool2dSame(kernel, stride=1, dilation=dilation)
    x = torch.randn(1, 2, h, w)
    y = pool(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert (y >= x.amin(dim=(2, 3), keepdim=True)).all()
