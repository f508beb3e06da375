"""Hostile and broken input: exit 0 with a verified file, or exit 2 with one line and
nothing written; never a traceback.

Hypothesis draws recipe files (bytes that are not UTF-8, deep nesting, huge numbers,
wrong types, control characters, random op tables) and input shapes; fixed cases cover
files that are too large. Each run goes through the command line, against a small
two-conv model so that the suite stays within its time bound.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, cli, import_plain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bbswap.recipes.toml_io import MAX_RECIPE_BYTES

MODEL = f"{Path(__file__).resolve().parent / 'fixtures' / 'named_models.py'}:Tagged"
FIELDS = ["op", "at", "after", "stride", "channels", "rule", "mode", "kind", "p", "block"]
OPS = ["in_channels", "stride", "exact", "truncate", "project", "pool", "dropout", "nope"]

_values = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(alphabet=string.printable + "\x00\x1b\u2028é", max_size=12),
    st.sampled_from(["stem", "pool", "stem.conv", "max_pool2d()", "Tagged", "ceil", "dilate"]),
    st.lists(st.integers(min_value=-3, max_value=10**19), max_size=3),
)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, str):
        return (
            '"'
            + "".join(
                c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in value
            )
            + '"'
        )
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


@st.composite
def recipes(draw: st.DrawFn) -> bytes:
    lines = [f"name = {_toml_value(draw(st.text(max_size=10)))}"]
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        lines.append("[[ops]]")
        lines.append(f'op = "{draw(st.sampled_from(OPS))}"')
        for key in draw(st.lists(st.sampled_from(FIELDS[1:]), max_size=3, unique=True)):
            lines.append(f"{key} = {_toml_value(draw(_values))}")
    text = "\n".join(lines) + "\n"
    noise = draw(st.sampled_from([b"", b"\xff\xfe", b"\x00", b"[[ops]\n", b"a = " + b"[" * 3000]))
    return text.encode("utf-8") + noise


def _outcome(result, out: Path) -> None:
    """Exit 0 with a written file, or one error line and nothing written."""
    if result.exit_code == 0:
        assert out.is_file()
        return
    assert_one_line_error(result)
    assert not out.exists()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=recipes())
def test_any_recipe_file_applies_or_is_one_line(data: bytes, tmp_path: Path) -> None:
    recipe, out = tmp_path / "r.toml", tmp_path / "out.py"
    recipe.write_bytes(data)
    out.unlink(missing_ok=True)
    result = cli("apply", MODEL, recipe, "--input", "1x3x32x32", "-o", out, "--force")
    _outcome(result, out)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dims=st.lists(
        st.one_of(st.integers(min_value=-5, max_value=10**20), st.just("x"), st.just("")),
        min_size=1,
        max_size=5,
    )
)
def test_any_input_shape_inspects_or_is_one_line(dims: list, tmp_path: Path) -> None:
    text = "x".join(str(d) for d in dims)
    result = cli("inspect", MODEL, "--input", text)
    if result.exit_code != 0:
        assert_one_line_error(result)


_ONE_OP = b'name = "r"\n[[ops]]\n'


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'name = "r"\n\xff\xfe[[ops]]\n', "not UTF-8"),
        (b"a = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
        (b"# " + b"x" * (MAX_RECIPE_BYTES + 10) + b"\n", "larger than"),
        (
            b'name = "r"\n[[ops]]\nop = "stride"\nat = "stem"\nstride = 100000000000000000000\n',
            "must be below",
        ),
        (
            b'name = "r"\n[[ops]]\nop = "project"\nchannels = 99999999999999999999\n',
            "must be below",
        ),
        (b'name = "r"\n[[ops]]\nop = "dropout"\nblock = "Conv2d"\np = nan\n', "finite number"),
    ],
    ids=["not-utf8", "deep-nesting", "too-large", "huge-stride", "huge-channels", "nan-p"],
)
def test_broken_recipe_files_are_one_line(data: bytes, fragment: str, tmp_path: Path) -> None:
    recipe, out = tmp_path / "r.toml", tmp_path / "out.py"
    recipe.write_bytes(data)
    result = cli("apply", MODEL, recipe, "--input", "1x3x32x32", "-o", out)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_the_cpu_fallback_refuses_an_input_too_large_for_real_tensors() -> None:
    bad = Path(__file__).resolve().parent / "fixtures" / "bad_models.py"
    result = cli("inspect", f"{bad}:NeedsItem", "--input", "1x3x40000x40000")
    assert_one_line_error(result, "cannot run on the meta device", "17.9 GiB", "smaller input")


@pytest.mark.parametrize("text", ["1x3x99999999x9", "1x3x" + "9" * 20 + "x9", "9" * 200])
def test_enormous_input_sizes_are_refused_before_any_work(text: str) -> None:
    assert_one_line_error(cli("inspect", MODEL, "--input", text), "--input")


def test_apply_without_an_in_channels_op_builds_for_the_inputs_channels(tmp_path: Path) -> None:
    """A one-channel --input and no in_channels op: the source is built with one channel,
    and so is the emitted file's builder."""
    recipe, out = tmp_path / "r.toml", tmp_path / "t.py"
    recipe.write_text('name = "r"\n[[ops]]\nop = "truncate"\nafter = "layer4"\n')
    result = cli("apply", "resnet18", recipe, "--input", "1x1x64x64", "-o", out)
    assert result.exit_code == 0, result.stderr
    module = import_plain(out)
    model = module.ResNet18C512S32().eval()
    assert model.conv1.in_channels == 1
    assert tuple(model(torch.zeros(1, 1, 64, 64)).shape) == (1, 512, 2, 2)


