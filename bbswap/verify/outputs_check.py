"""Checks of a file that returns several outputs (``fit --like`` of such a backbone).

Every output is compared with the patched model's, in the same structure (a tuple, a
list, a dict with the same keys) and value by value; a mask-carrying encoder is run with
masks that pad part of the image, and the mask it returns must equal the slice of the
mask input that the like-backbone's own forward makes (torch.equal: values and dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bbswap.backbones.guard import user_code
from bbswap.surgery.outputs_plan import OutputsPlan
from bbswap.tracing.mask import all_ones_mask, mask_input
from bbswap.tracing.meta_run import on_meta
from bbswap.verify.checks import TOLERANCE, Check, VerifyReport, load_weights, verify_model

Size = tuple[int, int]


def padded_mask(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """An N x H x W bool mask, True on the padding: each image of the batch is padded
    at its bottom and right by a seeded amount (never all of it)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        rows = int(torch.randint(0, max(1, h // 2), (1,), generator=g))
        cols = int(torch.randint(0, max(1, w // 2), (1,), generator=g))
        mask[i, h - rows :, :] = True
        mask[i, :, w - cols :] = True
    return mask


def run_all(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> Any:
    """What the model returns, whole, in eval mode."""
    with torch.no_grad(), user_code("the model's forward"):
        return model(x) if mask is None else model(x, mask)


def _items(out: Any) -> list[tuple[Any, Any]]:
    if isinstance(out, dict):
        return list(out.items())
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    return [(0, out)]


def check_outputs(
    candidate: nn.Module,
    reference: nn.Module,
    plan: OutputsPlan,
    in_chans: int,
    sizes: Sequence[Size],
) -> Check:
    """Every output of the file equals the patched model's, in the plan's structure."""
    kind = {"tuple": tuple, "list": list, "dict": dict}[plan.returns]
    worst = 0.0
    for h, w in sizes:
        torch.manual_seed(0)
        x = torch.randn(2, in_chans, h, w)
        mask = padded_mask(2, h, w) if plan.mask_input is not None else None
        a, b = run_all(candidate, x, mask), run_all(reference, x, mask)
        if type(a) is not kind:
            return Check(
                "all outputs", False, f"the file returns {type(a).__name__}, not {kind.__name__}"
            )
        keys = [o.key for o in plan.outputs]
        if [k for k, _ in _items(a)] != keys:
            return Check(
                "all outputs", False, f"at {h}x{w} the file returns other outputs than {keys}"
            )
        for (key, x_a), (_, x_b) in zip(_items(a), _items(b)):
            if x_a.shape != x_b.shape or x_a.dtype != x_b.dtype:
                return Check(
                    "all outputs", False, f"at {h}x{w} output {key!r} differs in shape or dtype"
                )
            if x_a.dtype != torch.bool and x_a.numel():
                worst = max(worst, float((x_a.float() - x_b.float()).abs().max()))
            elif not torch.equal(x_a, x_b):
                return Check("all outputs", False, f"at {h}x{w} mask {key!r} differs")
    ok = worst <= TOLERANCE
    listed = ", ".join(f"{h}x{w}" for h, w in sizes)
    return Check(
        "all outputs",
        ok,
        f"all {len(plan.outputs)} outputs ({plan.returns}), max |difference| {worst:.2e} "
        f"over {listed}",
    )


def check_like_sizes(candidate: nn.Module, plan: OutputsPlan, in_chans: int) -> Check:
    """Every output at the size the like-backbone gives at each probe of the fit, and
    a mask equal to the like-backbone's slice of partly padded masks."""
    listed = [size for size, _ in plan.features.sizes]
    for h, w in listed:
        x = torch.randn(1, in_chans, h, w)
        mask = padded_mask(1, h, w, seed=h * 1000 + w) if plan.mask_input is not None else None
        got = dict(_items(run_all(candidate, x, mask)))
        for o in plan.outputs:
            want = dict(o.sizes)[(h, w)]
            out = got[o.key]
            if tuple(out.shape[-2:]) != want:
                return Check(
                    "like",
                    False,
                    f"at {h}x{w} output {o.key!r} is {'x'.join(map(str, out.shape[-2:]))}, "
                    f"{plan.like} gives {want[0]}x{want[1]}",
                )
            if o.rule is not None and mask is not None and not torch.equal(out, o.rule.apply(mask)):
                return Check(
                    "mask",
                    False,
                    f"at {h}x{w} the mask returned is not {o.rule.describe()} of the mask given",
                )
    what = "every output" + (" and the mask (partly padded masks)" if plan.mask else "")
    return Check("like", True, f"{what} as {plan.like} gives at {len(listed)} sizes")


class FittedOutput(nn.Module):
    """The fitted output alone of a model that returns several (given a mask of no
    padding, if it takes one), for the checks of one output; its class has the model's
    ``output_size``. The model is not registered: the view has no state of its own."""

    def __init__(self, model: nn.Module, key: Any) -> None:
        super().__init__()
        object.__setattr__(self, "inner", model)
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner: nn.Module = self.__dict__["inner"]
        mask = [all_ones_mask(x)] if mask_input(inner) is not None else []
        return inner(x, *mask)[self.key]

    def train(self, mode: bool = True) -> FittedOutput:
        self.__dict__["inner"].train(mode)
        return super().train(mode)


def fitted_output(model: nn.Module, key: Any) -> FittedOutput:
    size = getattr(type(model), "output_size", None)
    extra = {"output_size": staticmethod(size)} if size is not None else {}
    return type("FittedOutput", (FittedOutput,), extra)(model, key)


def verify_several(
    model: nn.Module,
    target: str,
    plan: OutputsPlan,
    *,
    in_chans: int,
    reference: nn.Module,
    compare_sizes: Sequence[Size],
    sweep: Sequence[Size],
    state: dict[str, torch.Tensor],
    rebuild: Callable[[], nn.Module] | None = None,
    source: Callable[[], nn.Module] | None = None,
) -> VerifyReport:
    """:func:`~bbswap.verify.checks.verify_model` on the fitted output, then every output
    against the patched model's and the like-backbone's sizes (and its mask). A model
    built on the meta device is built again on the CPU (``rebuild``) to take the weights."""
    if rebuild is not None and on_meta(model):
        model = rebuild()
    weights = load_weights(model, state, "the carried weights")
    if not weights.ok:
        return VerifyReport(target, (weights,))
    key = plan.features.key
    report = verify_model(
        fitted_output(model, key),
        target,
        in_chans=in_chans,
        reference=fitted_output(reference, key),
        compare_sizes=compare_sizes,
        sweep=sweep,
        source=source,
    )
    checks = [report.checks[0], weights, *report.checks[1:]]
    if report.ok:
        model.eval()
        checks.append(check_outputs(model, reference.eval(), plan, in_chans, compare_sizes))
        checks.append(check_like_sizes(model, plan, in_chans))
    return VerifyReport(target, tuple(checks))
