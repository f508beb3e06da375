"""The emitter, ``export`` and ``bbswap verify``: standalone files that compute the patch.

- Golden files (tests/goldens/emit/*.py.txt, written with ``--update-goldens``) pin the
  emitted source of six recipes on five zoo models; the same sources are checked for
  determinism, readability and ruff-cleanliness. They are emitted on the meta device.
- Round trips export every zoo model with every recipe op kind (real CPU weights,
  small inputs): ``export`` itself imports the file without bbswap and compares it with
  the in-memory patched model; the tests re-import it with plain importlib too.
- A CAN-style user file, a carried checkpoint, the drop-in host, TorchScript and
  torch.export, ``bbswap verify``, the write rules and the user errors.

CPU forwards here are small; the module runs torch on one intra-op thread, which on a
busy 2-core machine is several times faster than two threads fighting for the cores.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from cli_helpers import assert_one_line_error
from recipe_helpers import kwargs_for, randomize_batchnorm, recipe
from seed_resnet50 import SEED_TO_PATCHED, seed_resnet50
from typer.testing import CliRunner

import bbswap.verify.checks
from bbswap.backbones.registry import resolve
from bbswap.cli.app import app
from bbswap.codegen.export import export
from bbswap.codegen.module_file import Emitted, emit
from bbswap.codegen.size_code import closed_form
from bbswap.errors import InvalidArgument, SurgeryError, VerificationError
from bbswap.recipes.schema import Recipe
from bbswap.recipes.toml_io import load_recipe
from bbswap.surgery.apply import apply_recipe
from bbswap.tracing.sizes import SizeStep, chain_size, min_size
from bbswap.zoo import ZOO

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
SEED_RECIPE = RECIPES / "seed-hmer-resnet50.toml"
CAN = ROOT / "tests" / "fixtures" / "can_model"
RUFF = Path(sys.executable).parent / "ruff"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


_serial = itertools.count()


def import_plain(path: Path) -> ModuleType:
    """Import a written file with importlib under a fresh name (as a user would)."""
    name = f"emitted_{path.stem}_{next(_serial)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # TorchScript looks classes up by module
    spec.loader.exec_module(module)
    return module


def run(model: torch.nn.Module, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    model.eval()
    with torch.no_grad():
        return model(x)


# -- golden files ------------------------------------------------------------------------------

TRANS2_RECIPE = """\
# densenet100 at 1/8: its transitions pool with F.avg_pool2d inside their forward, so
# the stride edit rewrites trans2's forward.
name = "densenet100-trans2-stride1"
description = "densenet100 at 1/8: trans2's functional average pooling without its stride"
backbone = "densenet100"
input = "1x1x128x316"

[[ops]]
op = "stride"
at = "trans2"
stride = 1
mode = "stride"
"""

MOBILENET_RECIPE = """\
name = "mobilenet_v2-c128-s16"
description = "MobileNetV2 cut at 1/16 and projected to 128 channels"
backbone = "mobilenet_v2"
input = "1x3x128x128"

[[ops]]
op = "truncate"
after = "features.13"

[[ops]]
op = "project"
channels = 128
activation = "relu6"
"""

VGG_RECIPE = """\
name = "vgg16_bn-c256-s32"
description = "VGG-16-BN features projected to 256 channels"
backbone = "vgg16_bn"
input = "1x3x64x64"

[[ops]]
op = "truncate"
after = "features"

