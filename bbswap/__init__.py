"""bbswap: backbone surgery for PyTorch.

Inspect a CNN backbone's stages, patch it to a target downsample factor and channel
count with declarative recipes, and emit the patched network as Python source.

The Python API mirrors the command line::

    import bbswap

    report = bbswap.inspect_backbone("densenet100", "1x1x128x316")
    result = bbswap.apply_recipe("resnet50", bbswap.load_recipe("recipes/seed-hmer-resnet50.toml"))
    found = bbswap.fit("resnet50", channels=684, stride=16, in_chans=1, input_shape="1x1x128x316")
    bbswap.export("resnet50", bbswap.winner_recipe(found, "1x1x128x316"), "backbone.py")
    table = bbswap.matrix("tv:resnet*", strides=(8, 16, 32), channels=256)

``fit``, ``apply_recipe``, ``export`` and ``inspect_backbone`` also take a model instance
(an ``nn.Module``) where a spec goes, and never change it. ``help(bbswap.fit)`` and the
like document every parameter; ``dir(bbswap)`` lists the API.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "resolve": "bbswap.backbones.registry",
    "list_backbones": "bbswap.backbones.registry",
    "inspect_backbone": "bbswap.tracing.inspection",
    "cross_check": "bbswap.tracing.cross_check",
    "report_dict": "bbswap.cli.json_out",
    "trace": "bbswap.tracing.tracer",
    "trace_module": "bbswap.tracing.tracer",
    "load_recipe": "bbswap.recipes.toml_io",
    "recipe_to_toml": "bbswap.recipes.toml_io",
    "make_op": "bbswap.recipes.registry",
    "Recipe": "bbswap.recipes.schema",
    "apply_recipe": "bbswap.surgery.apply",
    "emit": "bbswap.codegen.module_file",
    "export": "bbswap.codegen.export",
    "check_file": "bbswap.verify.file",
    "fit": "bbswap.search.fit",
    "winner_recipe": "bbswap.search.fit",
    "matrix": "bbswap.search.matrix",
    "BBSwapError": "bbswap.errors",
}

__all__ = [*_API, "__version__"]


def __dir__() -> list[str]:
    """The public API, lazily imported names included, and the module's dunder names."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


def __getattr__(name: str) -> Any:
    """Import the API lazily, so ``bbswap --help`` does not pay for all of it."""
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bbswap' has no attribute {name!r}")
