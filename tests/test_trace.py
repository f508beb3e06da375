"""The meta-device tracer (bbswap.tracing.tracer), the inspection API and the size arithmetic.

Reference figures come from three independent counters, each with its own rules:

- ``torch.utils.flop_counter.FlopCounterMode``: FLOPs of aten ops; convolutions and
  matrix products count 2 per multiply-accumulate, everything else (batch norm,
  activations, pooling, additions) counts 0. Its total // 2 is what bbswap calls MACs.
- ``thop.profile``: module hooks; Conv/Linear count one per multiply-accumulate (no
  bias), but BatchNorm counts 2 or 4 per element, AvgPool/AdaptiveAvgPool one per
  pooled input plus one per output, ReLU/MaxPool/Dropout 0. Functional pools and
  convs are invisible to it (functional linear/matmul outside modules is counted).
  Zeroing its BatchNorm and average-pool rules with ``custom_ops`` leaves exactly
  the conv + linear MACs.
- ``torchinfo.summary``: ``total_params`` is the parameter count; its mult-adds
  count, per Conv layer, (weight + bias elements) x N x H_out x W_out and, per other
  layer, (weight + bias elements) x N -- so it includes biases and BatchNorm affine
  parameters, and it undercounts a Linear applied to a 4-D tensor (ConvNeXt). Only a
  conv layer's weight part is comparable with bbswap's figure.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import thop
import torch
import torch.nn.functional as F
import torchinfo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thop.vision.basic_hooks import zero_ops
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bbswap.cli.json_out import report_dict
from bbswap.errors import ModelError
from bbswap.tracing.inspection import inspect_backbone
from bbswap.tracing.sizes import SizeStep, chain_size, min_size, size_rule, total_stride
from bbswap.tracing.tracer import Trace, build_on_meta, trace, trace_module
from bbswap.zoo import ZOO

TESTS = Path(__file__).parent
BAD = TESTS / "fixtures" / "bad_models.py"
REFERENCE = json.loads((TESTS / "fixtures" / "reference_backbones.json").read_text())
REF_NAME = {name: ("densenet100_hmer" if name == "densenet100" else name) for name in ZOO}

HYPOTHESIS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers


def builder(name: str) -> Callable[..., nn.Module]:
    module, func = ZOO[name].builder.split(":")
    return getattr(importlib.import_module(f"bbswap.zoo.{module}"), func)


def chans(name: str) -> int:
    return ZOO[name].in_chans


@functools.cache
def meta_model(name: str) -> nn.Module:
    """A zoo model on the meta device, built once per session (tracing leaves it as is)."""
    return build_on_meta(builder(name))


def cpu_model(name: str) -> nn.Module:
    """A zoo model on CPU with zeroed weights (cheap: skips the weight initialisation)."""
    model = build_on_meta(builder(name)).to_empty(device="cpu")
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            t.zero_()
    return model.eval()


shared_cpu_model = functools.cache(cpu_model)  # for tests that only run forwards


@functools.cache
def zoo_trace(name: str, h: int = 67, w: int = 93, depth: int = 1) -> Trace:
    return trace_module(meta_model(name), (1, chans(name), h, w), depth)


def real_shapes(model: nn.Module, x: torch.Tensor, paths: list[str]) -> dict[str, tuple]:
    """Output shapes of the named submodules and of the model in a real forward."""
    shapes: dict[str, tuple] = {}
    modules = dict(model.named_modules())

    def hook(path: str) -> Callable:
        def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            shapes.setdefault(path, tuple(out.shape))

        return record

    handles = [modules[p].register_forward_hook(hook(p)) for p in paths]
    try:
        with torch.no_grad():
            shapes[""] = tuple(model(x).shape)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks
        and not m._forward_pre_hooks
        and not m._forward_hooks_with_kwargs
        and not m._backward_hooks
        for m in model.modules()
    )


def load_bad(name: str) -> type[nn.Module]:
    from bbswap.backbones.registry import resolve

    return resolve(f"{BAD}:{name}").factory


# ------------------------------------------------------------------ densenet100, resnet50


@pytest.fixture(scope="module")
def densenet100_report():
    return inspect_backbone("densenet100", "1x1x128x316")


def test_densenet100_figures(densenet100_report):
    t = densenet100_report.trace
    assert t.device == "meta" and t.note == ""
    assert t.input_shape == (1, 1, 128, 316)
    assert t.output_shape == (1, 684, 8, 20)
    assert t.downsample == (16, 16)
    assert t.params == 2_979_288
    assert abs(t.macs - 2_871_601_152) <= 0.01 * 2_871_601_152
    assert densenet100_report.features is None  # the output itself is spatial
    h, w = densenet100_report.rules
    assert (h.format("H"), w.format("W")) == ("H -> ceil(H/16)", "W -> ceil(W/16)")
    assert [s.path for s in t.stages] == [
        "conv1",
        "max_pool2d()",
        "dense1",
        "trans1",
        "dense2",
        "trans2",
        "dense3",
    ]
    assert sum(s.macs for s in t.stages) == t.macs
    assert sum(s.params for s in t.stages) == t.params


def test_densenet100_reduction_points(densenet100_report):
    t = densenet100_report.trace
    got = [
        (op.id, op.kind, op.op, op.kernel, op.stride, op.padding, op.ceil_mode, op.in_hw, op.out_hw)
        for op in t.reductions
    ]
    conv, pool = ("module", "conv"), ("functional", "max-pool")
    avg = ("functional", "avg-pool")
    k2s2 = ((2, 2), (2, 2), (0, 0), True)
    assert got == [
        ("conv1", *conv, (7, 7), (2, 2), (3, 3), False, (128, 316), (64, 158)),
        ("max_pool2d()", *pool, *k2s2, (64, 158), (32, 79)),
        ("trans1.avg_pool2d()", *avg, *k2s2, (32, 79), (16, 40)),
        ("trans2.avg_pool2d()", *avg, *k2s2, (16, 40), (8, 20)),
    ]
    assert t.op("max_pool2d()").owner == ""
    assert t.op("trans1.avg_pool2d()").owner == "trans1"
    assert t.op("trans1.avg_pool2d()").func == "avg_pool2d"
    assert t.chain == tuple(op.id for op in t.reductions)


def test_resnet50_reduction_points():
    report = inspect_backbone("resnet50", "1x1x128x316")
    t = report.trace
    ids = [op.id for op in t.reductions]
    assert ids == [
        "conv1",
        "maxpool",
        "layer2.0.conv2",
        "layer2.0.downsample.0",
        "layer3.0.conv2",
        "layer3.0.downsample.0",
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "avgpool",
    ]
    assert all(t.op(i).kind == "module" for i in ids)
    assert t.op("maxpool").op == "max-pool"
    assert (t.op("maxpool").kernel, t.op("maxpool").stride) == ((3, 3), (2, 2))
    assert t.op("avgpool").op == "adaptive-avg-pool"  # the head pool
    assert t.output_shape == (1, 1000)
    # the size rule is that of the features, the last stage before the head
    assert report.features is not None and report.features.path == "layer4"
    assert report.features.out_shape == (1, 2048, 4, 10)
    assert report.features.downsample == (32, 32)
    assert "avgpool" not in report.features.chain
    assert report.features.chain[:2] == ("conv1", "maxpool")
    assert report.rules[0].format("H") == "H -> ceil(H/32)"
    assert t.params == 25_550_760  # conv1 built for 1 input channel


# ------------------------------------------------------------------------ every zoo model


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_macs_params_and_shapes(name):
    shape = (1, chans(name), 67, 93)
    t = zoo_trace(name)
    model = meta_model(name)
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.empty(shape, device="meta"))
    reference = counter.get_total_flops() // 2
    assert abs(t.macs - reference) <= 0.01 * reference, (t.macs, reference)
    assert t.params == sum(p.numel() for p in model.parameters())
    # independent of the formula above: torchvision's own count, recorded in the fixture
    assert t.params == REFERENCE["models"][REF_NAME[name]]["params"]
    # the meta trace agrees with a real CPU forward, at the output and at every stage
    stages = [s.path for s in t.stages if not s.functional]
    real = real_shapes(cpu_model(name), torch.zeros(shape), stages)
    assert t.output_shape == real[""]
    assert {s.path: s.out_shape for s in t.stages if not s.functional} == {
        p: real[p] for p in stages
    }


def test_efficientnet_b0_squeeze_excitation_does_not_hide_the_features():
    """A squeeze-excitation gate (1x1, broadcast over H, W) must not take over the
    stride, receptive field or size chain of the tensor it scales."""
    t = zoo_trace("efficientnet_b0", 224, 224)
    assert t.features is not None and t.features.path == "features"
    assert t.features.out_shape == (1, 1280, 7, 7)
    assert t.features.downsample == (32, 32)
    assert t.size_rules(t.features.chain)[0].format("H") == "H -> ceil(H/32)"
    assert t.features.receptive_field[0] < 2000


# --------------------------------------------------------------------- thop and torchinfo


def test_conv_linear_macs_equal_thop_resnet18():
    """thop counts conv/linear MACs the same way (no bias); its BatchNorm and average
    pool rules are zeroed, since bbswap (like torch's flop counter) counts neither."""
    shape = (1, 3, 64, 64)
    t = trace_module(meta_model("resnet18"), shape)
    zero = {nn.BatchNorm2d: zero_ops, nn.AdaptiveAvgPool2d: zero_ops}
    macs, params = thop.profile(
        cpu_model("resnet18"), inputs=(torch.zeros(shape),), custom_ops=zero, verbose=False
    )
    assert int(macs) == t.macs == 148_557_824
    assert int(params) == t.params
    # with its own rules thop also counts BatchNorm and the head pool: more, not less
    macs_all, _ = thop.profile(cpu_model("resnet18"), inputs=(torch.zeros(shape),), verbose=False)
    assert macs_all > t.macs


@pytest.mark.parametrize("name", ["vgg16_bn", "densenet100", "mobilenet_v2"])
def test_conv_linear_macs_equal_thop(name):
    """vgg16_bn has conv biases (neither counts them), densenet100 functional pools
    (invisible to thop, 0 MACs for bbswap), mobilenet_v2 grouped convs."""
    shape = (1, chans(name), 64, 64)
    t = trace_module(meta_model(name), shape)
    zero = {nn.BatchNorm2d: zero_ops, nn.AdaptiveAvgPool2d: zero_ops, nn.AvgPool2d: zero_ops}
    macs, params = thop.profile(
        cpu_model(name), inputs=(torch.zeros(shape),), custom_ops=zero, verbose=False
    )
    assert int(macs) == t.macs
    assert int(params) == t.params


@pytest.mark.parametrize("name", ["resnet18", "densenet100", "convnext_tiny"])
def test_params_equal_torchinfo(name):
    shape = (1, chans(name), 64, 64)
    t = trace_module(meta_model(name), shape)
    summary = torchinfo.summary(cpu_model(name), input_size=shape, verbose=0, device="cpu")
    assert summary.total_params == t.params


def test_conv_macs_equal_torchinfo_resnet18():
    """torchinfo's per-layer mult-adds of a bias-free conv are its weight elements times
    N x H_out x W_out; for the Linear head they include the bias."""
    shape = (1, 3, 64, 64)
    t = trace_module(meta_model("resnet18"), shape)
    model = cpu_model("resnet18")
    summary = torchinfo.summary(model, input_size=shape, verbose=0, device="cpu")
    convs = [layer for layer in summary.summary_list if layer.class_name == "Conv2d"]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert all(layer.module.bias is None for layer in convs)
    stage_macs = {s.path: s.macs for s in t.stages}
    assert sum(layer.macs for layer in convs) == t.macs - stage_macs["fc"]
    (fc,) = [layer for layer in summary.summary_list if layer.class_name == "Linear"]
    assert fc.macs - model.fc.bias.numel() == stage_macs["fc"] == 512 * 1000


# ----------------------------------------------------------------- size rule vs re-trace

SIZE_MODELS = ["resnet18", "densenet100", "vgg16_bn", "convnext_tiny", "mobilenet_v2"]


def _feature_hw(t: Trace, features_path: str | None) -> tuple[int, int]:
    if features_path is None:
        return t.output_shape[-2], t.output_shape[-1]
    (stage,) = [s for s in t.stages if s.path == features_path]
    return stage.out_shape[-2], stage.out_shape[-1]


@pytest.mark.parametrize("name", [*SIZE_MODELS, "efficientnet_b0"])
@HYPOTHESIS
@given(h=st.integers(32, 300), w=st.integers(32, 300))
def test_size_rule_predicts_a_new_trace(name, h, w):
    base = zoo_trace(name, 128, 160)
    features = base.features
    chain = features.chain if features else None
    predicted = base.output_size(h, w, chain)
    again = trace_module(meta_model(name), (1, chans(name), h, w))
    assert _feature_hw(again, features.path if features else None) == predicted


@pytest.mark.parametrize("name", SIZE_MODELS)
@settings(max_examples=3, deadline=None)
@given(h=st.integers(32, 80), w=st.integers(32, 80))
def test_size_rule_predicts_a_real_forward(name, h, w):
    base = zoo_trace(name, 128, 160)
    features = base.features
    predicted = base.output_size(h, w, features.chain if features else None)
    paths = [features.path] if features else []
    real = real_shapes(shared_cpu_model(name), torch.zeros(1, chans(name), h, w), paths)
    out = real[features.path] if features else real[""]
    assert out[-2:] == predicted


# ------------------------------------------------------------- the model is left as found


def test_trace_restores_training_flags_and_removes_hooks():
    model = load_bad("MixedTraining")()
    model.train()
    model.stem.bn.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    params = {name: p for name, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = trace_module(model, (1, 3, 32, 32), device="fake")
    assert t.output_shape == (1, 4, 16, 16)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert no_hooks(model)
    assert dict(model.named_parameters()) == params  # the same objects
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch._C._len_torch_function_stack() == 0


def test_trace_restores_the_model_after_a_forward_that_raises():
    model = build_on_meta(load_bad("ForwardRaises"))
    model.train()
    model.stem.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    with pytest.raises(Exception, match="exploding stage reached"):
        trace_module(model, (1, 3, 32, 32))
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert no_hooks(model)
    assert torch._C._len_torch_function_stack() == 0


def test_failed_trace_reports_the_stage_and_leaves_every_build_clean():
    built: list[nn.Module] = []

    def build() -> nn.Module:
        model = load_bad("ForwardRaises")()
        built.append(model)
        return model

    with pytest.raises(ModelError, match=r"ValueError in stage 'body' at input 1x3x32x32"):
        trace(build, (1, 3, 32, 32))
    assert len(built) == 2  # on meta, then again on CPU
    for model in built:
        assert no_hooks(model)
        assert all(m.training for m in model.modules())  # a new module trains


# ------------------------------------------------------------------------- CPU fallback


def test_fallback_to_cpu_when_the_forward_needs_data():
    t, model = trace(load_bad("NeedsItem"), (1, 3, 32, 32))
    assert t.device == "cpu"
    assert "meta device" in t.note and "item()" in t.note
    assert t.output_shape == (1, 16, 8, 8)
    assert t.downsample == (4, 4)
    assert [op.id for op in t.reductions] == ["stem.conv", "head"]
    assert not any(p.is_meta for p in model.parameters())
    assert no_hooks(model)


def test_a_constructor_computing_with_tensors_still_builds_on_meta():
    # .item() on a tensor it makes (a drop-path schedule; RegNet's widths): the weights
    # alone go to meta, as they are registered
    t, _ = trace(load_bad("ConstructorNeedsItem"), (1, 3, 32, 32))
    assert t.device == "meta" and not t.note
    assert t.output_shape == (1, 8, 16, 16)


def test_fallback_to_cpu_when_the_constructor_needs_data():
    t, _ = trace(load_bad("ConstructorReadsWeights"), (1, 3, 32, 32))
    assert t.device == "cpu"
    assert "meta device" in t.note
    assert t.output_shape == (1, 8, 16, 16)


def test_fallback_through_inspect_backbone():
    report = inspect_backbone(f"{BAD}:NeedsItem", "1x3x32x32", sizes=[(45, 61)])
    assert report.trace.device == "cpu" and report.trace.note
    (check,) = report.sizes
    assert check.ok and check.traced_hw == (12, 16)


# ---------------------------------------------------------------------- Python API


def _figures(report) -> dict:
    d = report_dict(report)
    for key in ("backbone", "device", "activation_bytes"):
        d.pop(key)
    for stage in d["stages"]:
        stage.pop("activation_bytes")
    return d


@pytest.fixture(scope="module")
def densenet100_instance_report():
    torch.manual_seed(0)
    model = builder("densenet100")()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = inspect_backbone(model, "1x1x128x316", sizes=[(33, 97)])
    return model, before, report


def test_inspect_instance_with_real_weights_matches_the_spec(densenet100_instance_report):
    model, before, report = densenet100_instance_report
    spec = inspect_backbone("densenet100", "1x1x128x316", sizes=[(33, 97)])
    assert report.trace.device == "fake"
    assert report.backbone == "DenseNet100"
    assert _figures(report) == _figures(spec)
    assert report.sizes[0].ok and report.sizes[0].traced_hw == (3, 7)
    # the weights are neither moved nor changed, and nothing is left on the model
    after = model.state_dict()
    assert all(not v.is_meta and torch.equal(before[k], after[k]) for k, v in after.items())
    assert no_hooks(model)
    assert all(m.training for m in model.modules())


def test_inspect_instance_activation_bytes_match_the_spec(densenet100_instance_report):
    """Dropout in eval mode returns its input: no new activation on either path."""
    _, _, report = densenet100_instance_report
    spec = inspect_backbone("densenet100", "1x1x128x316")
    assert report.trace.activation_bytes == spec.trace.activation_bytes


def test_inspect_instance_on_meta_and_hw_input():
    model = meta_model("densenet100")
    report = inspect_backbone(model, "128x316")  # channels read off the first conv
    spec = inspect_backbone("densenet100", "1x1x128x316")
    assert report.trace.device == "meta"
    assert report.trace.input_shape == (1, 1, 128, 316)
    assert _figures(report) == _figures(spec)
    assert report.trace.activation_bytes == spec.trace.activation_bytes


def test_inspect_instance_forward_error_is_a_model_error():
    with pytest.raises(ModelError, match="body"):
        inspect_backbone(load_bad("ForwardRaises")(), "1x3x32x32")


def test_scalar_stage_in_forward_is_reported():
    """A 0-dim tensor made in the model's own forward (y.mean()) becomes a stage row;
    rendering it must not fail."""
    report = inspect_backbone(f"{BAD}:ScalarInForward", "1x3x16x16")
    assert report.trace.output_shape == (1, 8, 14, 14)
    report_dict(report)  # reads Stage.channels of every stage


# ---------------------------------------------------------------------------- sizes


def _torch_size(run: Callable[[torch.Tensor], torch.Tensor], n: int) -> int | None:
    """H of ``run`` on a 1x1xnx1 tensor, or None when torch rejects the size."""
    try:
        return run(torch.zeros(1, 1, n, 1)).shape[-2]
    except RuntimeError:
        return None


def _naive_ceil(n: int, k: int, s: int, p: int, d: int) -> int:
    return -(-(n + 2 * p - d * (k - 1) - 1) // s) + 1


def _check_windows(cases, run_for, step_for) -> int:
    """Compare SizeStep.out_size with torch; return how often the last-window rule bit."""
    bitten = 0
    for n, args in cases:
        got = step_for(*args).out_size(n)
        want = _torch_size(run_for(*args), n)
        if want is None:
            assert got <= 0, (n, args, got)
        else:
            assert got == want, (n, args, got, want)
            k, s, p, d, ceil = args
            bitten += ceil and want != _naive_ceil(n, k, s, p, d)
    return bitten


def test_conv_out_size_matches_torch():
    cases = [
        (n, (k, s, p, d, False))
        for n in range(1, 41)
        for k in range(1, 6)
        for s in range(1, 4)
        for p in range(0, 4)
        for d in (1, 2)
    ]
    _check_windows(
        cases,
        lambda k, s, p, d, c: (
            lambda x: F.conv2d(
                x, torch.zeros(1, 1, k, 1), stride=(s, 1), padding=(p, 0), dilation=(d, 1)
            )
        ),
        lambda k, s, p, d, c: SizeStep("window", k, s, p, d, c, pool=False),
    )


@pytest.mark.parametrize("op", ["max", "avg"])
def test_pool_out_size_matches_torch_including_ceil_mode(op):
    """ceil_mode drops a last window that would start in the right padding: PyTorch's
    ``(out - 1) * stride >= in + pad`` rule. The cases must exercise it."""
    dilations = (1, 2) if op == "max" else (1,)
    cases = [
        (n, (k, s, p, d, ceil))
        for n in range(1, 41)
        for k in range(1, 6)
        for s in range(1, 5)
        for p in range(0, k // 2 + 1)
        for d in dilations
        for ceil in (False, True)
    ]

    def run_for(k, s, p, d, ceil):
        if op == "max":
            return lambda x: F.max_pool2d(
                x, (k, 1), (s, 1), (p, 0), dilation=(d, 1), ceil_mode=ceil
            )
        return lambda x: F.avg_pool2d(x, (k, 1), (s, 1), (p, 0), ceil_mode=ceil)

    bitten = _check_windows(
        cases, run_for, lambda k, s, p, d, c: SizeStep("window", k, s, p, d, c, pool=True)
    )
    assert bitten > 10


@pytest.mark.parametrize(
    ("n", "k", "s", "p", "naive", "want"),
    [
        # naive ceil((n + 2p - k)/s) + 1 keeps a last window that starts at
        # (naive - 1) * s >= n + p, i.e. in the right padding; PyTorch drops it
        (2, 1, 2, 0, 2, 1),
        (10, 1, 2, 0, 6, 5),
        (3, 1, 3, 0, 2, 1),
        (1, 2, 2, 1, 2, 1),
        (5, 2, 2, 1, 4, 3),
        (8, 2, 3, 1, 4, 3),
        # and keeps one that starts inside
        (79, 2, 2, 0, 40, 40),  # densenet100's ceil pools round odd sizes up
        (7, 3, 2, 1, 4, 4),
    ],
)
def test_ceil_mode_last_window_edge_cases(n, k, s, p, naive, want):
    assert _naive_ceil(n, k, s, p, 1) == naive
    step = SizeStep("window", k, s, p, 1, True, pool=True)
    x = torch.zeros(1, 1, n, 1)
    assert F.max_pool2d(x, (k, 1), (s, 1), (p, 0), ceil_mode=True).shape[-2] == want
    assert F.avg_pool2d(x, (k, 1), (s, 1), (p, 0), ceil_mode=True).shape[-2] == want
    assert step.out_size(n) == want


def test_transpose_pad_scale_fixed_match_torch():
    for n, k, s, p, d in itertools.product(
        range(1, 20), range(1, 5), range(1, 4), range(3), (1, 2)
    ):
        for extra in range(max(s, d)):
            x = torch.zeros(1, 1, n, 1)
            try:
                y = F.conv_transpose2d(
                    x, torch.zeros(1, 1, k, 1), stride=(s, 1), padding=(p, 0),
                    output_padding=(extra, 0), dilation=(d, 1),
                )  # fmt: skip
            except RuntimeError:
                assert SizeStep("transpose", k, s, p, d, value=extra).out_size(n) <= 0
                continue
            assert SizeStep("transpose", k, s, p, d, value=extra).out_size(n) == y.shape[-2]
    for n in range(1, 60):
        x = torch.zeros(1, 1, n, 1)
        for top, bottom in [(0, 0), (1, 2), (3, 0), (-1, 0)]:
            if n + top + bottom > 0:
                y = F.pad(x, (0, 0, top, bottom))
                assert SizeStep("pad", padding=top + bottom).out_size(n) == y.shape[-2]
        for factor in (0.5, 1.5, 2.0, 0.3, 1 / 3):
            if math.floor(n * factor) > 0:
                y = F.interpolate(x, scale_factor=(factor, 1.0), mode="nearest")
                assert SizeStep("scale", value=factor).out_size(n) == y.shape[-2]
        for m in (1, 3, 7):
            y = F.adaptive_avg_pool2d(x, (m, 1))
            assert SizeStep("fixed", value=m).out_size(n) == y.shape[-2] == m


def _window(k, s, p=0, ceil=False, pool=False, d=1):
    return SizeStep("window", k, s, p, d, ceil, pool)


def _evaluate(expression: str, n: int) -> int:
    return eval(expression.format(x="n"), {"ceil": math.ceil, "floor": math.floor, "n": n})


DENSENET100 = [_window(7, 2, 3), _window(2, 2, 0, True, True), _window(2, 2, 0, True, True),
               _window(2, 2, 0, True, True)]  # fmt: skip
VGG = [x for _ in range(5) for x in (_window(3, 1, 1), _window(2, 2, pool=True))]
DENSENET121 = [_window(7, 2, 3), _window(3, 2, 1, pool=True)] + [_window(2, 2, pool=True)] * 3


@pytest.mark.parametrize(
    ("steps", "formatted", "rounding", "factor", "minimum"),
    [
        (DENSENET100, "H -> ceil(H/16)", "ceil", 16, 1),
        (VGG, "H -> floor(H/32)", "floor", 32, 32),
        (DENSENET121, "H -> floor((H + 3)/32)", "floor", 32, 29),
        # with stride 1 ceil and floor agree; the first form tried (ceil) is reported
        ([_window(3, 1, 1)], "H -> H", "ceil", 1, 1),
        ([_window(3, 1, 0)], "H -> H - 2", "ceil", 1, 3),
        ([SizeStep("pad", padding=4), _window(3, 2)], "H -> ceil(H/2) + 1", "ceil", 2, 1),
        ([_window(3, 2, 1), SizeStep("fixed", value=7)], "H -> 7", "fixed", 2, 1),
        ([], "H -> H", "ceil", 1, 1),
    ],
)
def test_size_rule_forms(steps, formatted, rounding, factor, minimum):
    rule = size_rule(steps)
    assert rule.format("H") == formatted
    assert rule.rounding == rounding
    assert rule.factor == factor == total_stride(steps)
    assert rule.minimum == minimum == min_size(steps)
    if rounding != "fixed":
        for n in range(minimum, minimum + 3000):
            assert _evaluate(rule.expression, n) == chain_size(steps, n)


def test_size_rule_other_form():
    steps = [_window(3, 2, 1), SizeStep("scale", value=1.5)]
    rule = size_rule(steps)
    assert rule.rounding == "other"
    assert rule.factor == pytest.approx(2 / 1.5)
    assert "x1.5" in rule.expression


WINDOWS = st.builds(
    lambda k, s, p, ceil, pool: _window(k, s, min(p, k // 2), ceil and pool, pool),
    st.integers(1, 7),
    st.integers(1, 3),
    st.integers(0, 3),
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(WINDOWS, min_size=1, max_size=5))
def test_size_rule_closed_form_holds_beyond_its_search_span(steps):
    """size_rule checks ``span`` sizes from the minimum; the form it finds must hold
    far beyond (here: to 4096 + the minimum)."""
    rule = size_rule(steps)
    lo = min_size(steps)
    assert chain_size(steps, lo) > 0
    assert lo == 1 or chain_size(steps, lo - 1) <= 0
    if rule.rounding in ("ceil", "floor"):
        for n in range(lo, lo + 4096):
            assert _evaluate(rule.expression, n) == chain_size(steps, n), (n, rule)
