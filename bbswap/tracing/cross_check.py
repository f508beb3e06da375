"""``bbswap inspect --cross-check``: thop's and torchinfo's totals beside bbswap's.

Each library runs on a model of its own, built on the meta device with a meta input of
the traced shape, so nothing is allocated and a large input costs what a small one does.
A model that cannot run there is built on the CPU and run on a small real input instead;
the row says so and compares with bbswap's figures at that same input.

The three count different things, and each row says what its counter misses or adds
compared with bbswap, which counts the multiply-accumulates of convolutions, linear layers
and matrix products whether a module or a functional call (``F.conv2d``, ``torch.matmul``)
makes them, without biases, and nothing for normalisation, activations or pooling:

- thop hooks modules by type (a subclass by its base's rule) and counts functional matrix
  products (``torch.matmul``, ``F.linear``, ``einsum``), but no functional convolution;
  it adds BatchNorm, average pooling and upsampling work;
- torchinfo sees module calls only: weight and bias elements times output pixels per conv,
  times the batch for any other layer with weights; it misses every functional call, adds
  biases and normalisation parameters, and counts a Linear on a 4-D tensor once per sample.

thop and torchinfo are imported here, and this module only when a cross-check is asked for.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bbswap.backbones.guard import user_code
from bbswap.backbones.registry import Backbone, resolve
from bbswap.errors import MissingDependency, gist
from bbswap.tracing.inspection import Shape4, prepare
from bbswap.tracing.tracer import Trace, build_on_meta, trace

SMALL_SIDE = 224  # the largest side of the real input of the CPU fallback


class Counter(str, enum.Enum):
    """Who counted a row's params and MACs."""

    BBSWAP = "bbswap"
    THOP = "thop"
    TORCHINFO = "torchinfo"

    def __str__(self) -> str:
        return self.value


COUNTS = {
    Counter.BBSWAP: "convs, linears and matrix products, as modules or functional calls; "
    "no bias, norm, activation or pooling",
    Counter.THOP: "module hooks by type, plus functional matmul, F.linear and einsum",
    Counter.TORCHINFO: "module calls only: each layer's weight and bias elements, times "
    "the output pixels for a conv",
}
MISSES = {
    Counter.BBSWAP: "",
    Counter.THOP: "misses functional convolutions (F.conv2d in a forward); adds BatchNorm, "
    "average pooling and upsampling work",
    Counter.TORCHINFO: "misses every functional call (F.conv2d, torch.matmul in a forward); "
    "adds biases and norm parameters; a Linear on a 4-D tensor counts once per sample",
}


@dataclass(frozen=True)
class Count:
    """One counter's totals, at ``input_shape`` on ``device``; ``bbswap_macs`` and
    ``bbswap_params`` are bbswap's figures at that same input, to compare with."""

    counter: Counter
    params: int | None  # None when the counter failed (``error`` says why)
    macs: int | None
    device: str  # "meta", or "cpu" for the fallback on a small real input
    input_shape: Shape4
    bbswap_params: int
    bbswap_macs: int
    counts: str  # what the counter counts
    misses: str  # what it misses or adds compared with bbswap ("" for bbswap itself)
    error: str = ""

    @property
    def macs_difference(self) -> int | None:
        """Its MACs less bbswap's at the same input (None when the counter failed)."""
        return None if self.macs is None else self.macs - self.bbswap_macs


@dataclass(frozen=True)
class CrossCheck:
    """bbswap's totals and those of thop and torchinfo for one backbone and input.

    ``functional_macs`` are the MACs bbswap finds in calls made outside any leaf module
    (a ``torch.matmul`` or ``F.conv2d`` in a forward): what module-call counters cannot see.
    """

    backbone: str
    input_shape: Shape4
    counts: tuple[Count, ...]  # bbswap first, then thop and torchinfo
    functional_macs: int


def functional_macs(result: Trace) -> int:
    """The MACs of a trace made outside every leaf module."""
    paths = [s.path for s in result.module_stages]
    leaves = [
        s
        for s in result.module_stages
        if not any(p.startswith(s.path + ".") for p in paths if p != s.path)
    ]
    return result.macs - sum(s.macs for s in leaves)


