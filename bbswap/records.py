"""Plain records of data classes: the attributes named, under their own names."""

from __future__ import annotations

from typing import Any


def attrs(obj: object, *names: str) -> dict[str, Any]:
    """``{name: obj.name}`` for each of ``names``, in their order."""
    return {name: getattr(obj, name) for name in names}


def short_count(n: float) -> str:
    """A count in three significant digits for a summary: ``25.6M``, ``5.22G``, ``684``."""
    for size, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def dims(shape: tuple[int, ...]) -> str:
    """A shape as printed: ``1x3x224x224``."""
    return "x".join(str(d) for d in shape)
