"""The ``bbswap`` command line: parse options, call the library, render.

Every user mistake is a :class:`bbswap.errors.BBSwapError`; it is printed as one
line on stderr with exit status 2, worded with the flags the user typed. A usage
error (an unknown option, a value not among the choices) is one such line too. A
verification that fails exits with status 1 (see :data:`EXIT_CODES`). ``--debug``
shows the traceback instead.

Each command declares its arguments and options as a dataclass (see :func:`takes`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.metadata
import inspect
import json
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from bbswap.backbones.guard import DEFAULT_TIMEOUT, time_limit
from bbswap.cli.layout import TrailingSpaceFree
from bbswap.codegen.outputs import check_output, write_files
from bbswap.codegen.text import Place, as_source
from bbswap.errors import BBSwapError, InvalidArgument
from bbswap.kinds import Choice, Mode, Phase, Prefer, Returns, Rounding

if TYPE_CHECKING:
    from bbswap.cli.progress import Activity
    from bbswap.codegen.export import Exported
    from bbswap.recipes.schema import Recipe
    from bbswap.search.fit import FitResult
    from bbswap.search.matrix import Matrix
    from bbswap.surgery.apply import ApplyResult
    from bbswap.tracing.cross_check import CrossCheck
    from bbswap.tracing.inspection import InspectReport

T = TypeVar("T")


class NotAChoice(typer.BadParameter):
    """A value not among an option's choices: ``--prefer 'speed' is not one of ...``."""

    def format_message(self) -> str:
        return self.message


# typer's base of usage errors (it vendors click from 0.26 on), reached by a public name
_UsageError: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@contextmanager
def _usage_in_one_line() -> Iterator[None]:
    """A usage error as one ``bbswap: error:`` line on stderr and exit status 2."""
    try:
        yield
    except _UsageError as error:
        if type(error).__name__ == "NoArgsIsHelpError":
            raise  # bare ``bbswap``: the help is shown
        message = " ".join(error.format_message().split())
        sys.stderr.write(f"bbswap: error: {message}\n")
        raise typer.Exit(2) from None


class _Group(TyperGroup):
    """The command group, with usage errors on one line."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable_params(super().get_params(ctx))

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        with _usage_in_one_line():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _usage_in_one_line():
            return super().invoke(ctx)


EXIT_CODES = (
    (0, "done"),
    (1, "a verification failed: the file does not do what it claims"),
    (2, "a usage error: a bad option, value, backbone, recipe or target; nothing written"),
    (130, "interrupted (Ctrl-C)"),
    (143, "terminated (SIGTERM)"),
)


class _Argument(typer.core.TyperArgument):
    """An argument named by its metavar in the usage line and in ``--help``, where typer
    would show ``{backbone}`` and ``<list[str]>``."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None  # the metavar says what to type

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.metavar or (self.name or "").upper()
        return [name if self.required else f"[{name}]"]


def _readable_params(params: list[Any]) -> list[Any]:
    """The parameters with arguments shown by their metavars, flags without a type."""
    for param in params:
        if isinstance(param, typer.core.TyperArgument):
            param.__class__ = _Argument  # the same argument; only its help differs
        elif isinstance(param, typer.core.TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""  # a flag takes no value: no '<bool>'
    return params


class _Command(typer.core.TyperCommand):
    """A command whose help shows readable metavars (see :func:`_readable_params`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable_params(super().get_params(ctx))


class _App(typer.Typer):
    """The application, its commands built as :class:`_Command`."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _App(
    name="bbswap",
    cls=_Group,
    help="Backbone surgery for PyTorch: inspect a CNN backbone, patch it to a target "
    "downsample and channel count, emit it as Python source.",
    epilog="Exit status: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES) + ".",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def takes(options: type[T]) -> Callable[[Callable[[T], None]], Callable[..., None]]:
    """Give a command its arguments and options as one ``options`` dataclass: typer reads
    them from the fields (their ``Annotated`` types and defaults), in field order, the
    class's own fields first, then those of each base (:class:`EmitArgs`, :class:`RunArgs`)."""
    hints = typing.get_type_hints(options, include_extras=True)
    fields = dataclasses.fields(options)  # type: ignore[arg-type]  # a dataclass type
    mro = options.__mro__
    # the nearest class's fields first: the command's own, then those of its bases
    near = {
        f.name: next(i for i, c in enumerate(mro) if f.name in inspect.get_annotations(c))
        for f in fields
    }
    params = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=readable(f.name, hints[f.name]),
            default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default,
        )
        for f in sorted(fields, key=lambda f: near[f.name])
    ]

    def wrap(command: Callable[[T], None]) -> Callable[..., None]:
        def run(**given: Any) -> None:
            command(options(**given))

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # read by typer
        run.__doc__ = command.__doc__
        run.__name__ = command.__name__
        return run

    return wrap


