"""The loader an emitted file gets with carried weights: ``from_checkpoint`` reads the
weights file beside the module, checks its SHA-256 against the one recorded when it was
written, and refuses any other file, naming both hashes.

The written files are imported in a fresh interpreter whose working directory is elsewhere,
without PYTHONPATH and with ``import bbswap`` blocked: the file needs only torch (and
safetensors for a ``.safetensors`` file).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import import_plain
from recipe_helpers import kwargs_for, real_model, recipe

from bbswap.codegen.export import Exported, check_loader, export
from bbswap.codegen.module_file import emit
from bbswap.surgery.apply import apply_recipe

RUFF = Path(sys.executable).parent / "ruff"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
TRUNCATE = recipe({"op": "truncate", "after": "layer2"}, name="small-resnet18")

# run in a fresh interpreter: import the file by path with bbswap blocked, call the loader,
# and report the loaded tensors' hash per key (or the error it raised)
_PROBE = textwrap.dedent(
    """
    import hashlib, importlib.abc, importlib.util, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bbswap" or name.startswith("bbswap."):
                raise ImportError("bbswap is blocked")

    sys.meta_path.insert(0, Block())
    file, class_name, path = sys.argv[1], sys.argv[2], sys.argv[3] or None
    spec = importlib.util.spec_from_file_location("written", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["written"] = module
    spec.loader.exec_module(module)
    try:
        model = getattr(module, class_name).from_checkpoint(path)
    except Exception as error:
        print(json.dumps({"error": type(error).__name__, "message": str(error)}))
    else:
        state = {
            k: hashlib.sha256(v.numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()
        }
        print(json.dumps({"state": state, "bbswap": "bbswap" in sys.modules}))
    """
)


def _probe(exported: Exported, cwd: Path, path: Path | None = None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [str(exported.path), exported.emitted.class_name, str(path or "")]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _tensor_hashes(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(v.cpu().numpy().tobytes()).hexdigest() for k, v in state.items()}


def _export(folder: Path, *, safetensors: bool = False, name: str = "backbone.py") -> Exported:
    ckpt = folder / "source.pth"
    torch.save(real_model("resnet18", seed=5).state_dict(), ckpt)
    return export(
        "resnet18",
        TRUNCATE,
        folder / name,
        input_shape="1x3x32x32",
        kwargs=kwargs_for("resnet18"),
        weights=str(ckpt),
        safetensors=safetensors,
    )


def _other_weights(exported: Exported, safetensors: bool) -> bytes:
    """A valid state_dict with the patched model's keys and other values, as file bytes."""
    state = {
        k: torch.randn_like(v.float()).to(v.dtype)
        for k, v in exported.result.model.state_dict().items()
    }
    if safetensors:
        from safetensors.torch import save

        return bytes(save(state))
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _constants(source: str) -> dict[str, Any]:
    """The module-level constants of an emitted file, read from its syntax tree."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


@pytest.fixture(scope="module")
def exported_pth(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return _export(tmp_path_factory.mktemp("pth"))


def test_the_file_records_the_name_and_hash_of_the_bytes_written(exported_pth):
    assert exported_pth.weights_path is not None
    written = exported_pth.weights_path.read_bytes()
    constants = _constants(exported_pth.emitted.source)
    assert constants["WEIGHTS_FILE"] == "backbone.pth"
    assert constants["WEIGHTS_SHA256"] == hashlib.sha256(written).hexdigest()
    assert exported_pth.path.read_text(encoding="utf-8") == exported_pth.emitted.source
    checks = {c.name: c for c in exported_pth.report.checks}
    assert checks["loader"].ok, checks["loader"]
    assert "refuses other bytes" in checks["loader"].detail


def test_the_loader_gives_the_carried_weights_in_a_fresh_process(exported_pth, tmp_path):
    got = _probe(exported_pth, cwd=tmp_path)
    assert got.get("error") is None, got
    assert got["bbswap"] is False
    assert got["state"] == _tensor_hashes(exported_pth.result.model.state_dict())


def test_the_loader_refuses_other_weights_naming_both_hashes(exported_pth, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    py = Path(shutil.copy(exported_pth.path, folder))
    other = _other_weights(exported_pth, safetensors=False)
    (folder / "backbone.pth").write_bytes(other)  # a valid state_dict, of other values
    moved = dataclasses.replace(exported_pth, path=py, weights_path=folder / "backbone.pth")
    got = _probe(moved, cwd=tmp_path)
    assert got.get("error") == "WeightsMismatchError", got
    recorded = hashlib.sha256(exported_pth.weights_path.read_bytes()).hexdigest()
    assert hashlib.sha256(other).hexdigest() in got["message"]
    assert recorded in got["message"]
    assert "backbone.pth" in got["message"]
    # a path given explicitly is checked the same way
    elsewhere = tmp_path / "elsewhere.pth"
    elsewhere.write_bytes(other)
    assert _probe(exported_pth, cwd=tmp_path, path=elsewhere)["error"] == "WeightsMismatchError"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_the_loader_takes_an_explicit_path_and_a_device(exported_pth, tmp_path):
    copy = Path(shutil.copy(exported_pth.weights_path, tmp_path / "renamed.pth"))
    cls = getattr(import_plain(exported_pth.path), exported_pth.emitted.class_name)
    model = cls.from_checkpoint(copy, device="cpu")
    assert isinstance(model, cls)
    want = exported_pth.result.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert list(model.state_dict()) == list(want)
    scripted = torch.jit.script(model.eval())  # the classmethod does not hinder TorchScript
    x = torch.randn(1, 3, 33, 35)
    assert torch.equal(scripted(x), model(x))


def test_safetensors_weights_are_checked_too(tmp_path):
    pytest.importorskip(
        "safetensors", reason="safetensors is not installed (pip install 'bbswap[safetensors]')"
    )
    exported = _export(tmp_path, safetensors=True)
    assert exported.weights_path == tmp_path / "backbone.safetensors"
    constants = _constants(exported.emitted.source)
    assert constants["WEIGHTS_FILE"] == "backbone.safetensors"
    assert (
        constants["WEIGHTS_SHA256"]
        == hashlib.sha256(exported.weights_path.read_bytes()).hexdigest()
    )
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    got = _probe(exported, cwd=elsewhere)
    assert got.get("error") is None, got
    assert got["state"] == _tensor_hashes(exported.result.model.state_dict())
    other = _other_weights(exported, safetensors=True)
    exported.weights_path.write_bytes(other)
    got = _probe(exported, cwd=elsewhere)
    assert got["error"] == "WeightsMismatchError", got
    assert hashlib.sha256(other).hexdigest() in got["message"]
    assert constants["WEIGHTS_SHA256"] in got["message"]


def test_a_hostile_file_name_enters_the_file_as_data(tmp_path):
    name = 'we\'ird "name"\\ x.py'
    exported = _export(tmp_path, name=name)
    assert exported.report.ok, exported.report.checks
    assert _constants(exported.emitted.source)["WEIGHTS_FILE"] == 'we\'ird "name"\\ x.pth'
    got = _probe(exported, cwd=tmp_path)
    assert got.get("error") is None, got


def test_without_weights_the_file_has_no_loader():
    source = emit(apply_recipe("resnet18", TRUNCATE, "1x3x32x32")).source
    for absent in ("WEIGHTS_FILE", "WEIGHTS_SHA256", "from_checkpoint", "import hashlib"):
        assert absent not in source


def test_the_file_with_a_loader_passes_the_projects_ruff(exported_pth):
    if not RUFF.is_file():
        pytest.skip(f"ruff is not installed next to {sys.executable}")
    path = str(exported_pth.path)
    for args in (
        ("check", "--config", str(PYPROJECT), "--no-cache", path),
        ("format", "--config", str(PYPROJECT), "--no-cache", "--check", path),
        ("check", "--isolated", "--no-cache", path),
    ):
        proc = subprocess.run([str(RUFF), *args], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(1, 1)


class _AcceptsAnything:
    """A loader that skips the hash: it loads whatever file it is given."""

    @classmethod
    def from_checkpoint(cls, path: Any = None) -> torch.nn.Module:
        return _linear()


class _LoadsOtherWeights:
    """A loader that refuses nothing but gives weights of its own."""

    @classmethod
    def from_checkpoint(cls, path: Any = None) -> torch.nn.Module:
        return (
            torch.nn.Linear(1, 1)
            .requires_grad_(False)
            .apply(lambda m: torch.nn.init.constant_(m.weight, 3.0))
        )


def test_the_loader_check_fails_a_loader_that_accepts_any_file(tmp_path):
    file = tmp_path / "w.pth"
    file.write_bytes(b"")
    check = check_loader(_AcceptsAnything, file, _linear().state_dict())
    assert not check.ok
    assert check.detail == "from_checkpoint() loads a file of other bytes"
    check = check_loader(_LoadsOtherWeights, file, _linear().state_dict())
    assert not check.ok
    assert check.detail == "from_checkpoint() gives other tensors than the carried weights"
