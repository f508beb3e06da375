"""Outside text never becomes code in an emitted file.

Every string that reaches generated source (a recipe's name and description, the
backbone spec's path, a constructor argument's value, the names of a model's own
modules and of its recipe ops' targets) is fuzzed with hypothesis, payloads that try to
close a docstring, a string or a comment among them. Each emitted file must parse, its
syntax tree must equal that of the same file emitted with harmless text once every
string constant is blanked out (so the text changed only data), and importing it must
not run the payload (a marker file must not appear).
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import sys
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bbswap.codegen.module_file import emit
from bbswap.codegen.text import Place, as_source
from bbswap.errors import SurgeryError
from bbswap.recipes.registry import make_op
from bbswap.recipes.schema import Recipe
from bbswap.surgery.apply import apply_recipe

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "named_models.py"

_CLOSERS = ['"""', "'''", '"', "'", "\\", "\n", "\r", "\x00", "\x1b[2J", "\u2028", "#", "):"]


def _payloads(marker: Path) -> st.SearchStrategy[str]:
    """Text built from what closes literals and comments, around a payload that, run as
    code, creates ``marker``."""
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    parts = st.sampled_from([*_CLOSERS, code, "; ", "x", " ", "Ａbc", "\\N{BULLET}", "é"])
    return st.lists(parts, min_size=1, max_size=8).map("".join)


def _blanked(source: str) -> str:
    """The syntax tree with every string constant replaced by one placeholder."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = "_"
    return ast.dump(tree)


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"hostile_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _named(call: ast.Call, name: str) -> bool:
    return isinstance(call.func, ast.Name) and call.func.id == name


def _recipe(name: str, description: str) -> Recipe:
    ops = (make_op("stride", at="pool", stride=1), make_op("project", channels=8))
    return Recipe(name=name, ops=ops, description=description)


def _source(spec: str, name: str, description: str, tag: str) -> str:
    result = apply_recipe(spec, _recipe(name, description), "1x3x32x32", kwargs={"tag": tag})
    return emit(result).source


@pytest.fixture(scope="module")
def baseline() -> str:
    return _blanked(_source(f"{FIXTURE}:Tagged", "plain", "plain", "plain"))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_recipe_text_and_kw_values_stay_data(
    data: st.DataObject, baseline: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    name = data.draw(_payloads(marker), label="name")
    description = data.draw(_payloads(marker), label="description")
    tag = data.draw(_payloads(marker), label="tag")
    source = _source(f"{FIXTURE}:Tagged", name, description, tag)
    assert _blanked(source) == baseline
    tree = ast.parse(source)
    patched = tree.body[-1]
    assert isinstance(patched, ast.ClassDef)
    doc = ast.get_docstring(patched, clean=False) or ""
    assert doc.startswith(f"{FIXTURE}:Tagged patched by recipe {name}: ")
    (call,) = [n for n in ast.walk(patched) if isinstance(n, ast.Call) and _named(n, "Tagged")]
    assert [ast.literal_eval(k.value) for k in call.keywords if k.arg == "tag"] == [tag]
    out = tmp_path / "emitted.py"
    out.write_text(source, encoding="utf-8")
    _import(out)
    assert not marker.exists()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(folder=st.lists(st.sampled_from(['"""', "'", "\\", "\n", "x", " ", "#"]), min_size=1))
def test_a_hostile_backbone_path_stays_data(folder: list[str], tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("spec")
    where = root / "".join(folder)
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE, where / "named_models.py")
    spec = f"{where / 'named_models.py'}:Tagged"
    source = _source(spec, "plain", "plain", "plain")
    plain = _source(f"{FIXTURE}:Tagged", "plain", "plain", "plain")
    assert _blanked(source) == _blanked(plain)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_module_names_stay_data(data: st.DataObject, tmp_path_factory) -> None:
    """A model may register children under any name without a dot; every such name is
    written as a string (``getattr``, ``add_module``), and the file builds the same model."""
    tmp = tmp_path_factory.mktemp("names")
    marker = tmp / "ran"
    names = data.draw(
        st.lists(
            _payloads(marker).filter(lambda s: "." not in s and not hasattr(nn.Module, s)),
            min_size=2,
            max_size=2,
            unique=True,
        ),
        label="names",
    )
    recipe = Recipe(name="r", ops=(make_op("project", channels=8),))
    spec = f"{FIXTURE}:Named"
    if any(
        not n.isprintable()
        or set(n) & set("\\\"'")
        or (n.isidentifier() and unicodedata.normalize("NFKC", n) != n)
        for n in names
    ):
        # torch.fx itself writes module names unescaped, and identifiers as attributes
        # (which Python reads NFKC-normalised): refused in one line, before any fx code
        with pytest.raises(SurgeryError, match="rename the module") as refused:
            apply_recipe(spec, recipe, "1x3x16x16", kwargs={"names": names})
        assert "\n" not in str(refused.value) and not marker.exists()
        return
    result = apply_recipe(spec, recipe, "1x3x16x16", kwargs={"names": names})
    source = emit(result).source
    out = tmp / "emitted.py"
    out.write_text(source, encoding="utf-8")
    module = _import(out)
    assert not marker.exists()
    (cls,) = [v for k, v in vars(module).items() if k.startswith("Named") and k != "Named"]
    built = cls()
    assert [n for n, _ in built.named_children()] == [*names, "proj", "proj_bn"]
    assert built(torch.zeros(1, 3, 16, 16)).shape == (1, 8, 8, 8)


@pytest.fixture(scope="module")
def tagged_result():
    return apply_recipe(f"{FIXTURE}:Tagged", _recipe("plain", "plain"), "1x3x32x32")


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_hostile_weights_file_name_stays_data(
    data: st.DataObject, tagged_result, tmp_path: Path
) -> None:
    """The weights file's name (the ``-o`` name's) is a string constant of the file and a
    line of its docstring, nothing else."""
    marker = tmp_path / "ran"
    name = data.draw(_payloads(marker), label="name") + ".pth"
    digest = "0123456789abcdef" * 4
    source = emit(tagged_result, weights=(name, digest)).source
    plain = emit(tagged_result, weights=("plain.pth", digest)).source
    assert _blanked(source) == _blanked(plain)
    tree = ast.parse(source)
    (assign,) = [
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "WEIGHTS_FILE"
    ]
    assert ast.literal_eval(assign.value) == name
    assert f"Weights:         {name}, beside this file" in (
        ast.get_docstring(tree, clean=False) or ""
    )
    out = tmp_path / "emitted.py"
    out.write_text(source, encoding="utf-8")
    module = _import(out)
    assert vars(module)["WEIGHTS_FILE"] == name
    assert not marker.exists()


@pytest.mark.parametrize("text", ['x"""; import os; """', 'a"', "\\N{x}", "\x00\x1b", "é\u2028"])
def test_as_source_reads_back_as_the_text(text: str) -> None:
    assert ast.literal_eval(as_source(text, Place.STRING)) == text
    assert ast.literal_eval('"""' + as_source(text, Place.DOCSTRING) + '"""') == text
    comment = "# " + as_source(text, Place.COMMENT)
    assert ast.parse(comment + "\n").body == [] and "\n" not in comment