# what ``--help`` shows a value of these parameters as (the others: by their type)
METAVARS = {
    "backbone": "BACKBONE",
    "pattern": "PATTERN",
    "patterns": "PATTERN...",
    "recipe": "RECIPE.toml",
    "target": "FILE.py:Class",
    "input_shape": "NxCxHxW",
    "kw": "KEY=VALUE",
    "output": "FILE.py",
    "weights": "FILE",
    "save_recipe": "FILE.toml",
    "class_name": "NAME",
    "channels": "C",
    "in_chans": "C",
    "stride": "S",
    "like": "BACKBONE",
    "sizes": "HxW,...",
    "top": "N",
    "depth": "N",
}
_BY_TYPE = {int: "N", float: "NUMBER", str: "TEXT"}


def readable(name: str, annotation: Any) -> Any:
    """``annotation`` (``Annotated[T, typer.Option(...)]``) with a metavar that reads as
    what to type: ``NxCxHxW``, ``FILE.py``; its own if it has one, none for a flag."""
    args = typing.get_args(annotation)
    info = next((a for a in args[1:] if isinstance(a, typer.models.ParameterInfo)), None)
    if info is None or info.metavar is not None or args[0] is bool:
        return annotation
    value = args[0]
    inner = [a for a in typing.get_args(value) if a is not type(None)] or [value]
    if typing.get_origin(inner[0]) is list:
        inner = list(typing.get_args(inner[0]))
    kind = inner[0]
    metavar = METAVARS.get(name, _BY_TYPE.get(kind, name.upper()))
    named = copy.copy(info)  # the declaration may be shared by other commands' fields
    named.metavar = metavar
    return Annotated[value, named]


def _choice(kind: type[Choice], flag: str, help_text: str) -> Any:
    """An option whose values are the members of ``kind``, listed in ``--help``."""

    def parse(value: str | Choice) -> Choice:
        if isinstance(value, kind):
            return value
        try:
            return kind(value)
        except ValueError:
            raise NotAChoice(f"{flag} '{value}' is not one of {', '.join(kind.values())}") from None

    metavar = "[" + "|".join(kind.values()) + "]"
    return typer.Option(flag, parser=parse, metavar=metavar, help=help_text)


Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        help="Stop the model's own code (import, constructor, forward) after this long.",
    ),
]
BackboneArg = Annotated[str, typer.Argument(help="Backbone spec (see `bbswap list`).")]
MaybeInputOpt = Annotated[
    str | None, typer.Option("--input", "-i", help="Dummy input as NxCxHxW or HxW.")
]
KwOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--kw",
        help="Constructor argument key=value: a Python literal, a bare word (a string), "
        "key=@file.yaml / key=@file.json for that file's content, or key=py:dotted.name "
        "for the object it imports; repeatable.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
