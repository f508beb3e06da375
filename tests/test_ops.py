"""Every recipe op on several zoo families, checked three ways: the trace of the patched
model (shapes, downsample, receptive field), the recorded edits, and a real CPU
forward of the patched copy of a model with random weights, which must give the
predicted shapes and, where the op has a closed form, the predicted values."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from recipe_helpers import apply, assert_same_snapshot, forward, one_thread, real_model, snapshot
from torch import nn

from bbswap.errors import ModelError, RecipeError, SurgeryError
from bbswap.surgery.apply import ApplyResult
from bbswap.tracing.tracer import trace

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

ODD_SIZES = ((37, 53), (45, 71))


@functools.cache
def source(spec: str) -> nn.Module:
    """One real CPU model per backbone, shared: apply must never change it (checked)."""
    return real_model(spec, seed=len(spec))


def x_of(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """A fixed random input of that shape."""
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(31 * h + w))


def check_forward(result: ApplyResult, sizes=ODD_SIZES) -> None:
    """The real patched model gives the after-trace's output at the traced input, and
    the size chain's prediction at other (odd) sizes."""
    n, c, h, w = result.after.input_shape
    out = forward(result.model, x_of(n, c, h, w))
    assert tuple(out.shape) == result.after.output_shape
    for hh, ww in sizes:
        out = forward(result.model, x_of(1, c, hh, ww))
        if len(result.after.output_shape) == 4:
            assert tuple(out.shape[-2:]) == result.after.output_size(hh, ww), (hh, ww)
        else:  # a classifier: the same logits whatever the size
            assert out.shape[1:] == result.after.output_shape[1:]
        assert torch.isfinite(out).all()


def edits(result: ApplyResult, op: str | None = None) -> list[tuple[str, str, str, str]]:
    return [(e.path, e.attribute, e.old, e.new) for e in result.edits if op in (None, e.op)]


def same_weights(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if not k.startswith(skip)]
    assert keys == [k for k in sb if not k.startswith(skip)]
    for k in keys:
        assert torch.equal(sa[k], sb[k]), k


