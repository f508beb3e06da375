"""``bbswap inspect`` and ``bbswap list`` through the command line.

Most tests use typer's CliRunner; in this typer version ``Result.stdout`` and
``Result.stderr`` are captured separately (``Result.output`` is both), so no
``mix_stderr`` argument is needed. A few tests run the installed console script.

The ``--json`` schema keys checked (``bbswap.inspect/1``): ``schema``, ``backbone``,
``input``, ``output``, ``device``, ``note``, ``downsample``, ``receptive_field``,
``params``, ``macs``, ``activation_bytes``, ``features`` (null or stage/output/
downsample), ``size_rule`` (h, w), ``stages[]`` (path, type, output, channels,
downsample, receptive_field, params, macs, activation_bytes, functional),
``reductions[]`` (id, owner, kind, op, stage, kernel, stride, padding, dilation,
rounding, input_hw, output_hw) and ``sizes[]`` (input, predicted, traced, ok).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from bbswap.cli.app import app
from bbswap.errors import BBSwapError
from bbswap.zoo import ZOO

TESTS = Path(__file__).parent
CAN = TESTS / "fixtures" / "can_model"
BAD = TESTS / "fixtures" / "bad_models.py"
SCRIPT = Path(sys.executable).parent / "bbswap"

# Deterministic rendering: a fixed width, and no colour forced by the environment.
ENV: dict[str, str | None] = {
    "COLUMNS": "160",
    "LINES": "50",
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "TTY_INTERACTIVE": None,
    "BBSWAP_DEBUG": None,
}

DENSENET_REDUCTIONS = ["conv1", "max_pool2d()", "trans1.avg_pool2d()", "trans2.avg_pool2d()"]


def run(*args: str, env: dict[str, str | None] | None = None):
    return CliRunner().invoke(app, list(args), env={**ENV, **(env or {})})


def ok(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert result.stderr == ""
    return result.stdout


def normalised(text: str) -> str:
    """Rich pads table lines to the console width; golden files keep no trailing blanks."""
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def figures(report: dict) -> dict:
    """What must not depend on how a backbone was named or where its code lives (a copy)."""
    return copy.deepcopy(
        {
            key: report[key]
            for key in (
                "input",
                "output",
                "device",
                "downsample",
                "receptive_field",
                "params",
                "macs",
                "activation_bytes",
                "features",
                "size_rule",
                "stages",
                "reductions",
                "sizes",
            )
        }
    )


# ---------------------------------------------------------------------------- inspect


@pytest.fixture(scope="module")
def densenet_json() -> dict:
    return json.loads(ok("inspect", "densenet100", "--input", "1x1x128x316", "--json"))


def test_inspect_densenet100_text():
    out = ok("inspect", "densenet100", "--input", "1x1x128x316")
    for needle in ["1x684x8x20", "2,979,288", "2,871,601,152", "H -> ceil(H/16)", "meta device"]:
        assert needle in out
    for op_id in DENSENET_REDUCTIONS:
        assert re.search(rf"^\s+{re.escape(op_id)}\s", out, re.M), op_id
    assert "Traceback" not in out


def test_inspect_densenet100_json(densenet_json):
    d = densenet_json
    assert d["schema"] == "bbswap.inspect/1"
    assert d["backbone"] == "densenet100"
    assert d["input"] == [1, 1, 128, 316]
    assert d["output"] == [1, 684, 8, 20]
    assert d["device"] == "meta" and d["note"] == ""
    assert d["downsample"] == [16, 16]
    assert d["receptive_field"] == [917, 917]
    assert d["params"] == 2_979_288
    assert abs(d["macs"] - 2_871_601_152) <= 0.01 * 2_871_601_152
    assert d["activation_bytes"] > 0
    assert d["features"] is None
    assert d["size_rule"] == {"h": "H -> ceil(H/16)", "w": "W -> ceil(W/16)"}
    assert d["sizes"] == []
    stage_keys = {"path", "type", "output", "channels", "downsample", "receptive_field",
                  "params", "macs", "activation_bytes", "functional", "grid"}  # fmt: skip
    assert all(set(s) == stage_keys for s in d["stages"])
    assert [s["path"] for s in d["stages"]] == [
        "conv1", "max_pool2d()", "dense1", "trans1", "dense2", "trans2", "dense3"
    ]  # fmt: skip
    assert sum(s["params"] for s in d["stages"]) == d["params"]
    assert sum(s["macs"] for s in d["stages"]) == d["macs"]
    assert d["stages"][-1]["output"] == d["output"] and d["stages"][-1]["channels"] == 684
    assert [r["id"] for r in d["reductions"]] == DENSENET_REDUCTIONS
    by_id = {r["id"]: r for r in d["reductions"]}
    assert by_id["conv1"] == {
        "id": "conv1", "owner": "conv1", "kind": "module", "op": "conv", "stage": "conv1",
        "kernel": [7, 7], "stride": [2, 2], "padding": [3, 3], "dilation": [1, 1],
        "rounding": "floor", "input_hw": [128, 316], "output_hw": [64, 158],
    }  # fmt: skip
    assert by_id["max_pool2d()"]["kind"] == "functional"
    assert by_id["max_pool2d()"]["rounding"] == "ceil"
    assert by_id["trans1.avg_pool2d()"]["owner"] == "trans1"
    assert by_id["trans2.avg_pool2d()"]["output_hw"] == [8, 20]


def test_inspect_text_and_json_agree(densenet_json):
    out = ok("inspect", "densenet100", "--input", "1x1x128x316")
    assert f"params {densenet_json['params']:,}" in out
    assert f"MACs {densenet_json['macs']:,}" in out


def test_inspect_sizes():
    out = ok("inspect", "densenet100", "--input", "1x1x128x316", "--sizes", "33x97,117x293")
    assert re.search(r"^\s+33x97\s+3x7\s+3x7\s+ok\s*$", out, re.M)
    assert re.search(r"^\s+117x293\s+8x19\s+8x19\s+ok\s*$", out, re.M)
    assert "MISMATCH" not in out
    d = json.loads(
        ok("inspect", "densenet100", "--input", "128x316", "--sizes", "33x97, 117x293", "--json")
    )
    assert d["input"] == [1, 1, 128, 316]  # HxW takes the model's channels
    assert d["sizes"] == [
        {"input": [33, 97], "predicted": [3, 7], "traced": [3, 7], "ok": True},
        {"input": [117, 293], "predicted": [8, 19], "traced": [8, 19], "ok": True},
    ]


def test_inspect_sizes_of_a_classifier_check_its_features():
    d = json.loads(ok("inspect", "resnet18", "--input", "1x3x64x64", "--sizes", "45x77", "--json"))
    assert d["features"] == {"stage": "layer4", "output": [1, 512, 2, 2], "downsample": [32, 32]}
    assert d["sizes"] == [{"input": [45, 77], "predicted": [2, 3], "traced": [2, 3], "ok": True}]


def test_inspect_depth_2():
    out = ok("inspect", "densenet100", "--input", "1x1x128x316", "--depth", "2")
    for row in ["dense1.0", "dense1.15", "trans1.conv1", "trans1.avg_pool2d()", "dense3.15"]:
        assert re.search(rf"^\s+{re.escape(row)}\s", out, re.M), row
    assert not re.search(r"^\s+dense1\s", out, re.M)  # expanded into its blocks
    d = json.loads(ok("inspect", "densenet100", "--input", "1x1x128x316", "--depth", "2", "--json"))
    paths = [s["path"] for s in d["stages"]]
    assert (
        paths.index("trans1.conv1") < paths.index("trans1.avg_pool2d()") < paths.index("dense2.0")
    )
    assert sum(s["macs"] for s in d["stages"]) == d["macs"]


def test_inspect_cpu_fallback_prints_a_note():
    out = ok("inspect", f"{BAD}:NeedsItem", "--input", "1x3x32x32")
    assert "traced on real CPU tensors" in out
    assert re.search(r"^note: .*meta device", out, re.M)


def test_inspect_can_fixture_equals_densenet100(densenet_json):
    """The CAN-style user file, built from its YAML config, traces to densenet100's figures."""
    spec = f"{CAN / 'densenet.py'}:DenseNet"
    d = json.loads(
        ok("inspect", spec, "--kw", f"params=@{CAN / 'config.yaml'}",
           "--input", "1x1x128x316", "--json")
    )  # fmt: skip
    assert d["backbone"] == spec
    # the user's classes have their own names (Transition, not DenseTransition)
    types = {s["path"]: s["type"] for s in d["stages"]}
    assert types["trans1"] == "Transition" and types["dense1"] == "Sequential"
    mine, zoo = figures(d), figures(densenet_json)
    for stage in mine["stages"] + zoo["stages"]:
        stage.pop("type")
    assert mine == zoo
    out = ok("inspect", spec, "--kw", f"params=@{CAN / 'config.yaml'}", "--input", "128x316")
    assert "1x684x8x20" in out and "2,979,288" in out and "2,871,601,152" in out