SourceOutputOpt = Annotated[
    str | None,
    typer.Option(
        "--source-output",
        metavar="INDEX|KEY",
        help="For a forward that returns several tensors: the one to work on "
        "(default: the largest downsample).",
    ),
]
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
    str | None,
    typer.Option(
        help="Checkpoint (.pth, .pt or .safetensors) of the source backbone, or a folder "
        "holding one."
    ),
]
PretrainedOpt = Annotated[
    bool,
    typer.Option(
        "--pretrained",
        help="tv: and timm: specs: the builder's own weights (torchvision or timm fetches "
        "and caches them).",
    ),
]
PartialOpt = Annotated[
    bool, typer.Option(help="Load the checkpoint tensors that fit; report the rest.")
]
SafetensorsOpt = Annotated[
    bool, typer.Option(help="Write the carried weights as .safetensors instead of .pth.")
]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite existing output files.")]
StrideOpt = Annotated[str | None, typer.Option(help="Target downsample: 16, or 32x4 (H x W).")]
PreferOpt = Annotated[Prefer, _choice(Prefer, "--prefer", "Ranking: macs, depth or rf.")]
ModeOpt = Annotated[Mode, _choice(Mode, "--mode", "Removing a stride: dilate or stride.")]
FitRoundingOpt = Annotated[
    Rounding,
    _choice(Rounding, "--rounding", "Size rule of a --stride target: ceil, floor or any (either)."),
]
VerifyRoundingOpt = Annotated[
    Rounding, _choice(Rounding, "--rounding", "Size rule of --stride: ceil, floor or any (either).")
]
TargetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--target",
        metavar="[NAME=]STRIDE:CHANNELS",
        help="One output of several, e.g. p3=8:256 (repeatable; instead of --stride and "
        "--channels).",
    ),
]
ReturnOpt = Annotated[
    Returns | None,
    _choice(Returns, "--return", "What holds several --target outputs: list, tuple or dict."),
]
MatrixRoundingOpt = Annotated[
    Rounding, _choice(Rounding, "--rounding", "Size rule the targets accept: ceil, floor or any.")
]


def _console() -> Console:
    # Piped output is not wrapped to 80 columns: tables stay one row per line.
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    out = typing.cast(typing.IO[str], TrailingSpaceFree(sys.stdout))  # a text stream
    return Console(file=out, highlight=False, width=160 if piped else None)


@contextmanager
def _guard(
    debug: bool, timeout: float | None = DEFAULT_TIMEOUT, json_out: bool = False
) -> Iterator[None]:
    """Turn user errors into one line on stderr and exit status 2; give the user's code
    at most ``timeout`` seconds a stage; a stop signal ends the run cleanly. With
    ``json_out`` whatever the model itself prints goes to stderr, so stdout stays JSON."""
    _json_stream[:] = [sys.stdout]
    quiet = contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()
    try:
        with _terminated_as_interrupt(), time_limit(timeout), quiet:
            yield
    except BBSwapError as error:
        if debug or _state["debug"] or os.environ.get("BBSWAP_DEBUG"):
            raise
        message = as_source(" ".join(error.as_flags().split()), Place.COMMENT)
        sys.stderr.write(f"bbswap: error: {message}\n")
        raise typer.Exit(error.exit_code) from None


@contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that temporary files are removed on the way out
    (exit status 143, as if killed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        del frame
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except _Terminated:
        raise typer.Exit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """A SIGTERM received while a command runs."""


_json_stream: list[Any] = []  # the stdout of the running command, for its JSON


def _print_json(data: dict[str, Any]) -> None:
    out = _json_stream[0] if _json_stream else sys.stdout
    out.write(json.dumps(data, indent=2) + "\n")


def _print_version(value: bool) -> None:
    """``--version``: the installed package's version."""
    if value:
        try:
            number = importlib.metadata.version("bbswap")
        except importlib.metadata.PackageNotFoundError:
            number = "(not installed)"
        sys.stdout.write(f"bbswap {number}\n")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Debug = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    del version  # handled by its callback
    _state["debug"] = debug


@dataclasses.dataclass(frozen=True)
class ListArgs:
    pattern: Annotated[
        str, typer.Argument(help="fnmatch pattern; 'tv:*' or 'timm:*' lists those packages.")
    ] = "*"
    json_out: JsonOpt = False
    debug: Debug = False


@app.command("list")
@takes(ListArgs)
def list_cmd(a: ListArgs) -> None:
    """List the registered backbones."""
    from bbswap.backbones.registry import list_backbones
    from bbswap.cli.json_out import list_dict
    from bbswap.cli.render import render_list

    with _guard(a.debug):
        rows = list_backbones(a.pattern)
        if a.json_out:
            _print_json(list_dict(rows))
        else:
            render_list(rows, _console())


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunArgs:
    """The options every command that runs model code takes, after its own."""

    json_out: JsonOpt = False
    timeout: TimeoutOpt = DEFAULT_TIMEOUT
    debug: Debug = False


@dataclasses.dataclass(frozen=True)
class InspectArgs(RunArgs):
    backbone: BackboneArg
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="Dummy input as NxCxHxW or HxW (default: 1x3x224x224, or the one size "
            "a timm model is built for).",
        ),
    ] = None
    depth: Annotated[int, typer.Option(help="Module depth of the stage rows.")] = 1
    sizes: Annotated[
        str | None,
        typer.Option(help="Input sizes to check the size rule at, e.g. 33x97,117x293."),
    ] = None
    kw: KwOpt = None
    cross_check: Annotated[
        bool,
        typer.Option(
            "--cross-check",
            help="Also count params and MACs with thop and torchinfo, and say what each misses.",
        ),
    ] = False
    source_output: SourceOutputOpt = None