def _thop(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    try:
        import thop
    except ImportError:
        raise MissingDependency("--cross-check needs thop: pip install ultralytics-thop") from None
    macs, params = thop.profile(model, inputs=(x,), verbose=False)
    return int(params), int(macs)


def _torchinfo(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    try:
        import torchinfo
    except ImportError:
        raise MissingDependency("--cross-check needs torchinfo: pip install torchinfo") from None
    summary = torchinfo.summary(model, input_data=[x], device=x.device, verbose=0)
    return int(summary.total_params), int(summary.total_mult_adds)


RUNNERS: dict[Counter, Callable[[nn.Module, torch.Tensor], tuple[int, int]]] = {
    Counter.THOP: _thop,
    Counter.TORCHINFO: _torchinfo,
}


def _small(shape: Shape4) -> Shape4:
    _, c, h, w = shape
    return (1, c, min(h, SMALL_SIDE), min(w, SMALL_SIDE))


def _run(counter: Counter, model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    with torch.no_grad(), user_code(f"the model's forward under {counter}"):
        return RUNNERS[counter](model, x)


def _count(counter: Counter, build: Callable[[], nn.Module], shape: Shape4, ours: Trace) -> Count:
    """``counter``'s totals on the meta device, else on the CPU at a small real input."""
    row: dict[str, Any] = {"counts": COUNTS[counter], "misses": MISSES[counter]}
    try:
        params, macs = _run(counter, build_on_meta(build), torch.empty(shape, device="meta"))
        return Count(counter, params, macs, "meta", shape, ours.params, ours.macs, **row)
    except MissingDependency:
        raise
    except Exception as error:  # the library or the model cannot run on meta tensors
        meta_error = gist(error)
    small = _small(shape)
    torch.manual_seed(0)
    reference, _ = trace(build, small)
    try:
        params, macs = _run(counter, build(), torch.zeros(small))
    except MissingDependency:
        raise
    except Exception as error:  # a failure of the library itself: reported in its row
        failed = f"on the meta device: {meta_error}; on the CPU: {gist(error)}"
        return Count(
            counter,
            None,
            None,
            "cpu",
            small,
            reference.params,
            reference.macs,
            **row,
            error=failed,
        )
    return Count(counter, params, macs, "cpu", small, reference.params, reference.macs, **row)


def cross_check(
    spec: str | Backbone,
    input_shape: str | None = None,
    *,
    kwargs: dict[str, Any] | None = None,
    ours: Trace | None = None,
) -> CrossCheck:
    """thop's and torchinfo's params and MACs for a backbone beside bbswap's, each with
    what its counter counts and misses.

    Args:
        spec: A backbone spec or a resolved :class:`~bbswap.backbones.registry.Backbone`.
        input_shape: The input, ``"NxCxHxW"`` or ``"HxW"``; default 3 channels at the
            backbone's own size (224x224 for most).
        kwargs: Constructor arguments for a spec.
        ours: bbswap's trace at this input when the caller has one already
            (:func:`~bbswap.tracing.inspection.inspect_backbone` made it); else it is
            traced here.

    Returns:
        A :class:`CrossCheck`: one :class:`Count` per counter, bbswap's first.

    Example::

        check = cross_check("resnet18", "1x3x224x224")
        [(c.counter, c.params, c.macs) for c in check.counts]
    """
    backbone = spec if isinstance(spec, Backbone) else resolve(spec, kwargs)
    prepared = prepare(backbone, input_shape)
    shape = prepared.input_shape
    if ours is None or tuple(ours.input_shape) != shape:
        ours, _ = trace(prepared.build, shape, name=backbone.spec)
    own = Count(
        Counter.BBSWAP,
        ours.params,
        ours.macs,
        str(ours.device),
        shape,
        ours.params,
        ours.macs,
        COUNTS[Counter.BBSWAP],
        MISSES[Counter.BBSWAP],
    )
    others = tuple(_count(c, prepared.build, shape, ours) for c in RUNNERS)
    return CrossCheck(backbone.spec, shape, (own, *others), functional_macs(ours))