def stage_output(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    """The output of one module of the original model, caught with a hook."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        forward(model, x)
    finally:
        handle.remove()
    return seen[0]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 rounding, relative to the size of the values (random weights
    and BatchNorm statistics make activations grow to the hundreds in deep models)."""
    assert a.shape == b.shape
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal: for float64 results of the same arithmetic done in another order."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * max(1.0, float(b.abs().max())))


def forward64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output in float64, from a float64 copy of the model."""
    return forward(copy.deepcopy(model).double(), x.double())


def trunc(after: str) -> dict:
    return {"op": "truncate", "after": after}


# -- in_channels ----------------------------------------------------------------------------

STEMS = {
    "resnet18": "conv1",  # no bias
    "vgg16_bn": "features.0",  # with bias
    "mobilenet_v2": "features.0.0",
    "efficientnet_b0": "features.0.0",
    "convnext_tiny": "features.0.0",  # 4x4/4 patchify conv with bias
}


@pytest.mark.parametrize("spec", ["resnet18", "vgg16_bn", "mobilenet_v2", "convnext_tiny"])
def test_in_channels_sum_equals_the_grey_image_repeated(spec):
    result = apply(
        spec, {"op": "in_channels", "channels": 1}, input_shape="1x1x40x56", model=source(spec)
    )
    stem = STEMS[spec]
    assert edits(result) == [(stem, "in_channels", "3", "1 (sum)")]
    assert result.after.input_shape == (1, 1, 40, 56)
    assert result.before.input_shape == (1, 3, 40, 56)
    assert result.after.output_shape == result.before.output_shape
    conv = result.model.get_submodule(stem)
    assert conv.in_channels == 1 and conv.weight.shape[1] == 1
    assert result.after.params == result.before.params - 2 * conv.weight[:, 0].numel()
    x = x_of(2, 1, 40, 56)
    close(forward(result.model, x), forward(source(spec), x.repeat(1, 3, 1, 1)))
    same_weights(result.model, source(spec), skip=(stem + ".weight",))


def test_in_channels_mean_equals_a_third_of_the_grey_image_repeated():
    spec = "resnet18"
    result = apply(
        spec,
        {"op": "in_channels", "channels": 1, "strategy": "mean"},
        input_shape="1x1x40x56",
        model=source(spec),
    )
    assert edits(result) == [("conv1", "in_channels", "3", "1 (mean)")]
    x = x_of(2, 1, 40, 56)
    close(forward(result.model, x), forward(source(spec), x.repeat(1, 3, 1, 1) / 3))


@pytest.mark.parametrize("spec", ["resnet18", "vgg16_bn", "efficientnet_b0"])
def test_in_channels_repeat_to_six_equals_the_image_twice(spec):
    result = apply(
        spec, {"op": "in_channels", "channels": 6}, input_shape="1x6x40x56", model=source(spec)
    )
    assert edits(result) == [(STEMS[spec], "in_channels", "3", "6 (repeat)")]
    assert result.after.input_shape == (1, 6, 40, 56)
    x = x_of(2, 3, 40, 56)
    close(forward(result.model, torch.cat([x, x], 1)), forward(source(spec), x))
    check_forward(result, sizes=((37, 53),))


def test_in_channels_repeat_on_densenet100_from_one_channel():
    # densenet100 is built for 1 channel; 3 channels repeat its one filter at 1/3
    spec = "densenet100"
    result = apply(
        spec, {"op": "in_channels", "channels": 3}, input_shape="1x3x48x64", model=source(spec)
    )
    assert edits(result) == [("conv1", "in_channels", "1", "3 (repeat)")]
    assert result.before.input_shape == (1, 1, 48, 64)
    assert result.after.output_shape == (1, 684, 3, 4)
    x = x_of(1, 3, 48, 64)
    close(forward(result.model, x), forward(source(spec), x.mean(1, keepdim=True)))


@pytest.mark.parametrize("spec", ["resnet18", "convnext_tiny"])
def test_in_channels_select_keeps_the_chosen_channels(spec):
    result = apply(
        spec,
        {"op": "in_channels", "channels": 2, "strategy": "select", "select": [2, 0]},
        input_shape="1x2x40x56",
        model=source(spec),
    )
    assert edits(result) == [(STEMS[spec], "in_channels", "3", "2 (select)")]
    x2 = x_of(1, 2, 40, 56)
    x3 = torch.stack([x2[:, 1], torch.zeros_like(x2[:, 0]), x2[:, 0]], 1)
    close(forward(result.model, x2), forward(source(spec), x3))


def test_in_channels_random_makes_a_fresh_stem_and_keeps_the_rest():
    spec = "resnet18"
    result = apply(
        spec,
        {"op": "in_channels", "channels": 4, "strategy": "random"},
        input_shape="1x4x40x56",
        model=source(spec),
    )
    assert edits(result) == [("conv1", "in_channels", "3", "4 (random)")]
    weight = result.model.conv1.weight
    assert weight.shape == (64, 4, 7, 7)
    assert weight.std() > 0  # initialised, not zeros or copied sums
    assert not torch.equal(weight[:, :3], source(spec).conv1.weight)
    same_weights(result.model, source(spec), skip=("conv1.weight",))
    check_forward(result, sizes=((37, 53),))


def test_in_channels_at_a_later_conv_that_breaks_the_model_is_refused():
    with pytest.raises(SurgeryError, match="the patched model fails"):
        apply(
            "resnet18",
            {"op": "in_channels", "channels": 1, "at": "layer1.0.conv1"},
            input_shape="1x1x40x56",
        )


def test_in_channels_on_a_grouped_conv_is_refused():
    with pytest.raises(SurgeryError, match="grouped conv"):
        apply(
            "mobilenet_v2",
            {"op": "in_channels", "channels": 1, "at": "features.1.conv.0.0"},
            input_shape="1x1x40x56",
        )


@pytest.mark.parametrize(
    ("op", "match"),
    [
        ({"channels": 2, "strategy": "sum"}, r"\.strategy: 'sum' makes 1 channel"),
        ({"channels": 2, "strategy": "select", "select": [0]}, r"\.select: .* 2 source"),
        ({"channels": 1, "strategy": "select", "select": [3]}, r"index 3 is out of range"),
        ({"channels": 1, "at": "nope"}, r"\.at: 'nope' is not a conv module \(convs: conv1, "),
    ],
)
def test_in_channels_bad_fields_are_refused(op, match):
    with pytest.raises(RecipeError, match=match):
        apply("resnet18", {"op": "in_channels", **op}, input_shape="1x3x40x56")


# -- stride -----------------------------------------------------------------------------------


def test_stride_per_axis_on_a_resnet_stage_gives_different_h_and_w_factors():
    spec = "resnet18"
    result = apply(
        spec,
        {"op": "stride", "at": "layer3", "stride": [2, 1]},
        trunc("layer4"),
        input_shape="1x3x64x96",
        model=source(spec),
    )
    assert edits(result, "stride") == [
        ("layer3.0.conv1", "stride", "2", "2x1"),
        ("layer3.0.downsample.0", "stride", "2", "2x1"),
    ]
    assert result.after.output_shape == (1, 512, 2, 6)
    assert result.after.downsample == (32.0, 16.0)
    rules = result.after.size_rules()
    assert rules[0].format("H") == "H -> ceil(H/32)"
    assert rules[1].format("W") == "W -> ceil(W/16)"
    assert result.model.layer3[0].conv1.stride == (2, 1)
    assert result.model.layer3[0].conv1.padding == (1, 1)
    same_weights(result.model, source(spec), skip=("fc.",))
    check_forward(result)


def test_stride_can_grow_too():
    spec = "resnet18"
    result = apply(
        spec,
        {"op": "stride", "at": "layer2", "stride": 3},
        trunc("layer2"),
        input_shape="1x3x64x96",
        model=source(spec),
    )
    assert result.after.downsample == (12.0, 12.0)
    assert result.after.size_rules()[0].format("H") == "H -> ceil(H/12)"
    assert result.after.output_shape == (1, 128, 6, 8)
    check_forward(result)


def test_stride_one_on_a_resnet50_stage_is_the_seed_change():
    spec = "resnet50"
    result = apply(
        spec,
        {"op": "stride", "at": "layer2", "stride": 1},
        trunc("layer4"),
        input_shape="1x3x64x96",
        model=source(spec),
    )
    assert edits(result, "stride") == [
        ("layer2.0.conv2", "stride", "2", "1"),
        ("layer2.0.downsample.0", "stride", "2", "1"),
    ]
    assert result.after.output_shape == (1, 2048, 4, 6)
    assert result.after.downsample == (16.0, 16.0)
    same_weights(result.model, source(spec), skip=("fc.",))
    check_forward(result, sizes=((37, 53),))


def test_stride_on_vgg_max_pool_window_follows_the_stride():
    spec = "vgg16_bn"
    result = apply(
        spec,
        {"op": "stride", "at": "features.43", "stride": 1},
        trunc("features"),
        input_shape="1x3x64x96",
        model=source(spec),
    )
    # the 2x2/2 pool becomes 1x1/1; its padding (0) is not an edit
    assert edits(result, "stride") == [
        ("features.43", "kernel_size", "2", "1"),
        ("features.43", "stride", "2", "1"),
    ]
    assert result.after.output_shape == (1, 512, 4, 6)
    assert result.after.downsample == (16.0, 16.0)
    x = x_of(1, 3, 64, 96)
    out = forward(result.model, x)
    # the original is the patched output max-pooled 2x2, as the removed pool did
    close(F.max_pool2d(out, 2), stage_output(source(spec), "features", x))
    check_forward(result, sizes=((37, 53),))


def test_stride_on_mobilenet_v2_depthwise_conv():
    spec = "mobilenet_v2"
    result = apply(
        spec,
        {"op": "stride", "at": "features.7", "stride": [1, 2]},
        trunc("features"),
        input_shape="1x3x64x96",
        model=source(spec),
    )
    assert edits(result, "stride") == [("features.7.conv.1.0", "stride", "2", "1x2")]
    assert result.after.downsample == (16.0, 32.0)
    assert result.after.output_shape == (1, 1280, 4, 3)
    check_forward(result)


def test_stride_on_densenet100_functional_pools():
    spec = "densenet100"
    result = apply(
        spec,
        {"op": "stride", "at": "trans1.avg_pool2d()", "stride": [2, 1]},
        {"op": "stride", "at": "max_pool2d()", "stride": 1},
        input_shape="1x1x32x48",
        model=source(spec),
    )
    assert edits(result, "stride") == [
        ("trans1.avg_pool2d()", "kernel_size", "2", "2x1"),
        ("trans1.avg_pool2d()", "stride", "2", "2x1"),
        ("max_pool2d()", "kernel_size", "2", "1"),
        ("max_pool2d()", "stride", "2", "1"),
    ]
    assert result.after.downsample == (8.0, 4.0)
    assert result.after.output_shape == (1, 684, 4, 12)
    # a 1x1/1 pool no longer changes the size: it leaves the chain of reductions
    assert result.after.chain == ("conv1", "trans1.avg_pool2d()", "trans2.avg_pool2d()")
    rules = result.after.size_rules()
    assert rules[0].format("H") == "H -> ceil(H/8)"
    assert rules[1].format("W") == "W -> ceil(W/4)"
    same_weights(result.model, source(spec))
    check_forward(result)


def test_stride_on_densenet121_transition_and_efficientnet_stage():
    result = apply(
        "densenet121",
        {"op": "stride", "at": "features.transition3", "stride": 1},
        trunc("features"),
        input_shape="1x3x64x96",
        model=source("densenet121"),
    )
    assert edits(result, "stride") == [
        ("features.transition3.pool", "kernel_size", "2", "1"),
        ("features.transition3.pool", "stride", "2", "1"),
    ]
    assert result.after.downsample == (16.0, 16.0)
    check_forward(result, sizes=((37, 53),))

    result = apply(
        "efficientnet_b0",
        {"op": "stride", "at": "features.6", "stride": 1},
        trunc("features"),
        input_shape="1x3x64x96",
        model=source("efficientnet_b0"),
    )
    # a 5x5 depthwise conv with padding 2: only its stride changes
    assert edits(result, "stride") == [("features.6.0.block.1.0", "stride", "2", "1")]
    assert result.after.downsample == (16.0, 16.0)
    assert result.after.output_shape == (1, 1280, 4, 6)
    check_forward(result, sizes=((37, 53),))


def test_stride_one_on_a_two_by_two_conv_pads_the_odd_pixel_on_one_side():
    # ConvNeXt's 2x2/2 downsampling conv at stride 1: its even kernel would need half a
    # pixel of padding per side, so it takes torch's padding='same' (the odd pixel on the
    # right and bottom) and keeps every size exactly.
    model = source("convnext_tiny")
    result = apply(
        "convnext_tiny",
        {"op": "stride", "at": "features.2.1", "stride": 1},
        input_shape="1x3x64x96",
        model=model,
    )
    conv = result.model.features[2][1]
    assert conv.stride == (1, 1) and conv.padding == "same"
    seen = []
    conv.register_forward_hook(lambda m, a, out: seen.append((a[0].shape[-2:], out.shape[-2:])))
    model = result.model.eval()
    for h, w in [(64, 96), (61, 95), (33, 47)]:
        assert tuple(model(torch.randn(1, 3, h, w)).shape) == result.after.output_shape
    assert len(seen) == 3 and all(i == o for i, o in seen)


def test_stride_on_one_axis_of_a_two_by_two_conv_is_refused():
    # stride [1, 2]: 'same' padding needs stride 1 on both axes, so a pixel would be lost
    model = source("convnext_tiny")
    before = snapshot(model)
    with pytest.raises(SurgeryError, match=r"features\.2\.1.*kernel 2.*a pixel would be lost"):
        apply(
            "convnext_tiny",
            {"op": "stride", "at": "features.2.1", "stride": [1, 2]},
            input_shape="1x3x64x96",
            model=model,
        )
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    ("op", "error", "match"),
    [
        (
            {"at": "layer9", "stride": 1},
            RecipeError,
            r"\.at: 'layer9' is not a reduction point .*\(valid: layer2, layer3, layer4, "
            r"conv1, maxpool, layer2\.0\.conv1",
        ),
        ({"at": "layer1", "stride": 1}, RecipeError, r"'layer1' is not a reduction point"),
        (
            {"at": "layer2", "stride": 3, "mode": "dilate"},
            RecipeError,
            r"\.stride: mode 'dilate' removes stride",
        ),
    ],
)
def test_stride_bad_fields_are_refused(op, error, match):
    with pytest.raises(error, match=match):
        apply("resnet18", {"op": "stride", **op}, input_shape="1x3x64x96")


# -- stride, mode = "dilate" -------------------------------------------------------------------


def torchvision_resnet50_convs(replace: tuple[bool, bool, bool]) -> dict[str, tuple]:
    """(stride, dilation, padding) of every 3x3 conv and stride of every shortcut of
    torchvision's resnet50(replace_stride_with_dilation=replace), from its _make_layer."""
    want: dict[str, tuple] = {}
    dilation = 1
    for i, blocks in enumerate([3, 4, 6, 3]):
        stride = 1 if i == 0 else 2
        previous = dilation
        if i > 0 and replace[i - 1]:
            dilation *= stride
            stride = 1
        for b in range(blocks):
            d = previous if b == 0 else dilation
            want[f"layer{i + 1}.{b}.conv2"] = ((stride if b == 0 else 1,) * 2, (d, d), (d, d))
        if i > 0:
            want[f"layer{i + 1}.0.downsample.0"] = ((stride, stride), (1, 1), (0, 0))
    return want


def conv_geometry(model: nn.Module, paths) -> dict[str, tuple]:
    out = {}
    for path in paths:
        m = model.get_submodule(path)
        out[path] = (tuple(m.stride), tuple(m.dilation), tuple(m.padding))
    return out


@pytest.fixture(scope="module")
def resnet50_plain() -> ApplyResult:
    return apply("resnet50", trunc("layer4"), input_shape="1x3x64x96", model=source("resnet50"))


def test_dilate_resnet50_layer4_is_torchvision_replace_stride_with_dilation(resnet50_plain):
    spec = "resnet50"
    result = apply(
        spec,
        {"op": "stride", "at": "layer4", "stride": 1, "mode": "dilate"},
        trunc("layer4"),
        input_shape="1x3x64x96",
        model=source(spec),
    )
    want = torchvision_resnet50_convs((False, False, True))
    assert conv_geometry(result.model, want) == want
    assert want["layer4.0.conv2"] == ((1, 1), (1, 1), (1, 1))
    assert want["layer4.1.conv2"] == ((1, 1), (2, 2), (2, 2))
    assert edits(result, "stride") == [
        ("layer4.0.conv2", "stride", "2", "1"),
        ("layer4.0.downsample.0", "stride", "2", "1"),
        ("layer4.1.conv2", "dilation", "1", "2"),
        ("layer4.1.conv2", "padding", "1", "2"),
        ("layer4.2.conv2", "dilation", "1", "2"),
        ("layer4.2.conv2", "padding", "1", "2"),
    ]
    plain = resnet50_plain.after
    assert result.after.downsample == (16.0, 16.0)
    assert result.after.receptive_field == plain.receptive_field  # kept
    assert result.after.output_shape == (1, 2048, 4, 6)
    same_weights(result.model, source(spec), skip=("fc.",))
    # DeepLab's equivalence: the dilated output at even positions is the original's
    x = x_of(1, 3, 61, 93)
    exact(forward64(result.model, x)[..., ::2, ::2], forward64(resnet50_plain.model, x))
    check_forward(result, sizes=((37, 53),))


def test_dilate_resnet50_layer3_then_layer4_doubles_the_dilation(resnet50_plain):
    spec = "resnet50"
    result = apply(
        spec,
        {"op": "stride", "at": "layer3", "stride": 1, "mode": "dilate"},
        {"op": "stride", "at": "layer4", "stride": 1, "mode": "dilate"},
        trunc("layer4"),
        input_shape="1x3x64x96",
        model=source(spec),
    )
    want = torchvision_resnet50_convs((False, True, True))
    assert conv_geometry(result.model, want) == want
    assert want["layer3.1.conv2"][1] == (2, 2)
    assert want["layer4.0.conv2"] == ((1, 1), (2, 2), (2, 2))
    assert want["layer4.1.conv2"][1:] == ((4, 4), (4, 4))
    second = [e for e in edits(result, "stride") if e[0].startswith("layer4.1")]
    assert ("layer4.1.conv2", "dilation", "2", "4") in second
    assert result.after.downsample == (8.0, 8.0)
    assert result.after.receptive_field == resnet50_plain.after.receptive_field
    x = x_of(1, 3, 61, 93)
    exact(forward64(result.model, x)[..., ::4, ::4], forward64(resnet50_plain.model, x))


def test_dilate_a_basic_block_resnet_keeps_the_receptive_field():
    # torchvision refuses dilation in BasicBlock; here the strided conv1 loses its
    # stride and the 3x3 conv2 after it in the same block is dilated.
    spec = "resnet18"
    plain = apply(spec, trunc("layer4"), input_shape="1x3x64x96", model=source(spec))
    result = apply(
        spec,
        {"op": "stride", "at": "layer4", "stride": 1, "mode": "dilate"},
        trunc("layer4"),
        input_shape="1x3x64x96",
        model=source(spec),
    )
    geometry = conv_geometry(
        result.model, ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    )
    assert geometry == {
        "layer4.0.conv1": ((1, 1), (1, 1), (1, 1)),
        "layer4.0.conv2": ((1, 1), (2, 2), (2, 2)),
        "layer4.1.conv1": ((1, 1), (2, 2), (2, 2)),
        "layer4.1.conv2": ((1, 1), (2, 2), (2, 2)),
    }
    assert result.after.receptive_field == plain.after.receptive_field
    assert result.after.downsample == (16.0, 16.0)
    x = x_of(1, 3, 61, 93)
    exact(forward64(result.model, x)[..., ::2, ::2], forward64(plain.model, x))


def test_dilate_mobilenet_v2_keeps_the_receptive_field():
    spec = "mobilenet_v2"
    plain = apply(spec, trunc("features"), input_shape="1x3x64x96", model=source(spec))
    result = apply(
        spec,
        {"op": "stride", "at": "features.14", "stride": 1, "mode": "dilate"},
        trunc("features"),
        input_shape="1x3x64x96",
        model=source(spec),
    )
    dilated = sorted({e[0] for e in edits(result, "stride") if e[1] == "dilation"})
    assert dilated == ["features.15.conv.1.0", "features.16.conv.1.0", "features.17.conv.1.0"]
    assert result.after.receptive_field == plain.after.receptive_field
    assert result.after.downsample == (16.0, 16.0)
    same_weights(result.model, source(spec), skip=("classifier.",))
    x = x_of(1, 3, 61, 93)
    exact(forward64(result.model, x)[..., ::2, ::2], forward64(plain.model, x))
    check_forward(result, sizes=((37, 53),))


def test_dilate_twice_multiplies_the_dilation():
    # features.7 then features.14 of MobileNetV2: the convs after the second removal
    # are dilated by both factors
    spec = "mobilenet_v2"
    plain = apply(spec, trunc("features"), input_shape="1x3x64x96", model=source(spec))
    result = apply(
        spec,
        {"op": "stride", "at": "features.7", "stride": 1, "mode": "dilate"},
        {"op": "stride", "at": "features.14", "stride": 1, "mode": "dilate"},
        trunc("features"),
        input_shape="1x3x64x96",
        model=source(spec),
    )
    geometry = conv_geometry(
        result.model,
        [
            "features.7.conv.1.0",
            "features.8.conv.1.0",
            "features.14.conv.1.0",
            "features.15.conv.1.0",
        ],
    )
    assert geometry == {
        "features.7.conv.1.0": ((1, 1), (1, 1), (1, 1)),
        "features.8.conv.1.0": ((1, 1), (2, 2), (2, 2)),
        "features.14.conv.1.0": ((1, 1), (2, 2), (2, 2)),
        "features.15.conv.1.0": ((1, 1), (4, 4), (4, 4)),
    }
    assert result.after.receptive_field == plain.after.receptive_field
    assert result.after.downsample == (8.0, 8.0)
    x = x_of(1, 3, 61, 93)
    exact(forward64(result.model, x)[..., ::4, ::4], forward64(plain.model, x))


def test_dilate_a_stage_of_several_reductions_in_one_op():
    # the stage "features" holds MobileNetV2's five strided convs one after another; one
    # op removes them all, and each conv is dilated by the strides removed before it
    spec = "mobilenet_v2"
    plain = apply(spec, trunc("features.7"), input_shape="1x3x40x56", model=source(spec))
    result = apply(
        spec,
        {"op": "stride", "at": "features", "stride": 1, "mode": "dilate"},
        trunc("features.7"),
        input_shape="1x3x40x56",
        model=source(spec),
    )
    paths = [
        "features.0.0",
        "features.1.conv.0.0",
        "features.2.conv.1.0",
        "features.3.conv.1.0",
        "features.4.conv.1.0",
        "features.5.conv.1.0",
        "features.7.conv.1.0",
    ]
    assert conv_geometry(result.model, paths) == {
        "features.0.0": ((1, 1), (1, 1), (1, 1)),
        "features.1.conv.0.0": ((1, 1), (2, 2), (2, 2)),
        "features.2.conv.1.0": ((1, 1), (2, 2), (2, 2)),
        "features.3.conv.1.0": ((1, 1), (4, 4), (4, 4)),
        "features.4.conv.1.0": ((1, 1), (4, 4), (4, 4)),
        "features.5.conv.1.0": ((1, 1), (8, 8), (8, 8)),
        "features.7.conv.1.0": ((1, 1), (8, 8), (8, 8)),
    }
    assert plain.after.downsample == (16.0, 16.0)
    assert result.after.downsample == (1.0, 1.0)
    assert result.after.receptive_field == plain.after.receptive_field
    x = x_of(1, 3, 37, 53)
    exact(forward64(result.model, x)[..., ::16, ::16], forward64(plain.model, x))


def test_dilate_on_densenet100_last_transition():
    spec = "densenet100"
    result = apply(
        spec,
        {"op": "stride", "at": "trans2", "stride": 1, "mode": "dilate"},
        input_shape="1x1x32x48",
        model=source(spec),
    )
    changed = edits(result, "stride")
    assert changed[:2] == [
        ("trans2.avg_pool2d()", "kernel_size", "2", "1"),
        ("trans2.avg_pool2d()", "stride", "2", "1"),
    ]
    dilated = [e[0] for e in changed if e[1] == "dilation"]
    assert dilated == [f"dense3.{i}.conv2" for i in range(16)]
    assert all(m.dilation == (2, 2) for m in result.model.dense3.modules() if _is_3x3(m))
    assert result.after.downsample == (8.0, 8.0)
    assert result.after.output_shape == (1, 684, 4, 6)
    check_forward(result)


def _is_3x3(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)


def test_dilate_on_densenet100_first_transition_is_refused():
    # dilating everything after trans1 would have to dilate trans2's 2x2 average pool
    model = source("densenet100")
    before = snapshot(model)
    with pytest.raises(
        SurgeryError, match=r"ops\[0\] \(stride\): mode 'dilate' .*trans2\.avg_pool2d\(\)"
    ):
        apply(
            "densenet100",
            {"op": "stride", "at": "trans1", "stride": 1, "mode": "dilate"},
            input_shape="1x1x64x96",
            model=model,
        )
    assert_same_snapshot(before, snapshot(model))


def test_dilate_before_a_max_pool_is_refused():
    # dilating resnet18's 3x3/2 max pool by 2 would need padding 2, but torch pools take
    # at most half their kernel (1) as padding: the patched model could not run
    model = source("resnet18")
    before = snapshot(model)
    with pytest.raises(
        SurgeryError,
        match=r"ops\[0\] \(stride\): cannot dilate maxpool exactly: it would need 2 pixels of "
        r"padding per side on H, but a max-pool with kernel 3 takes at most 1",
    ):
        apply(
            "resnet18",
            {"op": "stride", "at": "conv1", "stride": 1, "mode": "dilate"},
            input_shape="1x3x32x32",
            model=model,
        )
    assert_same_snapshot(before, snapshot(model))


def test_the_meta_trace_refuses_a_pool_padding_torch_refuses():
    # the tracer's shape shortcut must fail where torch fails, not predict a shape
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(3, 1, padding=2, dilation=2))

    with pytest.raises(RuntimeError, match="pad should be"):
        build()(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ModelError, match="pad should be"):
        trace(build, (1, 1, 16, 16))


