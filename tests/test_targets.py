"""Fits to several targets (``--target [NAME=]STRIDE:CHANNELS``, ``--return``): the hosts
that take several feature maps, with the same weights, value by value.

- timm's ``features_only`` models: the emitted list equals theirs, output by output, with
  the state dict copied by its keys (no projection is added when the channels match), and
  ``feature_info`` channels are timm's; with ``--mode dilate`` it equals ``output_stride``.
- torchvision's ``FeaturePyramidNetwork`` takes a ``--return dict`` fit at odd sizes and
  trains a step; a DeepLabV3+-style head of this file takes ``(high, low)`` and trains.
- the recipe a fit saves replays to the same file; ``matrix --target`` reports the cell;
  every mistake is one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_one_line_error, cli, import_plain, ok
from hypothesis import given
from hypothesis import strategies as st
from recipe_helpers import randomize_batchnorm
from torch import nn

from bbswap.errors import InvalidArgument, RecipeError
from bbswap.parsing import FeatureTarget, parse_target
from bbswap.recipes.toml_io import recipe_from_dict
from bbswap.search.fit import fit

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _emit(tmp_path: Path, name: str, *args: Any) -> Any:
    """``bbswap fit ARGS -o name.py`` in-process; the written class, constructed."""
    out = tmp_path / f"{name}.py"
    ok(cli("fit", *args, "-o", out, "--class-name", "Net"))
    return import_plain(out).Net


def _same_values(ours: nn.Module, theirs: nn.Module, size: tuple[int, int]) -> None:
    """The same weights by key, then the same outputs in eval mode, one by one."""
    randomize_batchnorm(ours)
    missing = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert isinstance(a, list) and len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.shape == v.shape, (i, u.shape, v.shape)
        assert torch.allclose(u, v, atol=1e-5), (i, float((u - v).abs().max()))


def test_timm_features_only_parity(tmp_path: Path):
    net = _emit(
        tmp_path,
        "f",
        "timm:resnet50",
        *("--target", "4:256", "--target", "8:512", "--target", "16:1024"),
        *("--target", "32:2048", "--return", "list", "--input", "64x64"),
    )
    theirs = timm.create_model("resnet50", features_only=True, out_indices=(1, 2, 3, 4))
    ours = net()
    assert not any("proj" in k for k in ours.state_dict())  # the channels match: no projection
    _same_values(ours, theirs, (64, 64))
    assert [i["num_chs"] for i in net.feature_info] == theirs.feature_info.channels()
    assert [i["reduction"] for i in net.feature_info] == theirs.feature_info.reduction()
    assert [i["module"] for i in net.feature_info] == theirs.feature_info.module_name()
    sizes = [tuple(t.shape[-2:]) for t in ours(torch.randn(1, 3, 61, 45))]
    assert net.output_size(61, 45) == sizes


def test_timm_output_stride_parity(tmp_path: Path):
    net = _emit(
        tmp_path,
        "os16",
        "timm:resnet50",
        *("--target", "4:256", "--target", "16:2048", "--mode", "dilate", "--input", "64x64"),
    )
    theirs = timm.create_model("resnet50", features_only=True, output_stride=16, out_indices=(1, 4))
    _same_values(net(), theirs, (64, 64))
    assert [i["num_chs"] for i in net.feature_info] == theirs.feature_info.channels()
    assert [i["reduction"] for i in net.feature_info] == [4, 16]


def test_timm_resnet18_three_levels(tmp_path: Path):
    net = _emit(
        tmp_path,
        "r18",
        "timm:resnet18",
        *("--target", "8:128", "--target", "16:256", "--target", "32:512", "--input", "64x64"),
    )
    theirs = timm.create_model("resnet18", features_only=True, out_indices=(2, 3, 4))
    _same_values(net(), theirs, (65, 97))
    assert [i["num_chs"] for i in net.feature_info] == theirs.feature_info.channels()


def _nonzero_grads(model: nn.Module) -> int:
    return sum(
        1 for p in model.parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0
    )


def test_fpn_host_takes_a_dict_and_trains(tmp_path: Path):
    net = _emit(
        tmp_path,
        "fpn",
        "resnet50",
        *("--target", "p3=8:256", "--target", "p4=16:256", "--target", "p5=32:256"),
        *("--return", "dict", "--input", "64x64"),
    )
    assert [i["name"] for i in net.feature_info] == ["p3", "p4", "p5"]
    backbone = net()
    fpn = torchvision.ops.FeaturePyramidNetwork([256, 256, 256], 128)
    x = torch.randn(2, 3, 97, 131)
    feats = backbone(x)
    assert list(feats) == ["p3", "p4", "p5"]
    sizes = [(math.ceil(97 / s), math.ceil(131 / s)) for s in (8, 16, 32)]
    assert [tuple(t.shape[-2:]) for t in feats.values()] == sizes == net.output_size(97, 131)
    out = fpn(feats)
    assert [tuple(t.shape) for t in out.values()] == [(2, 128, *s) for s in sizes]
    params = [*backbone.parameters(), *fpn.parameters()]
    opt = torch.optim.SGD(params, lr=0.01)
    before = backbone.layer2[0].conv1.weight.detach().clone()
    loss = sum(t.pow(2).mean() for t in out.values())
    loss.backward()
    assert _nonzero_grads(backbone) > 100
    assert float(backbone.p3_proj.weight.grad.abs().sum()) > 0  # the projection learns too
    opt.step()
    assert not torch.equal(before, backbone.layer2[0].conv1.weight)


class DeepLabHead(nn.Module):
    """A DeepLabV3+-style decoder: ASPP-lite on the high-level map, upsampled to the
    low-level map's size, concatenated with its 1x1 reduction, then a prediction."""

    def __init__(self, high: int, low: int, classes: int = 5) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Conv2d(high, 64, 1, bias=False)]
            + [nn.Conv2d(high, 64, 3, padding=r, dilation=r, bias=False) for r in (2, 4)]
        )
        self.pool = nn.Conv2d(high, 64, 1, bias=False)
        self.merge = nn.Sequential(nn.Conv2d(64 * 4, 64, 1, bias=False), nn.BatchNorm2d(64))
        self.reduce = nn.Sequential(nn.Conv2d(low, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.predict = nn.Conv2d(64 + 24, classes, 3, padding=1)

    def forward(self, high: torch.Tensor, low: torch.Tensor, size: tuple[int, int]) -> Any:
        pooled = self.pool(F.adaptive_avg_pool2d(high, 1)).expand(-1, -1, *high.shape[-2:])
        aspp = torch.cat([b(high) for b in self.branches] + [pooled], dim=1)
        up = F.interpolate(F.relu(self.merge(aspp)), size=low.shape[-2:], mode="bilinear")
        logits = self.predict(torch.cat([up, F.relu(self.reduce(low))], dim=1))
        return F.interpolate(logits, size=size, mode="bilinear")


def test_deeplab_host_takes_high_and_low_and_trains(tmp_path: Path):
    net = _emit(
        tmp_path,
        "dl",
        "resnet50",
        *("--target", "16:2048", "--target", "4:256", "--return", "tuple", "--input", "64x64"),
    )
    backbone = net()
    x = torch.randn(2, 3, 65, 99)
    high, low = backbone(x)
    assert high.shape == (2, 2048, 5, 7) and low.shape == (2, 256, 17, 25)
    assert net.output_size(65, 99) == [(5, 7), (17, 25)]
    # layer4 dilated (as DeepLab does): the deepest tap is layer4 at 1/16, no projection
    assert [(i["module"], i["reduction"]) for i in net.feature_info] == [
        ("layer4", 16),
        ("layer1", 4),
    ]
    head = DeepLabHead(2048, 256)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.01)
    logits = head(high, low, (65, 99))
    loss = F.cross_entropy(logits, torch.randint(0, 5, (2, 65, 99)))
    loss.backward()
    assert _nonzero_grads(backbone) > 100
    opt.step()


def test_saved_recipe_replays_to_the_same_file(tmp_path: Path):
    out, recipe = tmp_path / "a.py", tmp_path / "r.toml"
    args = ("--target", "p3=8:128", "--target", "p5=32:512", "--return", "dict", "-i", "64x64")
    ok(cli("fit", "resnet18", *args, "-o", out, "--save-recipe", recipe))
    text = recipe.read_text()
    assert 'returns = "dict"' in text and 'op = "tap"' in text
    ok(cli("apply", "resnet18", recipe, "-o", tmp_path / "b.py"))
    assert (tmp_path / "b.py").read_text() == out.read_text()


def test_fit_json_lists_the_outputs():
    result = ok(cli("fit", "resnet18", "--target", "4:64", "--target", "16:512", "--json"))
    data = json.loads(result.stdout)
    assert data["target"]["outputs"] == [
        {"name": None, "stride": [4, 4], "channels": 64},
        {"name": None, "stride": [16, 16], "channels": 512},
    ]
    assert data["target"]["returns"] == "list"
    winner = data["candidates"][0]
    assert [(o["taps"], o["downsample"]) for o in winner["outputs"]] == [
        ("layer1", [4.0, 4.0]),
        ("layer4", [16.0, 16.0]),
    ]


def test_python_api_and_projection():
    found = fit(
        "resnet18",
        targets=[FeatureTarget((8, 8), 256, "c3"), "c4=16:256"],
        returns="dict",
        input_shape="64x64",
    )
    w = found.winner
    assert w.ok and [o.key for o in w.trace.outputs] == ["c3", "c4"]
    assert [o.channels for o in w.trace.outputs] == [256, 256]
    # the last stage at 1/16 once layer4's stride is removed: layer4, projected to 256
    assert [op["at"] for op in w.recipe.taps] == ["layer2", "layer4"]
    cut = fit(
        "resnet18",
        targets=["c3=8:256", "c4=16:256"],
        returns="dict",
        input_shape="64x64",
        allow_truncate=True,
    )
    # cutting after layer3, already at 1/16, is cheaper than dilating layer4
    assert [op["at"] for op in cut.winner.recipe.taps] == ["layer2", "layer3"]
    assert cut.winner.trace.macs < w.trace.macs


def test_matrix_reports_the_targets_cell():
    result = ok(
        cli(
            "matrix", "resnet18", "--target", "8:128", "--target", "32:512", "--no-verify", "--json"
        )
    )
    data = json.loads(result.stdout)
    assert data["targets"] == ["8:128", "32:512"] and data["strides"] == []
    (cell,) = data["rows"][0]["cells"]
    assert cell["ok"] and cell["targets"] == ["8:128", "32:512"] and cell["stride"] == 32
    text = ok(cli("matrix", "resnet18", "--target", "8:128", "--target", "32:512", "--no-verify"))
    assert "8:128 + 32:512" in text.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--target", "16"), ("--target", "'16'", "[NAME=]STRIDE:CHANNELS")),
        (("--target", "16:abc"), ("--target", "'abc'")),
        (("--target", "=16:256"), ("--target", "'=16:256'")),
        (("--target", "8:256", "--stride", "16"), ("--target", "--stride")),
        (("--target", "a=8:256", "--target", "a=16:256"), ("--target", "'a'", "twice")),
        (
            ("--target", "16:256", "--target", "16:512", "--return", "dict"),
            ("--return", "dict", "name them"),
        ),
        (("--return", "dict", "--stride", "16", "--channels", "8"), ("--return", "--target")),
        (("--target", "1:64", "--target", "32:512"), ("1/1",)),
        (("--target", "3:64", "--target", "32:512"), ("3",)),
    ],
)
def test_mistakes_are_one_line(tmp_path: Path, args: tuple[str, ...], fragments: tuple[str, ...]):
    out = tmp_path / "never.py"
    assert_one_line_error(cli("fit", "resnet18", *args, "-o", out), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_recipe_mistakes():
    tap = {"op": "tap", "at": "layer2"}
    with pytest.raises(RecipeError, match="returns goes with tap ops"):
        recipe_from_dict(
            {"name": "r", "returns": "list", "ops": [{"op": "truncate", "after": "x"}]}
        )
    with pytest.raises(RecipeError, match=r"ops\[1\].*project"):
        recipe_from_dict({"name": "r", "ops": [tap, {"op": "project", "channels": 8}]})
    with pytest.raises(RecipeError, match="'set' is not one of list, tuple, dict"):
        recipe_from_dict({"name": "r", "returns": "set", "ops": [tap]})


@given(
    st.one_of(st.none(), st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)),
    st.integers(1, 1024),
    st.integers(1, 1024),
    st.integers(1, 4096),
)
def test_target_text_round_trips(name: str | None, sh: int, sw: int, channels: int):
    target = FeatureTarget((sh, sw), channels, name)
    assert parse_target(target.describe()) == target


def test_bad_target_values_name_the_parameter():
    with pytest.raises(InvalidArgument, match="targets"):
        FeatureTarget((8, 8), 0)
    with pytest.raises(InvalidArgument, match="targets"):
        FeatureTarget((8, 8), 8, "a'b")
