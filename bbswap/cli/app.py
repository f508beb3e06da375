"""The ``bbswap`` command line: parse options, call the library, render.

Every user mistake is a :class:`bbswap.errors.BBSwapError`; it is printed as one
line on stderr with exit status 2. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console

from bbswap.errors import BBSwapError, InvalidArgument

app = typer.Typer(
    name="bbswap",
    help="Backbone surgery for PyTorch: inspect a CNN backbone, patch it to a target "
    "downsample and channel count, emit it as Python source.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
InputOpt = Annotated[str, typer.Option("--input", "-i", help="Dummy input as NxCxHxW or HxW.")]
KwOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--kw",
        help="Constructor argument key=value: a Python literal, a bare word (a string), "
        "or key=@file.yaml / key=@file.json for that file's content; repeatable.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
OutOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Write the patched backbone to FILE.py.")
]
ClassNameOpt = Annotated[
    str | None, typer.Option(help="Class name in the written file (default from the target).")
]
DropinOpt = Annotated[
    bool, typer.Option(help="The class accepts and ignores the host's constructor arguments.")
]
ImportOpt = Annotated[
    bool, typer.Option("--import", help="Import the source backbone instead of bundling it.")
]
WeightsOpt = Annotated[
    str | None, typer.Option(help="Checkpoint (.pth, .pt or .safetensors) of the source backbone.")
]
PartialOpt = Annotated[
    bool, typer.Option(help="Load the checkpoint tensors that fit; report the rest.")
]
SafetensorsOpt = Annotated[
    bool, typer.Option(help="Write the carried weights as .safetensors instead of .pth.")
]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite existing output files.")]


def _console() -> Console:
    # Piped output is not wrapped to 80 columns: tables stay one row per line.
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=160 if piped else None)


@contextmanager
def _guard(debug: bool) -> Iterator[None]:
    """Turn user errors into one line on stderr and exit status 2."""
    try:
        yield
    except BBSwapError as error:
        if debug or _state["debug"] or os.environ.get("BBSWAP_DEBUG"):
            raise
        message = " ".join(str(error).split())
        sys.stderr.write(f"bbswap: error: {message}\n")
        raise typer.Exit(error.exit_code) from None


def _print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.callback()
def _main(debug: Debug = False) -> None:
    _state["debug"] = debug


@app.command("list")
def list_cmd(
    pattern: Annotated[
        str, typer.Argument(help="fnmatch pattern; 'tv:*' or 'timm:*' lists those packages.")
    ] = "*",
    json_out: JsonOpt = False,
    debug: Debug = False,
) -> None:
    """List the registered backbones."""
    from bbswap.backbones.registry import list_backbones
    from bbswap.cli.render import render_list

    with _guard(debug):
        rows = list_backbones(pattern)
        if json_out:
            _print_json(
                {
                    "schema": "bbswap.list/1",
                    "backbones": [
                        {
                            "spec": r.spec,
                            "family": r.family,
                            "in_chans": r.in_chans,
                            "description": r.description,
                        }
                        for r in rows
                    ],
                }
            )
            return
        render_list(rows, _console())


@app.command("inspect")
def inspect_cmd(
    backbone: Annotated[str, typer.Argument(help="Backbone spec (see `bbswap list`).")],
    input_shape: InputOpt = "1x3x224x224",
    depth: Annotated[int, typer.Option(help="Module depth of the stage rows.")] = 1,
    sizes: Annotated[
        str | None,
        typer.Option(help="Input sizes to check the size rule at, e.g. 33x97,117x293."),
    ] = None,
    kw: KwOpt = None,
    json_out: JsonOpt = False,
    debug: Debug = False,
) -> None:
    """Trace a backbone and show its stages, costs and reduction points."""
    from bbswap.cli.render import render_inspect
    from bbswap.parsing import parse_kw, parse_sizes
    from bbswap.tracing.inspection import inspect_backbone, report_dict

    with _guard(debug):
        report = inspect_backbone(
            backbone,
            input_shape,
            depth=depth,
            sizes=parse_sizes(sizes) if sizes is not None else (),
            kwargs=parse_kw(kw),
        )
        if json_out:
            _print_json(report_dict(report))
        else:
            render_inspect(report, _console())


@app.command("apply")
def apply_cmd(
    backbone: Annotated[str, typer.Argument(help="Backbone spec (see `bbswap list`).")],
    recipe: Annotated[str, typer.Argument(help="Recipe TOML file.")],
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input", "-i", help="Dummy input as NxCxHxW or HxW (default: the recipe's)."
        ),
    ] = None,
    kw: KwOpt = None,
    output: OutOpt = None,
    class_name: ClassNameOpt = None,
    dropin: DropinOpt = False,
    import_mode: ImportOpt = False,
    weights: WeightsOpt = None,
    partial: PartialOpt = False,
    safetensors: SafetensorsOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    debug: Debug = False,
) -> None:
    """Apply a surgery recipe and show the stages before and after, and every edit.

    With -o, write the patched backbone as a standalone Python file (verified first)."""
    from bbswap.cli.render import render_apply, render_export
    from bbswap.parsing import parse_kw
    from bbswap.recipes.toml_io import load_recipe
    from bbswap.surgery.apply import apply_dict, apply_recipe

    with _guard(debug):
        loaded = load_recipe(recipe)
        if output is None:
            _no_emit_options(class_name, dropin, import_mode, weights, partial, safetensors)
            result = apply_recipe(backbone, loaded, input_shape, kwargs=parse_kw(kw))
        else:
            from bbswap.codegen.export import export

            exported = export(
                backbone,
                loaded,
                output,
                input_shape=input_shape,
                kwargs=parse_kw(kw),
                weights=weights,
                partial=partial,
                class_name=class_name,
                dropin=dropin,
                import_mode=import_mode,
                force=force,
                safetensors=safetensors,
            )
            result = exported.result
        if json_out:
            data = apply_dict(result)
            if output is not None:
                data["written"] = export_dict(exported)
            _print_json(data)
            return
        console = _console()
        render_apply(result, console)
        if output is not None:
            render_export(exported, console)


@app.command("fit")
def fit_cmd(
    backbone: Annotated[str, typer.Argument(help="Backbone spec (see `bbswap list`).")],
    channels: Annotated[int | None, typer.Option(help="Target output channels.")] = None,
    stride: Annotated[
        str | None, typer.Option(help="Target downsample: 16, or 32x4 (H x W).")
    ] = None,
    in_chans: Annotated[
        int | None, typer.Option("--in-chans", help="Target input channels.")
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option("--input", "-i", help="Dummy input as NxCxHxW or HxW.")
    ] = None,
    like: Annotated[
        str | None,
        typer.Option(help="Take the target from another backbone: channels, input, sizes."),
    ] = None,
    prefer: Annotated[str, typer.Option(help="Ranking: macs, depth or rf.")] = "macs",
    allow_truncate: Annotated[
        bool, typer.Option(help="Also consider cutting the body at a stage already at the stride.")
    ] = False,
    mode: Annotated[str, typer.Option(help="Removing a stride: dilate or stride.")] = "dilate",
    rounding: Annotated[
        str, typer.Option(help="Size rule of a --stride target: ceil, floor or any (either).")
    ] = "ceil",
    top: Annotated[int, typer.Option(help="Candidates to show.")] = 5,
    save_recipe: Annotated[
        str | None, typer.Option(help="Write the winner as a recipe TOML file.")
    ] = None,
    kw: KwOpt = None,
    output: OutOpt = None,
    class_name: ClassNameOpt = None,
    dropin: DropinOpt = False,
    weights: WeightsOpt = None,
    partial: PartialOpt = False,
    safetensors: SafetensorsOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    debug: Debug = False,
) -> None:
    """Find the cheapest exact surgery to a target stride and channel count."""
    from pathlib import Path

    from bbswap.cli.render import progress_bar, render_fit
    from bbswap.parsing import parse_kw
    from bbswap.recipes.toml_io import recipe_to_toml
    from bbswap.search.fit import fit, fit_dict, recipe_header, winner_recipe

    with _guard(debug):
        if top < 1:
            raise InvalidArgument(f"--top must be at least 1, got {top}")
        if output is None:
            _no_emit_options(class_name, dropin, False, weights, partial, safetensors)
        recipe_path = Path(save_recipe) if save_recipe else None
        if recipe_path is not None and recipe_path.exists() and not force:
            raise InvalidArgument(f"{recipe_path} exists; pass --force to overwrite it")
        with progress_bar(json_out) as progress:
            result = fit(
                backbone,
                channels=channels,
                stride=stride,
                in_chans=in_chans,
                input_shape=input_shape,
                like=like,
                prefer=prefer,
                allow_truncate=allow_truncate,
                mode=mode,
                rounding=rounding,
                kwargs=parse_kw(kw),
                progress=progress,
            )
        source = result.source.input_shape
        chans = result.winner.result.surgery.in_chans if result.winner.result else source[1]
        input_text = f"{source[0]}x{chans}x{source[2]}x{source[3]}"
        recipe = winner_recipe(result, input_text)
        exported = None
        if output is not None:
            from bbswap.codegen.export import export

            exported = export(
                result.backbone,
                recipe,
                output,
                input_shape=input_text,
                weights=weights,
                partial=partial,
                class_name=class_name,
                dropin=dropin,
                force=force,
                safetensors=safetensors,
            )
        if recipe_path is not None:
            from bbswap.backbones.weights import atomic_write

            text = recipe_to_toml(recipe, recipe_header(result))
            atomic_write(recipe_path, text.encode("utf-8"))
        if json_out:
            data = fit_dict(result, top)
            if exported is not None:
                data["written"] = export_dict(exported)
            if recipe_path is not None:
                data["recipe"] = str(recipe_path)
            _print_json(data)
            return
        console = _console()
        render_fit(result, top, console)
        if recipe_path is not None:
            console.print(f"wrote {recipe_path} (replay it with `bbswap apply`)")
        if exported is not None:
            from bbswap.cli.render import render_export

            render_export(exported, console)


def _no_emit_options(*values: object) -> None:
    if any(values):
        raise InvalidArgument(
            "--class-name, --dropin, --import, --weights, --partial and --safetensors "
            "go with -o FILE.py"
        )


def export_dict(exported: Any) -> dict[str, Any]:
    return {
        "path": str(exported.path),
        "class_name": exported.emitted.class_name,
        "weights": str(exported.weights_path) if exported.weights_path else None,
        "checks": [
            {"name": c.name, "ok": c.ok, "detail": c.detail} for c in exported.report.checks
        ],
    }


@app.command("verify")
def verify_cmd(
    target: Annotated[str, typer.Argument(help="FILE.py:Class to check.")],
    weights: WeightsOpt = None,
    channels: Annotated[int | None, typer.Option(help="Expected output channels.")] = None,
    stride: Annotated[
        str | None, typer.Option(help="Expected downsample: 16, or 32x4 (H x W).")
    ] = None,
    rounding: Annotated[
        str, typer.Option(help="Size rule of --stride: ceil, floor or any (either).")
    ] = "ceil",
    like: Annotated[
        str | None, typer.Option(help="Backbone spec whose output size must be matched.")
    ] = None,
    sizes: Annotated[
        str | None, typer.Option(help="Input sizes to check, e.g. 33x97,117x293.")
    ] = None,
    in_chans: Annotated[
        int | None, typer.Option("--in-chans", help="Input channels (default: first conv's).")
    ] = None,
    json_out: JsonOpt = False,
    debug: Debug = False,
) -> None:
    """Check a generated or hand-edited backbone file: its output_size, channels, stride."""
    from bbswap.cli.render import render_verify
    from bbswap.verify.file import check_file

    with _guard(debug):
        report = check_file(
            target,
            weights=weights,
            channels=channels,
            stride=stride,
            like=like,
            sizes=sizes,
            in_chans=in_chans,
            rounding=rounding,
        )
        if json_out:
            _print_json(
                {
                    "schema": "bbswap.verify.checks/1",
                    "target": report.target,
                    "ok": report.ok,
                    "checks": [
                        {"name": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks
                    ],
                }
            )
        else:
            render_verify(report, _console())
        from bbswap.verify.checks import require

        require(report)


@app.command("matrix")
def matrix_cmd(
    patterns: Annotated[
        list[str],
        typer.Argument(help="Backbone specs or fnmatch patterns: 'tv:*', 'timm:resnet*', ..."),
    ],
    stride: Annotated[str, typer.Option(help="Target strides, comma-separated.")] = "8,16,32",
    channels: Annotated[
        int | None, typer.Option(help="Target channels (default: each backbone's own).")
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            help="Emit each winning plan with random weights and verify the file; "
            "--no-verify runs the meta-device steps only."
        ),
    ] = True,
    rounding: Annotated[
        str, typer.Option(help="Size rule the targets accept: ceil, floor or any.")
    ] = "any",
    input_shape: Annotated[
        str | None, typer.Option("--input", "-i", help="Dummy input as NxCxHxW or HxW.")
    ] = None,
    json_out: JsonOpt = False,
    debug: Debug = False,
) -> None:
    """Which backbones reach which target strides, the MACs of each winning plan, and why not."""
    from bbswap.cli.render import progress_bar, render_matrix
    from bbswap.parsing import parse_strides
    from bbswap.search.matrix import matrix, matrix_dict

    with _guard(debug):
        strides = parse_strides(stride)
        if rounding not in ("ceil", "floor", "any"):
            raise InvalidArgument(f"--rounding '{rounding}' is not one of ceil, floor, any")
        with progress_bar(json_out, "trying backbones") as progress:
            result = matrix(
                patterns,
                strides=strides,
                channels=channels,
                verify=verify,
                rounding=rounding,
                input_shape=input_shape,
                debug=debug or _state["debug"],
                progress=progress,
            )
        if json_out:
            _print_json(matrix_dict(result))
            return
        render_matrix(result, _console())


@app.command("ops")
def ops_cmd(debug: Debug = False) -> None:
    """List the recipe ops and their fields."""
    from bbswap.cli.render import render_ops
    from bbswap.recipes.registry import describe_ops

    with _guard(debug):
        render_ops(describe_ops(), _console())


def main(argv: list[str] | None = None) -> Callable[..., Any] | None:
    """Console-script entry point."""
    return app(args=argv)


if __name__ == "__main__":  # pragma: no cover
    main()
