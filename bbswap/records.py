"""Plain records of data classes: the attributes named, under their own names."""

from __future__ import annotations

from typing import Any


def attrs(obj: object, *names: str) -> dict[str, Any]:
    """``{name: obj.name}`` for each of ``names``, in their order."""
    return {name: getattr(obj, name) for name in names}
