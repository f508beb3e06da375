"""The id of a reduction point or stage, as recipes name it.

A module is named by its path (``layer2.0.conv2``); a functional call made in a
module's forward by the owner's path, the function and, after the first, the call's
index: ``trans1.avg_pool2d()``, ``max_pool2d()`` in the model's own forward,
``stem.pad()#1`` for its second ``pad`` call. :class:`PointId` writes and reads that
form; nothing else builds or takes such a string apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PointId:
    owner: str  # the module path; for a call, the module whose forward makes it
    func: str | None = None  # the function of a functional call; None for a module
    call: int = 0  # which call of ``func`` in the owner's forward, from 0

    @property
    def is_call(self) -> bool:
        return self.func is not None

    def __str__(self) -> str:
        if self.func is None:
            return self.owner
        prefix = f"{self.owner}." if self.owner else ""
        return f"{prefix}{self.func}()" + (f"#{self.call}" if self.call else "")

    @classmethod
    def parse(cls, text: str) -> PointId:
        """The id written as ``text``: a call if it ends in ``()`` or ``()#k``."""
        head, paren, index = text.partition("()")
        if not paren or (index and not (index[:1] == "#" and index[1:].isdigit())):
            return cls(text)
        owner, _, func = head.rpartition(".")
        return cls(owner, func, int(index[1:]) if index else 0)


def call_id(owner: str, func: str, call: int) -> str:
    """The id of the ``call``-th call of ``func`` in ``owner``'s forward."""
    return str(PointId(owner, func, call))
