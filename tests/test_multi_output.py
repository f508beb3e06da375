"""Backbones whose forward returns a tuple, a list or a dict of tensors.

``inspect`` lists every output (shape, channels, downsample) in text and JSON; ``fit`` and
``apply`` work on one of them, ``--source-output INDEX|KEY`` (``source_output`` in the
Python API and in recipes), by default the one with the largest downsample, and say
which; the emitted backbone returns that output alone, with the appended ops applied to
it. Values are compared with the source model's chosen output (same weights) followed by
the appended op. A bad index or key is one line naming the valid ones.

Fixtures: tests/fixtures/multi_output_models.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_one_line_error, cli, import_plain, ok
from hypothesis import given
from hypothesis import strategies as st
from recipe_helpers import randomize_batchnorm, recipe
from torch import nn

from bbswap.backbones.registry import resolve
from bbswap.codegen.export import export
from bbswap.errors import InvalidArgument, RecipeError
from bbswap.recipes.toml_io import load_recipe, recipe_from_dict, recipe_to_toml
from bbswap.search.fit import fit
from bbswap.surgery.apply import apply_recipe
from bbswap.tracing.inspection import inspect_backbone
from bbswap.tracing.outputs import Output, choose_output
from bbswap.tracing.tracer import trace_module

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "multi_output_models.py"
POOL = {"op": "pool", "stride": 2}
INPUT = "1x3x64x64"


def spec(name: str) -> str:
    return f"{FIXTURES}:{name}"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def source_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = resolve(spec(name)).build(in_chans=3)
    randomize_batchnorm(model)
    return model.eval()


def real_outputs(name: str, x: torch.Tensor) -> dict[Any, torch.Tensor]:
    """The source's outputs by key, from a real forward."""
    with torch.no_grad():
        out = source_model(name)(x)
    items = out.items() if isinstance(out, dict) else enumerate(out)
    return {k: v for k, v in items}


NAMES = ["DeepLabStyle", "DictOutput", "ListOutput", "SideBranch"]


@pytest.mark.parametrize("name", NAMES)
def test_inspect_json_lists_every_output(name: str):
    result = cli("inspect", spec(name), "--input", INPUT, "--json")
    ok(result)
    data = json.loads(result.stdout)
    real = real_outputs(name, torch.randn(1, 3, 64, 64))
    assert [o["key"] for o in data["outputs"]] == list(real)
    for o in data["outputs"]:
        tensor = real[o["key"]]
        assert o["output"] == list(tensor.shape)
        assert o["channels"] == tensor.shape[1]
        if tensor.dim() == 4:
            assert o["downsample"] == [64 / tensor.shape[2], 64 / tensor.shape[3]]
    spatial = [o for o in data["outputs"] if o["downsample"] is not None]
    deepest = max(spatial, key=lambda o: o["downsample"][0])
    assert data["source_output"]["key"] == deepest["key"]
    assert data["source_output"]["default"] is True
    assert data["output"] == deepest["output"]


def test_inspect_text_lists_every_output():
    result = ok(cli("inspect", spec("DictOutput"), "--input", INPUT, "--source-output", "mid"))
    real = real_outputs("DictOutput", torch.randn(1, 3, 64, 64))
    text = result.stdout
    table = text[
        text.index("outputs: the forward returns a dict of 3") : text.index("source output:")
    ]
    rows = {}
    for line in table.splitlines()[4:]:  # after the title, a blank line, the head, a rule
        cells = line.split()
        if cells:
            rows[cells[-5]] = cells  # [mark] key shape ch down RF
    for key, tensor in real.items():
        mark, shape, chans, down = rows[key][:-5], *rows[key][-4:-1]
        assert shape == "x".join(map(str, tensor.shape))
        assert int(chans) == tensor.shape[1]
        assert int(down) == 64 // tensor.shape[2]
        assert mark == (["*"] if key == "mid" else [])
    assert "source output: mid of the dict of 3 the forward returns (asked for)" in text
    assert "size rule: H -> ceil(H/8)" in text


