"""The user's own repository: tests/fixtures/seg_repo is DeepLab-style segmentation code
(a package with absolute and relative imports, a BatchNorm class as a constructor
argument, a forward returning ``(x, low_level_feat)``).

Loading imports a file as part of its package with the current directory on sys.path;
``--kw key=py:dotted.name`` passes an imported object; an emitted file bundles the
user's code from every module it comes from and stands alone in a fresh interpreter;
a recipe records the constructor arguments and never imports anything itself.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, cli, ok
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bbswap.backbones.registry import resolve
from bbswap.codegen.bundling import bundle_code
from bbswap.codegen.source import Imports
from bbswap.errors import InvalidArgument, RecipeError, VerificationError
from bbswap.parsing import PyRef, parse_kw, parse_kw_value
from bbswap.recipes.toml_io import load_recipe, recipe_from_dict, recipe_to_toml
from bbswap.verify.fresh import fresh_import

REPO = Path(__file__).parent / "fixtures" / "seg_repo"
FILE = "modeling/backbone/resnet.py"
SYNC_BN = "py:modeling.sync_batchnorm.batchnorm.SynchronizedBatchNorm2d"
KW = ["--kw", "output_stride=16", "--kw", "BatchNorm=py:torch.nn.BatchNorm2d"]


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the repository's root, as its README says to."""
    monkeypatch.chdir(REPO)
    return REPO


def _run(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The bbswap command line in a process of its own, run from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "bbswap", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


# -- loading -------------------------------------------------------------------------------


def test_a_file_in_a_package_is_imported_as_part_of_it(in_repo: Path) -> None:
    path_before = list(sys.path)
    backbone = resolve(f"{FILE}:ResNet101", {"output_stride": 16, "BatchNorm": nn.BatchNorm2d})
    assert backbone.module == "modeling.backbone.resnet"
    module = sys.modules["modeling.backbone.resnet"]
    assert Path(module.__file__).resolve() == (REPO / FILE).resolve()
    # the relative import (from .utils) and the absolute one (from modeling.sync_batchnorm)
    assert module.init_weight is sys.modules["modeling.backbone.utils"].init_weight
    assert module.SynchronizedBatchNorm2d.__module__ == "modeling.sync_batchnorm.batchnorm"
    assert sys.path == path_before  # restored; the modules stay for tracing and bundling
    model = backbone.build()
    x, low = model.eval()(torch.randn(1, 3, 64, 64))
    assert (tuple(x.shape), tuple(low.shape)) == ((1, 2048, 4, 4), (1, 256, 16, 16))


def test_package_module_spec_works_from_the_repository_root(in_repo: Path) -> None:
    kwargs = parse_kw(["output_stride=8", "BatchNorm=py:torch.nn.BatchNorm2d"])
    backbone = resolve("modeling.backbone.resnet:ResNet101", kwargs)
    assert backbone.objects == {"BatchNorm": nn.BatchNorm2d}
    assert backbone.kwargs["BatchNorm"] == PyRef("torch.nn.BatchNorm2d")
    x, _ = backbone.build().eval()(torch.randn(1, 3, 64, 64))
    assert tuple(x.shape) == (1, 2048, 8, 8)  # output stride 8


def test_inspect_from_the_repository_root_by_path_and_by_module() -> None:
    for spec in (f"{FILE}:ResNet101", "modeling.backbone.resnet:ResNet101"):
        done = _run("inspect", spec, *KW, "--input", "1x3x64x64", "--json", cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert '"downsample"' in done.stdout and "16" in done.stdout


def test_a_module_spec_from_another_folder_says_where_to_run_from() -> None:
    done = _run("inspect", "modeling.backbone.resnet:ResNet101", *KW, cwd=REPO.parent)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "no module named 'modeling'" in lines[0]
    assert f"it is in {REPO.resolve()}: run bbswap from that folder" in lines[0]


def test_a_missing_module_inside_the_users_file_is_named(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "proj"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "net.py").write_text("from nowhere_to_be_found import Thing\n")
    monkeypatch.chdir(tmp_path)
    result = cli("inspect", "proj/net.py:Net")
    assert_one_line_error(result, "no module named 'nowhere_to_be_found'", "proj/net.py")


def test_a_second_repository_with_a_package_of_the_same_name_is_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    first = resolve(f"{FILE}:ResNet101", {"output_stride": 16, "BatchNorm": nn.BatchNorm2d})
    other = tmp_path / "other_repo"
    shutil.copytree(REPO, other)
    resnet = other / FILE
    resnet.write_text(resnet.read_text().replace("layers=(1, 1, 2, 1)", "layers=(1, 1, 1, 1)"))
    monkeypatch.chdir(other)
    second = resolve(f"{FILE}:ResNet101", {"output_stride": 16, "BatchNorm": nn.BatchNorm2d})
    assert first.factory is not second.factory
    assert Path(sys.modules["modeling.backbone.resnet"].__file__).resolve() == resnet.resolve()
    assert len(second.build().layer3) == 1


# -- py: values ----------------------------------------------------------------------------


def test_py_values_name_objects_found_by_importing(in_repo: Path) -> None:
    kwargs = parse_kw([f"BatchNorm={SYNC_BN}", "output_stride=16"])
    backbone = resolve(f"{FILE}:ResNet101", kwargs)
    from modeling.sync_batchnorm.batchnorm import SynchronizedBatchNorm2d  # type: ignore

    assert backbone.objects["BatchNorm"] is SynchronizedBatchNorm2d
    assert isinstance(backbone.build().bn1, SynchronizedBatchNorm2d)


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ("py:torch.nn.BatchNorm3x", ["'torch.nn' has no attribute or submodule 'BatchNorm3x'"]),
        ("py:not_a_module_here.Thing", ["no module named 'not_a_module_here'"]),
        ("py:torch", ["'torch' is not a dotted Python path"]),
        ("py:torch.nn.BatchNorm2d()", ["is not a dotted Python path"]),
    ],
)
def test_bad_py_values_are_one_line_errors(in_repo: Path, value: str, fragments: list) -> None:
    result = cli(
        "inspect", f"{FILE}:ResNet101", "--kw", "output_stride=16", "--kw", f"BatchNorm={value}"
    )
    assert_one_line_error(result, *fragments)