@app.command("inspect")
@takes(InspectArgs)
def inspect_cmd(a: InspectArgs) -> None:
    """Trace a backbone and show its stages, costs and reduction points."""
    from bbswap.cli.json_out import report_dict
    from bbswap.cli.progress import activity
    from bbswap.cli.render import render_inspect

    with _guard(a.debug, a.timeout, a.json_out):
        with activity(a.json_out, Phase.TRACE):
            report, checked = _run_inspect(a)
        if a.json_out:
            _print_json(_with_cross_check(report_dict(report), checked))
            return
        console = _console()
        render_inspect(report, console)
        if checked is not None:
            from bbswap.cli.render import render_cross_check

            render_cross_check(checked, console)


def _run_inspect(a: InspectArgs) -> tuple[InspectReport, CrossCheck | None]:
    from bbswap.parsing import parse_kw, parse_sizes
    from bbswap.tracing.inspection import inspect_backbone

    sizes = parse_sizes(a.sizes) if a.sizes is not None else ()
    kwargs = parse_kw(a.kw)
    report = inspect_backbone(
        a.backbone,
        a.input_shape,
        depth=a.depth,
        sizes=sizes,
        kwargs=kwargs,
        source_output=a.source_output,
    )
    return report, _cross_check(a, report, kwargs) if a.cross_check else None


def _cross_check(a: InspectArgs, report: InspectReport, kwargs: dict[str, Any]) -> CrossCheck:
    from bbswap.tracing.cross_check import cross_check

    return cross_check(a.backbone, a.input_shape, kwargs=kwargs, ours=report.trace)


def _with_cross_check(data: dict[str, Any], checked: CrossCheck | None) -> dict[str, Any]:
    if checked is not None:
        from bbswap.cli.json_out import cross_check_dict

        data["cross_check"] = cross_check_dict(checked)
    return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmitArgs(RunArgs):
    """The options ``apply`` and ``fit`` share: what ``-o FILE.py`` writes."""

    output: OutOpt = None
    class_name: ClassNameOpt = None
    dropin: DropinOpt = False
    weights: WeightsOpt = None
    pretrained: PretrainedOpt = False
    partial: PartialOpt = False
    safetensors: SafetensorsOpt = False
    force: ForceOpt = False

    def export_options(self, import_mode: bool = False) -> dict[str, Any]:
        """The keyword arguments of :func:`bbswap.codegen.export.export` these options set."""
        names = ("weights", "pretrained", "partial", "class_name", "dropin", "force", "safetensors")
        return {"import_mode": import_mode, **{n: getattr(self, n) for n in names}}


@dataclasses.dataclass(frozen=True)
class ApplyArgs(EmitArgs):
    backbone: BackboneArg
    recipe: Annotated[str, typer.Argument(help="Recipe TOML file.")]
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input", "-i", help="Dummy input as NxCxHxW or HxW (default: the recipe's)."
        ),
    ] = None
    kw: KwOpt = None
    import_mode: ImportOpt = False
    source_output: SourceOutputOpt = None


@app.command("apply")
@takes(ApplyArgs)
def apply_cmd(a: ApplyArgs) -> None:
    """Apply a surgery recipe and show the stages before and after, and every edit.

    With -o, write the patched backbone as a standalone Python file (verified first)."""
    from bbswap.cli.json_out import apply_dict
    from bbswap.cli.render import render_apply

    with _guard(a.debug, a.timeout, a.json_out):
        result, exported = _run_apply(a)
        if a.json_out:
            _print_json(_written(apply_dict(result), exported))
            return
        render_apply(result, _console())
        _render_written(exported)


