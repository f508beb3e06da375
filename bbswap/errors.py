"""The one exception hierarchy of bbswap.

Every error a user can cause is a :class:`BBSwapError`; the command line prints its
message on one line to stderr and exits with status 2. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class BBSwapError(Exception):
    """A mistake in what the user asked for; the message says what and how to fix it."""

    exit_code = 2


class BackboneNotFound(BBSwapError):
    """A backbone spec names nothing that can be built."""


class MissingDependency(BBSwapError):
    """An optional package needed for a spec or output is not installed."""


class InvalidArgument(BBSwapError):
    """A malformed command-line value: --input, --sizes, --kw, --stride, ..."""


class ModelError(BBSwapError):
    """The user's model raised in its constructor or its forward."""


class RecipeError(BBSwapError):
    """A recipe file or one of its ops is invalid."""


class SurgeryError(BBSwapError):
    """An op cannot be applied to this backbone as asked."""


class TargetError(BBSwapError):
    """A fit target that no candidate reaches."""


class VerificationError(BBSwapError):
    """A generated or hand-edited file does not match what it claims."""


def choices(values: Iterable[str], limit: int = 12) -> str:
    """Format valid choices for an error message, eliding a long list."""
    items = list(values)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown
