"""Hierarchical transformers and conv/attention hybrids: inspected, fitted, emitted.

Their maps are NHWC (Swin) or token sequences on the grid (PVT, EfficientViT); attention
keeps the number of tokens, so the features follow the patch-embedding and merging
strides. Inspection gives those strides; fit cuts at a stage (patch merging is no stride
op can change) and projects; the emitted file returns NCHW. Values are compared with what
torchvision's ``create_feature_extractor`` and timm's ``features_only`` give for the same
stage, with the same weights.

Everything is traced on the meta device; only the value comparisons and the emitted
files run real (random) weights, on small inputs.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm.models import FeatureListNet
from torchvision.models.feature_extraction import create_feature_extractor

import bbswap
from bbswap.errors import TargetError
from bbswap.kinds import Layout
from bbswap.recipes.registry import make_op
from bbswap.recipes.schema import Recipe
from bbswap.tracing.meta_run import run_on_meta
from bbswap.tracing.tracer import build_on_meta, not_a_cnn

# spec -> (the features' stage, their channels): every one at 1/32
FEATURES = {
    "tv:swin_t": ("permute", 768),
    "tv:maxvit_t": ("blocks.3", 512),
    "timm:edgenext_xx_small": ("stages", 168),
    "timm:efficientvit_b0": ("stages", 128),
    "timm:mobilevit_xxs": ("final_conv", 320),
    "timm:pvt_v2_b0": ("stages", 256),
}


@pytest.mark.parametrize("spec", [s for s in FEATURES if s != "tv:maxvit_t"])
def test_inspect_gives_the_features_at_one_32nd(spec):
    sizes = ((224, 224), (224, 320), (256, 192))
    report = bbswap.inspect_backbone(spec, "1x3x224x224", sizes=sizes)
    t = report.trace
    assert t.attention != ""  # they all attend, and none is refused for it
    assert not_a_cnn(t) == ""
    assert report.features is not None
    path, channels = FEATURES[spec]
    assert (report.features.path, report.features.channels) == (path, channels)
    assert report.features.downsample == (32.0, 32.0)
    assert report.features.out_shape == (1, channels, 7, 7)
    assert [c.predicted_hw for c in report.sizes] == [(7, 7), (7, 10), (8, 6)]
    assert all(c.ok for c in report.sizes)


def test_maxvit_takes_whole_windows_only():
    """torchvision's MaxViT splits its maps into 7x7 windows without padding: at every
    stage the grid must hold whole windows, which the size rule says."""
    report = bbswap.inspect_backbone("tv:maxvit_t", "1x3x224x224", sizes=((224, 224),))
    assert report.features is not None and report.features.path == "blocks.3"
    assert report.features.downsample == (32.0, 32.0)
    assert report.features.out_shape == (1, 512, 7, 7)
    assert report.rules[0].format("H") == "H -> ceil(H/32) (H mod 224 in 0, 221-223)"
    t = report.trace
    assert t.one_size_at.startswith("blocks.0.") and "at 448x448" in t.one_size
    assert [t.output_size(h, h, report.features.chain)[0] for h in (224, 221, 225, 320)] == [
        7,
        7,
        0,
        0,
    ]


def test_torchvision_swin_stages_are_nhwc_and_its_patch_merging_a_reduction():
    t = bbswap.inspect_backbone("tv:swin_t", "1x3x224x224", depth=2).trace
    rows = {s.path: s for s in t.stages}
    for path, (hw, channels, down) in {
        "features.1": ((56, 56), 96, 4),
        "features.2": ((28, 28), 192, 8),
        "features.5": ((14, 14), 384, 16),
        "features.7": ((7, 7), 768, 32),
    }.items():
        s = rows[path]
        assert s.layout is Layout.NHWC and s.spatial
        assert s.out_shape == (1, *hw, channels) and s.grid == hw
        assert (s.channels, s.downsample) == (channels, (down, down))
    assert rows["permute"].layout is Layout.NCHW
    merges = [o for o in t.reductions if o.owner == "features.2"]
    assert [o.id for o in merges] == [
        "features.2.__getitem__()",
        "features.2.__getitem__()#1",
        "features.2.__getitem__()#2",
        "features.2.__getitem__()#3",
    ]
    assert {(o.op, o.stride, o.in_hw, o.out_hw) for o in merges} == {
        ("slice", (2, 2), (56, 56), (28, 28))
    }
    # padded to even before the slices: ceil at every merging, after the 4x4/4 patch conv
    assert t.features is not None
    sizes = (224, 225, 227, 228, 97, 60)
    predicted = [t.output_size(h, h + 8, t.features.chain) for h in sizes]
    assert [p[0] for p in predicted] == [7, 7, 7, 8, 3, 2]
    features = build_on_meta(torchvision.models.swin_t).features
    assert predicted == [tuple(run_on_meta(features, (1, 3, h, h + 8)).shape[1:3]) for h in sizes]


def test_timm_swin_features_are_nhwc():
    t = bbswap.inspect_backbone("timm:swin_tiny_patch4_window7_224", "1x3x224x224").trace
    assert t.features is not None
    assert (t.features.path, t.features.layout) == ("norm", Layout.NHWC)
    assert t.features.out_shape == (1, 7, 7, 768) and t.features.channels == 768
    assert t.features.downsample == (32.0, 32.0)


def test_pvt_tokens_sit_on_their_grid():
    """PVT-v2 attends over N x L x C tokens with keys pooled by a strided conv (its spatial
    reduction): the tokens keep their query's grid, not the pooled keys'."""
    t = bbswap.inspect_backbone("timm:pvt_v2_b0", "1x3x224x224").trace
    block = t.stage("stages.0.blocks.0")
    assert block is not None
    assert block.layout is Layout.TOKENS and block.out_shape == (1, 56 * 56, 32)
    assert block.grid == (56, 56) and block.downsample == (4.0, 4.0)
    attn = t.stage("stages.0.blocks.0.attn")
    assert attn is not None and attn.downsample == (4.0, 4.0)


@pytest.mark.parametrize(
    ("spec", "build", "size"),
    [
        ("timm:pvt_v2_b0", lambda: timm.create_model("pvt_v2_b0"), 64),  # sdpa
        ("tv:maxvit_t", torchvision.models.maxvit_t, 224),  # einsum
        ("tv:swin_t", torchvision.models.swin_t, 64),  # q @ k.T
    ],
)
def test_attention_matmuls_are_counted_as_flop_counter_counts_them(spec, build, size):
    """The trace counts a fused attention as its two products; FlopCounterMode sees those
    products when the attention is written out (it does not count torch's fused CPU
    kernel at all)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build().eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # q @ k.T and attn @ v as matmuls
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    traced = bbswap.inspect_backbone(spec, f"1x3x{size}x{size}").trace
    assert traced.macs == counter.get_total_flops() // 2


