"""The one exception hierarchy of bbswap.

Every error a user can cause is a :class:`BBSwapError`; the command line prints its
message on one line to stderr and exits with the error's :attr:`~BBSwapError.exit_code`:
2 for a usage error (the default), 1 for a :class:`VerificationError` (the command ran,
and what it checked is not so). Anything else is a bug and keeps its traceback.

A message names the arguments it is about by their Python parameter (``input_shape``);
the command line words the same message with its flags (``--input``, see :func:`flag`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

# parameters whose flag is not their name with dashes
FLAGS = {
    "input_shape": "--input",
    "strides": "--stride",
    "targets": "--target",
    "returns": "--return",
}


class BBSwapError(Exception):
    """A mistake in what the user asked for; the message says what and how to fix it.

    Args:
        message: The message; each of ``params`` appears in it as ``{name}``, which reads
            as the Python parameter in ``str(error)`` and as the flag in :meth:`as_flags`.
        brief: The same in a few words, for a cell of ``bbswap matrix``; default the
            class's.
        params: The arguments the message is about.

    Example::

        try:
            bbswap.fit("resnet50", channels=684, stride=0)
        except bbswap.BBSwapError as error:
            print(error)   # malformed stride '0': every dimension must be positive
    """

    exit_code = 2  # a usage error: the request is wrong, nothing was done
    brief_default = "error"

    def __init_subclass__(cls, brief: str | None = None, **kwargs: object) -> None:
        """``class X(BBSwapError, brief="...")``: the brief of X's errors that give none
        (without one, X keeps its base's)."""
        super().__init_subclass__(**kwargs)
        if brief is not None:
            cls.brief_default = brief

    def __init__(
        self, message: str, brief: str | None = None, *, params: Sequence[str] = ()
    ) -> None:
        self.template = message
        self.params = tuple(params)
        super().__init__(self.worded(str))
        self.brief = brief or self.brief_default

    def worded(self, name_of: Callable[[str], str]) -> str:
        """The message with each of ``params`` spelt by ``name_of``."""
        text = self.template
        for param in self.params:
            text = text.replace("{" + param + "}", name_of(param))
        return text

    def as_flags(self) -> str:
        """The message as the command line words it: ``--input``, not ``input_shape``."""
        return self.worded(flag)


class BackboneNotFound(BBSwapError, brief="unknown backbone"):
    """A backbone spec names nothing that can be built."""


class MissingDependency(BBSwapError, brief="missing package"):
    """An optional package needed for a spec or output is not installed."""


class InvalidArgument(BBSwapError, brief="bad argument"):
    """A malformed argument: an input shape, a size list, a ``--kw`` value, a stride, ..."""


class ModelError(BBSwapError, brief="build or forward fails"):
    """The user's model raised in its constructor or its forward."""


class RecipeError(BBSwapError, brief="bad recipe"):
    """A recipe file or one of its ops is invalid."""


class SurgeryError(BBSwapError, brief="surgery refused"):
    """An op cannot be applied to this backbone as asked."""


class TargetError(BBSwapError, brief="no exact plan"):
    """A fit target that no candidate reaches."""


class OneInputSize(TargetError, brief="fixed size: one input size"):
    """A fit target no candidate reaches because the model takes one input size (an
    attention bias or a reshape of one grid's size fails at any other) and no cut before
    the stage that ties it reaches the target: no size rule holds, so surgery cannot help."""


class VerificationError(BBSwapError, brief="verification fails"):
    """A generated or hand-edited file does not match what it claims."""

    exit_code = 1  # the command ran as asked; what it checked failed


class NotACNN(BBSwapError, brief="not a CNN"):
    """A backbone whose features follow no size rule: tied to one input size (a positional
    embedding of fixed size, a linear layer across its tokens) or tokens off its grid."""


def flag(param: str) -> str:
    """The command-line option of a Python parameter: ``in_chans`` -> ``--in-chans``."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def choices(values: Iterable[str], limit: int = 12) -> str:
    """Format valid choices for an error message, eliding a long list."""
    items = list(values)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


def gist(error: BaseException) -> str:
    """An error as its type and the first line of its message (``TypeError: ...``); the
    type alone for one without a message (a bare ``assert``)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