def _run_apply(a: ApplyArgs) -> tuple[ApplyResult, Exported | None]:
    """The patched backbone, and what ``-o`` wrote (None without it)."""
    from bbswap.cli.progress import activity
    from bbswap.parsing import parse_kw
    from bbswap.recipes.toml_io import load_recipe
    from bbswap.surgery.apply import apply_recipe
    from bbswap.verify.fresh import fresh_interpreter_ahead

    ahead = fresh_interpreter_ahead(a.output is not None)  # for the file's check
    with ahead, activity(a.json_out, Phase.TRACE) as status:
        loaded, kwargs = load_recipe(a.recipe), parse_kw(a.kw)
        if a.output is None:
            _no_emit_options(a, a.import_mode)
        if a.output is None:
            result = apply_recipe(
                a.backbone, loaded, a.input_shape, kwargs=kwargs, source_output=a.source_output
            )
            return result, None
        exported = _export(
            a,
            a.backbone,
            loaded,
            a.input_shape,
            kwargs,
            a.import_mode,
            a.source_output,
            status=status,
        )
    return exported.result, exported


@dataclasses.dataclass(frozen=True)
class FitArgs(EmitArgs):
    backbone: BackboneArg
    channels: Annotated[int | None, typer.Option(help="Target output channels.")] = None
    stride: StrideOpt = None
    in_chans: Annotated[int | None, typer.Option("--in-chans", help="Target input channels.")] = (
        None
    )
    input_shape: MaybeInputOpt = None
    like: Annotated[
        str | None,
        typer.Option(help="Take the target from another backbone: channels, input, sizes."),
    ] = None
    like_kw: Annotated[
        list[str] | None,
        typer.Option(
            "--like-kw",
            help="Constructor argument of the --like backbone, as --kw takes them; repeatable.",
        ),
    ] = None
    prefer: PreferOpt = Prefer.MACS
    allow_truncate: Annotated[
        bool, typer.Option(help="Also consider cutting the body at a stage already at the stride.")
    ] = False
    mode: ModeOpt = Mode.DILATE
    rounding: FitRoundingOpt = Rounding.CEIL
    top: Annotated[int, typer.Option(help="Candidates to show.")] = 5
    save_recipe: Annotated[
        str | None, typer.Option(help="Write the winner as a recipe TOML file.")
    ] = None
    kw: KwOpt = None
    source_output: SourceOutputOpt = None
    target: TargetOpt = None
    returns: ReturnOpt = None


@app.command("fit")
@takes(FitArgs)
def fit_cmd(a: FitArgs) -> None:
    """Find the cheapest exact surgery to a target stride and channel count."""
    from bbswap.cli.progress import activity
    from bbswap.search.fit import winner_input, winner_recipe
    from bbswap.verify.fresh import fresh_interpreter_ahead

    with _guard(a.debug, a.timeout, a.json_out):
        ahead = fresh_interpreter_ahead(a.output is not None)  # for the file's check
        with ahead, activity(a.json_out, Phase.TRACE) as status:
            recipe_path = _fit_preflight(a)
            result = _run_fit(a, status)
            input_text = winner_input(result)
            recipe = winner_recipe(result, input_text)
            also = {recipe_path: _recipe_text(recipe, result)} if recipe_path is not None else {}
            exported = None
            if a.output is not None:  # the recipe is written with the file, or not at all
                exported = _export(
                    a, result.backbone, recipe, input_text, also=also, status=status, fit=result
                )
            elif also:
                write_files(also, a.force)
        _fit_output(a, result, exported, recipe_path)


def _fit_preflight(a: FitArgs) -> Path | None:
    """Check the options that need no backbone; the path to save the recipe to."""
    if a.top < 1:
        raise InvalidArgument(f"--top must be at least 1, got {a.top}")
    if a.output is None:
        _no_emit_options(a, False)
    recipe_path = Path(a.save_recipe) if a.save_recipe else None
    if recipe_path is not None:
        check_output(recipe_path, a.force, "--save-recipe")
    if a.output is not None:
        check_output(Path(a.output), a.force, "-o")
        from bbswap.codegen.export import weights_options
        from bbswap.parsing import parse_kw

        weights_options(a.backbone, parse_kw(a.kw), a.weights, a.pretrained)
    return recipe_path


