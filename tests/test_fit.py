"""``bbswap fit``: the cheapest exact surgery to a target stride and channel count.

What the rankings mean (bbswap/fitting.py, ``_PREFER``); every ranking puts exact candidates
first and breaks ties by MACs:

- ``macs`` (default): fewest multiply-accumulates at the traced input;
- ``depth``: the latest *earliest edited unit*, i.e. the candidate that keeps the most
  early layers at their original resolution (an appended pooling edits no unit and
  ranks first, a truncation ranks last);
- ``rf``: the largest receptive field (height x width).

Fits trace on the meta device; only the written files are run on CPU tensors, with
one intra-op thread (faster than two contending threads on a busy 2-core machine).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, import_plain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import bbswap.cli.progress
from bbswap.cli.app import app
from bbswap.recipes.toml_io import load_recipe
from bbswap.search.fit import FitResult, fit
from bbswap.zoo.hmer import densenet100

INPUT = "1x1x128x316"
SEED_TARGET = ("resnet50", "--channels", "684", "--stride", "16", "--in-chans", "1")
SEED_ARGS = (*SEED_TARGET, "--input", INPUT)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def frozen_progress_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The status line appears once a command has run for a second, and on a stderr that
    is not a terminal the bar it replaced used to leave a stray newline (see the test at
    the end): a delay no run reaches keeps these tests' stderr independent of how busy the
    machine is."""
    monkeypatch.setattr(bbswap.cli.progress, "DELAY", threading.TIMEOUT_MAX)


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result: Any) -> Any:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result


@functools.cache
def fitted(spec: str, **kwargs: Any) -> FitResult:
    """``fit`` once per distinct call (it is deterministic)."""
    return fit(spec, **kwargs)


def table_rows(text: str) -> list[str]:
    """The candidate rows of a fit table (they end with the 'exact' column)."""
    return [
        line
        for line in text.splitlines()
        if re.search(r"\s(yes|no|rounding|refused: .*)( \(.*\))?\s*$", line) and "edits" not in line
    ]


# -- the seed's target: 684 channels at 1/16 from one input channel -----------------------------