# -- fit and the emitted file --------------------------------------------------------------------

SIZES = ((224, 224), (224, 320), (256, 192))
CHECK = """
import importlib.util, sys, torch
sys.modules["bbswap"] = None  # the file must not need it
spec = importlib.util.spec_from_file_location("emitted", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = getattr(module, sys.argv[2])().eval()
with torch.no_grad():
    for h, w in ((224, 224), (224, 320), (256, 192)):
        print(tuple(model(torch.randn(1, 3, h, w)).shape))
"""


@pytest.mark.parametrize(
    ("spec", "label"),
    [
        ("tv:swin_t", "truncate after features.5, exact ceil at features.0.0"),
        ("timm:efficientvit_b0", "stages.3: stride 1"),
    ],
)
def test_fit_emits_a_file_that_gives_256_channels_at_one_16th(spec, label, tmp_path):
    found = bbswap.fit(spec, channels=256, stride=16, rounding="any")
    assert found.winner.ok and found.winner.label == label
    assert found.winner.trace.output_shape == (1, 256, 14, 14)
    out = tmp_path / "backbone.py"
    exported = bbswap.export(spec, bbswap.winner_recipe(found), out)
    name = exported.emitted.class_name
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(out), name], capture_output=True, text=True, check=True
    )
    assert run.stdout.split("\n")[:3] == [f"(1, 256, {h // 16}, {w // 16})" for h, w in SIZES]


