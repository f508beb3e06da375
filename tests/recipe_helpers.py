"""Helpers shared by the recipe-engine tests (a helper module, not a test file)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bbswap.backbones.registry import resolve
from bbswap.recipes.schema import Recipe
from bbswap.recipes.toml_io import recipe_from_dict
from bbswap.surgery.apply import ApplyResult, apply_recipe
from bbswap.verify import checks

# Small heads: a zoo model's 1000-way classifier is most of VGG's weights and of its
# build time; every model a test builds with real weights uses this, and so does the
# meta build apply_recipe traces (through its kwargs), so the two agree.
SMALL_HEAD = {"num_classes": 10}
NO_HEAD = ("densenet100",)  # zoo models without a classifier (no num_classes argument)


def one_thread() -> Iterator[None]:
    """Run torch on one thread (use as a module-scoped autouse fixture), as the checks of
    an emitted file do: the models here are small and run one at a time."""
    with checks.one_thread():
        yield


def kwargs_for(spec: str) -> dict[str, Any]:
    return {} if spec in NO_HEAD else dict(SMALL_HEAD)


def recipe(*ops: dict[str, Any], name: str = "test") -> Recipe:
    """A recipe from op tables, checked like a file's."""
    return recipe_from_dict({"name": name, "ops": list(ops)}, "test.toml")


def real_model(spec: str, seed: int = 0, in_chans: int | None = None) -> nn.Module:
    """A zoo model on CPU with random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    model = resolve(spec, kwargs_for(spec)).build(in_chans=in_chans)
    randomize_batchnorm(model, seed)
    return model.eval()


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics, kept near 1 in scale."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def apply(
    spec: str, *ops: dict[str, Any], input_shape: str, model: nn.Module | None = None
) -> ApplyResult:
    """apply_recipe with the small-head kwargs."""
    return apply_recipe(spec, recipe(*ops), input_shape, kwargs=kwargs_for(spec), model=model)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything apply must leave unchanged on a caller's model: tensors, module tree,
    and the spatial attributes ops edit."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    attrs = {}
    for path, m in model.named_modules():
        attrs[path] = (
            type(m),
            tuple(m._modules),
            {
                key: getattr(m, key)
                for key in (
                    "kernel_size",
                    "stride",
                    "padding",
                    "dilation",
                    "ceil_mode",
                    "in_channels",
                    "p",
                )
                if hasattr(m, key)
            },
            type(m).forward,
            "forward" in m.__dict__,
            m.training,
        )
    return {"state": state, "attrs": attrs}


def assert_same_snapshot(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["attrs"] == b["attrs"]
    assert list(a["state"]) == list(b["state"])
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key


def modules_of(model: nn.Module, cls: type[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    return ((p, m) for p, m in model.named_modules() if isinstance(m, cls))