def test_dilate_on_densenet121_stem_pool_is_refused():
    with pytest.raises(SurgeryError, match=r"features\.transition1\.pool, an avg-pool"):
        apply(
            "densenet121",
            {"op": "stride", "at": "features.pool0", "stride": 1, "mode": "dilate"},
            input_shape="1x3x64x96",
        )


# -- truncate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "after", "shape", "removed", "down"),
    [
        ("resnet18", "layer3", (1, 256, 4, 6), ["layer4", "avgpool", "fc"], 16.0),
        ("resnet18", "layer3.0", (1, 256, 4, 6), ["layer3.1", "layer4", "avgpool", "fc"], 16.0),
        ("vgg16_bn", "features", (1, 512, 2, 3), ["avgpool", "classifier"], 32.0),
        ("mobilenet_v2", "features", (1, 1280, 2, 3), ["classifier"], 32.0),
        ("densenet100", "dense2", (1, 600, 8, 12), ["trans2", "dense3"], 8.0),
        (
            "densenet100",
            "max_pool2d()",
            (1, 48, 16, 24),
            ["dense1", "trans1", "dense2", "trans2", "dense3"],
            4.0,
        ),
    ],
)
def test_truncate_returns_a_stage_output(spec, after, shape, removed, down):
    c = 1 if spec == "densenet100" else 3
    result = apply(spec, trunc(after), input_shape=f"1x{c}x64x96", model=source(spec))
    assert result.after.output_shape == shape
    assert result.after.downsample == (down, down)
    assert [e[0] for e in edits(result) if e[1] == "(removed)"] == removed
    stage = result.before.stage(after)
    assert stage is not None and stage.out_shape == shape
    assert result.after.receptive_field == stage.receptive_field
    assert not any(p.startswith(tuple(removed)) for p, _ in result.model.named_modules() if p)
    same_weights(result.model, source(spec), skip=tuple(p + "." for p in removed))
    x = x_of(1, c, 64, 96)
    if not after.endswith(")"):
        close(forward(result.model, x), stage_output(source(spec), after, x))
    check_forward(result)