_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(20)
)


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("bad.yaml", b"tag: \xff\xfe\n", "not UTF-8"),
        ("bomb.yaml", _BOMB.encode(), "aliases"),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, "cannot parse"),
        ("big.yaml", b"# " + b"x" * (1 << 21), "larger than"),
    ],
    ids=["not-utf8", "alias-bomb", "deep-json", "too-large"],
)
def test_broken_kw_files_are_one_line(name: str, data: bytes, fragment: str, tmp_path) -> None:
    (tmp_path / name).write_bytes(data)
    result = cli("inspect", MODEL, "--kw", f"tag=@{tmp_path / name}", "--input", "1x3x32x32")
    assert_one_line_error(result, fragment)


@pytest.mark.parametrize(
    "value", ["[" + "1, " * 50_000 + "]", "(" * 3000 + ")" * 3000, "[" * 60 + "]" * 60 + "x"]
)
def test_enormous_or_nested_kw_literals_are_one_line(value: str) -> None:
    result = cli("inspect", MODEL, "--kw", f"tag={value}", "--input", "1x3x32x32")
    assert_one_line_error(result, "--kw")


def _checkpoint(kind: str, path: Path) -> None:
    from named_models import Tagged  # type: ignore[import-not-found]

    state = Tagged().state_dict()
    if kind == "meta":
        state = {k: v.to("meta") for k, v in state.items()}
    elif kind == "sparse":
        state = {k: v.to_sparse() if v.dim() == 1 else v for k, v in state.items()}
    if kind == "garbage":
        path.write_bytes(b"\x80\x02not a pickle at all")
    elif kind == "bad-safetensors":
        path.write_bytes(b"\xff" * 8 + b"{not json")
    else:
        torch.save(state, path)


@pytest.mark.parametrize("kind", ["meta", "sparse", "garbage", "bad-safetensors"])
def test_broken_checkpoints_are_one_line_and_nothing_is_written(kind: str, tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(MODEL.rpartition(":")[0]).parent))
    try:
        suffix = ".safetensors" if kind == "bad-safetensors" else ".pth"
        ckpt = tmp_path / f"ckpt{suffix}"
        _checkpoint(kind, ckpt)
    finally:
        sys.path.pop(0)
    recipe, out = tmp_path / "r.toml", tmp_path / "out" / "t.py"
    out.parent.mkdir()
    recipe.write_text('name = "r"\n[[ops]]\nop = "project"\nchannels = 8\n')
    result = cli("apply", MODEL, recipe, "--input", "1x3x32x32", "-o", out, "--weights", ckpt)
    assert_one_line_error(result, str(ckpt))
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "--class-name is empty"),
        ("Ａbc", "Python reads the name as 'Abc'"),
        ("a\x1bb", "'a\\x1bb' is not a Python identifier"),
    ],
)
def test_class_names_that_python_would_not_read_back(name: str, fragment: str, tmp_path) -> None:
    recipe, out = tmp_path / "r.toml", tmp_path / "t.py"
    recipe.write_text('name = "r"\n[[ops]]\nop = "project"\nchannels = 8\n')
    result = cli("apply", MODEL, recipe, "--input", "1x3x32x32", "-o", out, "--class-name", name)
    assert_one_line_error(result, fragment)
    assert not out.exists()
