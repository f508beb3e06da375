"""Every command's ``--json`` document validates against its schema in ``docs/schemas``.

The schemas are strict (every key of a fixed shape required, no undocumented key), so a
key added to :mod:`bbswap.cli.json_out` without its schema fails here. The documents come
from real runs: the command line in-process, and once in a subprocess.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import cli, ok
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from bbswap.cli import json_out
from bbswap.recipes.registry import OPS, describe_ops

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "docs" / "schemas"
RECIPES = ROOT / "recipes"
COMMANDS = ("inspect", "apply", "fit", "verify", "matrix", "list", "ops")


def _schema(command: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{command}.schema.json").read_text(encoding="utf-8"))


def validate(command: str, document: dict[str, Any]) -> dict[str, Any]:
    """Validate ``document`` against ``command``'s schema; every error is listed."""
    validator = Draft202012Validator(_schema(command))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == [], errors
    return document


def _json_of(*args: Any, status: int = 0) -> dict[str, Any]:
    result = cli(*args, "--json")
    if status == 0:
        ok(result)
    else:
        assert result.exit_code == status, (result.exit_code, result.stderr)
    return json.loads(result.stdout)


# -- the schema files themselves ---------------------------------------------------------------


def test_one_schema_file_per_command_and_the_ids_json_out_writes() -> None:
    files = sorted(p.name for p in SCHEMAS.glob("*.schema.json"))
    assert files == sorted(f"{c}.schema.json" for c in COMMANDS)
    source = Path(json_out.__file__).read_text(encoding="utf-8")
    written = set(re.findall(r'"schema": "(bbswap\.[a-z]+/1)"', source))
    assert written == {f"bbswap.{c}/1" for c in COMMANDS}
    for command in COMMANDS:
        schema = _schema(command)
        Draft202012Validator.check_schema(schema)
        assert schema["title"] == schema["properties"]["schema"]["const"] == f"bbswap.{command}/1"


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_object_is_closed_and_its_keys_required(command: str) -> None:
    for node in _objects(_schema(command)):
        # closed, or (a recipe op's table) every further key of a typed value
        assert node.get("additionalProperties") is not True, node
        assert "additionalProperties" in node, node
        assert set(node["required"]) <= set(node["properties"]), node
        assert node["required"], node


# -- each command's output, validated -----------------------------------------------------------


def test_inspect_json_validates() -> None:
    spatial = validate(
        "inspect", _json_of("inspect", "densenet100", "--input", "1x1x128x316", "--sizes", "33x97")
    )
    assert spatial["features"] is None and spatial["sizes"][0]["ok"] is True
    classifier = validate("inspect", _json_of("inspect", "resnet18", "--depth", "2"))
    assert classifier["features"]["stage"].startswith("layer4")


def test_inspect_cross_check_json_validates() -> None:
    data = validate("inspect", _json_of("inspect", "resnet18", "--cross-check"))
    counters = [c["counter"] for c in data["cross_check"]["counts"]]
    assert counters == ["bbswap", "thop", "torchinfo"]
    assert all(c["macs"] for c in data["cross_check"]["counts"])


def test_apply_json_validates() -> None:
    recipe = RECIPES / "seed-hmer-resnet50.toml"
    data = validate("apply", _json_of("apply", "resnet50", recipe, "--input", "1x1x128x316"))
    assert any(s["after"] is None for s in data["stages"])  # the truncated head
    assert any(s["before"] is None for s in data["stages"])  # the projection
    assert "written" not in data


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """``fit -o`` with a checkpoint and ``--save-recipe``: the JSON and the folder."""
    from bbswap.backbones.registry import resolve

    folder = tmp_path_factory.mktemp("fit")
    torch.save(resolve("resnet18").build().state_dict(), folder / "ckpt.pth")
    data = _json_of(
        "fit", "resnet18", "--channels", 128, "--stride", 16, "--top", 2,
        "--weights", folder / "ckpt.pth", "-o", folder / "b.py",
        "--save-recipe", folder / "r.toml",
    )  # fmt: skip
    return folder, data