[[ops]]
op = "project"
channels = 256
"""

# golden name -> (backbone, shipped recipe file or the text of a recipe written to tmp)
GOLDEN_CASES: dict[str, tuple[str, str]] = {
    "resnet50-seed-hmer": ("resnet50", "seed-hmer-resnet50.toml"),
    "resnet50-os16-684": ("resnet50", "resnet50-os16-684.toml"),
    "densenet100-os32": ("densenet100", "densenet100-os32.toml"),
    "resnet34-ocr-h32-w4": ("resnet34", "ocr-resnet34-h32-w4.toml"),
    "densenet100-trans2-stride1": ("densenet100", TRANS2_RECIPE),
    "mobilenet_v2-truncate-project": ("mobilenet_v2", MOBILENET_RECIPE),
    "vgg16_bn-truncate-project": ("vgg16_bn", VGG_RECIPE),
}


def _case_recipe(name: str, folder: Path) -> Recipe:
    source = GOLDEN_CASES[name][1]
    if source.endswith(".toml"):
        return load_recipe(RECIPES / source)
    path = folder / f"{name}.toml"
    path.write_text(source, encoding="utf-8")
    return load_recipe(path)


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="module")
def emitted(recipe_dir: Path) -> dict[str, Emitted]:
    """Every golden case emitted once, on the meta device."""
    out = {}
    for name, (spec, _) in GOLDEN_CASES.items():
        out[name] = emit(apply_recipe(spec, _case_recipe(name, recipe_dir)))
    return out


@pytest.fixture(scope="module")
def emitted_files(emitted: dict[str, Emitted], tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("emitted")
    paths = {}
    for name, e in emitted.items():
        paths[name] = folder / f"{name.replace('-', '_')}.py"
        paths[name].write_text(e.source, encoding="utf-8")
    return paths


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_emitted_source_matches_golden(name, emitted, golden):
    golden(f"emit/{name}.py.txt", emitted[name].source)


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_emit_is_deterministic(name, emitted, recipe_dir):
    spec = GOLDEN_CASES[name][0]
    result = apply_recipe(spec, _case_recipe(name, recipe_dir))
    first, second = emit(result), emit(result)
    assert first.source == second.source
    assert first.source == emitted[name].source  # a fresh apply gives the same file


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_emitted_source_is_readable(name, emitted, recipe_dir):
    e = emitted[name]
    text = e.source
    assert "pickle" not in text
    assert "/work" not in text and "/tmp" not in text
    assert not re.search(r"tmp[a-z0-9_]{6,}|pytest-of|bbswap_emitted|bbswap_checked", text)
    tree = ast.parse(text)
    imported = [
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert imported and not any(m.split(".")[0] == "bbswap" for m in imported), imported
    docstring = ast.get_docstring(tree)
    assert docstring is not None and docstring.startswith(f"{e.class_name}: ")
    assert "Recipe:" in docstring and "Size rule:" in docstring
    # the patched class is the file's last statement and has an output_size method
    last = tree.body[-1]
    assert isinstance(last, ast.ClassDef) and last.name == e.class_name
    methods = {n.name for n in last.body if isinstance(n, ast.FunctionDef)}
    assert {"__init__", "forward", "output_size"} <= methods
    # every edit is spelled out under a comment naming its recipe op
    for index, op in enumerate(_case_recipe(name, recipe_dir).ops):
        assert f"# op {index}: {op.op} (" in text


@pytest.mark.parametrize("name", ["resnet50-seed-hmer", "resnet50-os16-684"])
def test_resnet50_forward_is_short(name, emitted):
    tree = ast.parse(emitted[name].source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ResNet50C684S16")
    forward = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    assert forward.end_lineno is not None
    assert forward.end_lineno - forward.lineno + 1 < 40


def test_seed_edits_are_explicit_statements(emitted):
    text = emitted["resnet50-seed-hmer"].source
    assert "body.layer2[0].conv2.stride = (1, 1)" in text
    assert "body.layer2[0].downsample[0].stride = (1, 1)" in text
    assert "block.dropout = nn.Dropout(p=0.2)" in text
    assert "self.proj = nn.Conv2d(2048, 684, kernel_size=1, bias=False)" in text


def test_functional_stride_edit_is_written_in_the_childs_forward(emitted):
    text = emitted["densenet100-trans2-stride1"].source
    assert "class DenseTransitionEdited(nn.Module):" in text
    call = re.search(r"avg_pool2d = F\.avg_pool2d\((.*?)\)\n        return", text, re.S)
    assert call is not None
    args = " ".join(re.sub(r"#[^\n]*", "", call.group(1)).split())
    assert args == "dropout, kernel_size=(1, 1), ceil_mode=True, stride=(1, 1)"
    assert "body.trans2 = DenseTransitionEdited(body.trans2)" in text


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    if not RUFF.is_file():
        pytest.skip(f"ruff is not installed next to {sys.executable}")
    return subprocess.run([str(RUFF), *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_emitted_source_passes_ruff_check(name, emitted_files):
    proc = _ruff("check", "--isolated", "--no-cache", str(emitted_files[name]))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_emitted_source_is_ruff_formatted(name, emitted_files):
    path = str(emitted_files[name])
    proc = _ruff("format", "--isolated", "--no-cache", "--line-length", "100", "--check", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


GOLDEN_FILES = sorted((ROOT / "tests" / "goldens" / "emit").glob("*.py.txt"))


@pytest.fixture(scope="module")
def golden_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The emitted-source goldens as ``.py`` files, for ruff to check."""
    folder = tmp_path_factory.mktemp("golden_py")
    paths = []
    for golden_file in GOLDEN_FILES:
        path = folder / golden_file.name.replace("-", "_").removesuffix(".txt")
        path.write_bytes(golden_file.read_bytes())
        paths.append(path)
    return paths


