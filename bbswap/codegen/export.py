"""Emit a patched backbone to disk: build it with real weights, write the source,
prove the file equal to the in-memory model, then write the file and its weights.

The weights' bytes are made before the source: the source records their SHA-256, and the
file verified (its loader included) is the one written, next to those very bytes."""

from __future__ import annotations

import functools
import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bbswap.backbones.instance import as_backbone, require_emittable
from bbswap.backbones.registry import Backbone
from bbswap.backbones.weights import (
    LoadReport,
    WeightsSource,
    checkpoint_file,
    load_into,
    read_checkpoint,
    source_of,
    state_bytes,
)
from bbswap.codegen.module_file import Emitted, emit
from bbswap.codegen.outputs import check_output, write_files
from bbswap.codegen.weights_code import ERROR_CLASS, LOADER
from bbswap.errors import InvalidArgument
from bbswap.kinds import Phase
from bbswap.recipes.schema import Recipe
from bbswap.surgery.apply import ApplyResult, apply_recipe, run_ops, source_input
from bbswap.surgery.outputs_plan import OutputsPlan
from bbswap.surgery.several_outputs import with_outputs
from bbswap.tracing.tracer import Trace
from bbswap.verify.checks import (
    Check,
    VerifyReport,
    construct,
    import_file,
    require,
    round_up,
    sweep_sizes,
    verify_model,
)
from bbswap.verify.fresh import start_fresh_import
from bbswap.verify.outputs_check import verify_several


@dataclass(frozen=True)
class Exported:
    path: Path
    weights_path: Path | None
    emitted: Emitted
    result: ApplyResult
    report: VerifyReport
    load: LoadReport | None
    weights_source: WeightsSource | None = None  # where the source backbone's weights came from

    def __repr__(self) -> str:
        """``Exported(backbone.py + backbone.pth, class ResNet50C684S16, 5 checks ok)``."""
        files = f"{self.path}" + (f" + {self.weights_path}" if self.weights_path else "")
        state = "ok" if self.report.ok else "failed"
        return (
            f"Exported({files}, class {self.emitted.class_name}, "
            f"{len(self.report.checks)} checks {state})"
        )


def output_paths(
    out: str | Path, weights: bool, safetensors: bool, force: bool
) -> tuple[Path, Path | None]:
    """The .py and weights paths for ``out``, each checked before any work."""
    path = Path(out)
    if path.suffix != ".py":
        raise InvalidArgument(f"-o {out}: the output must be a .py file")
    weights_path = path.with_suffix(".safetensors" if safetensors else ".pth") if weights else None
    for p in (path, weights_path):
        if p is not None:
            check_output(p, force, "-o")
    return path, weights_path


def compare_sizes(
    downsample: tuple[float, float], minimum: tuple[int, int], multiple: tuple[int, int] = (1, 1)
) -> list[tuple[int, int]]:
    """Two small odd sizes at which to compare values: one whose output is about 4
    pixels a side (so that every tap of a dilated 3x3 conv sees data), one smaller; at
    least the smallest valid input, and the next multiples for a backbone that takes only
    multiples of some size."""
    dh, dw = (min(max(int(d), 1), 64) for d in downsample)
    mh, mw = minimum
    sizes = [(max(mh, 4 * dh) | 1, max(mw, 4 * dw + 2) | 1), (max(mh, 17) | 1, max(mw, 23) | 1)]
    return list(dict.fromkeys(round_up(size, multiple) for size in sizes))