def test_fit_json_with_written_files_validates(emitted: tuple[Path, dict[str, Any]]) -> None:
    folder, data = emitted
    validate("fit", data)
    assert data["written"]["weights"] == str(folder / "b.pth")
    assert data["recipe"] == str(folder / "r.toml")


def test_fit_json_of_refused_and_inexact_candidates_validates() -> None:
    refused = _json_of(
        "fit", "convnext_tiny", "--channels", 256, "--stride", 16, "--allow-truncate",
        "--rounding", "floor", "--top", 30,
    )  # fmt: skip
    validate("fit", refused)
    # every candidate reaches floor now that exact pads per input size; the notes remain
    failed = [c for c in refused["candidates"] if c["error"]]
    assert all("macs" not in c for c in failed)
    assert any(c["note"] for c in refused["candidates"])
    pytest.importorskip("torchvision")
    inexact = validate("fit", _json_of("fit", "tv:alexnet", "--channels", 64, "--stride", 16))
    assert inexact["candidates"][0]["exact"] is True


def test_apply_json_with_written_files_validates(
    emitted: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, _ = emitted
    data = _json_of("apply", "resnet18", folder / "r.toml", "-o", tmp_path / "a.py")
    validate("apply", data)
    assert data["written"]["weights"] is None and data["written"]["checks"]


def test_verify_json_validates_passed_and_failed(emitted: tuple[Path, dict[str, Any]]) -> None:
    folder, data = emitted
    target = f"{folder / 'b.py'}:{data['written']['class_name']}"
    passed = validate("verify", _json_of("verify", target, "--channels", 128, "--stride", 16))
    assert passed["ok"] is True
    result = cli("verify", target, "--channels", 3, "--json")
    assert result.exit_code != 0
    failed = validate("verify", json.loads(result.stdout))
    assert failed["ok"] is False and not all(c["ok"] for c in failed["checks"])


def test_matrix_json_validates() -> None:
    pytest.importorskip("timm")
    data = _json_of("matrix", "resnet18", "timm:mixer_s16_224", "--stride", "3,16", "--no-verify")
    validate("matrix", data)
    rows = {r["spec"]: r for r in data["rows"]}
    mixer = rows["timm:mixer_s16_224"]
    assert mixer["refused"] is True and mixer["cells"] == []
    assert [c["ok"] for c in rows["resnet18"]["cells"]] == [False, True]
    verified = validate("matrix", _json_of("matrix", "resnet18", "--stride", "32", "--verify"))
    assert verified["rows"][0]["emit"] == "bundled"
    assert verified["rows"][0]["cells"][0]["verified"] is True


def test_list_json_validates() -> None:
    validate("list", _json_of("list"))
    pytest.importorskip("torchvision")
    assert validate("list", _json_of("list", "tv:resnet*"))["backbones"]


def test_ops_json_validates() -> None:
    # ``bbswap ops --json`` on the command line, and its builder as the library calls it
    data = validate("ops", _json_of("ops"))
    assert [op["op"] for op in data["ops"]] == list(OPS)
    assert validate("ops", json_out.ops_dict(describe_ops())) == data
    stride = next(op for op in data["ops"] if op["op"] == "stride")
    mode = next(f for f in stride["fields"] if f["name"] == "mode")
    assert mode["choices"] == ["stride", "dilate"] and mode["default"] == "stride"


def test_json_in_a_subprocess_validates() -> None:
    for command, args in (("inspect", ["resnet18"]), ("ops", [])):
        done = subprocess.run(
            [sys.executable, "-m", "bbswap", command, *args, "--json"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        validate(command, json.loads(done.stdout))


# -- the schemas refuse what they do not describe ----------------------------------------------


def test_a_schema_refuses_an_unknown_or_missing_key() -> None:
    data = _json_of("inspect", "resnet18")
    for change in (
        lambda d: d.update(extra=1),
        lambda d: d.pop("macs"),
        lambda d: d["stages"][0].update(colour="red"),
        lambda d: d["reductions"][0].update(kind="method"),
        lambda d: d.update(schema="bbswap.inspect/2"),
    ):
        wrong = copy.deepcopy(data)
        change(wrong)
        with pytest.raises(ValidationError):
            Draft202012Validator(_schema("inspect")).validate(wrong)