def test_every_emitted_golden_passes_the_projects_own_ruff_configuration(golden_files):
    config = str(ROOT / "pyproject.toml")
    assert len(golden_files) == len(GOLDEN_CASES)
    files = [str(p) for p in golden_files]
    check = _ruff("check", "--config", config, "--no-cache", *files)
    assert check.returncode == 0, check.stdout + check.stderr
    formatted = _ruff("format", "--config", config, "--no-cache", "--check", *files)
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr


def _patched_init(source: str, class_name: str) -> ast.FunctionDef:
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_emitted_init_sets_each_attribute_once_and_has_no_orphan_comment(name, emitted):
    e = emitted[name]
    init = _patched_init(e.source, e.class_name)
    targets = [ast.unparse(t) for st in init.body if isinstance(st, ast.Assign) for t in st.targets]
    assert len(targets) == len(set(targets)), targets
    # every comment line of __init__ is followed, after more comments, by a statement
    lines = e.source.splitlines()[init.lineno : init.end_lineno]
    for i, line in enumerate(lines):
        if line.strip().startswith("#"):
            rest = [x for x in lines[i + 1 :] if not x.strip().startswith("#")]
            assert rest and rest[0].strip(), f"{line.strip()!r} stands above nothing"


@pytest.mark.parametrize("name", ["resnet50-seed-hmer", "resnet50-os16-684"])
def test_resnet50_bundle_carries_only_what_the_model_uses(name, emitted):
    text = emitted[name].source
    assert "BasicBlock" not in text
    assert "class Bottleneck(nn.Module):" in text
    assert "def conv3x3(" in text and "def conv1x1(" in text  # helpers the code calls
    assert "block: type[Bottleneck]," in text


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_emitted_output_size_is_closed_form_when_the_chain_is(name, emitted, recipe_dir):
    e = emitted[name]
    assert "_through" not in e.source and "_CHAIN_H" not in e.source
    tree = ast.parse(e.source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == e.class_name)
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "output_size")
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module([method], []), name, "exec"), namespace)  # the method alone
    size = namespace["output_size"]
    result = apply_recipe(GOLDEN_CASES[name][0], _case_recipe(name, recipe_dir))
    low_h, low_w = result.after.min_input()
    for h, w in zip(range(low_h, low_h + 300), range(low_w, low_w + 300)):
        assert size.__func__(h, w) == result.after.output_size(h, w), (h, w)


def _window(k: int, s: int, p: int = 0, ceil: bool = False, pool: bool = False) -> SizeStep:
    return SizeStep("window", k, s, p, 1, ceil, pool)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([], "h"),
        ([_window(7, 2, 3), _window(3, 2, 1, pool=True), _window(3, 2, 1)], "(h + 7) // 8"),
        ([_window(2, 2, pool=True)] * 5, "h // 32"),
        ([_window(7, 2, 3), _window(2, 2, ceil=True, pool=True)], "(h + 3) // 4"),
        ([_window(3, 1), _window(3, 1)], "h - 4"),
        ([_window(7, 2, 3), SizeStep("fixed", value=7.0), _window(3, 2, 1)], "4"),
    ],
)
def test_closed_form_equals_the_step_chain(steps, expected):
    form = closed_form(steps)
    assert form is not None and form.expression("h") == expected
    for n in range(1, 600):
        assert form.at(n) == chain_size(steps, n), n


def test_closed_form_guards_sizes_too_small_for_the_chain():
    steps = [_window(7, 2, 0), _window(3, 2, 0)]
    form = closed_form(steps)
    assert form is not None and form.guard and form.minimum == min_size(steps)
    assert all(form.at(n) == chain_size(steps, n) for n in range(1, 600))


@pytest.mark.parametrize(
    "steps",
    [
        [_window(2, 2, 1, ceil=True, pool=True)],  # its last window can start in the padding
        [SizeStep("pad", padding=2), _window(3, 2)],
        [SizeStep("fold", stride=4)],
        [SizeStep("transpose", 2, 2)],
    ],
)
def test_no_closed_form_where_the_chain_does_not_reduce_to_one(steps):
    assert closed_form(steps) is None


def test_a_value_set_twice_is_written_once_with_its_final_value():
    twice = recipe(
        {"op": "stride", "at": "layer2", "stride": 1},
        {"op": "stride", "at": "layer2", "stride": 2},
        {"op": "truncate", "after": "layer4"},
    )
    text = emit(apply_recipe("resnet18", twice)).source
    assert text.count("body.layer2[0].conv1.stride") == 1
    assert "body.layer2[0].conv1.stride = (2, 2)" in text
    assert "# op 0: stride (" in text and "# op 1: stride (" in text


