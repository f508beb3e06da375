"""Plain vision transformers (ViT) as backbones whose features lie on a grid.

A ViT cuts the image into patches with one strided conv, runs its blocks on the patch
tokens (after one or more prefix tokens: a class token, register or distillation tokens)
and adds a position embedding learnt for one grid size. Its tokens keep their number
through every block, so once the prefix tokens are dropped they lie back on the grid of
patches, H/patch x W/patch, as ViTDet and DPT use them. What ties the model to one input
size is the position embedding alone: it is interpolated to the grid of each input, as
timm does with ``dynamic_img_size`` and torchvision does when it loads weights for
another image size.

:func:`recognise` reads that layout off timm's and torchvision's ``VisionTransformer``
(by their attributes, and by the methods that add the position embedding and run the
blocks being theirs: a subclass that changes either, as EVA's rotary embedding does, is
not taken for one).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bbswap.kinds import Choice

Pair = tuple[int, int]


class ViTFamily(Choice):
    """Whose attribute layout a ViT has."""

    TIMM = "timm"  # timm.models.vision_transformer.VisionTransformer
    TORCHVISION = "torchvision"  # torchvision.models.VisionTransformer


@dataclass(frozen=True)
class ViTLayout:
    """Where a ViT keeps what the grid needs, and how its embedding is resized."""

    family: ViTFamily
    patch: Pair  # the patch conv's kernel and stride
    grid: Pair | None  # the grid the position embedding was learnt for (None: no embedding)
    dim: int  # the tokens' width
    prefix: int  # prefix tokens in the sequence (class, registers, distillation)
    pos_prefix: int  # of them, those the position embedding holds a row for
    prefix_names: tuple[str, ...]  # the parameters that hold them, in sequence order
    patch_conv: str  # the path of the patch-embedding conv
    position: str  # the path of the position embedding ("" for none)
    mode: str  # interpolation mode of the embedding, as its library resizes it
    align_corners: bool
    antialias: bool

    @property
    def note(self) -> str:
        """One line for the inspect output and the emitted file's docstring."""
        pos = (
            f"position embedding {self.position} learnt for {self.grid[0]}x{self.grid[1]}, "
            f"interpolated ({self.mode}) to each input's grid"
            if self.grid is not None
            else "no position embedding"
        )
        return (
            f"a ViT on its token grid: patch {self.patch[0]}x{self.patch[1]}, "
            f"{self.prefix} prefix token{'s' if self.prefix != 1 else ''} dropped, {pos}"
        )


def grid_of(model: object) -> ViTLayout | None:
    """The layout of a ViT already laid on its grid (``bbswap.surgery.vit_grid.ViTGrid``)."""
    layout = getattr(model, "vit_layout", None)
    return layout if isinstance(layout, ViTLayout) else None


def grid_note(model: object) -> str | None:
    """What lays a model's tokens on their grid, for a timm model whose own
    ``forward_intermediates`` does (``bbswap.surgery.intermediates_grid``); else None."""
    note = getattr(model, "intermediates_note", None)
    return note if isinstance(note, str) else None


def recognise(model: nn.Module) -> ViTLayout | None:
    """The layout of a timm or torchvision ViT; None for any other model."""
    return _timm_layout(model) or _torchvision_layout(model)


def _patch(conv: object) -> tuple[Pair, int] | None:
    """The patch and the output width of a non-overlapping patch conv (kernel = stride,
    no padding)."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        return None
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    if k != s or tuple(conv.dilation) != (1, 1) or conv.padding not in ((0, 0), "valid"):
        return None
    return (int(k[0]), int(k[1])), int(conv.out_channels)


def _token(model: nn.Module, name: str, dim: int) -> int | None:
    """How many prefix tokens parameter ``name`` holds (0 when it is None); None when it
    is not a (1, K, dim) tensor."""
    t = getattr(model, name, None)
    if t is None:
        return 0
    if not isinstance(t, nn.Parameter) or t.dim() != 3 or t.shape[0] != 1 or t.shape[2] != dim:
        return None
    return int(t.shape[1])


def _method(model: object, name: str) -> str:
    """The qualified name of the method ``name`` of the model's class ("" for none)."""
    return str(getattr(getattr(type(model), name, None), "__qualname__", ""))


_TIMM_POSITIONS = {"VisionTransformer._pos_embed", "VisionTransformerDistilled._pos_embed"}


def _timm_layout(model: nn.Module) -> ViTLayout | None:
    if _method(model, "_pos_embed") not in _TIMM_POSITIONS:
        return None
    if _method(model, "forward_features") != "VisionTransformer.forward_features":
        return None
    if not isinstance(getattr(model, "blocks", None), nn.Sequential):
        return None
    embed = getattr(model, "patch_embed", None)
    found = _patch(getattr(embed, "proj", None))
    needed = ("blocks", "norm", "pos_drop", "patch_drop", "norm_pre", "num_prefix_tokens")
    if found is None or not all(hasattr(model, n) for n in needed):
        return None
    if not isinstance(getattr(embed, "norm", None), nn.Module):
        return None
    patch, dim = found
    names = ("cls_token", "reg_token", "dist_token")  # in sequence order
    counts = [_token(model, n, dim) for n in names]
    if any(c is None for c in counts) or sum(c or 0 for c in counts) != model.num_prefix_tokens:
        return None
    prefix = int(model.num_prefix_tokens)
    pos = getattr(model, "pos_embed", None)
    pos_prefix = 0 if getattr(model, "no_embed_class", False) else prefix
    grid = _grid(pos, dim, pos_prefix, getattr(embed, "grid_size", None))
    if pos is not None and grid is None:
        return None
    return ViTLayout(
        ViTFamily.TIMM,
        patch,
        grid,
        dim,
        prefix,
        pos_prefix,
        tuple(n for n, c in zip(names, counts) if c),
        "patch_embed.proj",
        "pos_embed" if pos is not None else "",
        "bicubic",
        False,
        True,
    )


def _grid(pos: object, dim: int, prefix: int, size: object) -> Pair | None:
    """The grid a (1, prefix + H*W, dim) position embedding was learnt for."""
    if not isinstance(pos, nn.Parameter) or pos.dim() != 3 or pos.shape[2] != dim:
        return None
    cells = int(pos.shape[1]) - prefix
    if isinstance(size, tuple) and len(size) == 2 and size[0] * size[1] == cells:
        return (int(size[0]), int(size[1]))
    side = round(cells**0.5)
    return (side, side) if side * side == cells and cells > 0 else None


def _torchvision_layout(model: nn.Module) -> ViTLayout | None:
    found = _patch(getattr(model, "conv_proj", None))
    encoder = getattr(model, "encoder", None)
    if (_method(model, "_process_input"), _method(encoder, "forward")) != (
        "VisionTransformer._process_input",
        "Encoder.forward",
    ):
        return None
    needed = ("pos_embedding", "dropout", "layers", "ln")
    if found is None or not all(hasattr(encoder, n) for n in needed):
        return None
    patch, dim = found
    prefix = _token(model, "class_token", dim)
    if not prefix:
        return None
    grid = _grid(getattr(encoder, "pos_embedding", None), dim, prefix, None)
    if grid is None:
        return None
    return ViTLayout(
        ViTFamily.TORCHVISION,
        patch,
        grid,
        dim,
        prefix,
        prefix,
        ("class_token",),
        "conv_proj",
        "encoder.pos_embedding",
        "bicubic",
        True,
        False,
    )
