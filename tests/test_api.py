"""The Python API: every name in ``bbswap.__all__`` stays the function or class it
documents, whichever of bbswap's modules were imported first."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import pydoc
import re

import pytest

import bbswap


def test_api_names_survive_importing_every_module() -> None:
    for info in pkgutil.walk_packages(bbswap.__path__, "bbswap."):
        if info.name != "bbswap.__main__":  # runs the command line
            importlib.import_module(info.name)
    for name in bbswap.__all__:
        value = getattr(bbswap, name)
        if name == "__version__":
            assert isinstance(value, str)
        else:
            assert callable(value), f"bbswap.{name} is {value!r}"
            assert not isinstance(value, type(bbswap)), f"bbswap.{name} is a module"


def test_api_fit_is_the_fit_function() -> None:
    from bbswap.search.fit import fit

    assert bbswap.fit is fit


def test_api_report_dict_is_the_json_builder() -> None:
    from bbswap.cli.json_out import report_dict

    assert bbswap.report_dict is report_dict


# -- the library speaks Python: its errors name parameters, never --flags ------------------------


def _refused(call, *words: str) -> str:
    with pytest.raises(bbswap.BBSwapError) as caught:
        call()
    message = str(caught.value)
    assert "--" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


def test_api_errors_name_parameters_not_flags() -> None:
    _refused(lambda: bbswap.inspect_backbone("resnet50", "abc"), "input_shape 'abc'")
    seed = {"channels": 684, "stride": 16}
    _refused(
        lambda: bbswap.fit("resnet50", **seed, prefer="bogus"),
        "prefer 'bogus' is not one of macs, depth, rf",
    )
    _refused(lambda: bbswap.fit("resnet50", channels=684, stride=0), "stride '0'", "positive")
    _refused(
        lambda: bbswap.fit("resnet50", channels=-3, stride=16), "channels must be positive, got -3"
    )


def test_api_errors_are_worded_with_flags_on_the_command_line() -> None:
    from bbswap.errors import BBSwapError, TargetError

    error = TargetError("{in_chans} and {input_shape} disagree", params=("in_chans", "input_shape"))
    assert str(error) == "in_chans and input_shape disagree"
    assert error.as_flags() == "--in-chans and --input disagree"
    plain = BBSwapError("a {brace} stays as it is")
    assert str(plain) == plain.as_flags() == "a {brace} stays as it is"


def test_api_takes_the_enums_and_their_strings() -> None:
    from bbswap.kinds import Mode, Prefer, Rounding

    assert Prefer.parse("depth", "prefer") is Prefer.DEPTH
    assert Rounding.parse(Rounding.ANY, "rounding") is Rounding.ANY
    assert f"{Mode.STRIDE}" == str(Mode.STRIDE) == "stride"
    assert Rounding.values() == ("ceil", "floor", "any")


# -- help(bbswap.X) documents every parameter, with an example ----------------------------------


def _api_callables() -> list[str]:
    return [name for name in bbswap.__all__ if name != "__version__"]


def _documented(doc: str) -> list[str]:
    """The names an ``Args:`` section documents (``name: text`` at its first indent)."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return []
    indent = len(lines[start]) - len(lines[start].lstrip())
    names = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break  # the next section
        match = re.match(r"\s+(\*{0,2}\w+):\s", line)
        if match and len(line) - len(line.lstrip()) == indent + 4:
            names.append(match.group(1))
    return names


def _parameters(obj) -> list[str]:
    names = []
    for p in inspect.signature(obj).parameters.values():
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        names.append(prefix + p.name)
    return names


@pytest.mark.parametrize("name", _api_callables())
def test_api_docstring_documents_every_parameter_in_order(name: str) -> None:
    obj = getattr(bbswap, name)
    doc = inspect.getdoc(obj) or ""
    assert _documented(doc) == _parameters(obj), (name, _documented(doc))
    assert "Example::" in doc, f"bbswap.{name} has no example"


def test_the_docstring_parser_sees_a_missing_parameter() -> None:
    def documented(a: int, b: int = 0, **rest: int) -> None:
        """Text.

        Args:
            a: The first,
                over two lines.
            **rest: More.

        Example::

            documented(1)
        """

    assert _documented(inspect.getdoc(documented) or "") == ["a", "**rest"]
    assert _parameters(documented) == ["a", "b", "**rest"]


def test_help_of_fit_shows_its_parameters() -> None:
    text = pydoc.render_doc(bbswap.fit, renderer=pydoc.plaintext)
    for param in ("channels:", "stride:", "in_chans:", "prefer:", "rounding:", "kwargs:"):
        assert param in text


def test_dir_lists_the_lazy_api() -> None:
    listed = dir(bbswap)
    assert set(bbswap.__all__) <= set(listed)
    assert "__version__" in listed and "fit" in listed and "export" in listed
    assert "importlib" not in listed  # the module's own imports are not the API


# -- reports print as their summary, not their data -------------------------------------------


def test_reprs_are_the_summary_line() -> None:
    report = bbswap.inspect_backbone("resnet50")
    params = f"{report.trace.params / 1e6:.1f}M params"
    assert repr(report) == (
        f"InspectReport(resnet50, 1x3x224x224 -> 2048@/32, {len(report.trace.stages)} stages, "
        f"{params})"
    )
    assert repr(report.trace).startswith("Trace(1x3x224x224 -> 1x1000, ")
    assert len(repr(report.trace)) < 120
    found = bbswap.fit("resnet50", channels=684, stride=16, in_chans=1, input_shape="1x1x128x316")
    w = found.winner
    assert repr(found).startswith("FitResult(resnet50 -> 684 channels at 1/16, ceil rounding; ")
    assert f"winner {w.label} ({w.mode})" in repr(found)
    assert repr(w).startswith(f"Candidate({w.label}, {w.mode}, exact, ")
    result = bbswap.apply_recipe("resnet50", bbswap.winner_recipe(found))
    assert repr(result).startswith("ApplyResult(resnet50 + fit-resnet50-c684-s16, 1x1x128x316 ")
    assert f"-> 684@/16, {len(result.edits)} edits" in repr(result)
    for obj in (report, found, result, *found.candidates):
        assert len(repr(obj)) < 200, repr(obj)


def test_repr_of_a_matrix_and_a_verify_report() -> None:
    from bbswap.verify.checks import Check, VerifyReport

    table = bbswap.matrix(["resnet18"], strides=(16, 32), channels=256, verify=False)
    assert repr(table) == (
        "Matrix(resnet18; strides 16, 32; 1 of 1 backbones reach every target, 0 refused)"
    )
    checks = (Check("import", True, "x" * 500), Check("outputs", False, "y" * 500))
    shown = repr(VerifyReport("f.py:Net", checks))
    assert shown == "VerifyReport(f.py:Net, failed outputs, 2 checks)"
