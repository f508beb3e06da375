"""The Python API: every name in ``bbswap.__all__`` stays the function or class it
documents, whichever of bbswap's modules were imported first."""

from __future__ import annotations

import importlib
import pkgutil

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
