"""Emit a patched backbone to disk: build it with real weights, write the source,
prove the file equal to the in-memory model, then write the file and its weights."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bbswap.backbones.registry import Backbone, resolve
from bbswap.backbones.weights import LoadReport, load_into, read_checkpoint, state_bytes
from bbswap.codegen.module_file import Emitted, emit
from bbswap.codegen.outputs import check_output, write_files
from bbswap.errors import InvalidArgument
from bbswap.recipes.schema import Recipe
from bbswap.surgery.apply import ApplyResult, apply_recipe, source_input
from bbswap.verify.checks import (
    VerifyReport,
    construct,
    import_file,
    require,
    round_up,
    sweep_sizes,
    verify_model,
)


@dataclass(frozen=True)
class Exported:
    path: Path
    weights_path: Path | None
    emitted: Emitted
    result: ApplyResult
    report: VerifyReport
    load: LoadReport | None


def output_paths(
    out: str | Path, weights: bool, safetensors: bool, force: bool
) -> tuple[Path, Path | None]:
    """The .py and weights paths for ``out``, each checked before any work."""
    path = Path(out)
    if path.suffix != ".py":
        raise InvalidArgument(f"-o {out}: the output must be a .py file")
    if not path.parent.exists():
        raise InvalidArgument(f"-o {out}: folder {path.parent} does not exist")
    weights_path = path.with_suffix(".safetensors" if safetensors else ".pth") if weights else None
    for p in (path, weights_path):
        if p is not None:
            check_output(p, force, "-o")
    return path, weights_path


def compare_sizes(
    h: int, w: int, minimum: tuple[int, int], multiple: tuple[int, int] = (1, 1)
) -> list[tuple[int, int]]:
    """The traced size (capped for speed on a CPU) and two odd sizes (the next multiples
    for a backbone that takes only multiples of some size)."""
    h0, w0 = min(h, 128), min(w, 160)
    mh, mw = minimum
    sizes = [(h0, w0), (h0 | 1, (w0 + 2) | 1), (max(mh, 31) | 1, max(mw, 45) | 1)]
    return list(dict.fromkeys(round_up(size, multiple) for size in sizes))


def export(
    spec: str | Backbone,
    recipe: Recipe,
    out: str | Path,
    *,
    input_shape: str | None = None,
    kwargs: dict[str, Any] | None = None,
    weights: str | None = None,
    partial: bool = False,
    class_name: str | None = None,
    dropin: bool = False,
    import_mode: bool = False,
    force: bool = False,
    safetensors: bool = False,
    seed: int = 0,
    also: dict[Path, bytes] | None = None,
) -> Exported:
    """Build ``recipe`` on ``spec`` with real weights, emit it, verify the file by round
    trip, then write it (and the carried weights, and any files in ``also``) as one
    transaction: all or nothing, every path checked before any work."""
    for extra in also or {}:
        check_output(extra, force, "output")
    backbone = spec if isinstance(spec, Backbone) else resolve(spec, kwargs)
    path, weights_path = output_paths(out, weights is not None, safetensors, force)
    _, chans = source_input(backbone, recipe, input_shape)
    torch.manual_seed(seed)
    model = backbone.build(in_chans=chans)
    load = None
    if weights is not None:
        state, note = read_checkpoint(weights)
        load = load_into(model, state, weights, partial)
        if note:
            load = LoadReport(load.loaded, load.missing, load.unexpected, note)
    result = apply_recipe(backbone, recipe, input_shape, model=model)
    emitted = emit(result, class_name=class_name, dropin=dropin, import_mode=import_mode)
    report = check_emitted(emitted, result, source=model)
    require(report)
    files = {**(also or {})}
    if weights_path is not None:
        files[weights_path] = state_bytes(weights_path, result.model.state_dict())
    files[path] = emitted.source.encode("utf-8")  # last: the file that names the others
    write_files(files, force)
    return Exported(path, weights_path, emitted, result, report, load)


def check_emitted(
    emitted: Emitted, result: ApplyResult, source: torch.nn.Module | None = None
) -> VerifyReport:
    """Import the emitted source without bbswap and compare it with the patched model."""
    after = result.after
    minimum = after.min_input()
    rules = after.size_rules()
    multiple = (rules[0].multiple, rules[1].multiple)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "bbswap_emitted.py"
        file.write_text(emitted.source, encoding="utf-8")
        module = import_file(file)
        model = construct(module, emitted.class_name, "the emitted file")
        _, c, h, w = after.input_shape
        return verify_model(
            model,
            f"the emitted {emitted.class_name}",
            in_chans=c,
            reference=result.model,
            compare_sizes=compare_sizes(h, w, minimum, multiple),
            # and two multiples of 32, for a backbone that takes no other sizes
            sweep=[
                *sweep_sizes(minimum, multiple=multiple),
                (max(64, minimum[0] + 31) // 32 * 32, 96),
                (160, 224),
            ],
            state=result.model.state_dict(),
            source=source.eval() if source is not None else None,
        )