def test_truncate_after_a_functional_stage_of_the_head():
    spec = "resnet18"
    result = apply(spec, trunc("flatten()"), input_shape="1x3x64x96", model=source(spec))
    assert result.after.output_shape == (1, 512)
    assert edits(result) == [("fc", "(removed)", "Linear", "-")]
    x = x_of(2, 3, 64, 96)
    pooled = stage_output(source(spec), "avgpool", x)
    close(forward(result.model, x), pooled.flatten(1))


def test_truncate_at_an_unknown_stage_lists_the_stages():
    with pytest.raises(RecipeError, match=r"\.after: 'layer9' is not a stage.*conv1, bn1, "):
        apply("resnet18", trunc("layer9"), input_shape="1x3x64x96")


# -- project ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ops", "cin", "activation", "act_cls"),
    [
        ("resnet18", [trunc("layer4")], 512, "relu", nn.ReLU),
        ("mobilenet_v2", [trunc("features")], 1280, "gelu", nn.GELU),
        ("densenet100", [], 684, "silu", nn.SiLU),
        ("efficientnet_b0", [trunc("features")], 1280, "none", None),
    ],
)
def test_project_appends_conv_bn_activation(spec, ops, cin, activation, act_cls):
    c = 1 if spec == "densenet100" else 3
    shape = f"1x{c}x48x64"
    result = apply(
        spec,
        *ops,
        {"op": "project", "channels": 96, "activation": activation},
        input_shape=shape,
        model=source(spec),
    )
    if ops:  # the same without the projection
        plain = apply(spec, *ops, input_shape=shape, model=source(spec))
        plain_trace, body = plain.after, plain.model
    else:
        plain_trace, body = result.before, source(spec)
    appended = [e[0] for e in edits(result, "project")]
    assert appended == ["proj", "proj_bn"] + (["proj_act"] if act_cls else [])
    proj = result.model.proj
    assert isinstance(proj, nn.Conv2d)
    assert (proj.in_channels, proj.out_channels, proj.kernel_size, proj.bias) == (
        cin,
        96,
        (1, 1),
        None,
    )
    assert isinstance(result.model.proj_bn, nn.BatchNorm2d)
    assert result.model.proj_bn.num_features == 96
    if act_cls:
        assert isinstance(result.model.proj_act, act_cls)
    n, _, h, w = plain_trace.output_shape
    assert result.after.output_shape == (n, 96, h, w)
    assert result.after.downsample == plain_trace.downsample
    assert result.after.receptive_field == plain_trace.receptive_field
    assert result.after.params == plain_trace.params + cin * 96 + 2 * 96
    x = x_of(1, c, 48, 64)
    patched = result.model.eval()
    with torch.no_grad():
        want = patched.proj_bn(patched.proj(forward(body, x)))
        if act_cls:
            want = patched.proj_act(want)
    close(forward(patched, x), want)
    check_forward(result, sizes=((37, 53),))


