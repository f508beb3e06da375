"""The CAN-style user model in tests/fixtures/can_model matches the zoo's densenet100."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import yaml

from bbswap.zoo.hmer import densenet100

FIXTURE = Path(__file__).parent / "fixtures" / "can_model"


def load_can_densenet():
    spec = importlib.util.spec_from_file_location("can_densenet_fixture", FIXTURE / "densenet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    return module.DenseNet(params)


def test_fixture_state_dict_matches_densenet100():
    can = load_can_densenet()
    zoo = densenet100()
    got = [(k, tuple(v.shape)) for k, v in can.state_dict().items()]
    want = [(k, tuple(v.shape)) for k, v in zoo.state_dict().items()]
    assert got == want


def test_fixture_and_densenet100_compute_the_same():
    torch.manual_seed(0)
    can = load_can_densenet().eval()
    zoo = densenet100().eval()
    # non-trivial BN statistics, so the comparison exercises every buffer
    for name, buf in can.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_(0.0, 0.1)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
    zoo.load_state_dict(can.state_dict())
    x = torch.randn(1, 1, 61, 97)
    with torch.no_grad():
        a = can(x)
        b = zoo(x)
    assert list(a.shape) == [1, 684, 4, 7]
    assert torch.equal(a, b)