def test_default_is_stated_in_fit_text_and_json():
    text = ok(cli("fit", spec("DeepLabStyle"), "--channels", 64, "--stride", 8, "-i", INPUT))
    assert "source output: 0 of the tuple of 2 the forward returns (the largest downsample" in (
        text.stdout
    )
    data = json.loads(
        ok(
            cli("fit", spec("DeepLabStyle"), "--channels", 64, "--stride", 8, "-i", INPUT, "--json")
        ).stdout
    )
    assert data["source_output"] == {"key": 0, "returns": "tuple", "default": True}
    assert all(c["output"][1:] == [64, 8, 8] for c in data["candidates"] if c["exact"])


@pytest.mark.parametrize(
    ("name", "key"), [("DeepLabStyle", 1), ("DictOutput", "mid"), ("ListOutput", 0)]
)
def test_apply_pools_the_chosen_output(name: str, key: int | str):
    source = source_model(name)
    result = apply_recipe(spec(name), recipe(POOL), INPUT, model=source, source_output=key)
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        want = F.avg_pool2d(source(x)[key], 2, ceil_mode=True)
        got = result.model.eval()(x)
    torch.testing.assert_close(got, want)
    assert result.before.output_key == key and result.before.output_given
    assert result.recipe.source_output == key


def test_emitted_file_returns_the_chosen_output(tmp_path: Path):
    """The written backbone returns the chosen output pooled, value by value with the
    source's weights, and its docstring and recipe name the output."""
    out = tmp_path / "deeplab.py"
    source = source_model("DeepLabStyle")
    exported = export(spec("DeepLabStyle"), recipe(POOL), out, input_shape=INPUT, source_output="1")
    text = out.read_text()
    assert "Source output:   1 of the tuple its forward returns (0, 1)" in text
    assert "source_output = 1\n" in text
    module = import_plain(out)
    model = getattr(module, exported.emitted.class_name)().eval()
    model.load_state_dict(source.state_dict(), strict=False)
    assert set(model.state_dict()) < set(source.state_dict())  # layer2, layer3: not run
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.avg_pool2d(source(x)[1], 2, ceil_mode=True))
    assert model.output_size(50, 70) == model(x).shape[-2:]


def test_fit_projects_a_dict_output(tmp_path: Path):
    out = tmp_path / "dict.py"
    saved = tmp_path / "dict.toml"
    args = ["--channels", 24, "--stride", 4, "-i", INPUT, "--source-output", "mid"]
    ok(cli("fit", spec("DictOutput"), *args, "-o", out, "--save-recipe", saved, "--json"))
    assert load_recipe(saved).source_output == "mid"
    module = import_plain(out)
    cls = next(v for k, v in vars(module).items() if k.startswith("DictOutputC24S4"))
    y = cls().eval()(torch.randn(1, 3, 40, 40))
    assert tuple(y.shape) == (1, 24, *cls.output_size(40, 40))
    assert cls.output_size(40, 40) == (math.ceil(40 / 4),) * 2  # the target stride
    # the saved recipe names the output, so replaying it gives the same file
    again = tmp_path / "again.py"
    ok(cli("apply", spec("DictOutput"), saved, "-o", again, "--class-name", cls.__name__))
    assert again.read_text() == out.read_text()


def test_side_branch_is_dropped_and_said_so(tmp_path: Path):
    out = tmp_path / "side.py"
    export(spec("SideBranch"), recipe(POOL), out, input_shape=INPUT)
    text = out.read_text()
    patched = text[text.index("class SideBranchC") :]
    assert "this class returns its output 0 alone, so it no" in patched
    assert "aux" in patched.split("no\n")[1].split("\n")[0]  # the comment names it
    assert "self.aux" not in patched


def test_python_api_fit():
    result = fit(spec("ListOutput"), channels=8, stride=8, input_shape=INPUT, source_output=1)
    assert result.source.output_key == 1
    assert result.winner.ok and result.winner.recipe.source_output == 1
    assert result.winner.trace.output_shape[1:] == (8, 8, 8)


