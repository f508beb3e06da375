"""``bbswap fit --like SPEC --like-kw key=value``: the target is another backbone's output,
built with its own constructor arguments, probed only at inputs both backbones accept.

- CAN's ``DenseNet(params)`` (tests/fixtures/can_model) as the target of a ResNet-50: the
  emitted drop-in file gives the CAN model's output size at every probe size and at other
  odd sizes, compared by running both models.
- A text-line extractor that rejects inputs lower than 32 (tests/fixtures/ocr_like.py) as
  the target: the probes start at its smallest input (32x8), never below, with no
  ``--sizes``; the probes are in the text and the JSON of the result.
- Every new mistake is one line on stderr, exit status 2, nothing written.

Fits trace on the meta device; emitted files are checked on the meta device (sizes) and
once on CPU tensors, with one intra-op thread.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_helpers import assert_one_line_error, cli, import_plain, ok
from hypothesis import given
from hypothesis import strategies as st
from recipe_helpers import one_thread
from test_can_fixture import load_can_densenet

from bbswap.errors import InvalidArgument, ModelError, TargetError
from bbswap.search.fit import PROBES, FitResult, fit
from bbswap.tracing.sizes import from_smallest

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
pytestmark = pytest.mark.usefixtures("frozen_progress_clock")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CAN = FIXTURES / "can_model"
CAN_SPEC = f"{CAN / 'densenet.py'}:DenseNet"
CAN_PARAMS = f"params=@{CAN / 'config.yaml'}"
TEXT_LINE = f"{FIXTURES / 'ocr_like.py'}:TextLineVGG"
GRAY = f"{FIXTURES / 'ocr_like.py'}:GrayNet"
ODD_SIZES = [(61, 97), (33, 47), (127, 255), (2, 3), (45, 1)]


@functools.cache
def fitted(spec: str, **kwargs: Any) -> FitResult:
    items = {k: dict(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return fit(spec, **items)


def out_hw(model: torch.nn.Module, chans: int, h: int, w: int) -> tuple[int, int]:
    """The real output size of a model on the meta device."""
    with torch.no_grad():
        out = model(torch.empty(1, chans, h, w, device="meta"))
    return (out.shape[-2], out.shape[-1])


@functools.cache
def text_line_on_meta(width: int) -> torch.nn.Module:
    module = import_plain(FIXTURES / "ocr_like.py")
    with torch.device("meta"):
        return module.TextLineVGG(width=width).eval()


def text_line_hw(h: int, w: int, width: int = 4) -> tuple[int, int] | None:
    """TextLineVGG's real output size, or None where it rejects the input."""
    try:
        return out_hw(text_line_on_meta(width), 1, h, w)
    except RuntimeError:
        return None


# -- CAN's DenseNet(params) as the target -------------------------------------------------------


@pytest.fixture(scope="module")
def can_dropin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("like") / "densenet.py"
    args = ["resnet50", "--like", CAN_SPEC, "--like-kw", CAN_PARAMS, "--in-chans", 1]
    result = ok(cli("fit", *args, "--dropin", "--class-name", "DenseNet", "-o", out, "--json"))
    return out, json.loads(result.stdout)


def test_can_target_is_the_model_built_with_its_params(can_dropin):
    _, data = can_dropin
    assert data["target"] == {
        "channels": 684,
        "stride": [16, 16],
        "in_chans": 1,
        "like": CAN_SPEC,
        "rounding": "ceil",
        "outputs": [],
        "returns": None,
    }
    assert data["candidates"][0]["exact"] is True
    assert data["written"]["class_name"] == "DenseNet"
    # CAN's model takes any input: the probes are the usual ones, 1x1 included
    assert [tuple(p) for p in data["probes"]] == list(PROBES)


