"""recipes/seed-hmer-resnet50.toml reproduces the seed write-up's modified ResNet-50.

The seed author replaced CAN's DenseNet-B encoder with a hand-edited torchvision
ResNet-50 (tests/seed_resnet50.py). Applied to the zoo's resnet50, the shipped recipe
must give the same figures and, with the seed's weights loaded, the same outputs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from recipe_helpers import kwargs_for, one_thread, randomize_batchnorm, real_model
from seed_resnet50 import SEED_UNUSED, patched_state_dict, seed_resnet50
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from bbswap.cli.app import app
from bbswap.cli.json_out import apply_dict
from bbswap.recipes.toml_io import load_recipe
from bbswap.surgery.apply import apply_recipe

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

ROOT = Path(__file__).resolve().parent.parent
SEED_RECIPE = ROOT / "recipes" / "seed-hmer-resnet50.toml"
INPUT = "1x1x128x316"
OUTPUT = [1, 684, 8, 20]
PARAMS = 24_903_960
MACS = 11_278_999_552


def close(value: int, target: int, rel: float = 0.005) -> bool:
    return abs(value - target) <= rel * target


@pytest.fixture(scope="module")
def seed_figures() -> tuple[list[int], int, int]:
    """Output shape, used params and MACs of the seed network itself, on the meta device."""
    with torch.device("meta"):
        seed = seed_resnet50().eval()
        x = torch.empty(1, 1, 128, 316)
        with FlopCounterMode(display=False) as counter:
            out = seed(x)
    used = sum(p.numel() for k, p in seed.named_parameters() if not k.startswith(SEED_UNUSED))
    return list(out.shape), used, counter.get_total_flops() // 2


def test_the_seed_network_has_the_documented_figures(seed_figures):
    shape, params, macs = seed_figures
    assert shape == OUTPUT
    assert params == PARAMS
    assert close(macs, MACS)


def test_apply_recipe_reports_the_seed_figures(seed_figures):
    result = apply_recipe("resnet50", load_recipe(SEED_RECIPE), INPUT)
    after = result.after
    assert list(after.input_shape) == [1, 1, 128, 316]
    assert list(after.output_shape) == OUTPUT
    assert after.params == PARAMS
    assert close(after.macs, MACS)
    assert close(after.macs, seed_figures[2])
    assert after.downsample == (16.0, 16.0)
    rules = after.size_rules()
    assert (rules[0].format("H"), rules[1].format("W")) == ("H -> ceil(H/16)", "W -> ceil(W/16)")
    # the source: the stock classifier, traced with 3 input channels
    assert list(result.before.input_shape) == [1, 3, 128, 316]
    assert list(result.before.output_shape) == [1, 1000]
    assert result.before.params == 25_557_032

    edits = {(e.op, e.path, e.attribute, e.old, e.new) for e in result.edits}
    assert ("in_channels", "conv1", "in_channels", "3", "1 (sum)") in edits
    assert ("stride", "layer2.0.conv2", "stride", "2", "1") in edits
    assert ("stride", "layer2.0.downsample.0", "stride", "2", "1") in edits
    assert {e.path for e in result.edits if e.attribute == "(removed)"} == {"avgpool", "fc"}
    dropouts = [e.path for e in result.edits if e.op == "dropout"]
    assert len(dropouts) == 16
    assert dropouts[0] == "layer1.0.dropout" and dropouts[-1] == "layer4.2.dropout"
    assert [e.path for e in result.edits if e.op == "project"] == ["proj", "proj_bn"]
    # the stride op touches layer2 only
    assert {e.path for e in result.edits if e.op == "stride"} == {
        "layer2.0.conv2",
        "layer2.0.downsample.0",
    }

    data = apply_dict(result)
    assert data["after"]["output"] == OUTPUT
    assert data["after"]["params"] == PARAMS


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_json_reports_the_seed_figures():
    result = _cli("apply", "resnet50", str(SEED_RECIPE), "--input", INPUT, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "bbswap.apply/1"
    assert data["backbone"] == "resnet50"
    assert data["recipe"] == "seed-hmer-resnet50"
    assert data["after"]["input"] == [1, 1, 128, 316]
    assert data["after"]["output"] == OUTPUT
    assert data["after"]["params"] == PARAMS
    assert close(data["after"]["macs"], MACS)
    assert data["after"]["downsample"] == [16.0, 16.0]
    assert data["size_rule"] == {"h": "H -> ceil(H/16)", "w": "W -> ceil(W/16)"}
    stages = {s["path"]: s for s in data["stages"]}
    assert stages["layer2"]["before"] == [1, 512, 16, 40]
    assert stages["layer2"]["after"] == [1, 512, 32, 79]
    assert stages["layer4"]["after"] == [1, 2048, 8, 20]
    assert stages["fc"]["after"] is None
    assert stages["proj"]["before"] is None
    assert stages["proj_bn"]["after"] == OUTPUT
    assert len([e for e in data["edits"] if e["op"] == "dropout"]) == 16


def test_cli_input_defaults_to_the_recipes():
    result = _cli("apply", "resnet50", str(SEED_RECIPE), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["after"]["output"] == OUTPUT


def test_cli_table_shows_the_result():
    result = _cli("apply", "resnet50", str(SEED_RECIPE), "--input", INPUT)
    assert result.exit_code == 0, result.output
    assert "1x684x8x20" in result.stdout
    assert "24,903,960" in result.stdout


# -- numerical equality ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    """(seed network, recipe-patched zoo resnet50 holding the seed's weights)."""
    torch.manual_seed(1234)
    seed = seed_resnet50()
    randomize_batchnorm(seed, seed=5)
    # a real zoo ResNet-50 with other random weights; the recipe is applied to it
    source = real_model("resnet50", seed=99)
    recipe = load_recipe(SEED_RECIPE)
    result = apply_recipe("resnet50", recipe, INPUT, kwargs=kwargs_for("resnet50"), model=source)
    patched = result.model
    assert not any(p.is_meta for p in patched.parameters())
    mapped = patched_state_dict(seed.state_dict())
    assert set(mapped) == set(patched.state_dict())
    for key, value in patched.state_dict().items():
        assert value.shape == mapped[key].shape, key
    patched.load_state_dict(mapped, strict=True)
    return seed.eval(), patched.eval()


# Modest sizes (this CPU does a few GMAC/s), odd ones included: ceil rounding at 1/16.
@pytest.mark.parametrize("hw", [(32, 79), (37, 53), (17, 161), (16, 16)])
def test_patched_model_computes_the_seed_network(pair, hw):
    seed, patched = pair
    x = torch.randn(1, 1, *hw, generator=torch.Generator().manual_seed(hw[0] * 1000 + hw[1]))
    with torch.no_grad():
        want = seed(x)
        got = patched(x)
    assert got.shape == want.shape
    assert got.shape[1:] == (684, -(-hw[0] // 16), -(-hw[1] // 16))
    assert want.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_dropout_sits_where_the_seed_has_it(pair):
    seed, patched = pair

    def dropouts(model: nn.Module) -> dict[str, float]:
        return {p: m.p for p, m in model.named_modules() if isinstance(m, nn.Dropout)}

    assert dropouts(patched) == dropouts(seed)
    assert len(dropouts(seed)) == 16
    assert set(dropouts(seed).values()) == {0.2}
    assert all(p.endswith(".dropout") for p in dropouts(seed))

    # In train mode both draw the same dropout masks in the same order: with the same
    # RNG state they compute the same (stochastic) output, unlike eval mode.
    # (Copies: train mode updates the BatchNorm statistics.)
    seed, patched = copy.deepcopy(seed).train(), copy.deepcopy(patched).train()
    x = torch.randn(2, 1, 23, 41, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.manual_seed(7)
        want = seed(x)
        torch.manual_seed(7)
        got = patched(x)
        torch.manual_seed(8)
        other = patched(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, other)  # dropout is active in train mode