def test_project_on_a_classifier_output_is_refused():
    with pytest.raises(SurgeryError, match=r"ops\[0\] \(project\): .*add a truncate op"):
        apply("resnet50", {"op": "project", "channels": 684}, input_shape="1x3x64x96")


# -- pool -------------------------------------------------------------------------------------


def test_pool_on_densenet100_halves_with_ceil():
    spec = "densenet100"
    result = apply(spec, {"op": "pool", "stride": 2}, input_shape="1x1x40x52", model=source(spec))
    assert edits(result) == [
        (
            "pool",
            "(appended)",
            "-",
            "nn.AvgPool2d(kernel_size=(2, 2), stride=(2, 2), ceil_mode=True)",
        )
    ]
    assert result.after.output_shape == (1, 684, 2, 2)  # ceil(ceil(40/16)/2) x ceil(ceil(52/16)/2)
    assert result.after.downsample == (32.0, 32.0)
    assert result.after.size_rules()[0].format("H") == "H -> ceil(H/32)"
    x = x_of(1, 1, 40, 52)
    close(forward(result.model, x), F.avg_pool2d(forward(source(spec), x), 2, ceil_mode=True))
    check_forward(result)


def test_pool_max_per_axis_on_resnet18():
    spec = "resnet18"
    result = apply(
        spec,
        trunc("layer4"),
        {"op": "pool", "kind": "max", "stride": [1, 2]},
        input_shape="1x3x64x96",
        model=source(spec),
    )
    assert result.after.output_shape == (1, 512, 2, 2)
    assert result.after.downsample == (32.0, 64.0)
    assert isinstance(result.model.pool, nn.MaxPool2d)
    x = x_of(1, 3, 64, 96)
    close(
        forward(result.model, x),
        F.max_pool2d(stage_output(source(spec), "layer4", x), (1, 2), ceil_mode=True),
    )
    check_forward(result)


