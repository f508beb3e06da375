"""Plain ViTs (timm's and torchvision's) as 1/16 backbones: their tokens on the grid.

The grid features are compared value by value with what timm itself gives: at the size
the position embedding was learnt for, ``forward_features`` without its prefix tokens,
laid on the grid; at other sizes, the same model built with ``dynamic_img_size=True``
(timm's own interpolation of the embedding).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from typer.testing import CliRunner

from bbswap.cli.app import app
from bbswap.codegen.export import export
from bbswap.errors import NotACNN, TargetError
from bbswap.kinds import Layout
from bbswap.search.fit import fit, winner_recipe
from bbswap.surgery.vit_grid import ViTGrid, token_grid
from bbswap.tracing.inspection import inspect_backbone
from bbswap.tracing.vit_grid import ViTFamily, recognise

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

runner = CliRunner()
TINY = "timm:vit_tiny_patch16_224"
SIZES = [(224, 224), (224, 320), (256, 192)]


def _timm_vit(name: str = "vit_tiny_patch16_224", **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, depth=2, **kw).eval()


def _on_grid(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """timm's tokens without the prefix ones, laid on the (h, w) grid in NCHW."""
    return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def test_inspect_shows_downsample_16_and_the_grid() -> None:
    report = inspect_backbone(TINY, "1x3x224x224", kwargs={"depth": 2})
    t = report.trace
    assert t.output_shape == (1, 192, 14, 14)
    assert t.downsample == (16.0, 16.0)
    assert [op.id for op in t.reductions] == ["patch_embed.proj"]
    blocks = t.stage("blocks")
    assert blocks is not None and blocks.out_shape == (1, 197, 192)
    assert blocks.grid == (14, 14) and blocks.downsample == (16.0, 16.0)
    assert blocks.layout is Layout.TOKENS
    assert blocks.channels == 192
    assert "1 prefix token dropped" in t.note
    rules = report.rules
    assert rules[0].format("H") == "H -> floor(H/16)"