def test_a_run_of_identical_settings_is_a_loop():
    result = apply_recipe(
        "resnet50",
        recipe({"op": "stride", "at": "layer3", "stride": 1, "mode": "dilate"}),
    )
    e = emit(result)
    loop = (
        "        for block in body.layer3[1:]:\n"
        "            block.conv2.dilation = (2, 2)\n"
        "            block.conv2.padding = (2, 2)\n"
    )
    assert loop in e.source
    namespace: dict[str, Any] = {}
    exec(compile(e.source, "loop.py", "exec"), namespace)
    built = namespace[e.class_name]()
    patched = {k: tuple(v.shape) for k, v in result.model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == patched
    for i in range(1, 6):
        conv = built.layer3[i].conv2
        assert (conv.dilation, conv.padding) == ((2, 2), (2, 2))


# -- round trips over the zoo and the op kinds --------------------------------------------------

OP_KINDS = ("stride", "dilate", "per-axis", "truncate", "project", "in_channels", "pool", "dropout")


def _kinds(ops: list[dict[str, Any]]) -> set[str]:
    kinds = set()
    for op in ops:
        kinds.add(op["op"])
        if op["op"] == "stride":
            kinds.add("dilate" if op.get("mode") == "dilate" else "stride")
        if isinstance(op.get("stride"), list) and op["stride"][0] != op["stride"][1]:
            kinds.add("per-axis")
    return kinds


# (backbone, input, ops, carry weights): several op kinds per model, small inputs (VGG
# and ConvNeXt need 32 pixels, densenet121 29)
ROUND_TRIPS: list[tuple[str, str, list[dict[str, Any]], bool]] = [
    (
        "resnet18",
        "1x1x32x32",
        [
            {"op": "in_channels", "channels": 1, "strategy": "sum"},
            {"op": "stride", "at": "layer4", "stride": [2, 1]},
            {"op": "truncate", "after": "layer4"},
            {"op": "project", "channels": 32},
        ],
        True,
    ),
    (
        "resnet34",
        "1x3x32x32",
        [
            {"op": "stride", "at": "layer4", "stride": 1, "mode": "dilate"},
            {"op": "truncate", "after": "layer4"},
            {"op": "pool", "stride": 2, "kind": "max"},
        ],
        False,
    ),
    (
        "resnet50",
        "1x1x32x48",
        [
            {"op": "in_channels", "channels": 1, "strategy": "sum"},
            {"op": "stride", "at": "layer2", "stride": 1},
            {"op": "truncate", "after": "layer4"},
            {"op": "dropout", "block": "Bottleneck", "p": 0.2},
            {"op": "project", "channels": 684},
        ],
        False,
    ),
    (
        "resnet101",
        "1x3x32x32",
        [
            {"op": "stride", "at": "layer3", "stride": 1, "mode": "dilate"},
            {"op": "truncate", "after": "layer4"},
            {"op": "project", "channels": 64, "activation": "relu"},
        ],
        False,
    ),
    (
        # dropout in blocks the truncation drops (layer4's) must not break the file
        "resnet152",
        "1x3x32x32",
        [
            {"op": "truncate", "after": "layer3"},
            {"op": "dropout", "block": "Bottleneck", "p": 0.1},
        ],
        False,
    ),
    (
        # a cut inside the features Sequential rewrites its forward
        "vgg16_bn",
        "1x3x32x32",
        [
            {"op": "stride", "at": "features.23", "stride": [2, 1]},
            {"op": "truncate", "after": "features.32"},
            {"op": "project", "channels": 128},
        ],
        False,
    ),
    (
        "mobilenet_v2",
        "1x2x32x32",
        [
            {"op": "in_channels", "channels": 2, "strategy": "repeat"},
            {"op": "stride", "at": "features.14", "stride": 1, "mode": "dilate"},
            {"op": "truncate", "after": "features"},
            {"op": "project", "channels": 96, "activation": "relu6"},
        ],
        True,
    ),
    (
        "densenet121",
        "1x3x32x32",
        [
            {"op": "stride", "at": "features.transition3", "stride": 1, "mode": "stride"},
            {"op": "truncate", "after": "features"},
            {"op": "pool", "stride": [2, 1], "kind": "avg"},
        ],
        False,
    ),
    (
        "convnext_tiny",
        "1x1x32x32",
        [
            {"op": "in_channels", "channels": 1},
            {"op": "truncate", "after": "features.5"},
            {"op": "project", "channels": 256, "activation": "gelu"},
        ],
        False,
    ),
    (
        "efficientnet_b0",
        "1x3x32x32",
        [
            {"op": "stride", "at": "features.6", "stride": 1, "mode": "dilate"},
            {"op": "truncate", "after": "features"},
            {"op": "dropout", "block": "MBConv", "p": 0.3},
            {"op": "project", "channels": 64, "activation": "silu"},
        ],
        True,
    ),
    (
        # trans2 pools with F.avg_pool2d in its forward: a per-axis functional edit
        "densenet100",
        "1x1x32x48",
        [
            {"op": "stride", "at": "trans2", "stride": [2, 1]},
            {"op": "dropout", "block": "DenseBottleneck", "p": 0.2},
            {"op": "pool", "stride": 2},
        ],
        True,
    ),
]


def test_round_trips_cover_every_zoo_model_and_op_kind():
    assert {spec for spec, *_ in ROUND_TRIPS} == set(ZOO)
    covered = set().union(*(_kinds(ops) for _, _, ops, _ in ROUND_TRIPS))
    assert covered == set(OP_KINDS)
    assert any(weights for *_, weights in ROUND_TRIPS)


def _source_checkpoint(spec: str, in_chans: int, path: Path) -> dict[str, torch.Tensor]:
    """Random weights and BatchNorm statistics for the source backbone, saved to ``path``."""
    torch.manual_seed(7)
    model = resolve(spec, kwargs_for(spec)).build(in_chans=in_chans)
    randomize_batchnorm(model, 7)
    state = model.state_dict()
    torch.save(state, path)
    return state


@pytest.mark.parametrize(
    ("spec", "input_shape", "ops", "weights"),
    ROUND_TRIPS,
    ids=[f"{spec}-{'+'.join(sorted(_kinds(ops)))}" for spec, _, ops, _ in ROUND_TRIPS],
)
def test_round_trip(spec, input_shape, ops, weights, tmp_path):
    rec = recipe(*ops, name=f"round-trip-{spec}")
    ckpt = None
    if weights:
        source_chans = ZOO[spec].in_chans  # in_channels ops adapt the source's stem
        if not any(op["op"] == "in_channels" for op in ops):
            source_chans = int(input_shape.split("x")[1])
        ckpt = tmp_path / "source.pth"
        _source_checkpoint(spec, source_chans, ckpt)
    out = tmp_path / "backbone.py"
    exported = export(
        spec,
        rec,
        out,
        input_shape=input_shape,
        kwargs=kwargs_for(spec),
        weights=str(ckpt) if ckpt else None,
    )
    checks = {c.name: c for c in exported.report.checks}
    assert all(c.ok for c in checks.values()), checks
    assert {"import", "outputs", "output_size", "weights"} <= set(checks)
    assert out.is_file() and out.read_text(encoding="utf-8") == exported.emitted.source

    module = import_plain(out)
    model = getattr(module, exported.emitted.class_name)()
    keys = list(model.state_dict())
    assert keys == list(exported.result.model.state_dict())
    _, c, h, w = exported.result.after.input_shape
    if not weights:
        assert exported.weights_path is None
        return
    assert exported.weights_path == tmp_path / "backbone.pth"
    state = torch.load(exported.weights_path, weights_only=True)
    assert list(state) == keys
    model.load_state_dict(state, strict=True)
    got = run(model, (1, c, h + 1, w + 3))
    want = run(exported.result.model, (1, c, h + 1, w + 3))
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert tuple(got.shape[-2:]) == type(model).output_size(h + 1, w + 3)


# -- a user's file: CAN's DenseNet with a functional reduction in its transitions ---------------


@pytest.fixture(scope="module")
def can_params() -> dict[str, Any]:
    return yaml.safe_load((CAN / "config.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("stride", "factor"), [(1, (8, 8)), ([2, 1], (16, 8))], ids=["stride1", "stride2x1"]
)
def test_user_file_functional_edit_round_trips(stride, factor, can_params, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # a relative spec: the file names no absolute path
    spec = "tests/fixtures/can_model/densenet.py:DenseNet"
    rec = recipe({"op": "stride", "at": "trans2", "stride": stride}, name="can-trans2")
    out = tmp_path / "can_backbone.py"
    exported = export(spec, rec, out, input_shape="1x1x32x48", kwargs={"params": can_params})
    assert exported.report.ok, exported.report.checks
    text = out.read_text(encoding="utf-8")
    assert "/work" not in text and "/tmp" not in text
    assert "bundles DenseNet and what it needs from densenet.py" in text
    assert "class TransitionEdited(nn.Module):" in text
    pair = f"({stride}, {stride})" if isinstance(stride, int) else f"({stride[0]}, {stride[1]})"
    assert re.search(rf"F\.avg_pool2d\(.*?stride={re.escape(pair)}", text, re.S)
    assert "body.trans2 = TransitionEdited(body.trans2)" in text
    assert [r.factor for r in exported.result.after.size_rules()] == list(factor)

    cls = getattr(import_plain(out), exported.emitted.class_name)
    model = cls()
    for h, w in [(33, 47), (61, 97)]:
        got = run(model, (1, 1, h, w))
        assert tuple(got.shape) == (1, 684, math.ceil(h / factor[0]), math.ceil(w / factor[1]))
        assert cls.output_size(h, w) == tuple(got.shape[-2:])


# -- carried weights ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_export(tmp_path_factory: pytest.TempPathFactory):
    """A random torchvision-layout resnet50 checkpoint carried through the seed recipe."""
    folder = tmp_path_factory.mktemp("seed")
    ckpt = folder / "resnet50-random.pth"
    torch.manual_seed(3)
    model = resolve("resnet50").build()  # 1000 classes, like a torchvision checkpoint
    randomize_batchnorm(model, 3)
    source = model.state_dict()
    torch.save(source, ckpt)
    exported = export(
        "resnet50",
        load_recipe(SEED_RECIPE),
        folder / "seed_backbone.py",
        input_shape="1x1x64x96",
        weights=str(ckpt),
    )
    return exported, source


def test_carried_weights_load_strictly_and_give_the_same_outputs(seed_export):
    exported, _ = seed_export
    assert exported.report.ok
    assert exported.load is not None and exported.load.loaded == 320
    assert exported.load.missing == () and exported.load.unexpected == ()
    cls = getattr(import_plain(exported.path), exported.emitted.class_name)
    model = cls()
    state = torch.load(exported.weights_path, weights_only=True)
    model.load_state_dict(state, strict=True)
    for shape in [(1, 1, 64, 96), (2, 1, 61, 97)]:
        got, want = run(model, shape), run(exported.result.model, shape)
        assert got.shape == want.shape
        assert torch.equal(got, want)


def test_carried_weights_are_the_checkpoints_adapted(seed_export):
    exported, source = seed_export
    state = torch.load(exported.weights_path, weights_only=True)
    # in_channels with strategy 'sum': the 3-channel stem summed over its input channels
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    assert torch.equal(state["conv1.weight"], source["conv1.weight"].sum(dim=1, keepdim=True))
    # every other source tensor up to layer4 is carried unchanged; the head is gone
    kept = [k for k in source if not k.startswith(("conv1.", "fc."))]
    for key in kept:
        assert torch.equal(state[key], source[key]), key
    assert not any(k.startswith("fc.") for k in state)
    new = sorted(k for k in state if k not in source)
    assert new == sorted(
        ["proj.weight"]
        + [f"proj_bn.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
        + ["proj_bn.num_batches_tracked"]
    )


def test_carried_weights_run_in_the_seeds_own_network(seed_export):
    """The written state_dict, renamed back, drives tests/seed_resnet50.py's network."""
    exported, _ = seed_export
    state = torch.load(exported.weights_path, weights_only=True)
    back = {new: old for old, new in SEED_TO_PATCHED.items()}
    renamed = {}
    for key, value in state.items():
        for new, old in back.items():
            if key.startswith(new):
                key = old + key[len(new) :]
        renamed[key] = value
    seed = seed_resnet50()
    missing, unexpected = seed.load_state_dict(renamed, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    cls = getattr(import_plain(exported.path), exported.emitted.class_name)
    model = cls()
    model.load_state_dict(state, strict=True)
    got, want = run(model, (1, 1, 61, 97)), run(seed, (1, 1, 61, 97))
    assert got.shape == want.shape == (1, 684, 4, 7)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)


def test_safetensors_output(tmp_path):
    pytest.importorskip(
        "safetensors", reason="safetensors is not installed (pip install 'bbswap[safetensors]')"
    )
    from safetensors.torch import load_file

    ckpt = tmp_path / "source.pth"
    source = _source_checkpoint("resnet18", 3, ckpt)
    rec = recipe({"op": "truncate", "after": "layer3"})
    exported = export(
        "resnet18",
        rec,
        tmp_path / "b.py",
        input_shape="1x3x32x32",
        kwargs=kwargs_for("resnet18"),
        weights=str(ckpt),
        safetensors=True,
    )
    assert exported.weights_path == tmp_path / "b.safetensors"
    state = load_file(str(exported.weights_path))
    assert torch.equal(state["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    model = getattr(import_plain(exported.path), exported.emitted.class_name)()
    model.load_state_dict(state, strict=True)


# -- the drop-in host: CAN builds its encoder as DenseNet(params=...) ---------------------------


def test_dropin_replaces_cans_densenet(can_params, tmp_path, monkeypatch):
    out = tmp_path / "densenet.py"
    result = cli(
        "fit", "resnet50", "--like", "densenet100", "--input", "1x1x128x316",
        "--dropin", "--class-name", "DenseNet", "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, (result.stdout, result.stderr)
    # no error or warning (the progress bar's stray newline: see test_fit.py)
    assert result.stderr.strip() == ""
    spec = importlib.util.spec_from_file_location("densenet", out)  # CAN's module name
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "densenet", module)
    spec.loader.exec_module(module)
    DenseNet = module.DenseNet
    encoder = DenseNet(params=can_params).eval()
    assert DenseNet(can_params) is not None  # positional, too
    for shape in [(2, 1, 61, 97), (2, 1, 127, 255), (1, 1, 33, 47)]:
        images = torch.randn(*shape)
        mask = torch.ones(shape[0], 1, shape[2], shape[3])
        with torch.no_grad():
            features = encoder(images)
        assert features.shape[0] == shape[0]
        assert features.shape[1] == 684
        assert features.shape[-2:] == mask[:, :, ::16, ::16].shape[-2:]


# -- TorchScript and torch.export ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50-seed-hmer", "densenet100-trans2-stride1"])
def test_emitted_module_scripts_and_exports(name, emitted, emitted_files):
    cls = getattr(import_plain(emitted_files[name]), emitted[name].class_name)
    model = cls().eval()
    x = torch.randn(1, 1, 33, 47)
    with torch.no_grad():
        want = model(x)
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), want, rtol=0, atol=1e-5)
        program = torch.export.export(model, (x,))
        assert torch.allclose(program.module()(x), want, rtol=0, atol=1e-5)


# -- bbswap verify --------------------------------------------------------------------------------

SIZES = "33x97,64x64,61x203"


def test_verify_passes_a_correct_file(emitted, emitted_files):
    target = f"{emitted_files['resnet50-seed-hmer']}:{emitted['resnet50-seed-hmer'].class_name}"
    result = cli(
        "verify", target, "--channels", "684", "--stride", "16", "--like", "densenet100",
        "--sizes", SIZES, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, (result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert [c["name"] for c in data["checks"]] == [
        "import",
        "output_size",
        "channels",
        "stride",
        "like",
    ]


@pytest.fixture(scope="module")
def broken_file(emitted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed file with layer2's stride put back, consistently in both convs: the
    model is at 1/32 but its output_size still says 1/16."""
    text = emitted["resnet50-seed-hmer"].source
    for line in ("body.layer2[0].conv2.stride", "body.layer2[0].downsample[0].stride"):
        assert text.count(f"{line} = (1, 1)") == 1
        text = text.replace(f"{line} = (1, 1)", f"{line} = (2, 2)")
    path = tmp_path_factory.mktemp("broken") / "broken_backbone.py"
    path.write_text(text, encoding="utf-8")
    return path


def test_verify_fails_a_hand_broken_file(broken_file, emitted):
    target = f"{broken_file}:{emitted['resnet50-seed-hmer'].class_name}"
    result = cli("verify", target, "--channels", "684", "--stride", "16", "--sizes", SIZES)
    line = assert_one_line_error(
        result, "output_size", "output_size(33, 97) says 3x7", report=True, status=1
    )
    assert "but the model gives 2x4" in line


def test_verify_names_the_channel_mismatch(emitted, emitted_files):
    target = f"{emitted_files['resnet50-seed-hmer']}:{emitted['resnet50-seed-hmer'].class_name}"
    result = cli("verify", target, "--channels", "100", "--sizes", "33x97")
    assert_one_line_error(result, "channels", "not 100 channels", "684", report=True, status=1)


def test_verify_target_errors(emitted_files, tmp_path):
    seed = emitted_files["resnet50-seed-hmer"]
    assert_one_line_error(cli("verify", "foo.txt"), "malformed target 'foo.txt'", "FILE.py:Class")
    assert_one_line_error(cli("verify", f"{tmp_path}/missing.py:Net"), "file not found")
    assert_one_line_error(cli("verify", f"{seed}:Nope"), "no nn.Module class 'Nope'", "ResNet")


# -- writing: --force, and nothing written when verification fails -------------------------------

SMALL_RECIPE = """\
name = "resnet18-small"
backbone = "resnet18"
input = "1x3x32x32"

[[ops]]
op = "truncate"
after = "layer3"

[[ops]]
op = "project"
channels = 32
"""


@pytest.fixture
def small_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SMALL_RECIPE, encoding="utf-8")
    return path


def test_existing_output_needs_force(small_recipe, tmp_path):
    out = tmp_path / "out.py"
    out.write_text("# mine\n", encoding="utf-8")
    result = cli("apply", "resnet18", str(small_recipe), "-o", str(out))
    assert_one_line_error(result, f"{out} exists; pass --force")
    assert out.read_text(encoding="utf-8") == "# mine\n"

    result = cli("apply", "resnet18", str(small_recipe), "-o", str(out), "--force")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert out.read_text(encoding="utf-8").startswith('"""ResNet18C32S16: resnet18 after')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.py", "small.toml"]


def test_nothing_is_written_when_verification_fails(small_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(bbswap.verify.checks, "TOLERANCE", -1.0)  # no output difference passes
    ckpt = tmp_path / "source.pth"
    _source_checkpoint("resnet18", 3, ckpt)
    out = tmp_path / "out.py"
    result = cli(
        "apply", "resnet18", str(small_recipe), "-o", str(out),
        "--kw", "num_classes=10", "--weights", str(ckpt),
    )  # fmt: skip
    assert_one_line_error(
        result, "verification of the emitted ResNet18C32S16 failed: outputs:", status=1
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.toml", "source.pth"]

    with pytest.raises(VerificationError):
        export("resnet18", load_recipe(small_recipe), out)
    assert not out.exists()


# -- user errors ---------------------------------------------------------------------------------


def test_class_name_must_be_an_identifier(small_recipe, tmp_path):
    out = tmp_path / "out.py"
    result = cli("apply", "resnet18", str(small_recipe), "-o", str(out), "--class-name", "my-net")
    assert_one_line_error(result, "--class-name 'my-net' is not a Python identifier")
    assert not out.exists()
    with pytest.raises(SurgeryError, match="not a Python identifier"):
        emit(apply_recipe("resnet18", load_recipe(small_recipe)), class_name="class")


def test_weights_file_must_exist(small_recipe, tmp_path):
    out = tmp_path / "out.py"
    result = cli(
        "apply", "resnet18", str(small_recipe), "-o", str(out),
        "--weights", str(tmp_path / "missing.pth"),
    )  # fmt: skip
    assert_one_line_error(result, "checkpoint not found", "missing.pth")
    assert not out.exists()


@pytest.fixture
def mismatched_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """resnet18 (10 classes) without its fc and with one foreign tensor."""
    torch.manual_seed(5)
    state = resolve("resnet18", kwargs_for("resnet18")).build().state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "mismatched.pth"
    torch.save(state, path)
    return path, state


def test_mismatched_weights_are_an_error(small_recipe, mismatched_checkpoint, tmp_path):
    ckpt, _ = mismatched_checkpoint
    out = tmp_path / "out.py"
    result = cli(
        "apply", "resnet18", str(small_recipe), "-o", str(out),
        "--kw", "num_classes=10", "--weights", str(ckpt),
    )  # fmt: skip
    assert_one_line_error(
        result,
        "does not fit the backbone",
        "2 missing (fc.weight, fc.bias)",
        "1 unexpected (extra.weight)",
        "--partial",
    )
    assert not out.exists() and not out.with_suffix(".pth").exists()


def test_partial_loads_what_fits(small_recipe, mismatched_checkpoint, tmp_path):
    ckpt, state = mismatched_checkpoint
    exported = export(
        "resnet18",
        load_recipe(small_recipe),
        tmp_path / "out.py",
        kwargs=kwargs_for("resnet18"),
        weights=str(ckpt),
        partial=True,
    )
    assert exported.report.ok
    assert exported.load is not None
    assert exported.load.loaded == len(state) - 1
    assert exported.load.missing == ("fc.weight", "fc.bias")
    assert exported.load.unexpected == ("extra.weight",)
    written = torch.load(exported.weights_path, weights_only=True)
    for key in ("conv1.weight", "layer1.0.bn1.running_var", "layer3.1.conv2.weight"):
        assert torch.equal(written[key], state[key]), key


def test_no_emit_options_without_output(small_recipe):
    result = cli("apply", "resnet18", str(small_recipe), "--weights", "x.pth")
    assert_one_line_error(result, "go with -o FILE.py")


def test_output_must_be_a_python_file(small_recipe, tmp_path):
    with pytest.raises(InvalidArgument, match=r"must be a \.py file"):
        export("resnet18", load_recipe(small_recipe), tmp_path / "out.txt")


def test_class_name_must_not_shadow_a_name_of_the_file(small_recipe):
    result = apply_recipe("resnet18", load_recipe(small_recipe))
    for taken in ("ResNet", "BasicBlock", "resnet18", "nn", "torch", "_through"):
        with pytest.raises(SurgeryError, match=f"'{taken}' is already a name in the emitted"):
            emit(result, class_name=taken)
    assert emit(result, class_name="Encoder", dropin=True).class_name == "Encoder"
