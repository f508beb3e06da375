"""timm models whose features are tokens (EVA, XCiT, the rotary ViTs): laid on their grid
by their own ``forward_intermediates``, fitted, emitted, and compared value by value with
timm's own models on the same weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import import_plain

from bbswap.backbones.registry import resolve
from bbswap.codegen.export import export
from bbswap.search.fit import fit, winner_recipe
from bbswap.tracing.inspection import inspect_backbone

timm = pytest.importorskip("timm")

EVA = "timm:eva02_tiny_patch14_224"
EVA_KW = {"depth": 2}
ROPE = "timm:vit_small_patch16_rope_224"
ROPE_KW = {"depth": 2, "embed_dim": 64, "num_heads": 2}
XCIT = "timm:xcit_nano_12_p16_224"
XCIT_KW = {"depth": 2}


def _on_grid(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """Tokens without the prefix ones, laid on the (h, w) grid in NCHW."""
    return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


@pytest.mark.parametrize(
    "spec, kw, grid, channels",
    [
        (EVA, EVA_KW, (16, 16), 192),  # patches of 14 on 224x224
        (ROPE, ROPE_KW, (14, 14), 64),
        (XCIT, XCIT_KW, (14, 14), 128),
    ],
)
def test_tokens_lie_on_the_grid_of_their_patches(
    spec: str, kw: dict, grid: tuple[int, int], channels: int
) -> None:
    assert resolve(spec, kw).tokens_by_intermediates
    report = inspect_backbone(spec, "1x3x224x224", kwargs=kw)
    trace = report.trace
    assert trace.output_shape == (1, channels, *grid)
    assert trace.downsample == (224 / grid[0], 224 / grid[1])
    assert "forward_intermediates" in trace.note


def test_models_whose_features_are_maps_are_not_wrapped() -> None:
    for spec in ("timm:resnet18", "timm:vit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224"):
        assert not resolve(spec).tokens_by_intermediates, spec


def test_a_rope_vit_file_gives_timms_own_tokens_on_their_grid(tmp_path: Path) -> None:
    """Before its projection, the emitted file gives the patch tokens of timm's own
    forward_features (prefix dropped), at the traced size and at another."""
    found = fit(ROPE, channels=96, stride=16, rounding="any", kwargs=ROPE_KW)
    out = tmp_path / "rope.py"
    done = export(ROPE, winner_recipe(found), out, kwargs=ROPE_KW)
    assert all(check.ok for check in done.report.checks)
    text = out.read_text()
    assert "body.forward_intermediates(" in text and "import bbswap" not in text
    model = getattr(import_plain(out), done.emitted.class_name)().eval()
    model.load_state_dict(done.result.model.state_dict())
    grid: list[torch.Tensor] = []
    model.proj.register_forward_pre_hook(lambda m, args: grid.append(args[0]))
    ref = timm.create_model(ROPE[5:], pretrained=False, dynamic_img_size=True, **ROPE_KW).eval()
    state = {k[5:]: v for k, v in model.state_dict().items() if k.startswith("body.")}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("head") for k in missing)
    for h, w in ((224, 224), (224, 320), (256, 192)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            y = model(x)
            want = _on_grid(ref.forward_features(x), ref.num_prefix_tokens, h // 16, w // 16)
        assert y.shape == (1, 96, h // 16, w // 16)
        torch.testing.assert_close(grid[-1], want, rtol=0, atol=1e-5)


def test_an_eva_reaches_one_16th_by_resampling_its_patches(tmp_path: Path) -> None:
    """EVA-02's patches of 14 made 16 by the patch op: the file equals timm's own EVA-02
    built with patch_size=16 and given the weights timm's resample_patch_embed makes."""
    found = fit(EVA, channels=64, stride=16, rounding="any", kwargs=EVA_KW)
    recipe = winner_recipe(found)
    assert [op.op for op in recipe.ops] == ["patch", "project"]
    out = tmp_path / "eva16.py"
    done = export(EVA, recipe, out, kwargs=EVA_KW)
    assert all(check.ok for check in done.report.checks)
    assert "body.patch_embed.patch_size = (16, 16)" in out.read_text()
    model = getattr(import_plain(out), done.emitted.class_name)().eval()
    torch.manual_seed(1)
    state = timm.create_model(EVA[5:], pretrained=False, **EVA_KW).state_dict()
    state["patch_embed.proj.weight"] = timm.layers.resample_patch_embed(
        state["patch_embed.proj.weight"], [16, 16]
    )
    # the source learnt its embeddings for 16x16 patches of 14 (224): 16x16 of 16 is 256
    ref_kw = {**EVA_KW, "img_size": 256, "patch_size": 16, "dynamic_img_size": True}
    ref = timm.create_model(EVA[5:], pretrained=False, **ref_kw).eval()
    ref.load_state_dict(state)
    mine = model.state_dict()
    mine.update({f"body.{k}": v for k, v in state.items() if f"body.{k}" in mine})
    model.load_state_dict(mine)
    grid: list[torch.Tensor] = []
    model.proj.register_forward_pre_hook(lambda m, args: grid.append(args[0]))
    for h, w in ((224, 224), (224, 320)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            model(x)
            want = ref.forward_intermediates(
                x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
            )[-1]
        assert grid[-1].shape == (1, 192, h // 16, w // 16)
        torch.testing.assert_close(grid[-1], want, rtol=0, atol=1e-5)


def test_the_emitted_file_runs_in_a_fresh_interpreter_without_bbswap(tmp_path: Path) -> None:
    found = fit(XCIT, channels=32, stride=16, rounding="any", kwargs=XCIT_KW)
    out = tmp_path / "xcit.py"
    done = export(XCIT, winner_recipe(found), out, kwargs=XCIT_KW)
    code = (
        "import sys; sys.path.insert(0, '.'); sys.modules['bbswap'] = None\n"
        "import torch, xcit\n"
        f"m = xcit.{done.emitted.class_name}().eval()\n"
        "print(tuple(m(torch.randn(1, 3, 224, 320)).shape))"
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(1, 32, 14, 20)"