def test_pool_with_a_window_and_floor_rounding_on_vgg():
    spec = "vgg16_bn"
    result = apply(
        spec,
        trunc("features"),
        {"op": "pool", "stride": 2, "kernel": 3, "ceil_mode": False},
        input_shape="1x3x128x160",
        model=source(spec),
    )
    assert result.after.output_shape == (1, 512, 1, 2)  # floor((4 - 3) / 2) + 1 x (5 - 3) / 2 + 1
    rf = next(s for s in result.before.stages if s.path == "features").receptive_field
    assert result.after.receptive_field == (rf[0] + 2 * 32, rf[1] + 2 * 32)
    x = x_of(1, 3, 128, 160)
    close(forward(result.model, x), F.avg_pool2d(stage_output(source(spec), "features", x), 3, 2))
    check_forward(result, sizes=((96, 161), (129, 97)))


def test_pool_on_a_classifier_output_is_refused():
    with pytest.raises(SurgeryError, match=r"ops\[0\] \(pool\): pool needs a spatial output"):
        apply("mobilenet_v2", {"op": "pool", "stride": 2}, input_shape="1x3x64x96")


# -- dropout ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "block", "count"),
    [
        ("resnet18", "BasicBlock", 8),
        ("densenet100", "DenseTransition", 2),
        ("mobilenet_v2", "InvertedResidual", 17),
    ],
)
def test_dropout_after_every_block_of_a_class(spec, block, count):
    c = 1 if spec == "densenet100" else 3
    result = apply(
        spec,
        {"op": "dropout", "block": block, "p": 0.3},
        input_shape=f"1x{c}x48x64",
        model=source(spec),
    )
    added = [e[0] for e in edits(result, "dropout")]
    assert len(added) == count
    # named "dropout", or "dropout_1" in a block that has a child of that name already
    assert all(p.endswith(".dropout" if spec != "densenet100" else ".dropout_1") for p in added)
    for path in added:
        m = result.model.get_submodule(path)
        assert isinstance(m, nn.Dropout) and m.p == 0.3
    assert result.after.output_shape == result.before.output_shape
    same_weights(result.model, source(spec))
    x = x_of(2, c, 48, 64)
    close(forward(result.model, x), forward(source(spec), x))  # eval: dropout is identity
    trained = result.model.train()
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            a = trained(x)
            torch.manual_seed(1)
            b = trained(x)
    finally:
        result.model.eval()
    assert not torch.allclose(a, b)