def test_inspect_cli_on_torchvision_vit() -> None:
    result = runner.invoke(app, ["inspect", "tv:vit_b_16", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["downsample"] == [16.0, 16.0]
    assert data["output"] == [1, 768, 14, 14]
    rows = {s["path"]: s for s in data["stages"]}
    assert rows["encoder.layers"]["grid"] == [14, 14]
    assert rows["encoder.layers"]["output"] == [1, 197, 768]
    assert rows["conv_proj"]["downsample"] == [16.0, 16.0]
    text = runner.invoke(app, ["inspect", "tv:vit_b_16"]).stdout
    assert "1x197x768 tokens 1+14x14" in text


@pytest.mark.parametrize(
    "name, kw, prefix",
    [
        ("vit_tiny_patch16_224", {}, 1),
        ("vit_tiny_patch16_224", {"reg_tokens": 2, "no_embed_class": True}, 3),
        ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
        ("deit_tiny_distilled_patch16_224", {}, 2),  # a class and a distillation token
    ],
)
def test_grid_equals_timm_tokens(name: str, kw: dict, prefix: int) -> None:
    vit = _timm_vit(name, **kw)
    grid = token_grid(vit).eval()
    assert isinstance(grid, ViTGrid) and grid.vit_layout.prefix == prefix
    dynamic = _timm_vit(name, dynamic_img_size=True, **kw)
    dynamic.load_state_dict(vit.state_dict())
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
        assert torch.equal(grid(x), _on_grid(vit.forward_features(x), prefix, 14, 14))
        for h, w in [(224, 320), (256, 192), (96, 160)]:
            x = torch.randn(1, 3, h, w)
            want = _on_grid(dynamic.forward_features(x), prefix, h // 16, w // 16)
            torch.testing.assert_close(grid(x), want, rtol=0, atol=1e-5)


def test_torchvision_vit_grid_equals_its_encoder_output() -> None:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    layout = recognise(vit)
    assert layout is not None and layout.family is ViTFamily.TORCHVISION
    assert layout.grid == (4, 4) and layout.align_corners
    grid = token_grid(vit).eval()
    seen: list[torch.Tensor] = []
    vit.encoder.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        vit(x)
        assert torch.equal(grid(x), _on_grid(seen[0], 1, 4, 4))
        # another size: torchvision's own resize of the embedding (bicubic, align_corners)
        from torchvision.models.vision_transformer import interpolate_embeddings

        big = torchvision.models.VisionTransformer(
            image_size=96, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
        ).eval()
        state = interpolate_embeddings(96, 16, vit.state_dict())
        big.load_state_dict(state)
        seen.clear()
        big.encoder.register_forward_hook(lambda m, i, out: seen.append(out))
        x = torch.randn(1, 3, 96, 96)
        big(x)
        torch.testing.assert_close(grid(x), _on_grid(seen[0], 1, 6, 6), rtol=0, atol=1e-5)


def test_other_models_are_not_recognised() -> None:
    assert recognise(torchvision.models.resnet18()) is None
    assert recognise(timm.create_model("resnet18", pretrained=False)) is None
    # EVA adds a rotary embedding in its blocks: not the layout ViTGrid runs
    with torch.device("meta"):
        assert recognise(timm.create_model("eva02_tiny_patch14_224")) is None


class _FixedPositionViT(torch.nn.Module):
    """A ViT of its own layout, whose position embedding is added as it is."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, dim, kernel_size=16, stride=16)
        self.pos = torch.nn.Parameter(torch.zeros(1, 196, dim))
        self.block = torch.nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.block(tokens)


def test_an_unknown_vit_is_refused_for_its_fixed_position_embedding() -> None:
    with pytest.raises(NotACNN) as caught:
        inspect_backbone(_FixedPositionViT(), "1x3x224x224")
    message = str(caught.value)
    assert (
        "a positional embedding of fixed size (a 1x196x32 parameter) is added in the model's "
        "own forward, so the model takes one input size" in message
    )


def test_fit_torchvision_vit_with_one_input_channel_on_meta() -> None:
    found = fit("tv:vit_b_16", channels=256, stride=16, in_chans=1, rounding="any")
    ops = [op.op for op in winner_recipe(found).ops]
    assert ops == ["in_channels", "project"]
    after = found.winner.trace
    assert after.input_shape[1] == 1 and after.output_shape == (1, 256, 14, 14)


@pytest.mark.parametrize("stride, label, shape", [(32, "avg-pool /2", 7), (8, "stride 8", 28)])
def test_other_strides(stride: int, label: str, shape: int) -> None:
    """1/32 pools the grid (the patch conv is not given a stride past its kernel, which
    would leave pixels unread); 1/8 makes the patches overlap (16x16 every 8 pixels)."""
    found = fit(TINY, channels=256, stride=stride, rounding="any", kwargs={"depth": 1})
    labels = [c.label for c in found.candidates if c.ok]
    assert all("patch_embed: stride 32" not in label for label in labels)
    assert label in found.winner.label
    assert found.winner.trace.output_shape == (1, 256, shape, shape)


def _import(path: Path, name: str) -> ModuleType:
    found = importlib.util.spec_from_file_location(name, path)
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A depth-2 timm ViT fitted to 256 channels at 1/16, emitted, verified by bbswap's
    round trip, imported and given the patched model's weights."""
    found = fit(TINY, channels=256, stride=16, rounding="any", kwargs={"depth": 2})
    assert [c.recipe.ops[-1].op for c in found.candidates if c.ok][:1] == ["project"]
    out = tmp_path_factory.mktemp("vit") / "vit_grid.py"
    done = export(TINY, winner_recipe(found), out, kwargs={"depth": 2})
    assert all(check.ok for check in done.report.checks)
    module = _import(out, "bbswap_vit_emitted")
    model = getattr(module, done.emitted.class_name)().eval()
    model.load_state_dict(done.result.model.state_dict())
    return model, done.result.model.eval()


@pytest.mark.parametrize("h, w", SIZES)
def test_emitted_file_gives_256_channels_at_one_16th(emitted: tuple, h: int, w: int) -> None:
    model, patched = emitted
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        y = model(x)
        assert tuple(y.shape) == (1, 256, h // 16, w // 16)
        assert torch.equal(y, patched(x))
    assert model.output_size(h, w) == (h // 16, w // 16)


def test_emitted_grid_features_equal_timm(emitted: tuple) -> None:
    """Before the projection, the emitted file gives timm's own features: the tokens of
    forward_features at 224x224, those of the dynamic_img_size model at 224x320."""
    model, _ = emitted
    grid: list[torch.Tensor] = []
    model.proj.register_forward_pre_hook(lambda m, args: grid.append(args[0]))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("proj")}
    vit, dynamic = _timm_vit(), _timm_vit(dynamic_img_size=True)
    for m in (vit, dynamic):
        missing, unexpected = m.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("head") for k in missing)
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        model(x)
        assert torch.equal(grid[-1], _on_grid(vit.forward_features(x), 1, 14, 14))
        x = torch.randn(1, 3, 224, 320)
        model(x)
        want = _on_grid(dynamic.forward_features(x), 1, 14, 20)
        torch.testing.assert_close(grid[-1], want, rtol=0, atol=1e-5)


def test_a_vit_instance_is_refused_naming_its_spec() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(NotACNN) as caught:
        inspect_backbone(vit, "1x3x224x224")
    assert "is a ViT given as a model instance" in str(caught.value)
    assert "give tv:NAME or timm:NAME" in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_patch_weights_resample_as_timm_does() -> None:
    from bbswap.recipes.patch import resize_patch_weight

    torch.manual_seed(0)
    weight = torch.randn(8, 3, 14, 14)
    for size in (7, 8, 16, 32):
        got = resize_patch_weight(weight, size)
        want = timm.layers.resample_patch_embed(weight, [size, size])
        assert got.shape == (8, 3, size, size)
        torch.testing.assert_close(got, want, rtol=0, atol=5e-5)
    for h, w in ((32, 8), (4, 1), (16, 14)):
        got = resize_patch_weight(weight, (h, w))
        want = timm.layers.resample_patch_embed(weight, [h, w])
        assert got.shape == (8, 3, h, w)
        torch.testing.assert_close(got, want, rtol=0, atol=5e-5)


DINO = "timm:vit_small_patch14_dinov2"
DINO_KW = {"img_size": 70, "depth": 2, "embed_dim": 64, "num_heads": 2}


@pytest.mark.parametrize(
    ("stride", "patch"), [(16, (16, 16)), ((32, 8), (32, 8))], ids=["s16", "s32x8"]
)
def test_a_patch_14_vit_reaches_its_target_by_resampling_its_patches(
    tmp_path: Path, stride: int | tuple[int, int], patch: tuple[int, int]
) -> None:
    """No stride change takes 14-pixel patches to 1/16 (or to 1/32 x 1/8): the patch op
    makes them 16 pixels (32 x 8) and resamples the patch conv's weights; the emitted
    file equals timm's own ViT built with that patch_size, given the weights timm's
    resample_patch_embed makes."""
    found = fit(DINO, channels=64, stride=stride, rounding="any", kwargs=DINO_KW)
    side = "16" if patch == (16, 16) else "32x8"
    assert found.winner.label == f"patch_embed: patch {side}"
    recipe = winner_recipe(found)
    assert [op.op for op in recipe.ops] == ["patch"]
    out = tmp_path / f"dino{side}.py"
    done = export(DINO, recipe, out, kwargs=DINO_KW)
    assert all(check.ok for check in done.report.checks)
    model = getattr(_import(out, f"bbswap_dino{side}"), done.emitted.class_name)().eval()
    torch.manual_seed(1)
    source = timm.create_model(DINO[5:], pretrained=False, **DINO_KW).eval()
    state = source.state_dict()
    patched = dict(state)
    patched["patch_embed.proj.weight"] = timm.layers.resample_patch_embed(
        state["patch_embed.proj.weight"], list(patch)
    )
    # the embedding learnt for 5x5 patches of 14 (70x70) is one for 5x5 patches of 16
    size = (5 * patch[0], 5 * patch[1])
    ref_kw = {**DINO_KW, "img_size": size, "patch_size": patch, "dynamic_img_size": True}
    ref = timm.create_model(DINO[5:], pretrained=False, **ref_kw).eval()
    ref.load_state_dict(patched)
    mine = {k: v for k, v in patched.items() if k in model.state_dict()}
    model.load_state_dict(mine)
    for h, w in ((64, 64), (160, 112)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            got = model(x)
            want = ref.forward_intermediates(
                x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
            )[-1]
        assert got.shape == (1, 64, h // patch[0], w // patch[1])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


CONVNEXT = "timm:test_convnext2"


def test_a_4x4_stem_reaches_32x8_by_a_4x1_patch(tmp_path: Path) -> None:
    """1/32 x 1/8 on ConvNeXt: no stride change is exact (a 4x4 stem or a 2x2
    downsample at stride 1 on W would lose pixels), so the stem's patch becomes 4x1; the
    emitted file equals timm's own ConvNeXt with its stem conv replaced by a 4x1 one (its
    ``patch_size`` takes one side only), given the weights timm's resample_patch_embed
    makes."""
    found = fit(CONVNEXT, channels=128, stride=(32, 8), rounding="any")
    assert found.winner.label == "stem: patch 4x1"
    recipe = winner_recipe(found)
    assert [op.op for op in recipe.ops] == ["patch", "truncate"]  # the features, no head
    assert recipe.ops[0].params["size"] == (4, 1)
    out = tmp_path / "convnext32x8.py"
    done = export(CONVNEXT, recipe, out)
    assert all(check.ok for check in done.report.checks)
    model = getattr(_import(out, "bbswap_convnext32x8"), done.emitted.class_name)().eval()
    torch.manual_seed(2)
    state = timm.create_model(CONVNEXT[5:], pretrained=False).state_dict()
    state["stem.0.weight"] = timm.layers.resample_patch_embed(state["stem.0.weight"], [4, 1])
    ref = timm.create_model(CONVNEXT[5:], pretrained=False).eval()
    stem = ref.stem[0]
    ref.stem[0] = torch.nn.Conv2d(stem.in_channels, stem.out_channels, (4, 1), (4, 1))
    ref.load_state_dict(state)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    for h, w in ((64, 64), (96, 40)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            got, want = model(x), ref.forward_features(x)
        assert got.shape == (1, 128, h // 32, w // 8)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


SAM = "timm:samvit_base_patch16"
SAM_KW = {
    "img_size": 64,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "window_size": 2,
    "global_attn_indexes": (1,),
    "neck_chans": 24,
}


def test_sam_vit_resizes_its_own_embedding_and_fits_value_by_value(tmp_path: Path) -> None:
    """SAM's ViT adds a position embedding learnt for one grid, but resamples it to each
    grid in its own forward (timm's resample_abs_pos_embed_nhwc): no fixed-size refusal.
    The emitted file calls the same timm function and equals timm's forward_features at
    the size it was built for and at two others."""
    report = inspect_backbone(SAM, "1x3x64x64", kwargs=SAM_KW)
    assert not report.trace.fixed_size
    assert report.rules[0].format("H") == "H -> floor(H/16)"
    found = fit(SAM, channels=24, stride=16, rounding="any", kwargs=SAM_KW)
    assert found.winner.label == "no stride change"
    out = tmp_path / "sam.py"
    done = export(SAM, winner_recipe(found), out, kwargs=SAM_KW)
    assert all(check.ok for check in done.report.checks)
    assert "timm.layers.pos_embed.resample_abs_pos_embed_nhwc(" in out.read_text()
    model = getattr(_import(out, "bbswap_sam"), done.emitted.class_name)().eval()
    torch.manual_seed(2)
    ref = timm.create_model(SAM[5:], pretrained=False, **SAM_KW).eval()
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if k in model.state_dict()})
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    given = inspect_backbone(ref, "1x3x64x64")  # an instance: traced on fake tensors
    assert not given.trace.fixed_size and given.rules[0].format("W") == "W -> floor(W/16)"
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    for h, w in ((64, 64), (96, 128), (128, 80)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            got, want = model(x), ref.forward_features(x)
        assert got.shape == (1, 24, h // 16, w // 16)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


NAFLEX = "timm:naflexvit_base_patch16_gap"
NAFLEX_KW = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def test_naflexvit_patchify_by_reshape_is_a_reduction_by_its_patch(tmp_path: Path) -> None:
    """NaFlexViT cuts its input into patches with a view, a 6-D permute and a reshape
    straight to tokens, then a linear layer: a space-to-depth by 16. It counts as the
    reduction it is, so the grid is at 1/16, the emitted file's output_size says what the
    model gives, and 1/8 is refused naming the reshape no stride op changes."""
    report = inspect_backbone(NAFLEX, "1x3x64x64", kwargs=NAFLEX_KW)
    assert report.trace.downsample == (16.0, 16.0)
    assert [(o.op, o.stride) for o in report.trace.reductions] == [("space-to-depth", (16, 16))]
    found = fit(NAFLEX, channels=24, stride=16, rounding="any", kwargs=NAFLEX_KW)
    out = tmp_path / "naflex.py"
    done = export(NAFLEX, winner_recipe(found), out, kwargs=NAFLEX_KW)
    assert all(check.ok for check in done.report.checks)
    module = _import(out, "bbswap_naflex")
    model = getattr(module, done.emitted.class_name)().eval()
    torch.manual_seed(3)
    ref = timm.create_model(NAFLEX[5:], pretrained=False, **NAFLEX_KW).eval()
    theirs = {f"body.{k}": v for k, v in ref.state_dict().items()}
    model.load_state_dict({k: theirs.get(k, v) for k, v in model.state_dict().items()})
    for h, w in ((64, 64), (48, 112), (160, 32)):
        assert model.output_size(h, w) == (h // 16, w // 16)
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            got = model(x)
            grid = _on_grid(ref.forward_features(x), ref.num_prefix_tokens, h // 16, w // 16)
            want = model.proj_bn(model.proj(grid))
        assert got.shape == (1, 24, h // 16, w // 16)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(TargetError, match=r"space-to-depth by 16 at body\.embeds\.reshape\(\)"):
        fit(NAFLEX, channels=24, stride=8, rounding="any", kwargs=NAFLEX_KW)


EVA = "timm:eva02_tiny_patch14_224"
EVA_KW = {"img_size": 84, "depth": 2, "embed_dim": 64, "num_heads": 2}


def test_a_new_patch_that_does_not_divide_the_traced_size_is_traced_at_whole_patches(
    tmp_path: Path,
) -> None:
    """EVA-02's patch embedding asserts that the input is whole patches. Built for 84x84
    (6x6 patches of 14), a 32x8 patch does not divide 84 rows: the patched model is traced
    at 96x88, the next whole patches, and the fit reaches 1/32 x 1/8 instead of failing
    every candidate on the assertion."""
    found = fit(EVA, channels=64, stride=(32, 8), rounding="any", kwargs=EVA_KW)
    assert found.winner.label == "body: patch 32x8"
    assert found.winner.trace.input_shape == (1, 3, 96, 88)
    assert found.winner.trace.output_shape == (1, 64, 3, 11)
    out = tmp_path / "eva32x8.py"
    done = export(EVA, winner_recipe(found), out, kwargs=EVA_KW)
    assert all(check.ok for check in done.report.checks)
    model = getattr(_import(out, "bbswap_eva32x8"), done.emitted.class_name)().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 64)).shape == (1, 64, 4, 8)