# ----------------------------------------------------------------------------- goldens


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("inspect_densenet100.txt", ["inspect", "densenet100", "--input", "1x1x128x316"]),
        (
            "inspect_resnet18_depth2.txt",
            ["inspect", "resnet18", "--input", "1x3x64x64", "--depth", "2"],
        ),
    ],
)
def test_inspect_golden(golden, name, args):
    first = ok(*args)
    assert ok(*args) == first  # deterministic
    golden(name, normalised(first))


# ------------------------------------------------------------------------------ errors

TORCHVISION = importlib.util.find_spec("torchvision") is not None
TIMM = importlib.util.find_spec("timm") is not None

ERRORS = [
    # (id, args, fragments the message must contain)
    ("unknown-backbone", ["inspect", "resnet5"],
     ["unknown backbone 'resnet5'", "did you mean", "resnet50", "`bbswap list`"]),
    ("unknown-backbone-far", ["inspect", "zzzz"], ["unknown backbone 'zzzz'", "bbswap list"]),
    ("input-3-dims", ["inspect", "densenet100", "--input", "1x1x128"], ["--input", "NxCxHxW"]),
    ("input-words", ["inspect", "densenet100", "--input", "axb"], ["--input", "integers"]),
    ("input-zero", ["inspect", "densenet100", "--input", "1x1x0x5"], ["--input", "positive"]),
    ("input-negative", ["inspect", "densenet100", "--input=1x1x-3x4"], ["--input", "positive"]),
    ("input-empty", ["inspect", "densenet100", "--input", ""], ["--input"]),
    ("input-float", ["inspect", "densenet100", "--input", "1x1x12.5x4"], ["--input"]),
    ("input-5-dims", ["inspect", "densenet100", "--input", "1x1x1x8x8"], ["--input"]),
    ("input-1-dim", ["inspect", "densenet100", "--input", "224"], ["--input"]),
    ("kw-no-equals", ["inspect", "densenet100", "--kw", "growth_rate"],
     ["malformed --kw 'growth_rate'", "key=value"]),
    ("kw-bad-key", ["inspect", "densenet100", "--kw", "1a=3"], ["malformed --kw '1a=3'"]),
    ("kw-bad-value", ["inspect", "densenet100", "--kw", "a=[1,"], ["--kw", "'a'"]),
    ("kw-missing-file", ["inspect", "densenet100", "--kw", "params=@missing.yaml"],
     ["--kw params", "file not found", "missing.yaml"]),
    ("kw-bare-missing-file", ["inspect", "densenet100", "--kw", "@missing.yaml"], ["--kw"]),
    ("kw-unknown-argument", ["inspect", "densenet100", "--kw", "bogus=3"],
     ["cannot build densenet100", "bogus"]),
    ("missing-file", ["inspect", "/no/such/dir/model.py:Net"],
     ["backbone file not found", "/no/such/dir/model.py"]),
    ("missing-class", ["inspect", f"{CAN / 'densenet.py'}:Nope"],
     ["'Nope' is not in", "Bottleneck, DenseNet, SingleLayer, Transition"]),
    ("near-class", ["inspect", f"{CAN / 'densenet.py'}:Densenet"], ["did you mean DenseNet"]),
    ("spec-without-name", ["inspect", f"{BAD}:"], ["malformed backbone spec"]),
    ("spec-without-file", ["inspect", ":Net"], ["malformed backbone spec"]),
    ("unknown-module", ["inspect", "no_such_module_for_bbswap:Net"],
     ["cannot import no_such_module_for_bbswap", "no module named 'no_such_module_for_bbswap'"]),
    ("module-missing-class", ["inspect", "bbswap.zoo.resnet:Nope"],
     ["'Nope' is not in bbswap.zoo.resnet", "ResNet"]),
    ("constructor-raises", ["inspect", f"{BAD}:ConstructorRaises", "--input", "1x3x32x32"],
     ["constructor raised RuntimeError", "constructor exploded on purpose"]),
    ("forward-raises", ["inspect", f"{BAD}:ForwardRaises", "--input", "1x3x32x32"],
     ["forward raised ValueError", "in stage 'body'", "1x3x32x32", "exploding stage reached"]),
    ("returns-nothing", ["inspect", f"{BAD}:ReturnsNothing", "--input", "1x3x32x32"],
     ["returned no tensor"]),
    ("not-a-module", ["inspect", f"{BAD}:not_a_module", "--input", "1x3x32x32"],
     ["returned str, not a torch.nn.Module"]),
    ("sizes-incomplete", ["inspect", "densenet100", "--sizes", "3x"], ["--sizes", "'3x'"]),
    ("sizes-empty", ["inspect", "densenet100", "--sizes", ","], ["--sizes is empty"]),
    ("sizes-3-dims", ["inspect", "densenet100", "--sizes", "33x97,3x4x5"],
     ["--sizes entry '3x4x5'", "HxW"]),
    ("sizes-zero", ["inspect", "densenet100", "--sizes", "0x5"], ["--sizes", "positive"]),
    ("depth-0", ["inspect", "densenet100", "--depth", "0"], ["--depth must be at least 1"]),
    ("depth-negative", ["inspect", "densenet100", "--depth=-2"], ["--depth"]),
]  # fmt: skip

