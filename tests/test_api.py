"""The Python API: every name in ``bbswap.__all__`` stays the function or class it
documents, whichever of bbswap's modules were imported first."""

from __future__ import annotations

import importlib
import pkgutil

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
