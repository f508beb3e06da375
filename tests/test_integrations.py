"""torchvision and timm backbones end to end: inspect, fit, emit, verify, and the refusal
of transformers. One model per torchvision CNN family and six timm families; the whole
sweep is ``benchmarks/coverage.py`` (docs/coverage.md).

These tests need torchvision and timm, which the ``test`` extra installs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from bbswap.cli.app import app
from bbswap.errors import NotACNN
from bbswap.search.fit import fit

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

runner = CliRunner()

# one model per module of torchvision.models that holds CNNs (the smallest of each)
TV_FAMILIES = {
    "alexnet": "alexnet",
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
    "efficientnet": "efficientnet_b0",
    "googlenet": "googlenet",
    "inception": "inception_v3",
    "mnasnet": "mnasnet0_5",
    "mobilenetv2": "mobilenet_v2",
    "mobilenetv3": "mobilenet_v3_small",
    "regnet": "regnet_y_400mf",
    "resnet": "resnet18",
    "shufflenetv2": "shufflenet_v2_x0_5",
    "squeezenet": "squeezenet1_1",
    "vgg": "vgg11",
}

# each stands for something the tracer or the surgery has to get right
TIMM_FAMILIES = {
    "resnet": "resnet18",
    "mobilenetv3": "mobilenetv3_small_100",  # hard-swish, squeeze-excitation
    "convnext": "convnext_atto",  # 4x4 patchify stem, 2x2 downsample convs
    "efficientnet": "tf_efficientnet_b0",  # TF 'same' padding computed per input size
    "ghostnetv2": "ghostnetv2_100",  # a gate pooled by 2 and interpolated back
    "regnet": "regnetx_002",
}


def _fit_emit_verify(spec: str, tmp_path: Path) -> str:
    """fit -o, then verify the written file on its own; returns the winner's size rule."""
    out = tmp_path / "backbone.py"
    args = ["fit", spec, "--channels", "256", "--stride", "16", "--rounding", "any"]
    result = runner.invoke(app, [*args, "--input", "1x3x96x96", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    winner = data["candidates"][0]
    assert winner["exact"] and winner["output"][1] == 256
    assert all(check["ok"] for check in data["written"]["checks"])
    source = out.read_text(encoding="utf-8")
    assert "--import mode:" in source  # torchvision's and timm's builders are imported
    package = "torchvision" if spec.startswith("tv:") else "timm"
    assert f"; needs torch and {package}. This file " in source
    checked = runner.invoke(
        app,
        [
            "verify",
            f"{out}:{data['written']['class_name']}",
            "--channels",
            "256",
            "--stride",
            "16",
            "--rounding",
            winner["rule"],
            "--sizes",
            "96x96,97x131,161x113",
        ],
    )
    assert checked.exit_code == 0, checked.output
    assert f"{winner['rule']}(H/16) x {winner['rule']}(W/16) at 3 sizes" in checked.output
    return str(winner["rule"])


@pytest.mark.parametrize("name", sorted(TV_FAMILIES.values()))
def test_torchvision_family_fits_emits_and_verifies(name: str, tmp_path: Path) -> None:
    rule = _fit_emit_verify(f"tv:{name}", tmp_path)
    # a 4x4/4 patchify stem rounds down and no padding makes it round up; VGG rounds
    # down as it stands (2x2 max-pools), so "any" takes that plan with no padding edits
    assert rule == ("floor" if name in ("convnext_tiny", "vgg11") else "ceil")


@pytest.mark.parametrize("name", sorted(TIMM_FAMILIES.values()))
def test_timm_family_fits_emits_and_verifies(name: str, tmp_path: Path) -> None:
    _fit_emit_verify(f"timm:{name}", tmp_path)


def test_every_torchvision_cnn_is_covered_by_a_family() -> None:
    names = torchvision.models.list_models(module=torchvision.models)
    refused = [n for n in names if n.startswith(("vit_", "swin_", "maxvit_"))]
    cnns = sorted(set(names) - set(refused))
    assert len(cnns) == 68 and len(refused) == 12
    modules = {torchvision.models.get_model_builder(n).__module__.rsplit(".", 1)[1] for n in cnns}
    tested = {
        torchvision.models.get_model_builder(n).__module__.rsplit(".", 1)[1]
        for n in TV_FAMILIES.values()
    }
    assert modules == tested


def test_a_linear_layer_across_tokens_is_refused_in_one_line() -> None:
    """Not for attention or tokens as such: MLP-Mixer's token-mixing layer takes 196 tokens."""
    spec = "timm:mixer_s16_224"
    for args in (
        ["inspect", spec],
        ["fit", spec, "--channels", "256", "--stride", "16"],
    ):
        result = runner.invoke(app, args)
        assert_one_line_error(
            result,
            f"{spec} has no feature map that follows the input size",
            "a linear layer at 'blocks.0.mlp_tokens.fc1' mixes the tokens, 196 of them",
            "so the model takes one input size",
        )
    with pytest.raises(NotACNN) as caught:
        fit(spec, channels=256, stride=16)
    assert caught.value.brief == "fixed size: tokens"


def test_matrix_over_torchvision_names_the_refusal() -> None:
    result = runner.invoke(
        app,
        [
            "matrix",
            "tv:resnet18",
            "timm:mixer_s16_224",
            "--stride",
            "8,16,32",
            "--channels",
            "256",
            "--no-verify",
        ],
    )
    assert result.exit_code == 0, result.output
    row = {
        line.split()[0]: line
        for line in result.output.splitlines()
        if line.strip().startswith(("tv:", "timm:"))
    }
    assert "fixed size: tokens" in row["timm:mixer_s16_224"]
    assert row["tv:resnet18"].count(" ceil") == 3
    assert result.output.splitlines()[-1] == (
        "1 of 1 backbones reach every target (inspect, fit on the meta device); "
        "1 refused as following no size rule: timm:mixer_s16_224"
    )


def test_import_mode_for_a_module_spec(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'name = "c3"\n\n[[ops]]\nop = "truncate"\nafter = "layer3"\n', encoding="utf-8"
    )
    out = tmp_path / "backbone.py"
    spec = "torchvision.models.resnet:resnet18"
    result = runner.invoke(
        app, ["apply", spec, str(recipe), "--input", "1x3x64x64", "-o", str(out), "--import"]
    )
    assert result.exit_code == 0, result.output
    source = out.read_text(encoding="utf-8")
    assert "from torchvision.models.resnet import resnet18" in source
    assert "; needs torch and torchvision. This file imports resnet18 from" in source
    assert "class ResNet(" not in source  # imported, not bundled


def test_convnext_serves_a_ceil_host(tmp_path: Path) -> None:
    # a CAN-style host slices its mask with [::16], so it needs ceil(H/16); ConvNeXt's
    # 4x4/4 stem and 2x2/2 downsamples round down at every fixed padding, so they pad
    # each input by its size in the emitted file
    out = tmp_path / "f.py"
    args = ["fit", "tv:convnext_tiny", "--channels", "256", "--stride", "16"]
    result = runner.invoke(app, [*args, "--input", "1x3x64x64", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    winner, written = data["candidates"][0], data["written"]
    assert winner["exact"] and winner["rule"] == "ceil"
    assert all(check["ok"] for check in written["checks"])
    source = out.read_text(encoding="utf-8")
    assert "class Conv2dSame(nn.Conv2d):" in source
    assert "body.features[0][0] = Conv2dSame(3, 96, kernel_size=4, stride=4)" in source
    spec = importlib.util.spec_from_file_location("convnext_ceil", out)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, written["class_name"])
    model = cls().eval()
    for h, w in [(64, 64), (67, 61), (33, 97)]:
        want = (-(-h // 16), -(-w // 16))
        assert cls.output_size(h, w) == want
        with torch.no_grad():
            assert tuple(model(torch.randn(1, 3, h, w)).shape) == (1, 256, *want)
