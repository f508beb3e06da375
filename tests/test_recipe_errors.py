"""Malformed recipes: one line on stderr naming the file (and the op and field), exit 2.

Also: recipes survive a write/read round trip, and ``bbswap ops`` lists every op.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from bbswap.cli.app import app
from bbswap.errors import RecipeError
from bbswap.recipes.registry import OPS
from bbswap.recipes.schema import Recipe
from bbswap.recipes.strides import Stride
from bbswap.recipes.toml_io import load_recipe, recipe_from_dict, recipe_to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "recipes").glob("*.toml"))
ALL_OPS = {
    "in_channels",
    "patch",
    "stride",
    "exact",
    "truncate",
    "project",
    "pool",
    "dropout",
    "tap",
}


def toml(*ops: str) -> str:
    return 'name = "bad"\n' + "".join(f"\n[[ops]]\n{op.strip()}\n" for op in ops)


# (id, file text, what the one line must contain besides the file name)
BAD = [
    ("broken-toml", 'name = "bad"\n[[ops]\nop = "stride"\n', ["not valid TOML", "line 2"]),
    ("ops-not-tables", 'name = "bad"\nops = "stride"\n', ["at least one [[ops]] table"]),
    (
        "unknown-op",
        toml('op = "shrink"'),
        [
            "ops[0].op: unknown op 'shrink'",
            "(valid: dropout, exact, in_channels, patch, pool, project, stride, tap, truncate)",
        ],
    ),
    (
        "no-patch-embedding",
        toml('op = "patch"\nsize = 16'),
        ["ops[0] (patch): the model has no patch embedding (a conv whose kernel is its stride"],
    ),
    (
        "patch-at-without-patch-embedding",
        toml('op = "patch"\nsize = 16\nat = "conv1"'),
        ["ops[0] (patch).at: the model has no patch embedding"],
    ),
    (
        "patch-too-large",
        toml('op = "patch"\nsize = 256'),
        ["ops[0] (patch).size: 256 must be below 256"],
    ),
    (
        "unknown-stage",
        toml('op = "truncate"\nafter = "layer4"', 'op = "stride"\nat = "layer9"\nstride = 1'),
        [
            "ops[1] (stride).at: 'layer9' is not a reduction point or a stage",
            "valid: layer2, layer3, layer4, conv1, maxpool, layer2.0.conv2,",
        ],
    ),
    (
        "unknown-truncate-stage",
        toml('op = "truncate"\nafter = "layer9"'),
        ["ops[0] (truncate).after: 'layer9'", "conv1, bn1, relu, maxpool, layer1, layer2"],
    ),
    (
        "wrong-type",
        toml('op = "stride"\nat = "layer2"\nstride = "two"'),
        ["ops[0] (stride).stride: expected an integer or a pair [h, w] of integers, got 'two'"],
    ),
    (
        "wrong-type-bool",
        toml('op = "in_channels"\nchannels = true'),
        ["ops[0] (in_channels).channels: expected an integer, got True"],
    ),
    (
        "wrong-pair-length",
        toml('op = "pool"\nstride = [2, 2, 2]'),
        ["ops[0] (pool).stride: expected an integer or a pair [h, w]"],
    ),
    (
        "channels-zero",
        toml('op = "truncate"\nafter = "layer4"', 'op = "project"\nchannels = 0'),
        ["ops[1] (project).channels: 0 is below the minimum 1"],
    ),
    (
        "channels-negative",
        toml('op = "in_channels"\nchannels = -3'),
        ["ops[0] (in_channels).channels: -3 is below the minimum 1"],
    ),
    (
        "stride-zero",
        toml('op = "stride"\nat = "layer2"\nstride = [0, 1]'),
        ["ops[0] (stride).stride: 0 is below the minimum 1"],
    ),
    (
        "pool-stride-negative",
        toml('op = "truncate"\nafter = "layer4"', 'op = "pool"\nstride = -1'),
        ["ops[1] (pool).stride: -1 is below the minimum 1"],
    ),
    (
        "dropout-p-one",
        toml('op = "dropout"\nblock = "Bottleneck"\np = 1.0'),
        ["ops[0] (dropout).p: 1.0 must be below 1"],
    ),
    (
        "bad-choice",
        toml('op = "stride"\nat = "layer2"\nstride = 1\nmode = "squash"'),
        ["ops[0] (stride).mode: 'squash' is not one of stride, dilate"],
    ),
    (
        "missing-field",
        toml('op = "stride"\nstride = 1'),
        ["ops[0] (stride).at: missing (a reduction point id or a stage path)"],
    ),
    (
        "missing-op",
        toml('at = "layer2"'),
        [
            "ops[0].op: missing (one of dropout, exact, in_channels, patch, pool, project, "
            "stride, tap, truncate)"
        ],
    ),
    (
        "missing-name",
        '[[ops]]\nop = "truncate"\nafter = "layer4"\n',
        ["missing field 'name'"],
    ),
    (
        "unknown-field",
        toml('op = "stride"\nat = "layer2"\nstride = 1\nfoo = 3'),
        ["ops[0] (stride): unknown field 'foo' (valid: at, mode, stride)"],
    ),
    (
        "unknown-top-level-field",
        'name = "bad"\nbackbnoe = "resnet50"\n[[ops]]\nop = "truncate"\nafter = "layer4"\n',
        ["unknown top-level field 'backbnoe'"],
    ),
    (
        "dropout-no-such-class",
        toml('op = "truncate"\nafter = "layer4"', 'op = "dropout"\nblock = "Nope"'),
        ["ops[1] (dropout).block: no module of class 'Nope'", "Bottleneck"],
    ),
    (
        "select-out-of-range",
        toml('op = "in_channels"\nchannels = 2\nstrategy = "select"\nselect = [0, 3]'),
        ["ops[0] (in_channels).select: index 3 is out of range for 3 source channels"],
    ),
    (
        "select-wrong-length",
        toml('op = "in_channels"\nchannels = 2\nstrategy = "select"\nselect = [0]'),
        ["ops[0] (in_channels).select: strategy 'select' needs a list of 2"],
    ),
    (
        "project-on-classifier",
        toml('op = "project"\nchannels = 684'),
        ["ops[0] (project): project needs a spatial output", "add a truncate op"],
    ),
]


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(("text", "needles"), [case[1:] for case in BAD], ids=[c[0] for c in BAD])
def test_malformed_recipe_is_one_line_on_stderr_and_exit_2(tmp_path, text, needles):
    path = tmp_path / "BAD.toml"
    path.write_text(text, encoding="utf-8")
    result = run("apply", "resnet50", str(path))
    line = assert_one_line_error(result, *needles)
    assert f"bbswap: error: {path}: " in line  # the file, first


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nowhere" / "BAD.toml"
    result = run("apply", "resnet50", str(path))
    assert_one_line_error(result, f"recipe file not found: {path}")


def test_recipe_that_is_a_directory(tmp_path):
    result = run("apply", "resnet50", str(tmp_path))
    assert_one_line_error(result, f"recipe file not found: {tmp_path}")


def test_the_console_script_prints_the_same_line(tmp_path):
    # the real process: stdout empty, one line on stderr, status 2, no traceback
    path = tmp_path / "BAD.toml"
    path.write_text(toml('op = "stride"\nat = "layer9"\nstride = 1'), encoding="utf-8")
    bbswap = Path(sys.executable).with_name("bbswap")
    env = {k: v for k, v in os.environ.items() if k != "BBSWAP_DEBUG"}
    proc = subprocess.run(
        [str(bbswap), "apply", "resnet50", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"bbswap: error: {path}: ops[0] (stride).at: 'layer9'")


def test_load_recipe_raises_recipe_error(tmp_path):
    path = tmp_path / "BAD.toml"
    path.write_text(toml('op = "stride"\nat = "layer2"\nstride = "two"'), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"BAD\.toml: ops\[0\] \(stride\)\.stride: expected"):
        load_recipe(path)


# -- round trip -------------------------------------------------------------------------------

EVERY_FIELD = {
    "name": "every-field",
    "description": 'all ops, all kinds of field: "quoted" and unicode ×',
    "backbone": "resnet50",
    "input": "2x1x97x131",
    "ops": [
        {"op": "in_channels", "channels": 2, "strategy": "select", "select": [2, 0]},
        {"op": "in_channels", "channels": 1, "at": "conv1"},
        {"op": "stride", "at": "layer3", "stride": [2, 1], "mode": "dilate"},
        {"op": "stride", "at": "layer2.0.conv2", "stride": 1},
        {"op": "truncate", "after": "layer4"},
        {"op": "dropout", "block": "Bottleneck", "p": 0.25},
        {"op": "project", "channels": 684, "activation": "relu6"},
        {"op": "pool", "stride": [1, 2], "kind": "max", "kernel": 3, "ceil_mode": False},
    ],
}


def same_recipe(a: Recipe, b: Recipe) -> None:
    assert (a.name, a.description, a.backbone, a.input) == (
        b.name,
        b.description,
        b.backbone,
        b.input,
    )
    assert a.ops == b.ops


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_round_trips(tmp_path, path):
    recipe = load_recipe(path)
    text = recipe_to_toml(recipe, header="written back\nby the round-trip test")
    assert text.startswith("# written back\n# by the round-trip test\n")
    out = tmp_path / path.name
    out.write_text(text, encoding="utf-8")
    again = load_recipe(out)
    same_recipe(again, recipe)
    assert again.source == str(out)
    assert recipe_to_toml(again, header="written back\nby the round-trip test") == text


def test_every_field_round_trips(tmp_path):
    recipe = recipe_from_dict(EVERY_FIELD, "every.toml")
    # defaults are filled in and pairs normalised on reading
    assert recipe.ops[2] == Stride(at="layer3", stride=(2, 1), mode="dilate")
    assert recipe.ops[7]["kernel"] == (3, 3)
    text = recipe_to_toml(recipe)
    data = tomllib.loads(text)
    assert data["name"] == "every-field"
    assert data["description"] == EVERY_FIELD["description"]
    assert [op["op"] for op in data["ops"]] == [op["op"] for op in EVERY_FIELD["ops"]]
    assert data["ops"][2]["stride"] == [2, 1]
    assert data["ops"][5]["p"] == 0.25
    assert data["ops"][7]["ceil_mode"] is False
    out = tmp_path / "every.toml"
    out.write_text(text, encoding="utf-8")
    same_recipe(load_recipe(out), recipe)


def test_a_written_recipe_is_applied_like_the_original(tmp_path):
    from bbswap.cli.json_out import apply_dict
    from bbswap.surgery.apply import apply_recipe

    path = ROOT / "recipes" / "ocr-resnet34-h32-w4.toml"
    recipe = load_recipe(path)
    out = tmp_path / "copy.toml"
    out.write_text(recipe_to_toml(recipe), encoding="utf-8")
    a = apply_dict(apply_recipe("resnet34", recipe))
    b = apply_dict(apply_recipe("resnet34", load_recipe(out)))
    assert a == b


# -- bbswap ops ---------------------------------------------------------------------------------


def test_ops_lists_all_nine_ops_and_their_fields():
    assert set(OPS) == ALL_OPS
    result = run("ops")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    listed = [line.split(":")[0] for line in result.stdout.splitlines() if line[:1].isalpha()]
    assert sorted(listed) == sorted(ALL_OPS)
    for name, op in OPS.items():
        assert f"{name}: {op.summary}" in result.stdout
        for field in op.fields:
            assert f"{field.name} ({field.kind}" in result.stdout, (name, field.name)
    assert "strategy (str, optional; one of sum, mean, repeat, select, random)" in result.stdout
    assert "mode (str, default 'stride'; one of stride, dilate)" in result.stdout