def _run_fit(a: FitArgs, status: Activity | None) -> FitResult:
    from bbswap.parsing import parse_kw
    from bbswap.search.fit import fit

    return fit(
        a.backbone,
        channels=a.channels,
        stride=a.stride,
        in_chans=a.in_chans,
        input_shape=a.input_shape,
        like=a.like,
        like_kw=parse_kw(a.like_kw, "--like-kw"),
        prefer=a.prefer,
        allow_truncate=a.allow_truncate,
        mode=a.mode,
        rounding=a.rounding,
        kwargs=parse_kw(a.kw),
        progress=status.step if status is not None else None,
        on_phase=status.phase if status is not None else None,
        source_output=a.source_output,
        targets=a.target,
        returns=a.returns,
    )


def _recipe_text(recipe: Recipe, result: FitResult) -> bytes:
    from bbswap.recipes.toml_io import recipe_to_toml
    from bbswap.search.fit import recipe_header

    if result.outputs is not None:
        raise InvalidArgument(
            f"--save-recipe: a recipe gives one output, and the fit reproduces "
            f"{result.outputs.describe()}; leave --save-recipe out and keep the file -o writes"
        )
    return recipe_to_toml(recipe, recipe_header(result)).encode("utf-8")


def _fit_output(
    a: FitArgs, result: FitResult, exported: Exported | None, recipe_path: Path | None
) -> None:
    from bbswap.cli.json_out import fit_dict
    from bbswap.cli.render import render_fit

    if a.json_out:
        data = _written(fit_dict(result, a.top), exported)
        if recipe_path is not None:
            data["recipe"] = str(recipe_path)
        _print_json(data)
        return
    console = _console()
    render_fit(result, a.top, console)
    if recipe_path is not None:
        console.print(f"wrote {recipe_path} (replay it with `bbswap apply`)")
    _render_written(exported, console)


def _no_emit_options(a: EmitArgs, import_mode: bool) -> None:
    if any((a.class_name, a.dropin, import_mode, a.weights, a.partial, a.safetensors)):
        raise InvalidArgument(
            "--class-name, --dropin, --import, --weights, --partial and --safetensors "
            "go with -o FILE.py"
        )
    if a.pretrained:
        raise InvalidArgument("--pretrained goes with -o FILE.py (the weights it writes)")


def _export(
    a: EmitArgs,
    backbone: Any,
    recipe: Recipe,
    input_shape: str | None,
    kwargs: dict[str, Any] | None = None,
    import_mode: bool = False,
    source_output: str | None = None,
    also: dict[Path, bytes] | None = None,
    status: Activity | None = None,
    fit: FitResult | None = None,
) -> Exported:
    """Write the patched backbone to ``-o FILE.py`` as the emit options say (with every
    output of a ``--like`` backbone that returns several, from ``fit``)."""
    from bbswap.codegen.export import export

    assert a.output is not None  # asked only with -o
    return export(
        backbone,
        recipe,
        a.output,
        input_shape=input_shape,
        kwargs=kwargs,
        also=also,
        source_output=source_output,
        on_phase=status.phase if status is not None else None,
        outputs=fit.outputs if fit is not None else None,
        **a.export_options(import_mode),
    )


def _written(data: dict[str, Any], exported: Exported | None) -> dict[str, Any]:
    """A report's JSON with what ``-o`` wrote under ``written``."""
    if exported is not None:
        from bbswap.cli.json_out import export_dict

        data["written"] = export_dict(exported)
    return data


def _render_written(exported: Exported | None, console: Console | None = None) -> None:
    if exported is not None:
        from bbswap.cli.render import render_export

        render_export(exported, console or _console())


@dataclasses.dataclass(frozen=True)
class VerifyArgs(RunArgs):
    target: Annotated[str, typer.Argument(help="FILE.py:Class to check.")]
    weights: WeightsOpt = None
    channels: Annotated[int | None, typer.Option(help="Expected output channels.")] = None
    stride: Annotated[
        str | None, typer.Option(help="Expected downsample: 16, or 32x4 (H x W).")
    ] = None
    rounding: VerifyRoundingOpt = Rounding.CEIL
    like: Annotated[
        str | None, typer.Option(help="Backbone spec whose output size must be matched.")
    ] = None
    sizes: Annotated[str | None, typer.Option(help="Input sizes to check, e.g. 33x97,117x293.")] = (
        None
    )
    in_chans: Annotated[
        int | None, typer.Option("--in-chans", help="Input channels (default: first conv's).")
    ] = None


