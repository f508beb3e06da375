"""The command line: parse options, call the library, render its data classes."""

from bbswap.cli.app import app, main

__all__ = ["app", "main"]
