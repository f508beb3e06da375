"""``fit --like`` a backbone that returns several outputs: the patched backbone returns
all of them, in the like-backbone's structure, each at its size at every probe.

- tests/fixtures/deeplab_like.py:Backbone (DeepLab's MobileNetV2 returning
  ``(x, low_level_feat)``, ``output_stride`` as its constructor argument) as the target
  of the zoo's MobileNetV2: the low-level map is tapped at ``features.3``; the emitted
  file is compared with the fixture in a fresh interpreter at odd sizes.
- ``width_mult=0.5`` gives the low-level map other channels: a 1x1 conv + BN projects it.
- A dict keeps its keys (tests/fixtures/multi_output_models.py:DictOutput).
- Mistakes are one line, exit 2, nothing written.
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
from cli_helpers import assert_one_line_error, cli, import_plain, ok
from recipe_helpers import one_thread

from bbswap.codegen.export import export
from bbswap.search.fit import fit, winner_recipe
from bbswap.surgery.outputs_plan import OutputRole

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
pytestmark = pytest.mark.usefixtures("frozen_progress_clock")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
DEEPLAB = f"{FIXTURES / 'deeplab_like.py'}:Backbone"
MULTI = FIXTURES / "multi_output_models.py"
ODD_SIZES = [(33, 97), (61, 203), (65, 127), (31, 45), (17, 9)]


@pytest.fixture(scope="module")
def deeplab_file(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("deeplab") / "dl.py"
    result = ok(
        cli("fit", "mobilenet_v2", "--like", DEEPLAB, "--like-kw", "output_stride=16",
            "--class-name", "Backbone", "-o", out, "--json")
    )  # fmt: skip
    return out, json.loads(result.stdout)


def test_plan_taps_the_low_level_map(deeplab_file):
    _, data = deeplab_file
    plan = data["like_outputs"]
    assert plan["returns"] == "tuple"
    high, low = plan["outputs"]
    assert (high["role"], high["channels"], high["stride"]) == ("features", 320, [16, 16])
    assert (low["role"], low["channels"], low["stride"]) == ("tap", 24, [4, 4])
    assert low["tap"] == "features.3" and low["projected_from"] is None
    assert [i for i, _ in low["sizes"]] == data["probes"]


def test_emitted_file_gives_both_outputs_at_every_probe(deeplab_file):
    out, data = deeplab_file
    cls = import_plain(out).Backbone
    with torch.device("meta"):
        model = cls().eval()
        high, low = data["like_outputs"]["outputs"]
        sizes = [(size, a, b) for (size, a), (_, b) in zip(high["sizes"], low["sizes"])]
    for size, want_high, want_low in sizes:
        with torch.device("meta"), torch.no_grad():
            x, lo = model(torch.empty(1, 3, *size))
        assert list(x.shape[-2:]) == want_high and list(lo.shape[-2:]) == want_low, size
        assert (x.shape[1], lo.shape[1]) == (320, 24)
        assert list(cls.output_size(*size)) == want_high


def test_emitted_file_matches_the_fixture_in_a_fresh_interpreter(deeplab_file, tmp_path):
    out, _ = deeplab_file
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys, torch
        def load(path, name):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        ours = load({str(out)!r}, "dl").Backbone().eval()
        theirs = load({str(FIXTURES / "deeplab_like.py")!r}, "host").Backbone(16).eval()
        assert "bbswap" not in sys.modules
        rows = []
        for h, w in {ODD_SIZES!r}:
            x = torch.randn(1, 3, h, w)
            with torch.no_grad():
                a, b = ours(x), theirs(x)
            rows.append([type(a).__name__, [list(t.shape) for t in a], [list(t.shape) for t in b]])
        print(json.dumps(rows))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for size, (kind, ours, theirs) in zip(ODD_SIZES, json.loads(proc.stdout)):
        assert kind == "tuple"
        assert ours == theirs, size


def test_other_channels_are_projected(tmp_path):
    found = fit("mobilenet_v2", like=DEEPLAB, like_kw={"output_stride": 16, "width_mult": 0.5})
    plan = found.outputs
    assert plan is not None
    low = plan.outputs[1]
    assert (low.role, low.tap, low.tap_channels, low.channels) == (
        OutputRole.TAP,
        "features.3",
        24,
        16,
    )
    assert low.projected
    out = tmp_path / "half.py"
    exported = export("mobilenet_v2", winner_recipe(found), out, outputs=plan)
    assert exported.report.ok
    assert {c.name for c in exported.report.checks} >= {"all outputs", "like"}
    text = out.read_text()
    assert "self.proj_1 = nn.Sequential(" in text and "proj_1 = self.proj_1(features_3)" in text
    model = import_plain(out).MobileNetV2C160S16().eval()
    with torch.no_grad():
        x, low_level = model(torch.randn(1, 3, 45, 61))
    assert tuple(x.shape) == (1, 160, 3, 4) and tuple(low_level.shape) == (1, 16, 12, 16)


def test_a_dict_keeps_its_keys(tmp_path):
    found = fit("resnet18", like=f"{MULTI}:DictOutput")
    plan = found.outputs
    assert plan is not None and plan.returns == "dict"
    assert [o.key for o in plan.outputs] == ["low", "mid", "out"]
    assert [o.tap for o in plan.outputs] == ["layer1", "layer2", ""]
    out = tmp_path / "d.py"
    export("resnet18", winner_recipe(found), out, outputs=plan)
    model = import_plain(out).ResNet18C32S16().eval()
    with torch.no_grad():
        got = model(torch.randn(1, 3, 37, 53))
    assert list(got) == ["low", "mid", "out"]
    assert [tuple(t.shape) for t in got.values()] == [(1, 8, 10, 14), (1, 16, 5, 7), (1, 32, 3, 4)]


ERRORS = {
    "an-output-that-is-no-map": (
        ["resnet18", "--like", f"{MULTI}:ListOutput"],
        ["its output 3 is 1x32", "no feature map"],
    ),
    "no-module-at-that-size": (
        ["resnet18", "--like", f"{FIXTURES / 'deeplab_like.py'}:Lopsided"],
        ["no exact candidate on resnet18 has a module", "output 1", "(1/1x4,"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_mistakes_are_one_line_and_write_nothing(case, tmp_path):
    args, fragments = ERRORS[case]
    assert_one_line_error(cli("fit", *args, "-o", tmp_path / "b.py"), *fragments)
    assert list(tmp_path.iterdir()) == []
