"""Weights users already have: ``--pretrained`` (the builder's own weights, from
torchvision's and timm's caches), timm's ``local-dir:`` and ``hf-hub:`` names, and
``--weights FOLDER``. The emitted docstring says where the weights came from.

Nothing is downloaded: each test writes the files into the caches itself, where the
builders look for them. torchvision reads ``$TORCH_HOME/hub/checkpoints/<file name of the
weights' URL>`` when it is there: its ``check_hash=True`` is checked by torch only on a
download, so a file of other values loads. timm reads resnet18's weights from the Hugging
Face cache (``$HF_HOME/hub/models--timm--resnet18.a1_in1k/snapshots/REV/``), which
``HF_HUB_OFFLINE=1`` makes it use without asking the hub; a ``local-dir:`` folder holds
config.json and the weights.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import huggingface_hub.constants
import pytest
import timm
import torch
import torchvision
from cli_helpers import assert_one_line_error, cli, import_plain, ok
from recipe_helpers import one_thread, randomize_batchnorm, recipe
from safetensors.torch import save_file

from bbswap.backbones.registry import resolve
from bbswap.codegen.export import export
from bbswap.errors import InvalidArgument, ModelError

ROOT = Path(__file__).resolve().parent.parent
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a snapshot of the hub cache
TRUNCATE = recipe({"op": "truncate", "after": "layer2"}, name="small")
FIT = ["--channels", "256", "--stride", "16", "--input", "1x3x64x64"]

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def _state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``model``'s state_dict with random weights and BatchNorm statistics of ``seed``."""
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    randomize_batchnorm(model, seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def torchvision_cache(torch_home: Path) -> Path:
    """resnet18's DEFAULT weights file where torchvision looks for it, of other values."""
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    file = torch_home / "hub" / "checkpoints" / Path(urlparse(url).path).name
    file.parent.mkdir(parents=True)
    torch.save(_state(torchvision.models.resnet18(), seed=11), file)
    return file


def hub_cache(hf_home: Path, repo: str, files: dict[str, Any]) -> Path:
    """A snapshot of ``repo`` in the Hugging Face cache under ``hf_home``: tensors are
    written as safetensors, anything else as JSON. Returns the snapshot folder."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_file(content, str(snapshot / name))
        else:
            (snapshot / name).write_text(json.dumps(content))
    return snapshot


def timm_state(seed: int, **kwargs: Any) -> dict[str, torch.Tensor]:
    return _state(timm.create_model("resnet18", pretrained=False, **kwargs), seed)


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty caches for torch and Hugging Face, offline; in this process and in the
    environment of the processes a test starts."""
    torch_home, hf_home = tmp_path / "torch", tmp_path / "hf"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the hub client read the environment when it was imported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return {"torch": torch_home, "hf": hf_home}


def run_bbswap(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m bbswap ARGS`` in a fresh interpreter, with this test's environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "bbswap", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def emitted_model(path: Path, class_name: str) -> torch.nn.Module:
    """The written class, loaded by its own loader from the weights file beside it."""
    return getattr(import_plain(path), class_name).from_checkpoint().eval()


def assert_carried(model: torch.nn.Module, builder: torch.nn.Module, new: set[str]) -> None:
    """Every tensor of the emitted model but the ``new`` modules' equals the builder's."""
    own, theirs = model.state_dict(), builder.state_dict()
    assert {k.split(".")[0] for k in own if k not in theirs} == new
    for key, value in own.items():
        if key in theirs:
            assert torch.equal(value, theirs[key]), key


def test_fit_tv_pretrained_carries_torchvisions_cached_weights(caches, tmp_path):
    cached = torchvision_cache(caches["torch"])
    assert cached.name == "resnet18-f37072fd.pth"  # the name in the weights' URL
    proc = run_bbswap("fit", "tv:resnet18", "--pretrained", *FIT, "-o", "f.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    builder = torchvision.models.resnet18(weights="DEFAULT").eval()  # reads the same file
    model = emitted_model(tmp_path / "f.py", "ResNet18C256S16")
    assert_carried(model, builder, new={"proj", "proj_bn"})
    # the layers the winner leaves as they are compute what the builder's do
    x = torch.randn(1, 3, 67, 61)
    with torch.no_grad():
        ours, theirs = x, x
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            ours, theirs = getattr(model, name)(ours), getattr(builder, name)(theirs)
    assert torch.equal(ours, theirs)
    doc = (tmp_path / "f.py").read_text(encoding="utf-8")
    assert "Weights from:    torchvision ResNet18_Weights.IMAGENET1K_V1\n" in doc
    assert f"\n                 {cached}\n" in doc
    assert f"(SHA-256 {_sha256(cached)})" in doc


def test_fit_timm_pretrained_carries_timms_cached_weights(caches, tmp_path):
    state = timm_state(seed=12)
    snapshot = hub_cache(caches["hf"], "timm/resnet18.a1_in1k", {"model.safetensors": state})
    proc = run_bbswap("fit", "timm:resnet18", "--pretrained", *FIT, "-o", "f.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    weights = snapshot / "model.safetensors"
    builder = timm.create_model(
        "resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(weights)}
    ).eval()
    assert torch.equal(builder.conv1.weight, state["conv1.weight"])
    model = emitted_model(tmp_path / "f.py", "ResNet18C256S16")
    assert_carried(model, builder, new={"proj", "proj_bn"})
    doc = (tmp_path / "f.py").read_text(encoding="utf-8")
    assert "timm resnet18.a1_in1k from hf-hub:timm/resnet18.a1_in1k" in doc
    assert str(weights) in doc and _sha256(weights) in doc


def _local_dir(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """A folder as timm's local-dir: reads it: config.json and pytorch_model.bin."""
    folder.mkdir()
    state = timm_state(seed, num_classes=10)
    torch.save(state, folder / "pytorch_model.bin")
    config = {
        "architecture": "resnet18",
        "model_args": {"num_classes": 10},
        "pretrained_cfg": {"num_classes": 10, "input_size": [3, 224, 224]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return state


def _strings_but_docstrings(tree: ast.Module) -> list[str]:
    """The string constants of a module that are not the docstring of it or a definition."""
    owners = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef))]
    docs = {id(o.body[0].value) for o in owners if o.body and isinstance(o.body[0], ast.Expr)}
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_timm_local_dir_is_the_architecture_its_config_names_with_the_folders_weights(
    caches, tmp_path
):
    folder = tmp_path / "my model"
    state = _local_dir(folder, seed=13)
    spec = f"timm:local-dir:{folder}"
    backbone = resolve(spec)
    assert (backbone.name, backbone.kwargs, backbone.pretrained) == (
        "resnet18",
        {"num_classes": 10},
        False,
    )
    exported = export(spec, TRUNCATE, tmp_path / "out.py", input_shape="1x3x32x32", pretrained=True)
    source = exported.weights_source
    assert source is not None and source.path == folder / "pytorch_model.bin"
    assert source.sha256 == _sha256(folder / "pytorch_model.bin")
    model = emitted_model(exported.path, exported.emitted.class_name)
    assert {k.split(".")[0] for k in model.state_dict()} == {"conv1", "bn1", "layer1", "layer2"}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    text = exported.path.read_text(encoding="utf-8")
    # the file builds the architecture itself; the folder is only named in the docstring
    assert 'timm.create_model("resnet18", pretrained=False, in_chans=3, num_classes=10)' in text
    assert f"timm resnet18 from local-dir:{folder}" in text
    tree = ast.parse(text)
    assert str(folder / "pytorch_model.bin") in (ast.get_docstring(tree) or "")
    assert all(str(folder) not in s for s in _strings_but_docstrings(tree))


def test_timm_hf_hub_reads_config_and_weights_from_the_hub_cache(caches):
    state = timm_state(seed=14)
    repo = "someone/resnet18-finetuned"
    config = {"architecture": "resnet18", "pretrained_cfg": {"num_classes": 1000}}
    snapshot = hub_cache(caches["hf"], repo, {"config.json": config, "model.safetensors": state})
    backbone = resolve(f"timm:hf-hub:{repo}", pretrained=True)
    assert (backbone.name, backbone.pretrained) == ("resnet18", True)
    model, source = backbone.build_pretrained()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert source.origin == f"timm resnet18 from hf-hub:{repo}"
    assert source.path == snapshot / "model.safetensors"
    assert source.sha256 == _sha256(snapshot / "model.safetensors")


def test_timm_hf_hub_not_in_the_cache_offline_is_one_line(caches):
    result = cli("fit", "timm:hf-hub:someone/not-cached", *FIT)
    assert_one_line_error(result, "timm:hf-hub:someone/not-cached", "config.json")


def test_pretrained_weights_missing_offline_are_a_model_error(caches):
    with pytest.raises(ModelError, match="cannot load the pretrained weights of timm:resnet18"):
        resolve("timm:resnet18", pretrained=True).build_pretrained()


@pytest.mark.parametrize("spec", ["tv:resnet18", "timm:resnet18"])
def test_kw_pretrained_true_is_pretrained(spec):
    backbone = resolve(spec, {"pretrained": True})
    assert backbone.pretrained and "pretrained" not in backbone.kwargs
    assert not resolve(spec, {"pretrained": False}).pretrained
    # the builder no longer gets the argument twice
    ok(cli("fit", spec, "--kw", "pretrained=True", *FIT))


def test_kw_pretrained_not_a_bool_and_kw_weights_point_to_pretrained():
    line = assert_one_line_error(cli("fit", "timm:resnet18", "--kw", "pretrained=maybe", *FIT))
    assert "pretrained='maybe'" in line and "--pretrained" in line
    line = assert_one_line_error(cli("fit", "tv:resnet18", "--kw", "weights=DEFAULT", *FIT))
    assert "--pretrained" in line and "--weights" in line


def test_pretrained_is_refused_for_a_zoo_model_before_any_work(tmp_path):
    out = tmp_path / "x.py"
    line = assert_one_line_error(cli("fit", "resnet18", "--pretrained", *FIT, "-o", out))
    assert "--pretrained is for tv: and timm: specs" in line and "--weights" in line
    assert not out.exists()
    with pytest.raises(InvalidArgument, match="pretrained is for tv: and timm: specs"):
        resolve("resnet18", pretrained=True)


def test_pretrained_goes_with_o_and_not_with_weights(tmp_path):
    assert_one_line_error(cli("fit", "tv:resnet18", "--pretrained", *FIT), "--pretrained", "-o")
    ckpt = tmp_path / "w.pth"
    torch.save({}, ckpt)
    args = ("--pretrained", "--weights", ckpt, "-o", tmp_path / "x.py")
    assert_one_line_error(cli("fit", "tv:resnet18", *FIT, *args), "--pretrained", "--weights")


def test_weights_folder_with_one_checkpoint_loads_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a checkpoint")
    torch.manual_seed(15)
    state = resolve("resnet18").build().state_dict()
    torch.save(state, folder / "best.pt")
    exported = export(
        "resnet18", TRUNCATE, tmp_path / "out.py", input_shape="1x3x32x32", weights=folder
    )
    assert exported.weights_source is not None
    assert exported.weights_source.path == folder / "best.pt"
    text = exported.path.read_text(encoding="utf-8")
    assert "Weights from:    checkpoint\n" in text and str(folder / "best.pt") in text
    assert _sha256(folder / "best.pt") in text
    assert all(torch.equal(v, state[k]) for k, v in exported.result.model.state_dict().items())


@pytest.mark.parametrize(
    ("files", "fragments"),
    [
        ((), ["is a folder without a checkpoint", "it holds nothing"]),
        (("readme.md",), ["without a checkpoint", "it holds only readme.md"]),
        (("a.pth", "b.safetensors"), ["folder with 2 checkpoints (a.pth, b.safetensors)"]),
    ],
)
def test_weights_folder_without_exactly_one_checkpoint_is_one_line(tmp_path, files, fragments):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes(b"")
    out = tmp_path / "x.py"
    result = cli("fit", "resnet18", *FIT, "--weights", folder, "-o", out)
    assert_one_line_error(result, f"--weights {folder}", *fragments)
    assert not out.exists()
