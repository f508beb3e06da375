"""Ops that change the model's structure: ``truncate`` (drop what follows a stage),
``pool`` (append a pooling) and ``dropout`` (add Dropout after every block of a class)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bbswap.errors import RecipeError, SurgeryError, choices
from bbswap.kinds import Layout
from bbswap.recipes.channels import need_spatial
from bbswap.recipes.schema import MAX_STRIDE, Field, Op, OpKind
from bbswap.surgery.core import Surgery, parent_path
from bbswap.surgery.layout import ChannelsFirst
from bbswap.tracing.ids import PointId
from bbswap.tracing.tracer import Trace


def _top_stages(trace: Trace) -> list[str]:
    return [st.path for st in trace.stages if "." not in st.path.split("(")[0]]


def _dropped(trace: Trace, after: str) -> list[str]:
    """Modules after ``after`` among its siblings and those of each ancestor."""
    if after not in trace.modules:  # a functional stage of the model's own forward
        names = [st.path for st in trace.stages]
        return [p for p in names[names.index(after) + 1 :] if p in trace.modules]
    dropped: list[str] = []
    path = after
    order = {m: i for i, m in enumerate(trace.modules)}
    while True:
        point = PointId.parse(path)
        parent = point.owner if point.is_call else parent_path(path)
        siblings = [
            m for m in trace.modules if parent_path(m) == parent and "(" not in m and m != path
        ]
        anchor = trace.modules.index(path) if path in trace.modules else -1
        dropped += [m for m in siblings if order[m] > anchor and anchor >= 0]
        if not parent:
            break
        path = parent
    return dropped


@dataclass(frozen=True)
class Truncate(Op, kind=OpKind.TRUNCATE):
    """drop everything after a stage (for zoo models: the classifier head)"""

    fields = (Field("after", "str", "the last stage to keep", required=True),)
    after: str

    def validate(self, trace: Trace, where: str) -> None:
        stages = _top_stages(trace)
        if self.after not in stages and self.after not in trace.modules:
            deeper = next((m for m in trace.modules if "." in m), "features.5")
            raise RecipeError(
                f"{where}.after: '{self.after}' is not a stage or module "
                f"(stages: {choices(stages)}; a deeper module path such as "
                f"'{deeper}' works too)"
            )

    def apply(self, surgery: Surgery, where: str) -> None:
        stage = surgery.trace.stage(self.after)
        if stage is None:
            raise SurgeryError(f"{where}.after: '{self.after}' is never called in the forward")
        surgery.truncate(self.after, _dropped(surgery.trace, self.after))
        surgery.out_channels = stage.channels
        surgery.out_spatial = stage.spatial
        if stage.spatial and stage.layout is Layout.NHWC:  # returned channels first, as NCHW
            surgery.append_output("", "nchw", ChannelsFirst(), "ChannelsFirst()")


@dataclass(frozen=True)
class Pool(Op, kind=OpKind.POOL):
    """append an average or max pooling reduction, per axis"""

    fields = (
        Field(
            "stride", "pair", "its stride, or [h, w]", required=True, minimum=1, maximum=MAX_STRIDE
        ),
        Field("kind", "str", "avg or max", default="avg", choices=("avg", "max")),
        Field("kernel", "pair", "the window (default: the stride)", minimum=1, maximum=MAX_STRIDE),
        Field("ceil_mode", "bool", "round sizes up (ceil) rather than down", default=True),
    )
    stride: tuple[int, int]
    kind: str = "avg"
    kernel: tuple[int, int] | None = None
    ceil_mode: bool = True

    def apply(self, surgery: Surgery, where: str) -> None:
        need_spatial(surgery, where, "pool")
        kernel = self.kernel or self.stride
        cls = nn.AvgPool2d if self.kind == "avg" else nn.MaxPool2d
        module = cls(kernel, self.stride, ceil_mode=self.ceil_mode)
        source = (
            f"nn.{cls.__name__}(kernel_size={kernel}, stride={self.stride}, "
            f"ceil_mode={self.ceil_mode})"
        )
        surgery.append_output("", "pool", module, source)


@dataclass(frozen=True)
class Dropout(Op, kind=OpKind.DROPOUT):
    """add Dropout(p) after every block of a given class"""

    fields = (
        Field("block", "str", "the block class name, e.g. Bottleneck", required=True),
        Field("p", "float", "the drop probability", default=0.2, minimum=0.0, maximum=1.0),
    )
    block: str
    p: float = 0.2

    def apply(self, surgery: Surgery, where: str) -> None:
        model = surgery.model
        paths = [p for p, m in model.named_modules() if p and type(m).__name__ == self.block]
        if not paths:
            names = sorted({type(m).__name__ for _, m in model.named_modules()})
            raise RecipeError(
                f"{where}.block: no module of class '{self.block}' (classes: {choices(names)})"
            )
        for path in paths:
            source = f"nn.Dropout(p={self.p:g})"
            surgery.append_output(path, "dropout", nn.Dropout(self.p), source)