def test_dropout_block_class_that_does_not_exist_lists_the_classes():
    model = source("resnet18")
    before = snapshot(model)
    with pytest.raises(RecipeError, match=r"\.block: no module of class 'Nope' \(classes: "):
        apply(
            "resnet18",
            {"op": "in_channels", "channels": 1},
            {"op": "dropout", "block": "Nope"},
            input_shape="1x1x48x64",
            model=model,
        )
    assert_same_snapshot(before, snapshot(model))


# -- the caller's model -----------------------------------------------------------------------


def test_apply_never_changes_the_callers_model():
    spec = "resnet50"
    model = real_model(spec, seed=3)
    before = snapshot(model)
    result = apply(
        spec,
        {"op": "in_channels", "channels": 1},
        {"op": "stride", "at": "layer3", "stride": 1, "mode": "dilate"},
        {"op": "stride", "at": "layer2", "stride": [1, 2]},
        trunc("layer4"),
        {"op": "dropout", "block": "Bottleneck"},
        {"op": "project", "channels": 64},
        {"op": "pool", "stride": 2},
        input_shape="1x1x48x64",
        model=model,
    )
    assert_same_snapshot(before, snapshot(model))
    assert result.model is not model
    assert not any(p is q for p in result.model.parameters() for q in model.parameters())
    # and it still computes what it did
    x = x_of(1, 3, 48, 64)
    out = forward(model, x)
    assert out.shape == (1, 10)
    check_forward(result, sizes=((37, 53),))


