"""Where a classifier's features end: a model's own ``forward_features`` (timm's
convention) decides, ahead of "the last spatial stage". timm's VGG puts a 7x7
``pre_logits`` conv after its features, one that adaptive-pools any smaller map up to
7x7 first; taken as the features, no stride surgery on it has a size rule.

Fixture: tests/fixtures/headed_models.py. Real forwards run on one intra-op thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, import_plain, ok
from recipe_helpers import one_thread

from bbswap.backbones.registry import resolve
from bbswap.errors import ModelError
from bbswap.tracing.tracer import trace, trace_instance

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "headed_models.py"
HEADED = f"{FIXTURES}:HeadedVGGLike"
UNNAMED = f"{FIXTURES}:UnnamedVGGLike"
pytestmark = pytest.mark.usefixtures("frozen_progress_clock")


def test_forward_features_names_the_features():
    t, _ = trace(resolve(HEADED).build, (1, 3, 224, 224), name=HEADED)
    assert t.features_at == "features"
    assert t.features is not None and t.features.path == "features"
    assert (t.features.out_shape, t.features.downsample) == ((1, 32, 14, 14), (16.0, 16.0))


def test_without_it_the_last_spatial_stage_is_taken():
    t, _ = trace(resolve(UNNAMED).build, (1, 3, 224, 224), name=UNNAMED)
    assert t.features_at == ""
    assert t.features is not None and t.features.path == "pre_logits"
    assert t.features.out_shape == (1, 64, 8, 8)


def test_the_model_is_left_as_it_was():
    model = resolve(HEADED).build()
    trace_instance(model, (1, 3, 64, 64))
    assert "forward_features" not in vars(model)
    assert model.forward_features.__func__ is type(model).forward_features
    with pytest.raises(ModelError):
        trace_instance(model, (1, 5, 64, 64))  # the first conv takes 3 channels
    assert "forward_features" not in vars(model)


def test_fit_and_emit_on_the_features(tmp_path):
    out = tmp_path / "vgg8.py"
    args = ("fit", HEADED, "--channels", 48, "--stride", 8, "--input", "1x3x112x112")
    data = json.loads(ok(cli(*args, "-o", out, "--json")).stdout)
    winner = data["candidates"][0]
    assert {"op": "truncate", "after": "features"} in winner["ops"]
    assert winner["output"] == [1, 48, 14, 14] and winner["rule"] == "ceil"
    assert all(c["ok"] for c in data["written"]["checks"])
    cls = getattr(import_plain(out), data["written"]["class_name"])
    model = cls().eval()
    with torch.no_grad():
        for h, w in [(8, 8), (20, 36), (33, 17), (112, 112)]:
            want = (math.ceil(h / 8), math.ceil(w / 8))
            assert cls.output_size(h, w) == want
            assert tuple(model(torch.randn(1, 3, h, w)).shape) == (1, 48, *want), (h, w)
