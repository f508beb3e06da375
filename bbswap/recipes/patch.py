"""The ``patch`` op: another patch size for a patch embedding (a ViT's, ConvMixer's).

A patch embedding is a conv whose kernel is its stride, with no padding: it reads each
pixel once. Its stride cannot grow past its kernel without leaving pixels unread, and a
patch of 14 pixels reaches no stride of 16. The op makes the conv's kernel and stride
the new patch size, and resamples its weights by the pseudo-inverse of the resize (as FlexiViT
does): the embedding of a patch of the new size is the old embedding of that patch
resized to the old size, as nearly as a linear map can make it (exactly, when the new
patch is the larger), with timm's resize (bicubic, antialiased). What follows the
embedding sees another grid; a ViT on its grid interpolates its position embedding to it,
as for any input size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bbswap.errors import RecipeError, SurgeryError, choices
from bbswap.recipes.schema import Field, Op, OpKind
from bbswap.surgery.core import Surgery, module_at, new_module, parent_path
from bbswap.tracing.tracer import SpatialOp, Trace

MAX_PATCH = 1 << 8  # exclusive, as every bound of a field
Size = tuple[int, int]


def patch_convs(trace: Trace) -> list[SpatialOp]:
    """The patch embeddings on the output's path: conv modules whose kernel is their
    stride (above 1), without padding or dilation."""
    on_path = set(trace.chain)
    return [
        o
        for o in trace.ops
        if o.op == "conv"
        and o.kind == "module"
        and o.id in on_path
        and o.kernel == o.stride
        and max(o.stride) > 1
        and o.padding == (0, 0)
        and o.dilation == (1, 1)
    ]


def resize_matrix(old: int | Size, new: int | Size) -> torch.Tensor:
    """The (nh*nw, oh*ow) matrix of the resize of an old patch (oh x ow, or a side) to a
    new one: bicubic, antialiased, as timm resizes patch embeddings by default."""
    (oh, ow), (nh, nw) = _hw(old), _hw(new)
    basis = torch.eye(oh * ow, dtype=torch.float64).reshape(oh * ow, 1, oh, ow)
    resized = F.interpolate(
        basis, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True
    )
    return resized.reshape(oh * ow, nh * nw).T


def resize_patch_weight(weight: torch.Tensor, new: int | Size) -> torch.Tensor:
    """A patch conv's weight (out, in, kh, kw) for new patches (a side, or h x w):
    ``w'`` such that ``<w', resize(x)> = <w, x>`` for every kh x kw patch ``x``, in the
    least-squares sense (``w' = pinv(R^T) w`` with ``R`` the resize)."""
    out, chans, kh, kw = weight.shape
    nh, nw = _hw(new)
    r = resize_matrix((kh, kw), (nh, nw))  # (nh*nw, kh*kw)
    flat = weight.detach().to(torch.float64).reshape(out * chans, kh * kw)
    resampled = flat @ torch.linalg.pinv(r.T).T  # (out*chans, nh*nw)
    return resampled.reshape(out, chans, nh, nw).to(weight.dtype)


def _hw(size: int | Size) -> Size:
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _side(size: Size) -> str:
    """A patch size as the conv's argument: one number when square."""
    return str(size[0]) if size[0] == size[1] else f"({size[0]}, {size[1]})"


def _conv_with_patch(conv: nn.Conv2d, size: Size) -> tuple[Callable[[], nn.Conv2d], str]:
    source = (
        f"nn.Conv2d({conv.in_channels}, {conv.out_channels}, kernel_size={_side(size)}, "
        f"stride={_side(size)}, bias={conv.bias is not None})"
    )

    def make() -> nn.Conv2d:
        return nn.Conv2d(
            conv.in_channels, conv.out_channels, size, size, bias=conv.bias is not None
        )

    return make, source


@dataclass(frozen=True)
class Patch(Op, kind=OpKind.PATCH):
    """give a patch embedding (a conv whose kernel is its stride) another patch size,
    resampling its weights"""

    fields = (
        Field(
            "size",
            "pair",
            "the new patch side in pixels, or [h, w]",
            required=True,
            minimum=1,
            maximum=MAX_PATCH,
        ),
        Field("at", "str", "the patch conv (default: the first on the output's path)"),
    )
    size: tuple[int, int]
    at: str | None = None

    def validate(self, trace: Trace, where: str) -> None:
        self._conv(trace, where)

    def _conv(self, trace: Trace, where: str) -> SpatialOp:
        convs = patch_convs(trace)
        if not convs:
            field = ".at" if self.at is not None else ""
            raise RecipeError(
                f"{where}{field}: the model has no patch embedding (a conv whose kernel is its "
                "stride, without padding) on its output's path"
            )
        if self.at is None:
            return convs[0]
        for o in convs:
            if o.id == self.at:
                return o
        raise RecipeError(
            f"{where}.at: '{self.at}' is not a patch embedding (patch convs: "
            f"{choices(o.id for o in convs)})"
        )

    def apply(self, surgery: Surgery, where: str) -> None:
        target = self._conv(surgery.trace, where)
        conv = module_at(surgery.model, target.id)
        if not isinstance(conv, nn.Conv2d):
            raise SurgeryError(f"{where}: {target.id} is not an nn.Conv2d patch embedding")
        make, source = _conv_with_patch(conv, self.size)
        new = new_module(make, conv.weight.device)
        if not conv.weight.is_meta:
            with torch.no_grad():
                new.weight.copy_(resize_patch_weight(conv.weight, self.size))
                if conv.bias is not None and new.bias is not None:
                    new.bias.copy_(conv.bias)
        old = f"{conv.kernel_size[0]}x{conv.kernel_size[1]}"
        new_size = f"{self.size[0]}x{self.size[1]}"
        surgery.replace(target.id, new, source, old, new_size, "patch")
        # timm's PatchEmbed sizes its grid, pads and checks the input by its patch_size
        owner = module_at(surgery.model, parent_path(target.id))
        if getattr(owner, "patch_size", None) == tuple(conv.kernel_size):
            surgery.set_attr(parent_path(target.id), "patch_size", self.size)