@given(st.text(max_size=60))
def test_a_py_value_is_a_dotted_path_or_refused_never_evaluated(text: str) -> None:
    try:
        value = parse_kw_value("k", "py:" + text)
    except InvalidArgument as error:
        assert "\n" not in str(error)
        return
    assert isinstance(value, PyRef)
    assert all(part.isidentifier() for part in value.path.split("."))


# -- recipes -------------------------------------------------------------------------------


def _recipe_text(kw: str) -> str:
    return f'name = "p"\n{kw}\n[[ops]]\nop = "project"\nchannels = 8\n'


def test_recipe_kw_round_trips_with_py_values() -> None:
    data = {
        "name": "r",
        "kw": {"output_stride": 16, "BatchNorm": "py:torch.nn.BatchNorm2d", "cfg": {"a": [1, 2]}},
        "ops": [{"op": "project", "channels": 8}],
    }
    recipe = recipe_from_dict(data)
    assert recipe.kw["BatchNorm"] == PyRef("torch.nn.BatchNorm2d")
    assert recipe.kw["BatchNorm"].may_import is False
    import tomllib

    again = recipe_from_dict(tomllib.loads(recipe_to_toml(recipe)))
    assert again.kw == recipe.kw
    assert '[kw]\noutput_stride = 16\nBatchNorm = "py:torch.nn.BatchNorm2d"\n' in recipe_to_toml(
        recipe
    )


def test_what_toml_cannot_hold_is_refused_by_name() -> None:
    recipe = recipe_from_dict({"name": "r", "ops": [{"op": "project", "channels": 8}]})
    from dataclasses import replace

    with pytest.raises(RecipeError, match="pretrained=None cannot be recorded"):
        recipe_to_toml(replace(recipe, kw={"pretrained": None}))