def export(
    spec: str | Backbone | torch.nn.Module,
    recipe: Recipe,
    out: str | Path,
    *,
    input_shape: str | None = None,
    kwargs: dict[str, Any] | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    partial: bool = False,
    class_name: str | None = None,
    dropin: bool = False,
    import_mode: bool = False,
    force: bool = False,
    safetensors: bool = False,
    seed: int = 0,
    also: dict[Path, bytes] | None = None,
    source_output: int | str | None = None,
    on_phase: Callable[[Phase], None] | None = None,
    outputs: OutputsPlan | None = None,
) -> Exported:
    """Build ``recipe`` on a backbone with real weights, emit it, verify the file by round
    trip, then write it (and the carried weights, and any files in ``also``) as one
    transaction: all or nothing, every path checked before any work.

    The weights are random (from ``seed``) unless ``weights`` names a checkpoint (or a
    folder holding one) or ``pretrained`` asks a ``tv:``/``timm:`` builder for its own;
    the emitted docstring records where they came from and that file's SHA-256.

    A model instance given as ``spec`` is emitted from the builder that makes the same
    model (a zoo entry, a torchvision builder, a timm architecture, or its class called
    with ``kwargs``), bundled or imported as that spec would be, and its own weights are
    carried into ``FILE.pth``; when no builder makes the same model, a one-line error says
    so before any work. The instance is never changed.

    Args:
        spec: A backbone spec, a resolved :class:`~bbswap.backbones.registry.Backbone`, or
            a model instance (an ``nn.Module``).
        recipe: The recipe to apply.
        out: The ``.py`` file to write.
        input_shape: The dummy input, ``"NxCxHxW"`` or ``"HxW"``; default the recipe's.
        kwargs: Constructor arguments for a spec; for a model instance, the arguments it
            was constructed with.
        weights: A checkpoint (``.pth``, ``.pt`` or ``.safetensors``), or a folder holding
            one, to load into the source backbone; its weights are carried into
            ``FILE.pth`` beside ``out``.
        pretrained: Carry the ``tv:``/``timm:`` builder's own weights instead.
        partial: Load ``weights`` non-strictly, reporting missing and unexpected keys.
        class_name: The emitted class's name; default from the backbone and the target.
        dropin: Give the class a constructor that accepts and ignores any arguments.
        import_mode: Import the source backbone from its package instead of bundling it.
        force: Replace existing files.
        safetensors: Write the carried weights as ``.safetensors`` instead of ``.pth``.
        seed: The random seed of the weights of a backbone built without a checkpoint.
        also: More files to write in the same transaction, as ``{path: bytes}``.
        source_output: Which output of a backbone that returns several to make the file
            from (an index or a key); default the one with the largest downsample.
        on_phase: Called as the build, the emit and the verification begin
            (:class:`bbswap.kinds.Phase`).
        outputs: The outputs of a ``--like`` backbone that returns several (or takes a
            mask), as :attr:`~bbswap.search.fit.FitResult.outputs` plans them: the file
            returns them all, in that backbone's structure, and is checked for each.

    Returns:
        An :class:`Exported`: the paths written, the emitted source, the apply result,
        the verification report and how the checkpoint loaded.

    Raises:
        VerificationError: The emitted file failed a check (nothing is written).

    Example::

        found = bbswap.fit("resnet50", channels=684, stride=16, in_chans=1)
        bbswap.export("resnet50", bbswap.winner_recipe(found), "backbone.py")
        model = torchvision.models.resnet18()
        bbswap.export(model, bbswap.winner_recipe(bbswap.fit(model, channels=256, stride=16)),
                      "resnet18_s16.py")                # also writes resnet18_s16.pth
    """
    phase = on_phase or (lambda _: None)
    for extra in also or {}:
        check_output(extra, force, "output")
    # the recipe's constructor arguments, those given here taking precedence
    merged = kwargs if isinstance(spec, torch.nn.Module) else {**recipe.kw, **(kwargs or {})}
    backbone, checkpoint = weights_options(spec, merged, weights, pretrained)
    carry = checkpoint is not None or backbone.pretrained or isinstance(spec, torch.nn.Module)
    path, weights_path = output_paths(out, carry, safetensors, force)
    _, chans = source_input(backbone, recipe, input_shape)
    phase(Phase.BUILD)
    torch.manual_seed(seed)
    model, load, origin = _source_model(backbone, chans, checkpoint, partial)
    result = _patched(backbone, recipe, input_shape, model, source_output, outputs)
    files = {**(also or {})}
    carried, recorded = None, None
    if weights_path is not None:  # the exact bytes written, hashed into the emitted file
        files[weights_path] = state_bytes(weights_path, result.model.state_dict())
        carried = (weights_path.name, files[weights_path])
        recorded = (weights_path.name, hashlib.sha256(files[weights_path]).hexdigest())
    phase(Phase.EMIT)
    emitted = emit(
        result,
        class_name=class_name,
        dropin=dropin,
        import_mode=import_mode,
        weights=recorded,
        weights_source=origin,
    )
    phase(Phase.VERIFY)

    def source() -> torch.nn.Module:  # the unpatched backbone, built only if asked for
        return backbone.build(in_chans=chans)

    report = check_emitted(emitted, result, source=source, weights=carried)
    require(report)
    files[path] = emitted.source.encode("utf-8")  # last: the file that names the others
    write_files(files, force)
    return Exported(path, weights_path, emitted, result, report, load, origin)


def weights_options(
    spec: str | Backbone | torch.nn.Module,
    kwargs: dict[str, Any] | None,
    weights: str | Path | None,
    pretrained: bool,
) -> tuple[Backbone, Path | None]:
    """The backbone (asking for its builder's own weights with ``pretrained``) and the
    checkpoint file ``weights`` names (the one in a folder), checked before any work."""
    if pretrained and weights is not None:
        raise InvalidArgument(
            "{pretrained} and {weights} are two sources of weights; give one",
            params=("pretrained", "weights"),
        )
    backbone = as_backbone(spec, kwargs)
    require_emittable(backbone)
    backbone = backbone.with_pretrained() if pretrained else backbone
    return backbone, checkpoint_file(weights) if weights is not None else None


def _source_model(
    backbone: Backbone, chans: int, checkpoint: Path | None, partial: bool
) -> tuple[torch.nn.Module, LoadReport | None, WeightsSource | None]:
    """The source backbone with its weights: the builder's own, a checkpoint's or random;
    the load report of a checkpoint, and where the weights came from."""
    if backbone.pretrained:
        model, source = backbone.build_pretrained(in_chans=chans)
        return model, None, source
    model = backbone.build(in_chans=chans)
    if checkpoint is None:
        return model, None, None
    state, note = read_checkpoint(checkpoint)
    load = load_into(model, state, str(checkpoint), partial)
    if note:
        load = LoadReport(load.loaded, load.missing, load.unexpected, note)
    return model, load, source_of("checkpoint", checkpoint)


def check_sizes(after: Trace) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The sizes an emitted file is checked at: values at two small odd ones, shapes at
    those and twelve more (ten small ones from the smallest valid input up, and two
    multiples of 32, for a backbone that takes no other sizes)."""
    minimum = after.min_input()
    rules = after.size_rules()
    multiple = (rules[0].multiple, rules[1].multiple)
    sweep = [
        *sweep_sizes(minimum, multiple=multiple),
        (max(64, minimum[0] + 31) // 32 * 32, 96),
        (160, 224),
    ]
    return compare_sizes(after.downsample, minimum, multiple), sweep


def _patched(
    backbone: Backbone,
    recipe: Recipe,
    input_shape: str | None,
    model: torch.nn.Module,
    source_output: int | str | None,
    outputs: OutputsPlan | None,
) -> ApplyResult:
    """The recipe planned and traced on the meta device, then applied to ``model`` itself
    (built for this alone), so the weights are held once."""
    result = apply_recipe(backbone, recipe, input_shape, source_output=source_output)
    patched = run_ops(model, result.before, result.recipe, in_place=True).finish()
    result = replace(result, model=patched)
    return with_outputs(result, outputs) if outputs is not None else result


def check_emitted(
    emitted: Emitted,
    result: ApplyResult,
    source: Callable[[], torch.nn.Module] | None = None,
    weights: tuple[str, bytes] | None = None,
) -> VerifyReport:
    """Import the emitted source without bbswap and check it against the patched model:
    its shapes at 12 sizes and more on the meta device, its values at two small odd
    sizes on real tensors, with the patched model's own weights loaded strictly (and
    shared, not copied). ``source`` builds the unpatched backbone, asked for only where
    the file fails (and built on the meta device when it runs there). With ``weights``
    (the weights file's name and bytes), check its loader, too."""
    after = result.after
    compared, swept = check_sizes(after)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "bbswap_emitted.py"
        file.write_text(emitted.source, encoding="utf-8")
        alone = start_fresh_import(
            file, emitted.class_name, "the emitted file", _not_bundled(emitted)
        )
        try:  # the checks here run while the fresh interpreter does its own
            report = _check_in_process(emitted, result, file, compared, swept, source, weights)
        except Exception:
            alone.wait()  # its failure says more: the file does not even stand alone
            raise
        except BaseException:  # an interrupt: end it, wait for nothing
            alone.interpreter.close()
            raise
        alone.wait()
        return report


def _check_in_process(
    emitted: Emitted,
    result: ApplyResult,
    file: Path,
    compared: list[tuple[int, int]],
    swept: list[tuple[int, int]],
    source: Callable[[], torch.nn.Module] | None,
    weights: tuple[str, bytes] | None,
) -> VerifyReport:
    """:func:`check_emitted`'s checks in this process, on the file imported here."""
    module = import_file(file)
    where = "the emitted file"
    model = construct(module, emitted.class_name, where, meta=True)
    c = result.after.input_shape[1]
    verify = (
        verify_model
        if result.outputs is None
        else functools.partial(verify_several, plan=result.outputs)
    )
    report = verify(
        model,
        f"the emitted {emitted.class_name}",
        in_chans=c,
        rebuild=lambda: construct(module, emitted.class_name, where),
        reference=result.model,
        compare_sizes=compared,
        sweep=swept,
        state=result.model.state_dict(),
        source=source,
    )
    if weights is None:
        return report
    (file.parent / weights[0]).write_bytes(weights[1])
    cls = getattr(module, emitted.class_name)
    check = check_loader(cls, file.parent / weights[0], result.model.state_dict())
    return VerifyReport(report.target, (*report.checks, check))


def _not_bundled(emitted: Emitted) -> str:
    """Why the emitted file imports modules of the user's, for an import that fails."""
    if not emitted.imported:
        return ""
    listed = "; ".join(f"{module}: {why}" for module, why in emitted.imported)
    return f" (it imports modules of yours that could not be bundled: {listed})"


def check_loader(cls: type, file: Path, state: dict[str, torch.Tensor]) -> Check:
    """The emitted class's loader gives the carried weights from ``file`` (the one beside
    the module) and refuses a file of other bytes."""
    try:
        loaded = getattr(cls, LOADER)().state_dict()
    except Exception as error:  # whatever the loader raises, the check reports it
        return Check("loader", False, f"{LOADER}() failed: {type(error).__name__}: {error}")
    if list(loaded) != list(state) or not all(torch.equal(loaded[k], state[k]) for k in state):
        return Check("loader", False, f"{LOADER}() gives other tensors than the carried weights")
    other = file.parent / "other" / file.name
    other.parent.mkdir(exist_ok=True)
    other.write_bytes(b"not the weights")
    if not _refuses(cls, other):
        return Check("loader", False, f"{LOADER}() loads a file of other bytes")
    return Check(
        "loader", True, f"{LOADER}() loads {file.name} (SHA-256 checked) and refuses other bytes"
    )


def _refuses(cls: type, file: Path) -> bool:
    try:
        getattr(cls, LOADER)(file)
    except Exception as error:  # the file's own error class, defined in the emitted module
        return type(error).__name__ == ERROR_CLASS
    return False