def test_can_dropin_file_gives_the_can_output_size_everywhere(can_dropin):
    path, data = can_dropin
    module = import_plain(path)
    params = yaml.safe_load((CAN / "config.yaml").read_text())
    with torch.device("meta"):
        emitted = module.DenseNet(params).eval()  # the host's constructor call
        can = load_can_densenet().eval()
    sizes = [tuple(p) for p in data["probes"]] + ODD_SIZES
    for h, w in sizes:
        want = out_hw(can, 1, h, w)
        assert out_hw(emitted, 1, h, w) == want, (h, w)
        assert module.DenseNet.output_size(h, w) == want, (h, w)


def test_can_dropin_file_runs_on_real_tensors(can_dropin):
    path, _ = can_dropin
    module = import_plain(path)
    torch.manual_seed(0)
    emitted = module.DenseNet(None, 1, "ignored").eval()
    can = load_can_densenet().eval()
    x = torch.randn(1, 1, 61, 97)
    with torch.no_grad():
        assert emitted(x).shape == can(x).shape == (1, 684, 4, 7)


def test_like_kw_in_the_python_api():
    params = yaml.safe_load((CAN / "config.yaml").read_text())
    result = fit("resnet18", like=CAN_SPEC, like_kw={"params": params}, input_shape="64x96")
    assert (result.target.channels, result.target.stride, result.target.in_chans) == (
        684,
        (16, 16),
        1,
    )
    assert result.winner.ok and result.probes == PROBES and result.smallest == (1, 1)


# -- a target that rejects inputs lower than 32 -------------------------------------------------


def test_text_line_target_is_probed_from_its_smallest_input():
    result = fitted(TEXT_LINE, kwargs=(("width", 16),), like=TEXT_LINE, like_kw=(("width", 4),))
    assert result.smallest == (32, 8)
    assert result.probes == from_smallest(PROBES, (32, 8))
    assert all(h >= 32 and w >= 8 for h, w in result.probes)
    assert any(h % 2 for h, _ in result.probes) and any(w % 2 for _, w in result.probes)
    assert text_line_hw(31, 100) is None and text_line_hw(32, 7) is None  # it does reject
    assert (result.target.channels, result.target.stride, result.target.in_chans) == (
        16,
        (16, 4),
        1,
    )
    winner = result.winner
    assert winner.ok
    model = winner.result.model.eval()  # the patched model, on the meta device
    for h, w in [*result.probes, (32, 100), (47, 31), (99, 63)]:
        want = text_line_hw(h, w)
        assert want is not None
        assert winner.trace.output_size(h, w) == want, (h, w)
        assert out_hw(model, 1, h, w) == want, (h, w)


def test_text_line_target_on_the_command_line():
    args = ["fit", TEXT_LINE, "--kw", "width=16", "--like", TEXT_LINE, "--like-kw", "width=4"]
    data = json.loads(ok(cli(*args, "--json")).stdout)
    result = fitted(TEXT_LINE, kwargs=(("width", 16),), like=TEXT_LINE, like_kw=(("width", 4),))
    assert [tuple(p) for p in data["probes"]] == list(result.probes)
    assert data["candidates"][0]["exact"] is True
    text = ok(cli(*args)).stdout
    listed = ", ".join(f"{h}x{w}" for h, w in result.probes)
    assert f"probe sizes: {listed} (from 32x8, the smallest input accepted)" in text
    assert f"each checked at {len(result.probes)} input sizes" in " ".join(text.split())


def test_text_line_target_from_a_fresh_interpreter(tmp_path):
    out = tmp_path / "textline.py"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bbswap", "fit", TEXT_LINE, "--like", TEXT_LINE, "--like-kw",
         "width=4", "--channels", "24", "-o", str(out), "--json"],
        capture_output=True, text=True, timeout=600, check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["probes"][0] == [32, 8] and data["target"]["channels"] == 24
    module = import_plain(out)
    cls = getattr(module, data["written"]["class_name"])
    with torch.device("meta"):
        emitted = cls().eval()
    for h, w in [(32, 8), (33, 9), (64, 100), (95, 31)]:
        assert out_hw(emitted, 1, h, w) == text_line_hw(h, w), (h, w)
        assert cls.output_size(h, w) == text_line_hw(h, w), (h, w)