def test_a_command_line_kw_overrides_the_recipes(in_repo: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        _recipe_text('[kw]\noutput_stride = 16\nBatchNorm = "py:torch.nn.BatchNorm2d"')
    )
    args = ["apply", f"{FILE}:ResNet101Features", recipe, "--input", "1x3x64x64", "--json"]
    assert '"downsample": [\n      16' in ok(cli(*args)).stdout.split('"after"')[1]
    over = ok(cli(*args, "--kw", "output_stride=8")).stdout.split('"after"')[1]
    assert '"downsample": [\n      8' in over


def test_a_recipe_py_value_imports_nothing(tmp_path: Path, monkeypatch) -> None:
    """Importing a module runs its code; a shared recipe must never run code."""
    marker = tmp_path / "ran"
    (tmp_path / "evil_module.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\nclass Norm: pass\n"
    )
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self, norm=nn.BatchNorm2d):\n        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 8, 3)\n        self.bn = norm(8)\n\n"
        "    def forward(self, x):\n        return self.bn(self.conv(x))\n"
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text(_recipe_text('[kw]\nnorm = "py:evil_module.Norm"'))
    monkeypatch.chdir(tmp_path)
    result = cli("apply", "net.py:Net", recipe, "--input", "1x3x32x32")
    assert_one_line_error(result, "norm=py:evil_module.Norm", "a recipe imports nothing")
    assert not marker.exists() and "evil_module" not in sys.modules


@pytest.mark.parametrize(
    "value", ["py:os.system", "py:builtins.eval", "py:torch.hub.load", "py:torch.load"]
)
def test_a_recipe_py_value_names_no_function_that_could_run_code(
    value: str, tmp_path: Path
) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(_recipe_text(f'[kw]\nnorm = "{value}"'))
    model = str(Path(__file__).parent / "fixtures" / "named_models.py") + ":Tagged"
    result = cli("apply", model, recipe, "--input", "1x3x32x32")
    assert_one_line_error(result, f"norm={value} is not allowed", "on the command line")


# -- bundling ------------------------------------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _user_code(module) -> bool:
    return module.__name__.split(".")[0] in ("bpkg", "modeling")


def test_bundling_follows_imports_across_the_users_modules(in_repo: Path) -> None:
    resolve(f"{FILE}:ResNet101", {"output_stride": 16, "BatchNorm": nn.BatchNorm2d})
    imports = Imports()
    module = sys.modules["modeling.backbone.resnet"]
    bundled = bundle_code([(module, "ResNet101Features")], imports, _user_code)
    assert bundled.modules == (
        "modeling.backbone.resnet",
        "modeling.sync_batchnorm.batchnorm",
        "modeling.backbone.utils",
    )
    assert bundled.imported == {}
    code = "\n\n".join(bundled.sources)
    # a module after those it takes definitions from: its imports run before its body
    assert code.index("class SynchronizedBatchNorm2d") < code.index("class ResNet(")
    assert code.index("def init_weight") < code.index("class ResNet(")
    assert not any("modeling" in line or " ." in line for line in imports.lines)
    namespace: dict = {}
    exec(imports.render() + "\n" + code, namespace)
    model = namespace["ResNet101Features"]()  # its default: the bundled SynchronizedBatchNorm2d
    assert type(model.bn1).__name__ == "SynchronizedBatchNorm2d"


