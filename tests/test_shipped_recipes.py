"""Every recipe in recipes/ applies to the backbone it names and gives what its header
comment says. Each documented claim is looked up in the header (so the header and this
test change together) and checked against the trace, the edits and a real forward."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from recipe_helpers import forward, one_thread, real_model
from typer.testing import CliRunner

from bbswap.cli.app import app
from bbswap.cli.json_out import apply_dict
from bbswap.recipes.schema import Recipe
from bbswap.recipes.toml_io import load_recipe, recipe_from_dict
from bbswap.surgery.apply import ApplyResult, apply_recipe

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED = sorted(RECIPES.glob("*.toml"))


def header(path: Path) -> str:
    """The leading comment block, joined into one line of prose."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def plain(backbone: str, input_shape: str, after: str) -> ApplyResult:
    """The backbone only truncated: the reference for receptive field and cost."""
    recipe = recipe_from_dict({"name": "plain", "ops": [{"op": "truncate", "after": after}]})
    return apply_recipe(backbone, recipe, input_shape)


def geometry(result: ApplyResult, path: str) -> tuple:
    m = result.model.get_submodule(path)
    return (tuple(m.stride), tuple(m.dilation), tuple(m.padding))


# -- the documented claims, per file ------------------------------------------------------------


def seed_hmer(r: ApplyResult, recipe: Recipe) -> dict[str, Callable[[], None]]:
    def output() -> None:
        text = re.search(r"Output at (\S+): (\S+?)\.", header(RECIPES / f"{recipe.name}.toml"))
        assert text is not None
        assert "x".join(map(str, r.after.input_shape)) == text.group(1)
        assert "x".join(map(str, r.after.output_shape)) == text.group(2)

    def one_channel() -> None:
        assert r.after.input_shape[1] == 1
        assert r.model.conv1.in_channels == 1

    def layer2() -> None:
        assert geometry(r, "layer2.0.conv2")[0] == (1, 1)
        assert r.after.downsample == (16.0, 16.0)
        assert r.before.stage("layer4").downsample == (32.0, 32.0)

    def head() -> None:
        assert {e.path for e in r.edits if e.attribute == "(removed)"} == {"avgpool", "fc"}

    def dropout() -> None:
        blocks = [p for p, m in r.model.named_modules() if type(m).__name__ == "Bottleneck"]
        drops = [p for p, m in r.model.named_modules() if isinstance(m, torch.nn.Dropout)]
        assert len(blocks) == 16
        assert drops == [f"{b}.dropout" for b in blocks]
        assert all(r.model.get_submodule(p).p == 0.2 for p in drops)

    def project() -> None:
        assert (r.model.proj.in_channels, r.model.proj.out_channels) == (2048, 684)
        assert r.model.proj_bn.num_features == 684

    return {
        "Output at 1x1x128x316: 1x684x8x20": output,
        "one input channel": one_channel,
        "layer2 without its stride (so 1/16 instead of 1/32)": layer2,
        "the classifier head dropped": head,
        "Dropout(0.2) after every Bottleneck": dropout,
        "a 1x1 conv + BN from 2048 to 684 channels": project,
    }


def resnet50_os16(r: ApplyResult, recipe: Recipe) -> dict[str, Callable[[], None]]:
    ref = plain("resnet50", recipe.input, "layer4")

    def stride16() -> None:
        assert r.after.downsample == (16.0, 16.0)
        assert r.after.output_shape == (1, 684, 8, 20)
        assert geometry(r, "layer4.0.conv2")[0] == (1, 1)
        assert geometry(r, "layer4.0.downsample.0")[0] == (1, 1)

    def dilation() -> None:
        assert geometry(r, "layer4.0.conv2")[1:] == ((1, 1), (1, 1))
        assert geometry(r, "layer4.1.conv2")[1:] == ((2, 2), (2, 2))
        assert geometry(r, "layer4.2.conv2")[1:] == ((2, 2), (2, 2))
        # nothing before layer4 changes its geometry
        assert all(e.path.startswith("layer4.") for e in r.edits if e.op == "stride")

    def receptive_field() -> None:
        assert r.after.receptive_field == ref.after.receptive_field
        assert r.after.stage("layer4").receptive_field == ref.after.stage("layer4").receptive_field

    def half_the_macs() -> None:
        seed = apply_recipe("resnet50", load_recipe(RECIPES / "seed-hmer-resnet50.toml"))
        assert 0.4 <= r.after.macs / seed.after.macs <= 0.6

    def channels() -> None:
        assert r.after.output_shape[1] == 684
        assert r.after.input_shape[1] == 1

    return {
        "ResNet-50 at 1/16 by removing layer4's stride and dilating layer4": stride16,
        "its first block keeps dilation 1, the others get 2": dilation,
        "layer4 keeps its receptive field": receptive_field,
        "about half the MACs of removing layer2's stride": half_the_macs,
        "684 channels for CAN": channels,
    }


