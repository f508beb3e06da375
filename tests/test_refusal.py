"""Models no size rule holds for are refused in one line, naming why; attention alone is
no reason, and CNNs with gates are not refused.

Attention keeps the number of tokens, so a windowed-attention model is inspected like a
CNN. What is refused, with :class:`bbswap.errors.NotACNN`, wherever it is traced
(``inspect``, ``fit`` and ``apply``, on the command line and in the Python API): a
positional embedding of fixed size added to the tokens, a linear layer across the tokens
(MLP-Mixer), and features that are tokens after the last feature map. A
squeeze-excitation gate or a softmax over branches multiplies elementwise, and every zoo
model passes.

Also here: ``build_on_meta``'s fallback for a constructor that computes with tensors
(torchvision's RegNet), which patches ``nn.Module.register_parameter`` and
``register_buffer`` for one build and must always restore them.

Fixtures: tests/fixtures/token_models.py. Everything is traced on the meta device.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error
from torch import nn
from typer.testing import CliRunner

import bbswap
import bbswap.cli.render
from bbswap.cli.app import app
from bbswap.errors import BBSwapError, ModelError, NotACNN, OneInputSize, TargetError
from bbswap.recipes.registry import make_op
from bbswap.recipes.schema import Recipe
from bbswap.tracing.tracer import (
    _is_attention,
    build_on_meta,
    not_a_cnn,
    require_cnn,
    trace,
    trace_instance,
    trace_module,
)

TOKENS = Path(__file__).resolve().parent / "fixtures" / "token_models.py"


def _load_fixtures() -> Any:
    """The fixture file as a module, for its classes as instances and builders."""
    found = importlib.util.spec_from_file_location("refusal_token_models", TOKENS)
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


token_models = _load_fixtures()

# fixture class -> (brief, a fragment of the one-line message naming why)
REFUSED = {
    "TinyViT": (
        "not a CNN: token output",
        "its features are tokens on its 14x14 grid ('norm', 1x196x32), after its last feature map",
    ),
    "FixedPosViT": (
        "fixed size: positional embedding",
        "a positional embedding of fixed size (a 1x196x32 parameter) is added in the model's "
        "own forward",
    ),
    "TokenMixer": (
        "fixed size: tokens",
        "a linear layer at 'blocks.0.token_mlp.0' mixes the tokens, 196 of them, no more",
    ),
}
WHY = "has no feature map that follows the input size"
TRIVIAL_RECIPE = 'name = "trivial"\n\n[[ops]]\nop = "project"\nchannels = 8\n'


pytestmark = pytest.mark.usefixtures("frozen_progress_clock")


def spec(name: str) -> str:
    return f"{TOKENS}:{name}"


def cli(*args: Any):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def trivial_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "trivial.toml"
    path.write_text(TRIVIAL_RECIPE, encoding="utf-8")
    return path


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REFUSED))
def test_inspect_refuses(name):
    _, why = REFUSED[name]
    for extra in ([], ["--json"], ["--depth", "3"]):
        line = assert_one_line_error(cli("inspect", spec(name), *extra), f"{spec(name)} {WHY}")
        assert why in line


@pytest.mark.parametrize("name", list(REFUSED))
def test_fit_refuses_and_writes_nothing(name, tmp_path):
    out, saved = tmp_path / "backbone.py", tmp_path / "winner.toml"
    result = cli(
        "fit", spec(name), "--channels", 64, "--stride", 16, "-o", out, "--save-recipe", saved
    )
    assert_one_line_error(result, WHY, REFUSED[name][1])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", list(REFUSED))
def test_apply_refuses(name, trivial_recipe, tmp_path):
    assert_one_line_error(cli("apply", spec(name), trivial_recipe), WHY, REFUSED[name][1])
    out = tmp_path / "patched.py"
    assert_one_line_error(cli("apply", spec(name), trivial_recipe, "-o", out), WHY)
    assert not out.exists()


# -- the Python API ------------------------------------------------------------------------------


def refused(call: Any, name: str) -> NotACNN:
    with pytest.raises(NotACNN) as caught:
        call()
    error = caught.value
    assert isinstance(error, BBSwapError) and error.exit_code == 2
    brief, why = REFUSED[name]
    assert error.brief == brief
    assert why in str(error) and WHY in str(error)
    return error


@pytest.mark.parametrize("name", list(REFUSED))
def test_python_api_raises_not_a_cnn(name):
    s = spec(name)
    rec = Recipe("trivial", (make_op("project", channels=8),))
    calls = {
        "inspect": lambda: bbswap.inspect_backbone(s, "1x3x224x224"),
        "fit": lambda: bbswap.fit(s, channels=64, stride=16),
        "apply": lambda: bbswap.apply_recipe(s, rec, "1x3x224x224"),
        "trace": lambda: trace(getattr(token_models, name), (1, 3, 224, 224), name=s),
    }
    for what, call in calls.items():
        error = refused(call, name)
        assert str(error).startswith(f"{s} {WHY}"), what


@pytest.mark.parametrize("name", list(REFUSED))
def test_an_instance_with_real_weights_is_refused_too(name):
    torch.manual_seed(0)
    model = getattr(token_models, name)().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    error = refused(lambda: trace_instance(model, (1, 3, 224, 224), name=name), name)
    assert str(error).startswith(f"{name} {WHY}")
    after = model.state_dict()  # the refusal changed nothing, not even the training flags
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m.training for m in model.modules())


def test_trace_module_records_why_without_refusing():
    """trace_module is the raw trace: it records the attention and what fixes the size;
    require_cnn refuses for the latter only."""
    with torch.device("meta"):
        vit = token_models.FixedPosViT()
        mixer = token_models.TokenMixer()
    vit_trace = trace_module(vit, (1, 3, 224, 224))
    assert vit_trace.attention == "encoder.self_attn"
    assert vit_trace.fixed_size_at == ""  # the model's own forward adds it
    assert not_a_cnn(vit_trace).startswith("a positional embedding of fixed size")
    mixer_trace = trace_module(mixer, (1, 3, 224, 224))
    assert mixer_trace.attention == ""
    assert mixer_trace.features is not None and mixer_trace.features.path == "patch"
    assert mixer_trace.fixed_size_at == "blocks.0.token_mlp.0"
    with pytest.raises(NotACNN, match=rf"^mixer {WHY}: a linear layer") as caught:
        require_cnn(mixer_trace, "mixer")
    assert caught.value.brief == "fixed size: tokens"


def test_windowed_attention_is_inspected_with_the_sizes_it_takes():
    """Attention inside 4x4 windows split without padding: /8, for grids of whole windows
    at /4 and /8, so H mod 32 in 0-3 (floor(H/4) and floor(H/8) multiples of 4)."""
    report = bbswap.inspect_backbone(spec("WindowAttention"), "1x3x224x224")
    t = report.trace
    assert t.attention == "stage1" and not_a_cnn(t) == ""
    assert t.output_shape == (1, 32, 28, 28) and t.downsample == (8, 8)
    rule = t.size_rules()[0]
    assert rule.format("H") == "H -> floor(H/8) (H mod 32 in 0-3)"
    assert [t.output_size(h, h)[0] for h in (32, 35, 36, 64)] == [4, 4, 0, 8]
    windows = [o for o in t.ops if o.op == "windows"]
    assert [o.id for o in windows] == ["stage1.reshape()", "stage2.reshape()"]


def test_is_attention_tells_products_of_activations_from_linear_layers():
    a = torch.empty(2, 4, 8, device="meta")
    b = torch.empty(2, 8, 4, device="meta")
    weight = nn.Parameter(torch.empty(2, 8, 4, device="meta"))
    assert _is_attention("matmul", [a, b])
    assert _is_attention("__matmul__", [a, b])
    assert _is_attention("bmm", [a, b])
    assert _is_attention("scaled_dot_product_attention", [a])
    assert _is_attention("multi_head_attention_forward", [a])
    assert not _is_attention("matmul", [a, weight])  # a parameter: a linear layer
    assert not _is_attention("matmul", [a[0], b[0]])  # two 2-d matrices: not token mixing
    assert not _is_attention("mul", [a, a])  # a gate multiplies elementwise
    assert not _is_attention("linear", [a, torch.empty(4, 8, device="meta")])


# -- negative controls: CNNs are not refused -----------------------------------------------------


def test_gated_cnn_is_not_refused():
    """Squeeze-excitation and a selective-kernel softmax over branches: elementwise gates."""
    report = bbswap.inspect_backbone(spec("GatedCNN"), "1x3x224x224")
    assert report.trace.attention == ""
    assert not_a_cnn(report.trace) == ""
    assert report.trace.output_shape == (1, 32, 28, 28)
    assert report.trace.downsample == (8, 8)  # the 1x1 gates do not change the stride
    result = cli("inspect", spec("GatedCNN"), "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["output"] == [1, 32, 28, 28]
    fitted = bbswap.fit(spec("GatedCNN"), channels=64, stride=16)
    assert fitted.winner.ok and fitted.winner.trace.output_shape == (1, 64, 14, 14)


@pytest.mark.parametrize("listed", bbswap.list_backbones(), ids=lambda b: b.spec)
def test_every_zoo_model_traces_without_refusal(listed):
    report = bbswap.inspect_backbone(listed.spec, f"1x{listed.in_chans}x64x64")
    assert report.trace.device == "meta"
    assert report.trace.attention == ""
    assert not_a_cnn(report.trace) == ""


# -- build_on_meta: constructors that compute with tensors ---------------------------------------

ORIGINAL = (nn.Module.register_parameter, nn.Module.register_buffer)


def originals_restored() -> bool:
    return nn.Module.register_parameter is ORIGINAL[0] and nn.Module.register_buffer is ORIGINAL[1]


def test_regnet_like_cannot_be_built_with_meta_as_default_device():
    """So the trace below exercises the fallback, not the plain meta build."""
    with pytest.raises(Exception, match=r"meta"), torch.device("meta"):
        token_models.RegNetLike()
    assert token_models.regnet_widths() == [8, 16, 32]


def test_build_on_meta_falls_back_to_moving_only_the_weights():
    patched_during_build = []

    def build() -> nn.Module:
        patched_during_build.append(nn.Module.register_parameter is not ORIGINAL[0])
        return token_models.RegNetLike()

    model = build_on_meta(build)
    assert patched_during_build == [False, True]  # meta as the default device, then the patch
    assert originals_restored()
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in model.parameters())
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 32]
    bn = model.body[1]
    assert set(dict(bn.named_buffers())) == {"running_mean", "running_var", "num_batches_tracked"}
    assert "running_mean" in bn.state_dict()  # still persistent


def test_regnet_like_traces_on_meta():
    report = bbswap.inspect_backbone(spec("RegNetLike"), "1x3x224x224")
    assert report.trace.device == "meta" and report.trace.note == ""
    assert report.trace.output_shape == (1, 32, 28, 28)
    assert originals_restored()
    result, model = trace(token_models.RegNetLike, (1, 3, 61, 97))
    assert result.device == "meta" and result.output_shape == (1, 32, 8, 13)
    assert all(p.is_meta for p in model.parameters())
    assert originals_restored()


def test_register_functions_are_restored_after_a_constructor_that_raises():
    with pytest.raises(ValueError, match="not supported on purpose"):
        build_on_meta(token_models.RegNetLikeRaises)
    assert originals_restored()
    result = cli("inspect", spec("RegNetLikeRaises"))
    assert_one_line_error(result, "constructor raised ValueError", "not supported on purpose")
    assert originals_restored()
    with pytest.raises(ModelError):
        bbswap.fit(spec("RegNetLikeRaises"), channels=8, stride=8)
    assert originals_restored()
    # modules built afterwards register real tensors as usual
    conv = nn.Conv2d(3, 4, 3)
    assert not conv.weight.is_meta and isinstance(conv.weight, nn.Parameter)


BIASED = f"{TOKENS}:BiasedAttnNet"


def test_a_model_of_one_input_size_says_so_and_is_cut_before_what_ties_it(tmp_path):
    """An attention bias sized for one grid: traced at 64x64, the model fails at 128x128
    in 'attn'. inspect says so (and that the rule holds at 64x64 only); a fit that keeps
    'attn' is refused with that reason, one that cuts before it is fitted and verified;
    an instance traced so is left as it was."""
    report = bbswap.inspect_backbone(BIASED, "1x3x64x64")
    t = report.trace
    assert t.one_size_at == "attn" and "at 128x128 its forward fails in 'attn'" in t.one_size
    assert "the size rule holds at 64x64 only" in t.note
    shown = cli("inspect", BIASED, "--input", "1x3x64x64")
    assert shown.exit_code == 0 and "at 64x64 only: the model takes one size" in shown.stdout
    with pytest.raises(TargetError, match=r"it takes one input size: at 128x128") as refused:
        bbswap.fit(BIASED, channels=64, stride=16, input_shape="1x3x64x64")
    assert isinstance(refused.value, OneInputSize)
    assert refused.value.brief == "fixed size: one input size"
    assert "it keeps 'attn', which ties the model to one input size" in str(refused.value)
    found = bbswap.fit(BIASED, channels=64, stride=8, input_shape="1x3x64x64")
    assert found.winner.label == "truncate after stem.3"
    done = bbswap.export(BIASED, bbswap.winner_recipe(found), tmp_path / "cut.py")
    assert all(check.ok for check in done.report.checks)
    model = token_models.BiasedAttnNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert trace_instance(model, (1, 3, 64, 64)).one_size_at == "attn"
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_that_takes_twice_its_size_is_not_of_one_size():
    """Windowed attention (whole windows only) and a CNN take twice the size: no note."""
    for name in ("WindowAttention", "GatedCNN"):
        traced, _ = trace(getattr(token_models, name), (1, 3, 224, 224))
        assert traced.one_size == "" and traced.one_size_at == ""


def test_a_model_of_one_input_size_is_a_refused_row_of_the_matrix():
    """Where every target fails for the one input size the model takes, its matrix row is
    refused (not a failure, not among the backbones that follow a size rule); where a cut
    before what ties it reaches one target, the row is refused at the other only (it
    follows a size rule, but is no failure either)."""
    only = bbswap.matrix(BIASED, strides=[16, 32], verify=False, input_shape="1x3x64x64")
    (row,) = only.rows
    assert row.refused and not row.ok and not row.reason
    assert [c.one_size for c in row.cells] == [True, True]
    assert [c.reason for c in row.cells] == ["fixed size: one input size"] * 2
    assert (only.passed, only.cnns) == (0, 0)
    assert "1 refused as following no size rule: " + BIASED in bbswap.cli.render.matrix_summary(
        only
    )
    part = bbswap.matrix(BIASED, strides=[8, 16], verify=False, input_shape="1x3x64x64")
    (row,) = part.rows
    assert not row.refused and not row.ok and row.refused_in_part
    assert [(c.ok, c.one_size) for c in row.cells] == [(True, False), (False, True)]
    assert (part.passed, part.partly, part.cnns, part.failed) == (0, 1, 1, ())
    summary = bbswap.cli.render.matrix_summary(part)
    assert "1 reach every target but those refused as taking one input size: " + BIASED in summary
    assert "do not" not in summary


def test_features_resized_to_one_size_are_fitted_by_a_cut_before_the_resize(
    tmp_path: Path,
) -> None:
    """The adapter's features are 6x6 at any input size, so no stride change moves them;
    the stages before it follow a stride, and a cut there (with the projection) is the
    fit at 1/8, emitted and verified. At 1/16 no stage before the resize is there: the
    refusal says so, as NotACNN."""
    s = spec("FixedSizeFeatures")
    report = bbswap.inspect_backbone(s)
    assert report.trace.output_shape == (1, 48, 6, 6)
    assert [r.rounding for r in report.rules] == ["fixed", "fixed"]
    fitted = bbswap.fit(s, channels=40, stride=8, rounding="any")
    assert fitted.winner.label == "truncate after stage2"
    assert fitted.winner.trace.output_shape == (1, 40, 28, 28)
    out = tmp_path / "fixed_size.py"
    done = bbswap.export(s, bbswap.winner_recipe(fitted), out)
    assert all(check.ok for check in done.report.checks)
    with pytest.raises(NotACNN) as refused:
        bbswap.fit(s, channels=40, stride=16, rounding="any")
    assert "resizes its features to 6x6 at any input size" in str(refused.value)
    assert "no stage before that is at 1/16" in str(refused.value)


def test_a_resize_to_a_multiple_of_the_input_is_not_refused_as_one_size() -> None:
    """A map resized up to a multiple of 4 is traced as the size it gave (28x28 at
    224x224); a second trace at twice the size gives 56x56, so no refusal says the model
    has features of one size: at 1/8 a cut before the resize fits, at 1/16 the failure is
    the search's, not a refusal."""
    s = spec("ResizedToMultiple")
    assert bbswap.fit(s, channels=40, stride=8, rounding="any").winner.label == (
        "truncate after stage2"
    )
    with pytest.raises(TargetError) as failed:
        bbswap.fit(s, channels=40, stride=16, rounding="any")
    assert not isinstance(failed.value, NotACNN)
    assert "resizes its features" not in str(failed.value)


def test_a_model_traced_on_real_tensors_that_fails_at_twice_its_size_is_of_one_size():
    """timm's MViTv2 cannot run on the meta device and indexes relative-position tables
    sized for the grid it was built for. Once no candidate fits, the search runs it at
    twice the size on real tensors, and the refusal names the stage and the error; where
    a candidate fits (1/32, no stride change) it is not run there."""
    pytest.importorskip("timm")
    kw = {"img_size": 64}
    with pytest.raises(OneInputSize) as raised:
        bbswap.fit("timm:mvitv2_tiny", kwargs=kw, channels=32, stride=16, input_shape="1x3x64x64")
    message = str(raised.value)
    assert "it takes one input size: at 128x128 its forward fails" in message
    assert "'body.stages.0.blocks.0.attn' (IndexError:" in message
    found = bbswap.fit(
        "timm:mvitv2_tiny", kwargs=kw, channels=32, stride=32, input_shape="1x3x64x64"
    )
    assert found.winner.label == "no stride change"
    assert not found.source.one_size