def test_clashing_names_are_renamed_and_modules_used_as_modules_imported(
    tmp_path: Path, monkeypatch
) -> None:
    _package(
        tmp_path,
        {
            "bpkg/__init__.py": "",
            "bpkg/b.py": """
                def helper():
                    return 2

                class Block:
                    def value(self):
                        return helper()
            """,
            "bpkg/c.py": """
                def helper():
                    return 3
            """,
            "bpkg/a.py": """
                import bpkg.c as cmod
                from .b import Block
                from .b import helper as other_helper

                def helper():
                    return 1

                class Top(Block):
                    def values(self, helper=None):
                        own = globals()["helper"] if helper is None else helper
                        return (own(), self.value(), other_helper(), cmod.helper())

                def build():
                    return Top() if helper() == 1 else None
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import bpkg.a  # type: ignore[import-not-found]

    imports = Imports()
    bundled = bundle_code([(bpkg.a, "build")], imports, _user_code)
    assert bundled.imported == {"bpkg.c": "bpkg.a uses it as a module"}
    assert "import bpkg.c as cmod" in imports.lines
    code = "\n\n".join(bundled.sources)
    # b's helper is renamed where b's code uses it; a's alias of it is an assignment
    assert "def helper_b():" in code and "return helper_b()" in code
    assert "other_helper = helper_b" in code
    assert code.index("other_helper = helper_b") < code.index("class Top(")
    namespace: dict = {}
    exec(imports.render() + "\n" + code, namespace)
    assert namespace["build"]().values() == (1, 2, 2, 3)


# -- standalone files ------------------------------------------------------------------------


def test_the_import_check_runs_where_the_users_package_is_absent(
    in_repo: Path, tmp_path: Path
) -> None:
    resolve(f"{FILE}:ResNet101", {"output_stride": 16, "BatchNorm": nn.BatchNorm2d})
    assert "modeling" in sys.modules  # importable here, so an in-process check proves nothing
    file = tmp_path / "needs_modeling.py"
    file.write_text(
        "from torch import nn\nfrom modeling.backbone.utils import init_weight\n\n\n"
        "class Net(nn.Module):\n    pass\n"
    )
    with pytest.raises(VerificationError, match="No module named 'modeling'"):
        fresh_import(file, "Net")
    result = cli("verify", f"{file}:Net", "--sizes", "32x32")
    assert_one_line_error(result, "does not stand alone", "No module named 'modeling'", status=1)


def _imported_modules(source: str) -> list[str]:
    """The modules a file's import statements name."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append(node.module or "")
    return out


def _standalone(out: Path, tmp_path: Path, class_name: str) -> str:
    """Run ``out`` from a folder of its own with ``python -I``: no current directory,
    no PYTHONPATH, no user site; the fixture's package is nowhere on sys.path."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out, alone / "out.py")
    script = (
        "import sys, torch; sys.path.insert(0, '.'); import out; "
        f"m = out.{class_name}().eval(); y = m(torch.randn(1, 3, 64, 64)); "
        "print(tuple(y.shape), 'modeling' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=alone, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_fit_with_a_py_argument_then_apply_gives_the_same_standalone_file(
    in_repo: Path, tmp_path: Path
) -> None:
    spec = f"{FILE}:ResNet101Features"
    kw = ["--kw", f"BatchNorm={SYNC_BN}", "--kw", "output_stride=16"]
    first, second, recipe = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "r.toml"
    target = ["--channels", "64", "--stride", "16", "--input", "1x3x64x64"]
    ok(cli("fit", spec, *kw, *target, "--save-recipe", recipe, "-o", first))
    saved = load_recipe(recipe)
    assert str(saved.kw["BatchNorm"]) == SYNC_BN and saved.kw["output_stride"] == 16
    ok(cli("apply", spec, recipe, "-o", second))  # the recipe alone rebuilds the model
    source = first.read_text()
    assert second.read_text() == source
    assert "class SynchronizedBatchNorm2d(_SynchronizedBatchNorm):" in source
    assert "body = ResNet101Features(BatchNorm=SynchronizedBatchNorm2d, output_stride=16)" in source
    assert not [m for m in _imported_modules(source) if m.startswith("modeling")]
    assert "needs only torch" in source
    assert _standalone(first, tmp_path, "ResNet101FeaturesC64S16") == "(1, 64, 4, 4) False"


def test_fit_on_the_tuple_backbone_writes_a_standalone_file(tmp_path: Path) -> None:
    """The issue's own check; the backbone returns (x, low_level_feat), so fit works on
    its largest-downsample output."""
    out = tmp_path / "out.py"
    done = _run(
        "fit", f"{FILE}:ResNet101", *KW, "--channels", "256", "--stride", "16",
        "--input", "1x3x64x64", "-o", out, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    source = out.read_text()
    assert not [m for m in _imported_modules(source) if m.startswith("modeling")]
    assert "BatchNorm=nn.BatchNorm2d" in source
    class_name = source.split("\nclass ")[-1].split("(")[0]
    assert _standalone(out, tmp_path, class_name).startswith("(1, 256, 4, 4)")