def densenet100_os32(r: ApplyResult, recipe: Recipe) -> dict[str, Callable[[], None]]:
    def coarser() -> None:
        assert r.before.downsample == (16.0, 16.0)
        assert r.after.downsample == (32.0, 32.0)
        assert r.before.output_shape[1] == r.after.output_shape[1] == 684
        assert r.after.output_shape == (1, 684, 4, 10)

    def ceil_pool() -> None:
        assert [e.path for e in r.edits] == ["pool"]
        assert isinstance(r.model.pool, torch.nn.AvgPool2d)
        assert r.model.pool.ceil_mode
        assert r.model.pool.kernel_size == (2, 2)
        rules = r.after.size_rules()
        assert (rules[0].format("H"), rules[1].format("W")) == (
            "H -> ceil(H/32)",
            "W -> ceil(W/32)",
        )
        # odd sizes round up, as the transitions do
        assert r.after.output_size(129, 317) == (5, 10)

    return {
        "a 2x2 average pooling (ceil mode, like its own transitions)": ceil_pool,
        "from 1/16 to 1/32 with the same 684 channels": coarser,
    }


def ocr_resnet34(r: ApplyResult, recipe: Recipe) -> dict[str, Callable[[], None]]:
    def strides() -> None:
        for stage in ("layer2", "layer3", "layer4"):
            assert geometry(r, f"{stage}.0.conv1")[0] == (2, 1)
            assert geometry(r, f"{stage}.0.downsample.0")[0] == (2, 1)
        assert geometry(r, "conv1")[0] == (2, 2)
        assert r.after.input_shape[1] == 1

    def factors() -> None:
        assert r.after.downsample == (32.0, 4.0)
        rules = r.after.size_rules()
        assert (rules[0].format("H"), rules[1].format("W")) == ("H -> ceil(H/32)", "W -> ceil(W/4)")

    def line() -> None:
        assert r.after.input_shape == (1, 1, 32, 256)
        assert r.after.output_shape[2:] == (1, 64)

    def projected() -> None:
        assert r.after.output_shape[1] == 256
        assert isinstance(r.model.proj_act, torch.nn.ReLU)

    return {
        "the W stride removed in layer2, layer3 and layer4 ([2, 1])": strides,
        "1/32 in height, 1/4 in width": factors,
        "a 32x256 line image gives 1x64 columns": line,
        "projected to 256 channels": projected,
    }


CLAIMS = {
    "seed-hmer-resnet50.toml": seed_hmer,
    "resnet50-os16-684.toml": resnet50_os16,
    "densenet100-os32.toml": densenet100_os32,
    "ocr-resnet34-h32-w4.toml": ocr_resnet34,
}


def test_every_shipped_recipe_is_checked_here():
    assert sorted(p.name for p in SHIPPED) == sorted(CLAIMS)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_does_what_its_header_says(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.backbone and recipe.input and recipe.description
    text = header(path)
    assert text, f"{path.name} has no header comment"
    result = apply_recipe(recipe.backbone, recipe)
    assert "x".join(map(str, result.after.input_shape)) == recipe.input
    claims = CLAIMS[path.name](result, recipe)
    for claim, check in claims.items():
        assert claim in text, f"{path.name}: the header no longer says {claim!r}"
        check()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_through_the_cli(path):
    recipe = load_recipe(path)
    result = CliRunner().invoke(app, ["apply", recipe.backbone, str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == apply_dict(apply_recipe(recipe.backbone, recipe))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_on_real_weights(path):
    """With real weights, at a smaller odd size than the recipe's: the patched copy runs
    and gives the predicted shape."""
    recipe = load_recipe(path)
    n, c, h, w = (int(v) for v in recipe.input.split("x"))
    h, w = h // 2 + 1, w // 2 + 1
    model = real_model(recipe.backbone)
    result = apply_recipe(recipe.backbone, recipe, f"{n}x{c}x{h}x{w}", model=model)
    out = forward(result.model, torch.randn(n, c, h, w))
    assert tuple(out.shape) == result.after.output_shape
    assert tuple(out.shape[-2:]) == result.after.output_size(h, w)
    assert torch.isfinite(out).all()