@pytest.fixture(scope="module")
def seed_cli(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("fit")
    out, saved = folder / "backbone.py", folder / "winner.toml"
    result = ok(cli("fit", *SEED_ARGS, "-o", out, "--save-recipe", saved, "--json"))
    return folder, json.loads(result.stdout)


@pytest.fixture(scope="module")
def seed_table() -> str:
    return ok(cli("fit", *SEED_ARGS)).stdout


def seed_api() -> FitResult:
    return fitted("resnet50", channels=684, stride=16, in_chans=1, input_shape=INPUT)


def test_winner_is_exact_and_cheap(seed_cli):
    _, data = seed_cli
    winner = data["candidates"][0]
    assert data["schema"] == "bbswap.fit/1"
    assert data["target"] == {
        "channels": 684,
        "stride": [16, 16],
        "in_chans": 1,
        "like": None,
        "rounding": "ceil",
        "outputs": [],
        "returns": None,
    }
    assert winner["exact"] is True
    assert winner["output"] == [1, 684, 8, 20]
    assert winner["macs"] <= 5.3e9
    assert winner["macs_ratio"] == 1.0

    api = seed_api()
    assert api.winner.ok
    assert api.winner.trace.macs == winner["macs"] <= 5.3e9
    assert api.winner.label == winner["label"]
    assert data["evaluated"] == api.evaluated == len(api.candidates)


def test_layer2_variant_is_listed_at_about_2_2x(seed_cli, seed_table):
    _, data = seed_cli
    rows = [c for c in data["candidates"] if c["label"] == "layer2: stride 1"]
    assert len(rows) == 1 and rows[0]["exact"]
    assert 2.0 <= rows[0]["macs_ratio"] <= 2.4
    assert rows[0]["macs"] / data["candidates"][0]["macs"] == pytest.approx(rows[0]["macs_ratio"])

    line = next(r for r in table_rows(seed_table) if "layer2: stride 1" in r)
    ratio = float(re.search(r"\sx(\d+\.\d+)\s", line).group(1))
    assert 2.0 <= ratio <= 2.4
    assert line.rstrip().endswith("yes")
    api = seed_api()
    layer2 = next(c for c in api.candidates if c.label == "layer2: stride 1")
    assert 2.0 <= layer2.trace.macs / api.winner.trace.macs <= 2.4


def test_written_file_follows_ceil_h16_w16(seed_cli):
    folder, data = seed_cli
    written = data["written"]
    assert Path(written["path"]) == folder / "backbone.py"
    assert all(check["ok"] for check in written["checks"])
    cls = getattr(import_plain(folder / "backbone.py"), written["class_name"])
    assert cls.output_size(128, 316) == (8, 20)
    for h, w in itertools.product(range(1, 400, 7), range(1, 700, 13)):
        assert cls.output_size(h, w) == (math.ceil(h / 16), math.ceil(w / 16)), (h, w)
    model = cls().eval()
    for shape in [(1, 1, 128, 316), (1, 1, 33, 47), (2, 1, 61, 97), (1, 1, 17, 255)]:
        with torch.no_grad():
            out = model(torch.randn(*shape))
        h, w = shape[-2:]
        assert tuple(out.shape) == (shape[0], 684, math.ceil(h / 16), math.ceil(w / 16))


def test_saved_recipe_replays_to_the_same_file(seed_cli):
    folder, data = seed_cli
    saved = folder / "winner.toml"
    assert data["recipe"] == str(saved)
    text = saved.read_text(encoding="utf-8")
    assert text.startswith("# Written by bbswap fit: resnet50 -> 684 channels at 1/16")
    rec = load_recipe(saved)
    assert rec.input == INPUT
    assert [op.op for op in rec.ops] == ["in_channels", "stride", "truncate", "project"]
    replay = folder / "replay.py"
    ok(cli("apply", "resnet50", saved, "-o", replay))
    assert replay.read_bytes() == (folder / "backbone.py").read_bytes()


# -- --like: another backbone's sizes, odd ones included ----------------------------------------

EXTRA_SIZES = [(61, 97), (127, 255), (33, 47), (2, 3)]


@functools.cache
def densenet100_on_meta() -> torch.nn.Module:
    with torch.device("meta"):
        return densenet100().eval()


def densenet100_hw(h: int, w: int) -> tuple[int, int]:
    """densenet100's real output size, from a forward on the meta device."""
    with torch.no_grad():
        out = densenet100_on_meta()(torch.empty(1, 1, h, w, device="meta"))
    return tuple(out.shape[-2:])


def test_like_densenet100_matches_its_sizes():
    result = fitted("resnet50", like="densenet100", input_shape=INPUT)
    assert result.target.like == "densenet100"
    assert (result.target.channels, result.target.in_chans) == (684, 1)
    winner = result.winner
    assert winner.ok
    model = winner.result.model.eval()  # the patched model, on the meta device
    sizes = [*result.probes, *EXTRA_SIZES[:2]]
    assert any(h % 2 and w % 2 for h, w in sizes)
    for h, w in sizes:
        want = densenet100_hw(h, w)
        assert winner.trace.output_size(h, w) == want, (h, w)
        with torch.no_grad():
            out = model(torch.empty(1, 1, h, w, device="meta"))
        assert tuple(out.shape) == (1, 684, *want), (h, w)


# -- other targets ------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [32, 8])
def test_densenet100_to_stride_32_and_8(stride):
    data = json.loads(
        ok(cli("fit", "densenet100", "--stride", stride, "--channels", 684, "--json")).stdout
    )
    winner = data["candidates"][0]
    assert winner["exact"]
    assert winner["output"] == [1, 684, math.ceil(224 / stride), math.ceil(224 / stride)]
    result = fitted("densenet100", stride=stride, channels=684)
    for h, w in result.probes:
        assert result.winner.trace.output_size(h, w) == (
            math.ceil(h / stride),
            math.ceil(w / stride),
        )


def test_per_axis_stride_on_resnet34():
    data = json.loads(
        ok(cli("fit", "resnet34", "--stride", "32x4", "--channels", 256, "--json")).stdout
    )
    assert data["target"]["stride"] == [32, 4]
    assert data["candidates"][0]["exact"]
    result = fitted("resnet34", stride="32x4", channels=256)
    after = result.winner.trace
    assert after.downsample == (32, 4)
    assert [r.factor for r in after.size_rules()] == [32, 4]
    for h, w in [*result.probes, *EXTRA_SIZES]:
        assert after.output_size(h, w) == (math.ceil(h / 32), math.ceil(w / 4))


# -- rankings and options -----------------------------------------------------------------------

RANK_TARGETS = {
    "resnet50-truncate": ("resnet50", {"channels": 684, "stride": 16, "in_chans": 1,
                                       "input_shape": INPUT, "allow_truncate": True}),
    "densenet100-s32": ("densenet100", {"channels": 684, "stride": 32}),
    "resnet18-s8-stride": ("resnet18", {"channels": 64, "stride": 8, "mode": "stride"}),
}  # fmt: skip

KEYS = {
    "macs": lambda c: (c.trace.macs,),
    "depth": lambda c: (-c.order, c.trace.macs),
    "rf": lambda c: (-(c.trace.receptive_field[0] * c.trace.receptive_field[1]), c.trace.macs),
}


@pytest.mark.parametrize("prefer", list(KEYS))
@pytest.mark.parametrize("target", list(RANK_TARGETS))
def test_ranking_follows_its_key(target, prefer):
    spec, kwargs = RANK_TARGETS[target]
    result = fitted(spec, prefer=prefer, **kwargs)
    exact = [c for c in result.candidates if c.ok]
    assert exact and list(result.candidates[: len(exact)]) == exact  # exact ones first
    keys = [KEYS[prefer](c) for c in exact]
    assert keys == sorted(keys)
    # the same candidates whatever the ranking
    other = fitted(spec, prefer="macs", **kwargs)
    assert sorted(c.label for c in result.candidates) == sorted(c.label for c in other.candidates)


def winners(target: str) -> dict[str, str]:
    spec, kwargs = RANK_TARGETS[target]
    return {p: fitted(spec, prefer=p, **kwargs).winner.label for p in KEYS}


def test_rankings_differ():
    assert winners("resnet50-truncate") == {
        "macs": "truncate after layer3",  # cheapest, but layer4 and its RF are gone
        "depth": "layer4: stride 1",
        "rf": "layer4: stride 1",  # dilation keeps the receptive field: 427 vs 267
    }
    assert winners("densenet100-s32") == {
        "macs": "trans2: stride 4",
        "depth": "avg-pool /2",  # every layer keeps its resolution; the pool is appended
        "rf": "trans2: stride 4",
    }
    spec, kwargs = RANK_TARGETS["resnet18-s8-stride"]
    ranked = {p: [c.label for c in fitted(spec, prefer=p, **kwargs).candidates] for p in KEYS}
    assert ranked["depth"] != ranked["macs"] and ranked["depth"] != ranked["rf"]


def test_prefer_on_the_command_line():
    data = json.loads(
        ok(
            cli(
                "fit",
                "densenet100",
                "--stride",
                32,
                "--channels",
                684,
                "--prefer",
                "depth",
                "--json",
            )
        ).stdout
    )
    assert data["prefer"] == "depth"
    assert data["candidates"][0]["label"] == "avg-pool /2"
    assert_one_line_error(cli("fit", *SEED_TARGET, "--prefer", "speed"), "--prefer 'speed'")


def test_mode_stride():
    dilated = seed_api()
    plain = fitted(
        "resnet50", channels=684, stride=16, in_chans=1, input_shape=INPUT, mode="stride"
    )
    assert plain.winner.ok and plain.winner.label == dilated.winner.label
    for c in plain.candidates:
        assert c.mode == "stride"
        for op in c.recipe.ops:
            if op.op == "stride":
                assert op["mode"] == "stride"
    # without dilation the layers after the removed stride see less of the image
    assert plain.winner.trace.receptive_field < dilated.winner.trace.receptive_field
    data = json.loads(ok(cli("fit", *SEED_ARGS, "--mode", "stride", "--json")).stdout)
    stride_ops = [op for op in data["candidates"][0]["ops"] if op["op"] == "stride"]
    assert stride_ops and all(op["mode"] == "stride" for op in stride_ops)
    assert_one_line_error(cli("fit", *SEED_TARGET, "--mode", "pool"), "--mode 'pool'")


def test_allow_truncate_offers_layer3():
    result = fitted(
        "resnet50", channels=684, stride=16, in_chans=1, input_shape=INPUT, allow_truncate=True
    )
    truncations = [c for c in result.candidates if c.label.startswith("truncate after")]
    # one candidate per distinct network: layer3.5 ends layer3, so it is not offered again
    assert [c.label for c in truncations] == ["truncate after layer3"]
    ops = [op.to_toml() for op in truncations[0].recipe.ops]
    assert ops == [
        {"op": "in_channels", "channels": 1, "strategy": "sum"},
        {"op": "truncate", "after": "layer3"},
        {"op": "project", "channels": 684, "activation": "none"},
    ]
    assert truncations[0].ok and truncations[0].trace.output_shape == (1, 684, 8, 20)
    assert not any(c.label.startswith("truncate") for c in seed_api().candidates)
    text = ok(cli("fit", *SEED_ARGS, "--allow-truncate")).stdout
    assert "truncate after layer3 " in text


def test_top_limits_the_rows(seed_table):
    assert len(table_rows(seed_table)) == 5  # the default --top
    text = ok(cli("fit", *SEED_ARGS, "--top", "2")).stdout
    rows = table_rows(text)
    assert len(rows) == 2
    assert rows[0].lstrip().startswith("*")
    data = json.loads(ok(cli("fit", *SEED_ARGS, "--top", "2", "--json")).stdout)
    assert len(data["candidates"]) == 2 and data["evaluated"] == 5
    assert_one_line_error(cli("fit", *SEED_ARGS, "--top", "0"), "--top must be at least 1")


# -- infeasible targets --------------------------------------------------------------------------

INFEASIBLE = {
    "stride-24": (
        ["resnet50", "--stride", "24", "--channels", "684"],
        ["cannot reach stride 24", "nearest feasible strides: 8, 16, 32"],
    ),
    "channels-0": (
        ["resnet50", "--stride", "16", "--channels", "0"],
        ["--channels must be positive"],
    ),
    "in-chans-0": (
        ["resnet50", "--stride", "16", "--channels", "684", "--in-chans", "0"],
        ["--in-chans must be positive"],
    ),
    "stride-0": (["resnet50", "--stride", "0", "--channels", "684"], ["--stride", "positive"]),
    "no-channels": (["resnet50", "--stride", "16"], ["give --channels and --stride, or --like"]),
    "no-stride": (["resnet50", "--channels", "684"], ["give --channels and --stride, or --like"]),
}


@pytest.mark.parametrize("case", list(INFEASIBLE))
def test_infeasible_target_is_one_line_and_writes_nothing(case, tmp_path):
    args, fragments = INFEASIBLE[case]
    out, saved = tmp_path / "backbone.py", tmp_path / "winner.toml"
    result = cli("fit", *args, "-o", out, "--save-recipe", saved)
    assert_one_line_error(result, *fragments)
    assert not out.exists() and not saved.exists()
    assert list(tmp_path.iterdir()) == []


def test_vgg16_bn_fits_with_floor_rounding():
    data = json.loads(
        ok(
            cli(
                "fit",
                "vgg16_bn",
                "--stride",
                16,
                "--channels",
                512,
                "--rounding",
                "floor",
                "--json",
            )
        ).stdout
    )
    assert data["target"]["rounding"] == "floor"
    assert data["candidates"][0]["exact"]
    result = fitted("vgg16_bn", stride=16, channels=512, rounding="floor")
    for h, w in result.probes:
        if h >= 16 and w >= 16:
            assert result.winner.trace.output_size(h, w) == (h // 16, w // 16)


# -- any feasible power-of-two stride: the size rule is ceil(H/S), checked by running -----------


CHANNELS = {"resnet18": 64, "densenet100": 684}  # densenet100's fits are shared with above


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    spec=st.sampled_from(["resnet18", "densenet100"]),
    stride=st.sampled_from([4, 8, 16, 32, 64]),
    sizes=st.lists(st.tuples(st.integers(1, 320), st.integers(1, 320)), min_size=1, max_size=2),
)
def test_winner_size_rule_is_ceil(spec, stride, sizes):
    result = fitted(spec, stride=stride, channels=CHANNELS[spec])
    winner = result.winner
    assert winner.ok
    model = winner.result.model.eval()  # on the meta device
    chans = winner.result.surgery.in_chans
    for h, w in sizes:
        want = (math.ceil(h / stride), math.ceil(w / stride))
        assert winner.trace.output_size(h, w) == want
        with torch.no_grad():
            out = model(torch.empty(1, chans, h, w, device="meta"))
        assert tuple(out.shape) == (1, CHANNELS[spec], *want), (spec, stride, h, w, winner.label)


# -- known problems ------------------------------------------------------------------------------


def test_fit_writes_nothing_to_a_non_terminal_stderr(monkeypatch):
    monkeypatch.setattr(bbswap.cli.progress, "DELAY", 0.0)  # on a terminal: at once
    result = ok(cli("fit", "resnet18", "--stride", 32, "--channels", 512))
    assert result.stderr == ""


def test_candidates_keep_the_refusal_not_its_text():
    from bbswap.errors import SurgeryError

    result = fit("densenet100", channels=256, stride=8)
    refused = [c for c in result.candidates if c.dilate_refused is not None]
    assert refused, [c.label for c in result.candidates]
    for c in refused:
        assert isinstance(c.dilate_refused, SurgeryError) and c.mode == "stride"
        assert c.note.startswith("dilate refused: ")
        assert c.note.endswith(str(c.dilate_refused).split(": ", 1)[-1])
    assert all(c.failure is None and not c.error for c in result.candidates if not c.failed)