def _emitted(spec: str, after: str, tmp_path: Path) -> torch.nn.Module:
    """The file emitted for a cut after ``after``, imported, with random weights."""
    recipe = Recipe("cut", (make_op("truncate", after=after),), spec)
    result = bbswap.apply_recipe(spec, recipe, "1x3x224x224")
    path = tmp_path / "cut.py"
    emitted = bbswap.emit(result)
    path.write_text(emitted.source, encoding="utf-8")
    found = importlib.util.spec_from_file_location("cut_emitted", path)
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return getattr(module, emitted.class_name)().eval()


def test_a_swin_cut_gives_torchvisions_stage_output_channels_first(tmp_path):
    torch.manual_seed(0)
    cut = _emitted("tv:swin_t", "features.5", tmp_path)
    reference = torchvision.models.swin_t().eval()
    missing = reference.load_state_dict(cut.state_dict(), strict=False).missing_keys
    assert all(k.startswith(("features.6", "features.7", "norm", "head")) for k in missing)
    extractor = create_feature_extractor(reference, return_nodes={"features.5": "out"})
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        want = extractor(x)["out"].permute(0, 3, 1, 2)
        got = cut(x)
    assert got.shape == (1, 384, 6, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_maxvit_cut_inside_its_block_list_gives_torchvisions_stage_output(tmp_path):
    # the cut is in the ModuleList the forward loops over; the file keeps blocks 0-2 under
    # their names, so torchvision's MaxViT takes its weights and its extractor compares
    torch.manual_seed(0)
    cut = _emitted("tv:maxvit_t", "blocks.2", tmp_path)
    reference = torchvision.models.maxvit_t().eval()
    missing = reference.load_state_dict(cut.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(("blocks.3", "classifier")) for k in missing)
    extractor = create_feature_extractor(reference, return_nodes={"blocks.2": "out"})
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = extractor(x)["out"]
        got = cut(x)
    assert got.shape == (1, 256, 14, 14)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_efficientvit_cut_gives_timms_features_only_stage(tmp_path):
    torch.manual_seed(0)
    cut = _emitted("timm:efficientvit_b0", "stages.2", tmp_path)
    full = timm.create_model("efficientvit_b0").eval()
    missing = full.load_state_dict(cut.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(("stages.3.", "head.")) for k in missing)
    # what features_only builds, on the model that holds the cut's weights
    reference = FeatureListNet(full, out_indices=(2,), flatten_sequential=True).eval()
    assert reference.feature_info.module_name() == ["stages.2"]
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        [want] = reference(x)
        got = cut(x)
    assert got.shape == (1, 64, 6, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fit_on_windows_split_without_padding_says_which_sizes_it_takes():
    """4x4 windows at 1/4 and 1/8, no padding: the probes are sizes the model takes, and
    the winner's rule says which those are."""
    spec = f"{Path(__file__).resolve().parent / 'fixtures' / 'token_models.py'}:WindowAttention"
    found = bbswap.fit(spec, channels=64, stride=16, rounding="any")
    assert found.winner.ok and found.winner.trace.output_shape == (1, 64, 14, 14)
    assert all(h % 32 < 4 and w % 32 < 4 for h, w in found.probes)
    rule = found.winner.trace.size_rules()[0].format("H")
    assert rule.endswith("(H mod 32 in 0-3)")


def test_a_backbone_no_stride_change_fits_is_cut_at_its_last_stage_at_the_stride():
    # torchvision's MaxViT fixes the number of its windows for the grid of 224x224 when it
    # is built: at 448x448 its first attention fails, so it takes one input size, and
    # every plan keeps that attention (no stage before it is at 1/16); the fit says why
    with pytest.raises(TargetError, match="it takes one input size: at 448x448") as refused:
        bbswap.fit("tv:maxvit_t", channels=256, stride=16, rounding="any")
    assert refused.value.brief == "fixed size: one input size"
    # the deepest stage at the stride, not the patch embedding before the stages
    cut = bbswap.fit("timm:efficientvit_m0", channels=256, stride=16, rounding="any")
    assert cut.winner.label == "truncate after stages.0"


# -- the layout rules on their own -----------------------------------------------------------------


def test_layouts_read_shapes_against_the_grid():
    from bbswap.tracing import layouts

    grid = (56, 56)
    assert layouts.classify((1, 96, 56, 56), grid, Layout.NCHW) is Layout.NCHW
    assert layouts.classify((1, 56, 56, 96), grid, Layout.NCHW) is Layout.NHWC
    assert layouts.classify((1, 56, 56, 56), grid, Layout.NHWC) is Layout.NHWC  # as it was
    assert layouts.classify((1, 3136, 64), grid, Layout.NCHW) is Layout.TOKENS
    assert layouts.classify((1, 64, 3136), grid, Layout.NCHW) is Layout.CHANNELS_TOKENS
    assert layouts.classify((16, 6, 49, 32), grid, Layout.NHWC) is Layout.NONE  # windows
    assert layouts.channels((1, 56, 56, 96), Layout.NHWC) == 96
    assert layouts.as_nchw((1, 56, 56, 96), Layout.NHWC) == (1, 96, 56, 56)


def test_a_strided_slice_is_a_reduction_and_a_window_split_a_constraint():
    from bbswap.tracing import layouts

    x = torch.empty(1, 56, 56, 96, device="meta")
    merge = layouts.slice_args(
        (Ellipsis, slice(1, None, 2), slice(0, None, 2), slice(None)), x, Layout.NHWC
    )
    assert merge is not None and (merge.op, merge.stride, merge.kernel) == ("slice", (2, 2), (2, 1))
    assert [st.out_size(57) for st in (*merge.steps[0], *merge.steps[1])] == [29, 29]  # ceil
    crop = (slice(None), slice(None, 28), slice(None, 28), slice(None))
    assert layouts.slice_args(crop, x, Layout.NHWC) is None  # a crop is no reduction
    split = layouts.window_blocks((1, 64, 56, 56), (1, 64, 8, 7, 8, 7), Layout.NCHW)
    assert split == (7, 7)
    assert layouts.window_blocks((1, 56, 56, 96), (1, 8, 7, 8, 7, 96), Layout.NHWC) == (7, 7)
    assert layouts.window_blocks((1, 96, 56, 56), (1, 96, 3136), Layout.NCHW) is None


def test_a_timm_model_built_for_one_size_is_traced_at_it_and_takes_any():
    # timm's config says swinv2_tiny_window8_256 takes 256x256 only; bbswap traces it
    # there and builds it with timm's own dynamic_img_size, which adds no weight
    backbone = bbswap.resolve("timm:swinv2_tiny_window8_256")
    assert backbone.own_size == (256, 256)
    assert backbone.kwargs == {"dynamic_img_size": True}
    assert bbswap.resolve("timm:swin_base_patch4_window12_384", {"img_size": 192}).own_size == (
        192,
        192,
    )
    assert bbswap.resolve("timm:resnet18").own_size == (224, 224)
    # a plain ViT is laid on its grid by bbswap, which interpolates its embedding itself
    assert bbswap.resolve("timm:vit_tiny_patch16_384").kwargs == {}
    report = bbswap.inspect_backbone(backbone, sizes=((224, 320),))
    assert report.trace.input_shape == (1, 3, 256, 256)
    assert report.features is not None
    assert report.features.layout is Layout.NHWC
    assert (report.features.channels, report.features.downsample) == (768, (32.0, 32.0))
    assert [c.predicted_hw for c in report.sizes] == [(7, 10)]
    assert all(c.ok for c in report.sizes)


def test_attention_scores_of_a_window_as_large_as_the_grid_are_no_map():
    # 8x8 windows hold 64 tokens: at 256x256 the first stage's grid is 64x64 too, so the
    # scores (windows x heads x 64 x 64) have the grid's shape; they are not a map, and
    # every patch merging after them is a reduction
    report = bbswap.inspect_backbone("timm:swinv2_tiny_window8_256", "1x3x256x256", depth=8)
    scores = report.trace.stage("layers.0.blocks.1.attn.softmax")
    assert scores is not None and scores.out_shape == (64, 3, 64, 64)
    assert scores.layout is Layout.NONE
    merges = [op.id for op in report.trace.reductions if op.op == "patch-merge"]
    assert len(merges) == 3
    assert report.features is not None and report.features.out_shape == (1, 8, 8, 768)


def test_tokens_after_the_last_map_are_laid_on_their_grid_not_cut_at_the_patch_embedding():
    # a rotary-embedding ViT with dynamic_img_size keeps its patches NHWC for one call;
    # its features are the tokens after its blocks, laid on their grid by its own
    # forward_intermediates, not that map
    spec = "timm:vit_base_patch16_rope_reg1_gap_256"
    report = bbswap.inspect_backbone(spec, kwargs={"depth": 2})
    assert report.trace.output_shape == (1, 768, 16, 16)
    assert "forward_intermediates" in report.trace.note
    paths = [stage.path for stage in report.trace.stages]
    assert "body.blocks.1" in paths  # the output comes after the last block
    assert paths.index("body.blocks.1") > paths.index("body.patch_embed")


def test_a_matrix_row_gives_the_channels_of_an_nhwc_map():
    result = bbswap.matrix(["timm:swin_tiny_patch4_window7_224"], strides=(32,), verify=False)
    (row,) = result.rows
    assert (row.channels, row.downsample) == (768, (32.0, 32.0))


TWINS_KW = {
    "embed_dims": (16, 32, 48, 64),
    "num_heads": (1, 2, 3, 4),
    "depths": (1, 1, 1, 1),
    "wss": (7, 7, 7, 7),
    "sr_ratios": (8, 4, 2, 1),
}


def test_a_twins_patch_embedding_given_stride_1_computes_its_grid_from_it(tmp_path):
    """Twins' PatchEmbed computes its token grid as the input size floor-divided by its
    patch_size, not from its conv's output. A stride op on its conv sets that patch_size
    too: the emitted file equals timm's Twins with the same two edits made by hand."""
    spec = "timm:twins_svt_small"
    ops = tuple(
        make_op("stride", at=f"body.patch_embeds.{i}", stride=1, mode="stride") for i in (1, 2)
    )
    result = bbswap.apply_recipe(spec, Recipe("twins", ops, spec), "1x3x224x224", kwargs=TWINS_KW)
    assert [e.attribute for e in result.edits].count("patch_size") == 2
    path = tmp_path / "twins.py"
    emitted = bbswap.emit(result)
    path.write_text(emitted.source, encoding="utf-8")
    found = importlib.util.spec_from_file_location("twins_emitted", path)
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    model = getattr(module, emitted.class_name)().eval()
    torch.manual_seed(4)
    ref = timm.create_model(spec[5:], pretrained=False, **TWINS_KW).eval()
    theirs = {f"body.{k}": v for k, v in ref.state_dict().items()}
    model.load_state_dict({k: theirs.get(k, v) for k, v in model.state_dict().items()})
    for i in (1, 2):
        ref.patch_embeds[i].proj.stride = (1, 1)
        ref.patch_embeds[i].proj.padding = "same"
        ref.patch_embeds[i].patch_size = (1, 1)
    for h, w in ((224, 224), (112, 160), (64, 96)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            got = model(x)
            want = ref.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[-1]
        assert got.shape == (1, 64, h // 8, w // 8)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_levit_conv_takes_one_input_size_and_is_cut_before_its_attention(tmp_path):
    """LeViT adds an attention bias learnt for one grid (196 x 196 at 224x224): at
    448x448 its first attention fails, so 1/32 (which keeps it) is refused with that
    reason, and 1/16 is its stem cut (the stem is at 1/16 before any attention),
    verified at every size the file takes."""
    spec = "timm:levit_conv_128"
    report = bbswap.inspect_backbone(spec)
    assert report.trace.one_size_at == "stages.0.blocks.0.attn"
    with pytest.raises(TargetError, match="it takes one input size") as refused:
        bbswap.fit(spec, channels=256, stride=32)
    assert refused.value.brief == "fixed size: one input size"
    found = bbswap.fit(spec, channels=256, stride=16)
    assert found.winner.label == "truncate after stem.conv4"
    done = bbswap.export(spec, bbswap.winner_recipe(found), tmp_path / "levit.py")
    assert all(check.ok for check in done.report.checks)


QWEN_KW = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def test_a_map_flattened_into_tokens_only_for_the_head_is_the_features(tmp_path):
    """Qwen3's ViT gives its blocks' output as an NHWC map and flattens it into tokens
    only for its head: the map is its features (inspect no longer refuses it as token
    output), and the file fitted at 1/16 with its own channels equals timm's
    forward_features, channels first, at the size it was built for and at others."""
    spec = "timm:qwen3_vit_88m"
    report = bbswap.inspect_backbone(spec, kwargs=QWEN_KW)
    features = report.trace.features
    assert features is not None and features.layout is Layout.NHWC
    found = bbswap.fit(spec, channels=64, stride=16, rounding="any", kwargs=QWEN_KW)
    recipe = bbswap.winner_recipe(found)
    path = tmp_path / "qwen.py"
    done = bbswap.export(spec, recipe, path, kwargs=QWEN_KW)
    assert all(check.ok for check in done.report.checks)
    found_spec = importlib.util.spec_from_file_location("qwen_emitted", path)
    assert found_spec is not None and found_spec.loader is not None
    module = importlib.util.module_from_spec(found_spec)
    found_spec.loader.exec_module(module)
    model = getattr(module, done.emitted.class_name)().eval()
    torch.manual_seed(5)
    ref = timm.create_model(spec[5:], pretrained=False, **QWEN_KW).eval()
    theirs = ref.state_dict()
    mine = model.state_dict()
    prefix = next(p for p in ("", "body.") if all(k.removeprefix(p) in theirs for k in mine))
    model.load_state_dict({k: theirs[k.removeprefix(prefix)] for k in mine})
    for h, w in ((224, 224), (224, 320), (256, 192)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            got, want = model(x), ref.forward_features(x).permute(0, 3, 1, 2)
        assert got.shape == (1, 64, h // 16, w // 16)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


SWINV2_CR_KW = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2)}
ODD_CHECK = CHECK.replace(
    "((224, 224), (224, 320), (256, 192))", "((224, 224), (33, 97), (65, 127))"
)


def test_a_new_patch_that_misses_at_odd_sizes_is_padded_to_the_rule(tmp_path):
    """SwinV2-CR at 1/32 x 1/8: a 4x1 patch floors H at sizes it does not divide before
    the patch merges round it up, so it misses alone; its embedding made exact (padded to
    ceil) follows ceil(H/32) x ceil(W/8) at every size."""
    spec = "timm:swinv2_cr_tiny_ns_224"
    found = bbswap.fit(spec, channels=32, stride="32x8", rounding="any", kwargs=SWINV2_CR_KW)
    assert found.winner.label == "patch_embed: patch 4x1, exact ceil at patch_embed.proj"
    alone = next(c for c in found.candidates if c.label == "patch_embed: patch 4x1")
    assert not alone.ok and alone.misses
    out = tmp_path / "swinv2.py"
    exported = bbswap.export(spec, bbswap.winner_recipe(found), out, kwargs=SWINV2_CR_KW)
    assert exported.report.ok
    run = subprocess.run(
        [sys.executable, "-c", ODD_CHECK, str(out), exported.emitted.class_name],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.split("\n")[:3] == ["(1, 32, 7, 28)", "(1, 32, 2, 13)", "(1, 32, 3, 16)"]
