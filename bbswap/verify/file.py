"""``bbswap verify``: check any backbone file against what it should produce."""

from __future__ import annotations

from pathlib import Path

from bbswap.backbones.weights import read_checkpoint
from bbswap.errors import InvalidArgument
from bbswap.kinds import Rounding
from bbswap.parsing import parse_sizes, parse_stride
from bbswap.tracing.inspection import first_conv_in_channels, inspect_backbone
from bbswap.verify.checks import (
    VerifyReport,
    construct,
    import_file,
    verify_model,
)
from bbswap.verify.fresh import fresh_import

DEFAULT_SIZES = [(33, 97), (64, 64), (61, 203), (117, 293), (128, 316)]


def like_sizes(spec: str, sizes: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, int]]:
    """Another backbone's output H, W at each size (its features, for a classifier)."""
    report = inspect_backbone(spec, f"{sizes[0][0]}x{sizes[0][1]}", sizes=sizes)
    out = {}
    for check in report.sizes:
        if check.traced_hw is None:
            raise InvalidArgument(f"{{like}} {spec}: its output is not spatial", params=("like",))
        out[check.input_hw] = check.traced_hw
    return out


def check_file(
    target: str,
    *,
    weights: str | None = None,
    channels: int | None = None,
    stride: str | None = None,
    like: str | None = None,
    sizes: str | None = None,
    in_chans: int | None = None,
    rounding: Rounding | str = Rounding.CEIL,
) -> VerifyReport:
    """Check a backbone file (emitted or edited by hand) as ``bbswap verify`` does: import
    it where bbswap cannot be imported, construct the class, run it on real CPU tensors and
    check its ``output_size`` and whatever target is given.

    Args:
        target: ``"FILE.py:Class"``.
        weights: A checkpoint to load into the class strictly first.
        channels: The output channels expected.
        stride: The downsample expected: ``"16"`` or ``"32x4"`` (H x W).
        like: A backbone spec whose output size the file must match at every size.
        sizes: The input sizes to check, ``"33x97,117x293"``; default five sizes.
        in_chans: The input channels; default the first conv's.
        rounding: The size rule of ``stride``: ``"ceil"``, ``"floor"`` or ``"any"``.

    Returns:
        A :class:`~bbswap.verify.checks.VerifyReport`; ``report.ok`` is whether every
        check passed (a failed check is a result, not an exception).

    Example::

        report = bbswap.check_file("backbone.py:ResNet50C684S16", channels=684, stride="16")
        report.ok, [(c.name, c.ok) for c in report.checks]
    """
    path_text, sep, class_name = target.rpartition(":")
    if not sep or not class_name or not path_text.endswith(".py"):
        raise InvalidArgument(f"malformed target '{target}': expected FILE.py:Class")
    if channels is not None and channels <= 0:
        raise InvalidArgument(
            f"{{channels}} must be positive, got {channels}", params=("channels",)
        )
    rule = Rounding.parse(rounding, "rounding")
    wanted_stride = parse_stride(stride) if stride is not None else None
    size_list = parse_sizes(sizes) if sizes is not None else DEFAULT_SIZES
    module = import_file(Path(path_text))
    model = construct(module, class_name, path_text, meta=True)
    fresh_import(Path(path_text), class_name)
    chans = in_chans or first_conv_in_channels(model)
    if chans is None:
        raise InvalidArgument(
            f"cannot tell the input channels of {class_name}; pass {{in_chans}}",
            params=("in_chans",),
        )
    state = read_checkpoint(weights)[0] if weights is not None else None
    return verify_model(
        model,
        target,
        in_chans=chans,
        rebuild=lambda: construct(module, class_name, path_text),
        sweep=size_list,
        state=state,
        channels=channels,
        stride=wanted_stride,
        rounding=rule.value,
        like=(like, like_sizes(like, size_list)) if like is not None else None,
    )
