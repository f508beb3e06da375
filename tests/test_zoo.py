"""The built-in zoo against the recorded reference layouts and figures."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bbswap.zoo import ZOO

REFERENCE = json.loads(
    (Path(__file__).parent / "fixtures" / "reference_backbones.json").read_text()
)
REF_NAME = {name: ("densenet100_hmer" if name == "densenet100" else name) for name in ZOO}


def build(name: str, **kw):
    module, func = ZOO[name].builder.split(":")
    return getattr(importlib.import_module(f"bbswap.zoo.{module}"), func)(**kw)


def test_every_reference_model_is_in_the_zoo():
    assert sorted(REF_NAME.values()) == sorted(REFERENCE["models"])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_state_dict_layout_matches_reference(name):
    ref = REFERENCE["models"][REF_NAME[name]]
    with torch.device("meta"):
        model = build(name)
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["params"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_output_shape_and_macs_match_reference(name):
    ref = REFERENCE["models"][REF_NAME[name]]
    with torch.device("meta"):
        model = build(name).eval()
        x = torch.empty(ref["input"])
        with FlopCounterMode(display=False) as counter:
            out = model(x)
    assert list(out.shape) == ref["output"]
    macs = counter.get_total_flops() // 2
    assert abs(macs - ref["macs"]) <= 0.01 * ref["macs"]


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_and_real_forward(name, in_chans):
    torch.manual_seed(0)
    model = build(name, in_chans=in_chans).eval()
    assert model.state_dict()[next(iter(model.state_dict()))].shape[1] == in_chans
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, 67, 93))
    assert out.shape[0] == 2
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_scriptable_and_fx_traceable(name):
    model = build(name, in_chans=3).eval()
    torch.jit.script(model)
    torch.fx.symbolic_trace(model)