def test_a_source_that_cannot_match_is_told_so_not_that_the_target_fails_at_1x1():
    with pytest.raises(TargetError, match="no candidate reaches") as caught:
        fit(GRAY, like=TEXT_LINE)  # ceil(H/2) five times: never floor(H/16) - 1
    assert "misses at 32x8" in str(caught.value)  # the first probe is its smallest input


# -- the probe sizes: never below the smallest input, as many, odd ones kept ---------------------


def test_probes_unchanged_for_a_model_that_takes_any_input():
    assert from_smallest(PROBES) == PROBES


@given(
    minimum=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    multiple=st.tuples(st.sampled_from([1, 2, 4, 32]), st.sampled_from([1, 2, 4, 32])),
)
def test_probes_start_at_the_smallest_input(minimum, multiple):
    probes = from_smallest(PROBES, minimum, multiple)
    assert len(set(probes)) == len(probes) <= len(PROBES)
    for h, w in probes:
        assert h >= minimum[0] and w >= minimum[1]
        assert h % multiple[0] == 0 and w % multiple[1] == 0
    low = tuple(-(-m // k) * k for m, k in zip(minimum, multiple))
    assert probes[0] == low  # 1x1 becomes the smallest input
    kept = [p for p in PROBES if p[0] >= minimum[0] and p[1] >= minimum[1]]
    if multiple == (1, 1):
        assert set(kept) <= set(probes)
        if max(minimum) < 64:
            assert len(probes) == len(PROBES)


# -- mistakes: one line, exit status 2, nothing written ------------------------------------------

ERRORS = {
    "like-kw-without-like": (
        ["resnet18", "--channels", "64", "--stride", "16", "--like-kw", "width=4"],
        ["--like-kw gives the constructor arguments of the --like backbone; give --like too"],
    ),
    "like-kw-not-a-pair": (
        ["resnet18", "--like", TEXT_LINE, "--like-kw", "width"],
        ["malformed --like-kw 'width'", "key=value"],
    ),
    "like-kw-bad-value": (
        ["resnet18", "--like", TEXT_LINE, "--like-kw", "width=(4"],
        ["malformed --like-kw value for 'width'", "'(4'"],
    ),
    "like-kw-missing-file": (
        ["resnet18", "--like", CAN_SPEC, "--like-kw", "params=@nosuch.yaml"],
        ["--like-kw params: file not found: nosuch.yaml"],
    ),
    "like-kw-unknown-argument": (
        ["resnet18", "--like", TEXT_LINE, "--like-kw", "depth=4"],
        ["cannot build", "TextLineVGG", "depth"],
    ),
    "like-without-its-params": (
        ["resnet18", "--like", CAN_SPEC],
        ["cannot build", "DenseNet", "params"],
    ),
    "input-below-the-like-minimum": (
        ["resnet18", "--like", TEXT_LINE, "--input", "16x64"],
        [f"--like {TEXT_LINE}: the model's forward raised", "at input 1x1x16x64"],
    ),
    "stride-contradicts-like": (
        ["resnet18", "--like", TEXT_LINE, "--stride", "16"],
        ["--stride 16 contradicts --like", "(1/16x4)"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_mistakes_are_one_line_and_write_nothing(case, tmp_path):
    args, fragments = ERRORS[case]
    out, saved = tmp_path / "backbone.py", tmp_path / "winner.toml"
    assert_one_line_error(cli("fit", *args, "-o", out, "--save-recipe", saved), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_api_errors_name_the_parameters():
    with pytest.raises(InvalidArgument) as caught:
        fit("resnet18", channels=64, stride=16, like_kw={"width": 4})
    assert str(caught.value) == (
        "like_kw gives the constructor arguments of the like backbone; give like too"
    )
    with pytest.raises(ModelError, match="cannot build"):
        fit("resnet18", like=TEXT_LINE, like_kw={"depth": 4})
