"""Convolutions and poolings that pad every input by its own size, so that each axis gives
``ceil(size / stride)`` outputs at any size, as TensorFlow's 'SAME' padding does.

They are what an even window (a 2x2 pooling kept at stride 1, a 4x4/4 patchify stem made
to round up) needs where no fixed padding is exact: the padding they add depends on the
input size, and the odd pixel goes after (right, bottom). Each is its torch class with
the same attributes and state_dict keys and its ``padding`` at 0; the emitted file
carries the classes a patched model uses, copied from this module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(
    size: int, kernel: int, stride: int, dilation: int, on_pixel: bool = False
) -> tuple[int, int]:
    """Pixels to add before and after an axis of ``size`` pixels so that a window of
    ``kernel`` pixels, ``dilation`` apart, at ``stride`` gives ``ceil(size / stride)``.

    ``on_pixel``: where the input is narrower than the dilation, a split in the middle
    leaves a window wholly in the padding (for a max pooling, -inf, and NaN after the next
    conv); there it all goes after, so that each window starts on a pixel."""
    span = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
    before = 0 if on_pixel and size < dilation else total // 2
    return before, total - before


def pad_same(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    value: float = 0.0,
    on_pixel: bool = False,
) -> torch.Tensor:
    """``x`` padded with ``value`` for a window of ``kernel`` at ``stride``, per axis."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0], dilation[0], on_pixel)
    left, right = same_padding(x.shape[-1], kernel[1], stride[1], dilation[1], on_pixel)
    return F.pad(x, (left, right, top, bottom), value=value)


def as_pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """A kernel, stride or dilation given as one number or as (h, w)."""
    return (value, value) if isinstance(value, int) else (value[0], value[1])


class Conv2dSame(nn.Conv2d):
    """A Conv2d that pads each input with zeros to give ceil(size / stride) per axis."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    """A MaxPool2d that pads each input with -inf to give ceil(size / stride) per axis,
    never so that a window sees only padding (timm's MaxPool2dSame gives -inf there)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
    ) -> None:
        window = as_pair(kernel_size)
        step = window if stride is None else as_pair(stride)
        super().__init__(window, step, 0, as_pair(dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation, -math.inf, True)
        return F.max_pool2d(x, self.kernel_size, self.stride, 0, self.dilation)


class AvgPool2dSame(nn.AvgPool2d):
    """An AvgPool2d that pads each input with zeros to give ceil(size / stride) per axis;
    the zeros count in the average."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        divisor_override: int | None = None,
    ) -> None:
        window = as_pair(kernel_size)
        step = window if stride is None else as_pair(stride)
        super().__init__(window, step, 0, divisor_override=divisor_override)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, (1, 1))
        return F.avg_pool2d(x, self.kernel_size, self.stride, 0, False, True, self.divisor_override)


SAME_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: Conv2dSame,
    nn.MaxPool2d: MaxPool2dSame,
    nn.AvgPool2d: AvgPool2dSame,
}


def same_version(module: nn.Module, values: dict[str, Any]) -> tuple[nn.Module, str] | None:
    """``module`` (a plain Conv2d, MaxPool2d or AvgPool2d) as its padding-per-size class,
    with ``values`` (kernel_size, stride, ...) set, sharing its parameters; and the
    constructor call the emitted file makes. None for any other module."""
    cls = SAME_CLASSES.get(type(module))
    if cls is None:
        return None
    get = {k: values.get(k, getattr(module, k, 1)) for k in ("kernel_size", "stride", "dilation")}
    kernel, stride = as_pair(get["kernel_size"]), as_pair(get["stride"])
    dilation = as_pair(get["dilation"])
    if isinstance(module, nn.Conv2d):
        conv = Conv2dSame(
            module.in_channels,
            module.out_channels,
            kernel,
            stride,
            0,
            dilation,
            module.groups,
            bias=module.bias is not None,
            device="meta",
        )
        conv.weight, conv.bias = module.weight, module.bias
        args = [str(module.in_channels), str(module.out_channels), f"kernel_size={_text(kernel)}"]
        args += [f"stride={_text(stride)}"] * (stride != (1, 1))
        args += [f"dilation={_text(dilation)}"] * (dilation != (1, 1))
        args += [f"groups={module.groups}"] * (module.groups != 1)
        args += ["bias=False"] * (module.bias is None)
        return conv, f"Conv2dSame({', '.join(args)})"
    if isinstance(module, nn.MaxPool2d):
        extra = f", dilation={_text(dilation)}" if dilation != (1, 1) else ""
        pool: nn.Module = MaxPool2dSame(kernel, stride, dilation)
        return pool, f"MaxPool2dSame({_text(kernel)}, stride={_text(stride)}{extra})"
    divisor = getattr(module, "divisor_override", None)
    pool = AvgPool2dSame(kernel, stride, divisor_override=divisor)
    extra = f", divisor_override={divisor}" if divisor is not None else ""
    return pool, f"AvgPool2dSame({_text(kernel)}, stride={_text(stride)}{extra})"


def _text(value: tuple[int, int]) -> str:
    return str(value[0]) if value[0] == value[1] else str(value)
