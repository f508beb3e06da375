"""Dilate mode against timm's ``output_stride``, value by value with the same weights.

For each family, timm's model at its default stride 32 gets random weights and batch-norm
statistics; ``fit`` (mode 'dilate') plans the way to 1/16 and 1/8, the plan is applied to
that model, and timm builds the same family with ``output_stride`` 16 or 8 and loads the
same state_dict. The patched backbone ends where timm's ``forward_features`` does, so the
two feature maps are compared element by element, at an odd input size (where 'same'
padding puts the odd pixel on one side).

What it pins: a pooling whose stride goes keeps its window at stride 1 (ResNet-D/T and
NF-ResNet's 2x2 average shortcut, padded on one side as timm's ``AvgPool2dSame`` pads),
average poolings after it are not dilated, and a 2x2 downsample conv (ConvNeXt) is
dilated with the strides after it already removed, and CondConv's kernel (its experts
mixed per sample by a routing pooled to 1x1) is no input whose stride counts. One known
departure: at stride 1 timm leaves ResNeSt's 3x3 average pooling (``avd_last``) out of
the block, where the a-trous plan keeps the window (as timm's Res2Net keeps its own 3x3
pooling); the test puts it back into timm's model and then requires equality too.

These tests need timm, which the ``test`` extra installs. Nothing is downloaded.
"""

from __future__ import annotations

import functools

import pytest
import torch
from recipe_helpers import one_thread
from torch import nn

import bbswap
from bbswap.search.fit import fit, winner_recipe

timm = pytest.importorskip("timm")

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using padding='same' with even kernel lengths:UserWarning"
)

FAMILIES = {
    "resnet": ["resnet18", "resnet26"],
    "resnet-d": ["resnet26d"],
    "resnet-t": ["resnet26t"],
    "resnest": ["resnest14d"],
    "nf-resnet": ["nf_resnet26"],
    "regnet": ["regnetx_002"],
    "efficientnet": ["efficientnet_b0"],
    "condconv": ["efficientnet_cc_b0_4e"],  # kernels mixed per sample by a routing
    "convnext": ["convnext_atto"],
}
NAMES = [name for names in FAMILIES.values() for name in names]
TRACE = "1x3x64x64"


@functools.cache
def reference(name: str) -> nn.Module:
    """timm's model at stride 32, in eval mode, with seeded random weights and batch-norm
    statistics (fresh statistics would make every batch norm nearly the identity)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, buffer in model.named_buffers():
            if key.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif key.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def timm_at(name: str, output_stride: int) -> nn.Module:
    """timm's own model at ``output_stride`` with the reference's weights."""
    model = timm.create_model(name, pretrained=False, output_stride=output_stride).eval()
    model.load_state_dict(reference(name).state_dict())
    for path, module in reference(name).named_modules():
        if path.endswith(".avd_last") and module is not None:
            block = model.get_submodule(path.rpartition(".")[0])
            if block.avd_last is None:  # ResNeSt: the window the a-trous plan keeps
                block.avd_last = nn.AvgPool2d(3, 1, padding=1)
    return model


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("name", NAMES)
def test_dilate_plan_equals_timm_output_stride(name: str, output_stride: int) -> None:
    source = reference(name)
    spec = f"timm:{name}"
    found = fit(
        spec,
        channels=source.num_features,
        stride=output_stride,
        mode="dilate",
        rounding="any",
        input_shape=TRACE,
    )
    winner = found.winner
    assert winner.ok and winner.mode == "dilate" and winner.dilate_refused is None, winner.label
    assert {op.op for op in winner.recipe.ops} == {"stride", "truncate"}, winner.label
    ours = bbswap.apply_recipe(spec, winner_recipe(found, TRACE), TRACE, model=source).model
    theirs = timm_at(name, output_stride)
    x = torch.randn(1, 3, 67, 61, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = ours.eval()(x), theirs.forward_features(x)
    assert got.shape == want.shape == (1, source.num_features, *winner.trace.output_size(67, 61))
    assert winner.trace.downsample == (output_stride, output_stride)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_resnest_departure_is_only_the_average_pooling() -> None:
    # without the pooling put back, timm's ResNeSt differs from the plan: the departure
    # the module docstring states is real, and it is the only one
    name, spec = "resnest14d", "timm:resnest14d"
    source = reference(name)
    found = fit(spec, channels=source.num_features, stride=16, mode="dilate", input_shape=TRACE)
    ours = bbswap.apply_recipe(spec, winner_recipe(found, TRACE), TRACE, model=source).model
    theirs = timm.create_model(name, pretrained=False, output_stride=16).eval()
    theirs.load_state_dict(source.state_dict())
    assert theirs.layer4[0].avd_last is None
    assert str(ours.layer4[0].avd_last) == "AvgPool2d(kernel_size=3, stride=(1, 1), padding=1)"
    x = torch.randn(1, 3, 67, 61, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours.eval()(x) - theirs.forward_features(x)).abs().max() > 1e-3