@pytest.mark.parametrize(
    ("command", "name", "value", "valid"),
    [
        ("fit", "DeepLabStyle", "2", "valid indices: 0, 1"),
        ("apply", "DictOutput", "high", "valid keys: low, mid, out"),
        ("inspect", "ListOutput", "-1", "valid indices: 0, 1, 2, 3"),
    ],
)
def test_a_bad_output_is_one_line(tmp_path: Path, command: str, name: str, value: str, valid: str):
    out = tmp_path / "out.py"
    (tmp_path / "pool.toml").write_text('name = "pool"\n[[ops]]\nop = "pool"\nstride = 2\n')
    args: list[Any] = {
        "fit": ["--channels", 8, "--stride", 8, "-o", out],
        "apply": [tmp_path / "pool.toml", "-o", out],
        "inspect": [],
    }[command]
    result = cli(command, spec(name), *args, "--input", INPUT, "--source-output", value)
    assert_one_line_error(result, f"--source-output '{value}'", valid)
    assert not out.exists()


def test_an_output_asked_of_a_single_tensor_is_an_error():
    with pytest.raises(InvalidArgument, match="returns one tensor"):
        fit("resnet18", channels=64, stride=8, input_shape="64x64", source_output=0)


def test_recipe_field_is_checked_and_written():
    base = {"name": "r", "ops": [POOL]}
    for bad in (-1, 1.5, True, [0]):
        with pytest.raises(RecipeError, match="source_output must be"):
            recipe_from_dict({**base, "source_output": bad})
    for good in (0, 3, "out"):
        r = recipe_from_dict({**base, "source_output": good})
        assert recipe_from_dict(_toml(recipe_to_toml(r))).source_output == good


def _toml(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)


def test_the_trace_of_every_output_follows_its_chain():
    """Each output's recorded chain predicts its size at other inputs."""
    model = source_model("DictOutput")
    t = trace_module(model, (1, 3, 64, 64))
    for h, w in ((33, 45), (70, 91)):
        real = real_outputs("DictOutput", torch.randn(1, 3, h, w))
        for o in t.outputs:
            assert t.output_size(h, w, o.chain) == tuple(real[o.key].shape[-2:])
    report = inspect_backbone(spec("DictOutput"), INPUT, sizes=[(33, 45)], source_output="low")
    assert all(c.ok for c in report.sizes)


_OUTPUT = st.tuples(st.sampled_from([1, 2, 4, 8, 16, 32]), st.booleans())


@given(
    st.lists(_OUTPUT, min_size=1, max_size=6),
    st.booleans(),
    st.one_of(st.integers(-2, 8), st.text(max_size=3)),
)
def test_choosing_an_output(specs: list[tuple[int, bool]], as_dict: bool, wanted: int | str):
    """The default is the first spatial output of the largest downsample (any output if
    none is spatial); a key or index picks its own; anything else names every valid one."""
    keys: list[int | str] = (
        [f"k{i}" for i in range(len(specs))] if as_dict else list(range(len(specs)))
    )
    outputs = tuple(
        Output(k, (1, 4, 8, 8) if spatial else (1, 4), (d, d), (1, 1), ())
        for k, (d, spatial) in zip(keys, specs)
    )
    kind = "dict" if as_dict else "tuple"
    chosen = choose_output(outputs, kind, None, "m")
    pool = [o for o in outputs if o.spatial] or list(outputs)
    assert chosen == next(o for o in pool if o.downsample == max(p.downsample for p in pool))
    for o in outputs:
        assert choose_output(outputs, kind, o.key, "m") is o
        assert choose_output(outputs, kind, str(o.key), "m") is o
    if wanted in keys or str(wanted) in map(str, keys):
        return
    with pytest.raises(InvalidArgument) as error:
        choose_output(outputs, kind, wanted, "m")
    message = str(error.value)
    assert message.startswith(f"source_output {wanted!r} is not an output of m")
    assert message.endswith(", ".join(map(str, keys)) + ")")