@app.command("verify")
@takes(VerifyArgs)
def verify_cmd(a: VerifyArgs) -> None:
    """Check a generated or hand-edited backbone file: its output_size, channels, stride."""
    from bbswap.cli.json_out import verify_dict
    from bbswap.cli.progress import activity
    from bbswap.cli.render import render_verify
    from bbswap.verify.checks import require
    from bbswap.verify.file import check_file

    with _guard(a.debug, a.timeout, a.json_out):
        options = dataclasses.asdict(a)
        for name in ("target", "json_out", "debug", "timeout"):
            del options[name]
        with activity(a.json_out, Phase.VERIFY):
            report = check_file(a.target, **options)
        if a.json_out:
            _print_json(verify_dict(report))
        else:
            render_verify(report, _console())
        require(report)


@dataclasses.dataclass(frozen=True)
class MatrixArgs(RunArgs):
    patterns: Annotated[
        list[str],
        typer.Argument(help="Backbone specs or fnmatch patterns: 'tv:*', 'timm:resnet*', ..."),
    ]
    stride: Annotated[
        str | None,
        typer.Option(
            metavar="S,...",
            help="Target strides, comma-separated (default 8,16,32 without --target).",
        ),
    ] = None
    channels: Annotated[
        int | None, typer.Option(help="Target channels (default: each backbone's own).")
    ] = None
    verify: Annotated[
        bool,
        typer.Option(
            help="Emit each winning plan with random weights and verify the file; "
            "--no-verify runs the meta-device steps only."
        ),
    ] = True
    rounding: MatrixRoundingOpt = Rounding.ANY
    input_shape: MaybeInputOpt = None
    in_chans: Annotated[
        int | None,
        typer.Option("--in-chans", help="Input channels of every plan (default: each backbone's)."),
    ] = None
    target: TargetOpt = None
    returns: ReturnOpt = None
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            help="Worker processes that try backbones side by side (0: one per core).",
        ),
    ] = 1


@app.command("matrix")
@takes(MatrixArgs)
def matrix_cmd(a: MatrixArgs) -> None:
    """Which backbones reach which target strides, the MACs of each winning plan, and why not."""
    from bbswap.cli.json_out import matrix_dict
    from bbswap.cli.progress import backbone_bar
    from bbswap.cli.render import render_matrix

    with _guard(a.debug, a.timeout, a.json_out):
        with backbone_bar(a.json_out) as progress:
            result = _run_matrix(a, progress)
        if a.json_out:
            _print_json(matrix_dict(result))
        else:
            render_matrix(result, _console())


def _run_matrix(a: MatrixArgs, progress: Callable[[int, int, str | None], None] | None) -> Matrix:
    from bbswap.parsing import parse_strides
    from bbswap.search.matrix import matrix

    return matrix(
        a.patterns,
        strides=parse_strides(a.stride or ("" if a.target else "8,16,32")),
        channels=a.channels,
        verify=a.verify,
        rounding=a.rounding,
        input_shape=a.input_shape,
        in_chans=a.in_chans,
        debug=a.debug or _state["debug"],
        progress=progress,
        targets=a.target,
        returns=a.returns,
        jobs=a.jobs,
    )


@dataclasses.dataclass(frozen=True)
class OpsArgs:
    json_out: JsonOpt = False
    debug: Debug = False


@app.command("ops")
@takes(OpsArgs)
def ops_cmd(a: OpsArgs) -> None:
    """List the recipe ops and their fields."""
    from bbswap.cli.json_out import ops_dict
    from bbswap.cli.render import render_ops
    from bbswap.recipes.registry import describe_ops

    with _guard(a.debug, json_out=a.json_out):
        if a.json_out:
            _print_json(ops_dict(describe_ops()))
            return
        render_ops(describe_ops(), _console())


def main(argv: list[str] | None = None) -> NoReturn:
    """Console-script entry point: run the command, then end the process at once.

    The process ends with ``os._exit`` as soon as the command has returned and its output
    is flushed: the interpreter's teardown (unloading torch) adds most of a second to every
    command and does nothing a finished command needs (every file is written and closed by
    then). An exception that is a bug keeps its traceback and the usual exit."""
    try:
        app(args=argv)
        code: int | str | None = 0
    except SystemExit as done:
        code = done.code
    if isinstance(code, str):  # SystemExit("message"): the message, and status 1
        print(code, file=sys.stderr)
    status = code if isinstance(code, int) else 0 if code is None else 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (``| head``)
            stream.flush()
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
