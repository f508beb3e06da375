"""``bbswap inspect``: resolve a backbone, trace it, check its size rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from bbswap.backbones.registry import Backbone, resolve
from bbswap.errors import InvalidArgument, ModelError
from bbswap.kinds import Layout
from bbswap.parsing import parse_dims, parse_input
from bbswap.records import dims, short_count
from bbswap.tracing import layouts
from bbswap.tracing.sizes import SizeRule
from bbswap.tracing.tracer import (
    ForwardFailed,
    Stage,
    Trace,
    build_any,
    describe_factor,
    forward_error,
    trace,
    trace_instance,
    trace_module,
)

Shape4 = tuple[int, int, int, int]


@dataclass(frozen=True)
class SizeCheck:
    """The output size predicted from the reduction chain, and the one a trace gave."""

    input_hw: tuple[int, int]
    predicted_hw: tuple[int, int]
    traced_hw: tuple[int, int] | None  # None when the output is not spatial

    @property
    def ok(self) -> bool:
        return self.traced_hw is None or self.traced_hw == self.predicted_hw


@dataclass(frozen=True)
class InspectReport:
    """A trace plus its size rule and size checks.

    For a classifier (non-spatial output) the rule and checks are those of
    ``features``, the last spatial stage before the head.
    """

    backbone: str
    trace: Trace
    features: Stage | None
    rules: tuple[SizeRule, SizeRule]
    sizes: tuple[SizeCheck, ...]

    def __repr__(self) -> str:
        """The summary, not the data:
        ``InspectReport(resnet50, 1x3x224x224 -> 2048@/32, 11 stages, 25.6M params)``."""
        t = self.trace
        return (
            f"InspectReport({self.backbone}, {dims(t.input_shape)} -> {features_text(t)}, "
            f"{len(t.stages)} stages, {short_count(t.params)} params)"
        )


def features_text(t: Trace) -> str:
    """The feature map a trace ends in, as ``channels@/downsample`` (a classifier's features
    stage when the output is not spatial)."""
    f = t.features
    shape, down = (f.out_shape, f.downsample) if f is not None else (t.output_shape, t.downsample)
    if len(shape) != 4:
        return dims(shape)
    return f"{shape[1]}@/{describe_factor(down)}"


@dataclass(frozen=True)
class Prepared:
    """A backbone and an input shape made consistent with each other."""

    backbone: Backbone
    input_shape: Shape4
    build: Callable[[], nn.Module]


def first_conv_in_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def own_in_chans(backbone: Backbone) -> int | None:
    """The input channels a backbone is built with by default (read off its first conv
    when the registry does not say)."""
    if backbone.default_in_chans is not None:
        return backbone.default_in_chans
    return first_conv_in_channels(build_any(backbone.build))


def choose_input(
    backbone: Backbone,
    text: str | None,
    *,
    keep_own: bool = False,
    fallback: int | None = 3,
) -> tuple[Shape4, int | None]:
    """The input the source backbone is traced with (its channels are the ones it is built
    with), and the channel count an ``NxCxHxW`` text names (None for ``HxW`` or no text).

    ``HxW`` or no text (the backbone's own size: 224x224 for most, the one size a timm
    model is built for) takes the model's own channels, else ``fallback``;
    ``NxCxHxW`` takes its own, unless ``keep_own``: the caller changes them later.
    """
    dims = parse_dims(text, "input_shape") if text is not None else backbone.own_size
    if len(dims) not in (2, 4):
        raise InvalidArgument(
            f"malformed {{input_shape}} '{text}': expected NxCxHxW or HxW, e.g. 1x3x224x224",
            params=("input_shape",),
        )
    asked = dims[1] if len(dims) == 4 else None
    n = dims[0] if len(dims) == 4 else 1
    if asked is not None and not keep_own:
        return (n, asked, dims[-2], dims[-1]), asked
    own = own_in_chans(backbone)
    if own is None and fallback is None:
        parse_input(text or "", None)  # raises: HxW without a channel count
    chans = own if own is not None else fallback
    assert chans is not None  # parse_input raised above
    return (n, chans, dims[-2], dims[-1]), asked


def prepare(backbone: Backbone, input_shape: str | Sequence[int] | None) -> Prepared:
    """Parse the input shape and decide the channel count the model is built with.

    A backbone that takes ``in_chans`` is built for the input's channel count; for
    ``HxW`` the channel count is the model's own (read off its first conv if needed).
    None is 3 channels at the backbone's own size (224x224 for most).
    """
    if input_shape is None:
        input_shape = (1, 3, *backbone.own_size)
    if isinstance(input_shape, str):
        shape, _ = choose_input(backbone, input_shape, fallback=None)
    else:
        shape = as_shape4(input_shape)
    chans = shape[1]

    def build() -> nn.Module:
        return backbone.build(in_chans=chans)

    return Prepared(backbone, shape, build)


def as_shape4(input_shape: Sequence[int]) -> Shape4:
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 4 or min(shape) <= 0:
        raise InvalidArgument(
            f"{{input_shape}} must be 4 positive integers (N, C, H, W), got {input_shape}",
            params=("input_shape",),
        )
    return (shape[0], shape[1], shape[2], shape[3])


def check_sizes(
    model: nn.Module, result: Trace, sizes: Sequence[tuple[int, int]]
) -> tuple[SizeCheck, ...]:
    """Predict each size from the chain and trace the model again to confirm it."""
    checks = []
    n, c = result.input_shape[:2]
    features = result.features
    for h, w in sizes:
        predicted = result.output_size(h, w, features.chain if features else None)
        try:
            again = trace_module(model, (n, c, h, w), depth=result.depth, device=result.device)
        except ForwardFailed as failed:
            raise ModelError(
                f"{{sizes}} {h}x{w}: {forward_error(failed, (n, c, h, w))}", params=("sizes",)
            ) from failed.error
        if result.outputs:  # the output the rule is of
            again = again.select_output(result.output_key)
        out, layout = again.output_shape, Layout.NCHW
        if features is not None:
            stage = next((s for s in again.stages if s.path == features.path), None)
            out, layout = (stage.out_shape, stage.layout) if stage is not None else ((), layout)
        traced = layouts.grid_of(out, layout) if len(out) == 4 else None
        checks.append(SizeCheck((h, w), predicted, traced))
    return tuple(checks)


def inspect_backbone(
    spec: str | Backbone | nn.Module,
    input_shape: str | Sequence[int] | None = None,
    *,
    depth: int = 1,
    sizes: Sequence[tuple[int, int]] = (),
    kwargs: dict[str, Any] | None = None,
    source_output: int | str | None = None,
) -> InspectReport:
    """Trace a backbone once on the meta device: its stages, costs, reduction points and
    size rule, and with ``sizes`` the output size predicted and traced at each.

    A model instance with real weights is traced under ``FakeTensorMode`` and comes back
    as it was: the same tensors with the same values, hooks and training flags.

    Args:
        spec: A backbone spec (``"resnet50"``, ``"tv:resnet18"``, ``"timm:resnet18"``,
            ``"path/to/file.py:Name"``), a resolved :class:`Backbone`, or a model instance.
        input_shape: The dummy input, ``"NxCxHxW"``, ``"HxW"`` (the model's own channels)
            or a sequence of four ints; default 1x3x224x224, or at the one size a timm
            model is built for (its config's ``input_size``, e.g. 384x384).
        depth: How deep the stage table goes (1: the top-level children).
        sizes: Input sizes ``(h, w)`` at which to check the size rule against a new trace.
        kwargs: Constructor arguments for a spec (ignored for a model instance).
        source_output: For a forward that returns several tensors (``trace.outputs`` lists
            them all), the one whose size rule and checks are reported; default the one
            with the largest downsample.

    Returns:
        An :class:`InspectReport`: ``trace`` (stages, reductions, params, MACs),
        ``features`` (a classifier's features stage), ``rules`` and ``sizes``.

    Example::

        report = bbswap.inspect_backbone("densenet100", "1x1x128x316", sizes=[(33, 97)])
        report.trace.output_shape                      # (1, 684, 8, 20)
        [r.id for r in report.trace.reductions][:2]    # ['conv1', 'max_pool2d()']
        bbswap.inspect_backbone(torchvision.models.resnet18(), "1x3x224x224")
    """
    if depth < 1:
        raise InvalidArgument(f"{{depth}} must be at least 1, got {depth}", params=("depth",))
    if isinstance(spec, nn.Module):
        model = spec
        if input_shape is None:
            shape: Shape4 = (1, 3, 224, 224)
        elif isinstance(input_shape, str):
            shape = parse_input(input_shape, first_conv_in_channels(model))
        else:
            shape = as_shape4(input_shape)
        result = trace_instance(model, shape, depth, type(model).__name__)
        name = type(model).__name__
    else:
        backbone = spec if isinstance(spec, Backbone) else resolve(spec, kwargs)
        prepared = prepare(backbone, input_shape)
        result, model = trace(prepared.build, prepared.input_shape, depth, backbone.spec)
        name = backbone.spec
    result = result.select_output(source_output, name)
    checks = check_sizes(model, result, sizes) if sizes else ()
    features = result.features
    rules = result.size_rules(features.chain if features else None)
    return InspectReport(name, result, features, rules, checks)
