"""The one way a string from outside (a recipe, a path, a model's module names) enters
generated source: as data, never as code.

:func:`as_source` is the only function that turns such text into source. It writes a
string literal, the text of a one-line comment, or the body of a docstring, escaping
everything that could end the literal, comment or docstring early or that Python would
read differently: quotes, backslashes, line breaks, control characters, unpaired
surrogates. Identifiers go through :func:`is_plain_name`, which accepts only names that
Python reads back unchanged (NFKC normalisation makes ``Ａbc`` the attribute ``Abc``).
"""

from __future__ import annotations

import enum
import keyword
import unicodedata


class Place(enum.Enum):
    """Where in generated source a piece of outside text goes."""

    STRING = "string"  # a complete string literal, quotes included
    COMMENT = "comment"  # the text after ``# ``, kept on one line
    DOCSTRING = "docstring"  # the body between triple quotes; line breaks kept


def _escape_char(char: str) -> str:
    """A character Python would not read back as itself, as a backslash escape."""
    escaped = repr(char)[1:-1]
    if escaped == char:  # printable but not safe in this place (a quote, a backslash)
        return "\\" + char
    return escaped


def _unprintable(char: str, keep_newline: bool) -> bool:
    return not char.isprintable() and not (keep_newline and char == "\n")


def as_source(text: str, place: Place) -> str:
    """``text`` as source for ``place``, reading back as exactly ``text``."""
    if place is Place.STRING:
        literal = repr(text)
        if literal.startswith("'") and '"' not in text:  # double quotes, as ruff format writes
            literal = '"' + literal[1:-1].replace("\\'", "'") + '"'
        return literal
    if place is Place.COMMENT:
        # a comment is not read back, but it must stay one comment: no line breaks,
        # no control characters (shown escaped, as repr shows them)
        return "".join(_escape_char(c) if _unprintable(c, False) else c for c in text)
    out, quotes = [], 0  # quotes: the run of plain double quotes just written
    for i, char in enumerate(text):
        if char == "\\" or _unprintable(char, True):
            out.append(_escape_char(char))
            quotes = 0
        elif char == '"' and (quotes == 2 or i == len(text) - 1):
            out.append('\\"')  # never three in a row, never one before the closing quotes
            quotes = 0
        else:
            out.append(char)
            quotes = quotes + 1 if char == '"' else 0
    return "".join(out)


def is_plain_name(name: str) -> bool:
    """Whether ``name`` can be written bare, as an attribute or a variable."""
    return (
        name.isidentifier()
        and not keyword.iskeyword(name)
        and unicodedata.normalize("NFKC", name) == name
    )
