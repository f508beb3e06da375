"""Mask-carrying encoders (BTTR/CoMER style): ``forward(img, img_mask)`` returning
``(features, mask)``, with tests/fixtures/hmer_mask_encoder.py.

- The tracer gives such a forward an all-ones N x H x W mask and follows the mask's
  slices apart from the feature maps; a chain of slices is one slice (hypothesis).
- ``fit resnet18 --like FILE:MaskEncoder --in-chans 1 --dropin --class-name MaskEncoder``
  writes a file whose ``MaskEncoder()(x, mask)`` returns features of the encoder's size and
  a mask equal to the encoder's own (torch.equal) for partly padded masks at odd sizes,
  checked in a fresh interpreter against the fixture itself.
- ``inspect`` traces it and shows both outputs; every mistake is one line, exit 2, nothing
  written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, cli, ok
from hypothesis import given, settings
from hypothesis import strategies as st
from recipe_helpers import one_thread

from bbswap.search.fit import fit
from bbswap.surgery.outputs_plan import OutputRole
from bbswap.tracing.mask import MaskRule, slice_step
from bbswap.tracing.tracer import trace

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
pytestmark = pytest.mark.usefixtures("frozen_progress_clock")

ROOT = Path(__file__).resolve().parent.parent
FILE = ROOT / "tests" / "fixtures" / "hmer_mask_encoder.py"
ENCODER = f"{FILE}:MaskEncoder"
ODD_SIZES = [(33, 97), (61, 203), (117, 293), (31, 45), (17, 16)]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "enc.py"
    result = cli(
        "fit", "resnet18", "--like", ENCODER, "--in-chans", 1, "--dropin",
        "--class-name", "MaskEncoder", "-o", out,
    )  # fmt: skip
    ok(result)
    assert "returns a tuple of 2 as" in result.stdout
    return out


def test_the_tracer_finds_the_mask_rule_of_each_encoder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hmer_mask_encoder_t", FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("MaskEncoder", "StepwiseMaskEncoder"):
        t, _ = trace(getattr(module, name), (1, 1, 65, 127))
        assert t.mask is not None and t.mask.key == 1, name
        assert t.mask.rule == MaskRule((0, 0), (16, 16)), name
        assert t.mask.input.mask in ("img_mask", "x_mask")
        # the mask's slices are no stages nor reduction points of the features
        assert all("getitem" not in s.path for s in t.stages)
        assert t.output_key == 0 and t.output_shape == (1, 60, 5, 8)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 4), st.integers(0, 3), st.integers(1, 4)),
        min_size=1,
        max_size=4,
    ),
    st.integers(1, 40),
    st.integers(1, 40),
)
def test_a_chain_of_slices_is_one_slice(chain, h, w):
    mask = torch.rand(2, h, w) > 0.5
    rule, real = MaskRule(), mask
    for a, s, b, t in chain:
        found = slice_step((slice(None), slice(a, None, s), slice(b, None, t)), 3)
        assert found is not None
        rule = rule.then(*found)
        real = real[:, a::s, b::t]
    assert torch.equal(rule.apply(mask), real)
    assert rule.size(h, w) == tuple(real.shape[-2:])


def test_other_indices_are_no_slice_rule():
    assert slice_step((slice(None), None), 3) is None
    assert slice_step((slice(None), slice(0, 8, 2)), 3) is None  # a stop: not size-free
    assert slice_step((0, slice(None)), 3) is None
    assert slice_step((Ellipsis, slice(1, None, 2), slice(None, None, 4)), 3) == ((1, 0), (2, 4))


def test_fit_plans_features_and_mask():
    found = fit("resnet18", like=ENCODER, in_chans=1)
    plan = found.outputs
    assert plan is not None and plan.returns == "tuple"
    assert [o.role for o in plan.outputs] == [OutputRole.FEATURES, OutputRole.MASK]
    assert plan.mask_input is not None and plan.mask_input.mask == "img_mask"
    # the mask is at the features' size at every probe
    assert plan.outputs[0].sizes == plan.outputs[1].sizes
    assert [s for s, _ in plan.outputs[0].sizes] == list(found.probes)
    assert found.target.channels == 60


def test_dropin_file_gives_the_encoders_features_and_mask(written, tmp_path):
    """A fresh interpreter: the written file against the fixture itself, on partly
    padded masks at odd sizes."""
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys, torch
        def load(path, name):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        enc = load({str(written)!r}, "enc")
        host = load({str(FILE)!r}, "host")
        assert "bbswap" not in sys.modules
        ours, theirs = enc.MaskEncoder(684, growth_rate=24).eval(), host.MaskEncoder().eval()
        rows = []
        for h, w in {ODD_SIZES!r}:
            torch.manual_seed(h * w)
            x = torch.randn(2, 1, h, w)
            mask = torch.zeros(2, h, w, dtype=torch.bool)
            mask[0, h - h // 3 :, :] = True
            mask[1, :, w - w // 4 :] = True
            with torch.no_grad():
                f, m = ours(x, mask)
                g, n = theirs(x, mask)
            rows.append([list(f.shape), list(g.shape), torch.equal(m, n), str(m.dtype),
                         list(enc.MaskEncoder.output_size(h, w))])
        print(json.dumps(rows))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for (h, w), (ours, theirs, same, dtype, size) in zip(ODD_SIZES, json.loads(proc.stdout)):
        assert ours == theirs, (h, w)
        assert same and dtype == "torch.bool", (h, w)
        assert tuple(ours[-2:]) == tuple(size) == (-(-h // 16), -(-w // 16))


def test_the_written_forward_has_the_encoders_signature(written):
    text = written.read_text()
    assert "img: torch.Tensor, img_mask: torch.Tensor" in text
    assert "mask = img_mask[:, 0::16, 0::16]" in text
    assert "1: the mask, img_mask[:, 0::16, 0::16]" in text


def test_inspect_traces_with_an_all_ones_mask_and_shows_both_outputs():
    result = ok(cli("inspect", ENCODER, "--input", "1x1x65x127"))
    text = result.stdout
    assert "outputs: the forward returns a tuple of 2" in text
    assert "mask: output 1 is img_mask[:, 0::16, 0::16]" in text
    assert "all-ones 1x65x127 mask" in text
    data = json.loads(ok(cli("inspect", ENCODER, "--input", "1x1x65x127", "--json")).stdout)
    assert data["mask"] == {
        "image": "img",
        "input": "img_mask",
        "key": 1,
        "rule": {"start": [0, 0], "step": [16, 16]},
        "made_by": None,
    }
    assert [o["output"] for o in data["outputs"]] == [[1, 60, 5, 8], [1, 5, 8]]


def test_fit_json_states_the_outputs():
    data = json.loads(
        ok(cli("fit", "resnet18", "--like", ENCODER, "--in-chans", 1, "--json")).stdout
    )
    plan = data["like_outputs"]
    assert plan["mask_input"] == {"image": "img", "mask": "img_mask"}
    assert [o["role"] for o in plan["outputs"]] == ["features", "mask"]
    assert plan["outputs"][1]["mask_rule"] == {"start": [0, 0], "step": [16, 16]}


ERRORS = {
    "mask-not-a-slice": (
        "ResizedMaskEncoder",
        ["made by the index [:, None]", "img_mask[:, a::s, b::t]"],
    ),
    "mask-not-at-the-features-size": (
        "OffMaskEncoder",
        ["the mask it returns is 1x2 but its features are 1x1", "at the features' size"],
    ),
    "second-input-not-image-sized": (
        "LengthsEncoder",
        ["all-ones 1x224x224 mask as 'widths'", "RuntimeError"],
    ),
    "second-input-unused": (
        "UnusedSecondInput",
        ["takes a second input 'img_mask'", "returns nothing made from it"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_mistakes_are_one_line_and_write_nothing(case, tmp_path):
    name, fragments = ERRORS[case]
    out = tmp_path / "enc.py"
    result = cli("fit", "resnet18", "--like", f"{FILE}:{name}", "--in-chans", 1, "-o", out)
    assert_one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_cannot_hold_the_mask(tmp_path):
    saved, out = tmp_path / "r.toml", tmp_path / "enc.py"
    result = cli(
        "fit", "resnet18", "--like", ENCODER, "--in-chans", 1, "--save-recipe", saved, "-o", out
    )
    assert_one_line_error(result, "--save-recipe: a recipe gives one output", "img_mask[:, 0::16")
    assert list(tmp_path.iterdir()) == []