@pytest.mark.parametrize(
    ("spec", "c", "ops", "error"),
    [
        (
            "resnet18",
            1,
            [
                {"op": "in_channels", "channels": 1},
                {"op": "stride", "at": "layer2", "stride": 1},
                {"op": "project", "channels": 8},
            ],
            SurgeryError,
        ),
        (
            "densenet100",
            1,
            [
                {"op": "dropout", "block": "DenseBottleneck"},
                {"op": "stride", "at": "trans1", "stride": 1, "mode": "dilate"},
            ],
            SurgeryError,
        ),
        (
            "convnext_tiny",
            3,
            [trunc("features"), {"op": "stride", "at": "features.4", "stride": [1, 2]}],
            SurgeryError,
        ),
    ],
)
def test_a_failing_recipe_leaves_nothing_half_applied(spec, c, ops, error):
    model = source(spec)
    before = snapshot(model)
    with pytest.raises(error):
        apply(spec, *ops, input_shape=f"1x{c}x48x64", model=model)
    assert_same_snapshot(before, snapshot(model))
    # the same model then takes the valid prefix exactly as a fresh one does
    good = apply(spec, *ops[:-1], input_shape=f"1x{c}x48x64", model=model)
    fresh = apply(spec, *ops[:-1], input_shape=f"1x{c}x48x64", model=real_model(spec, len(spec)))
    x = x_of(1, good.after.input_shape[1], 48, 64)
    close(forward(good.model, x), forward(fresh.model, x))
    assert edits(good) == edits(fresh)