if not TORCHVISION:
    ERRORS += [
        ("tv-missing", ["inspect", "tv:resnet18"], ["torchvision", "pip install"]),
        ("tv-list-missing", ["list", "tv:*"], ["torchvision", "pip install"]),
    ]
if not TIMM:
    ERRORS += [("timm-missing", ["inspect", "timm:resnet18"], ["timm", "pip install"])]


@pytest.mark.parametrize(("args", "fragments"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_is_one_line_on_stderr(args, fragments):
    assert_one_line_error(run(*args), *fragments)


@pytest.mark.parametrize("args", [e[1] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_debug_lets_the_error_propagate(args):
    result = run(*args, "--debug")
    assert isinstance(result.exception, BBSwapError), result.exception
    assert result.exit_code == 1
    assert "bbswap: error:" not in result.stderr


def test_debug_before_the_command_and_by_environment():
    for args, env in [
        (["--debug", "inspect", "resnet5"], {}),
        (["inspect", "resnet5"], {"BBSWAP_DEBUG": "1"}),
    ]:
        result = run(*args, env=env)
        assert isinstance(result.exception, BBSwapError)
    # the flag does not stick to the next invocation
    assert_one_line_error(run("inspect", "resnet5"), "unknown backbone")


@pytest.mark.skipif(not TORCHVISION, reason="torchvision is not installed")
def test_tv_spec_with_torchvision():
    d = json.loads(ok("inspect", "tv:resnet18", "--input", "1x3x64x64", "--json"))
    assert d["params"] == 11_689_512


def test_kw_file_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("densenet: [unclosed\n")
    text = tmp_path / "config.txt"
    text.write_text("a: 1\n")
    assert_one_line_error(
        run("inspect", "densenet100", "--kw", f"params=@{broken}"), "cannot parse", "broken.yaml"
    )
    assert_one_line_error(
        run("inspect", "densenet100", "--kw", f"params=@{text}"), "config.txt", ".yaml"
    )


def test_file_that_raises_on_import(tmp_path):
    model = tmp_path / "raises_on_import.py"
    model.write_text("raise ImportError('a dependency is missing')\n")
    assert_one_line_error(
        run("inspect", f"{model}:Net"), "raises_on_import.py", "a dependency is missing"
    )


def test_hw_input_with_a_constructor_that_raises():
    """``HxW`` makes bbswap build the model once to read its input channels; a failing
    constructor must still give the one-line error (as with NxCxHxW)."""
    result = run("inspect", f"{BAD}:ConstructorRaises", "--input", "32x32")
    assert_one_line_error(result, "constructor exploded on purpose")


def test_hw_input_with_a_constructor_that_needs_data():
    """The meta build for ``HxW`` must fall back to CPU as the trace itself does."""
    out = ok("inspect", f"{BAD}:ConstructorNeedsItem", "--input", "32x32")
    assert "1x8x16x16" in out


def test_sizes_too_small_for_the_model():
    """A --sizes entry the model cannot take is a user error, not a traceback."""
    result = run("inspect", "vgg16_bn", "--input", "1x3x32x32", "--sizes", "16x16")
    assert_one_line_error(result, "16x16")


def test_scalar_stage_renders():
    """A 0-dim tensor made in the model's own forward (y.mean()) is a stage row."""
    out = ok("inspect", f"{BAD}:ScalarInForward", "--input", "1x3x16x16")
    assert "1x8x14x14" in out
    json.loads(ok("inspect", f"{BAD}:ScalarInForward", "--input", "1x3x16x16", "--json"))


# -------------------------------------------------------------------------------- list


def listed(out: str) -> list[str]:
    return [name for name in ZOO if re.search(rf"^\s+{re.escape(name)}\s", out, re.M)]


def test_list():
    out = ok("list")
    assert listed(out) == list(ZOO)
    assert "DenseNet-B of the CAN math recognizer" in out


def test_list_pattern():
    resnets = [name for name in ZOO if name.startswith("resnet")]
    assert resnets == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert listed(ok("list", "resnet*")) == resnets
    assert listed(ok("list", "nothing-matches-*")) == []


def test_list_json():
    d = json.loads(ok("list", "--json"))
    assert d["schema"] == "bbswap.list/1"
    assert [b["spec"] for b in d["backbones"]] == list(ZOO)
    assert all(set(b) == {"spec", "family", "in_chans", "description"} for b in d["backbones"])
    assert {b["spec"]: b["in_chans"] for b in d["backbones"]}["densenet100"] == 1
    d = json.loads(ok("list", "resnet*", "--json"))
    assert [b["spec"] for b in d["backbones"]] == [n for n in ZOO if n.startswith("resnet")]
    assert {b["family"] for b in d["backbones"]} == {"resnet"}


# ------------------------------------------------------------------ the console script


def test_console_script_inspect_json(densenet_json):
    assert SCRIPT.is_file(), SCRIPT
    proc = subprocess.run(
        [str(SCRIPT), "inspect", "densenet100", "--input", "1x1x128x316", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout) == densenet_json


def test_console_script_error_and_debug_traceback():
    proc = subprocess.run(
        [str(SCRIPT), "inspect", "resnet5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.startswith("bbswap: error: unknown backbone") and proc.stderr.count("\n") == 1
    )
    proc = subprocess.run(
        [str(SCRIPT), "inspect", "resnet5", "--debug"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "BackboneNotFound: unknown backbone 'resnet5'" in proc.stderr


def test_python_m_bbswap_help():
    proc = subprocess.run(
        [sys.executable, "-m", "bbswap", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**{k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}, "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "inspect" in proc.stdout and "list" in proc.stdout
    assert "Backbone surgery for PyTorch" in proc.stdout


# ------------------------------------------------------------------ the golden fixture


def test_golden_fixture_compares_writes_and_explains(tmp_path):
    from conftest import check_golden

    fail = pytest.fail.Exception
    with pytest.raises(fail, match=r"missing; run `pytest --update-goldens`"):
        check_golden("sub/new.txt", "a\n", update=False, root=tmp_path)
    check_golden("sub/new.txt", "a\nb\n", update=True, root=tmp_path)
    assert (tmp_path / "sub" / "new.txt").read_bytes() == b"a\nb\n"
    check_golden("sub/new.txt", "a\nb\n", update=False, root=tmp_path)
    with pytest.raises(fail) as info:
        check_golden("sub/new.txt", "a\nc\n", update=False, root=tmp_path)
    message = str(info.value)
    assert "--update-goldens" in message and "-b\n" in message and "+c\n" in message
    with pytest.raises(fail, match="differs"):  # a difference in the final newline only
        check_golden("sub/new.txt", "a\nb", update=False, root=tmp_path)
    check_golden("sub/new.txt", "a\nc\n", update=True, root=tmp_path)
    assert (tmp_path / "sub" / "new.txt").read_text() == "a\nc\n"


def test_a_bad_choice_is_refused_by_the_option_parser_in_one_line():
    line = assert_one_line_error(run("fit", "resnet18", "--mode", "squash"), "--mode 'squash'")
    assert line.endswith("is not one of dilate, stride")
    assert_one_line_error(run("inspect", "resnet18", "--no-such-option"), "--no-such-option")


def test_choices_are_listed_in_help():
    text = ok("fit", "--help")
    for choices in ("[macs|depth|rf]", "[dilate|stride]", "[ceil|floor|any]"):
        assert choices in text
