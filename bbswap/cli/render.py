"""Rich renderings of bbswap's reports. Nothing here computes; it only formats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.text import Text

from bbswap.cli.layout import Column, Grid, Justify, Wrap, flow, show
from bbswap.kinds import Layout
from bbswap.surgery.core import EditKind
from bbswap.tracing.tracer import SpatialOp, Stage, Trace, describe_factor

if TYPE_CHECKING:
    from bbswap.backbones.registry import ListedBackbone
    from bbswap.codegen.export import Exported
    from bbswap.recipes.registry import OpInfo
    from bbswap.recipes.schema import Field
    from bbswap.search.fit import Candidate, FitResult
    from bbswap.search.matrix import Cell, Matrix
    from bbswap.surgery.apply import ApplyResult
    from bbswap.surgery.core import Edit
    from bbswap.tracing.cross_check import CrossCheck
    from bbswap.tracing.inspection import InspectReport
    from bbswap.verify.checks import VerifyReport


def shape(dims: Sequence[int]) -> str:
    return "x".join(str(d) for d in dims)


def count(n: int) -> str:
    return f"{n:,}"


def si(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".strip()


def size_bytes(n: int) -> str:
    for factor, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.1f} {suffix}"
    return f"{n} B"


def pair(p: tuple[int, int] | str) -> str:
    if isinstance(p, str):
        return p
    return str(p[0]) if p[0] == p[1] else f"{p[0]},{p[1]}"


def rf(value: tuple[int, int]) -> str:
    return str(value[0]) if value[0] == value[1] else f"{value[0]}x{value[1]}"


def stage_table(trace: Trace, title: str | None = None) -> Grid:
    grid = Grid(
        [
            Column("stage", footer="total"),
            Column("type"),
            Column("output", footer=shape(trace.output_shape)),
            Column("ch", "right"),
            Column("down", "right", describe_factor(trace.downsample)),
            Column("RF", "right", rf(trace.receptive_field)),
            Column("params", "right", count(trace.params)),
            Column("MACs", "right", count(trace.macs)),
            Column("act.", "right", size_bytes(trace.activation_bytes)),
        ],
        title,
    )
    for stage in trace.stages:
        grid.add_row(*_stage_cells(stage))
    return grid


def stage_output(stage: Stage) -> str:
    """A stage's output shape, with where it holds the image grid when that is not NCHW:
    ``1x56x56x96 NHWC``, ``1x3136x64 tokens 56x56``, ``1x197x768 tokens 1+14x14`` (a
    prefix token before the grid's)."""
    text = shape(stage.out_shape)
    if stage.layout is Layout.NHWC and stage.spatial:
        return f"{text} NHWC"
    if stage.layout is Layout.TOKENS and stage.grid is not None:
        h, w = stage.grid
        prefix = stage.out_shape[1] - h * w if len(stage.out_shape) == 3 else 0
        return f"{text} tokens {f'{prefix}+' if prefix > 0 else ''}{h}x{w}"
    if stage.layout is Layout.CHANNELS_TOKENS and stage.grid is not None:
        return f"{text} C-first tokens {stage.grid[0]}x{stage.grid[1]}"
    return text


def _stage_cells(stage: Stage) -> list[str | Text]:
    path = Text(stage.path, style="italic" if stage.functional else "")
    return [
        path,
        Text(stage.type),
        stage_output(stage),
        str(stage.channels),
        describe_factor(stage.downsample),
        rf(stage.receptive_field),
        count(stage.params) if stage.params else "-",
        si(stage.macs) if stage.macs else "-",
        size_bytes(stage.activation_bytes),
    ]


def reduction_table(ops: Sequence[SpatialOp], title: str = "reduction points") -> Grid:
    grid = Grid(
        [
            *(Column(name) for name in ("point", "call", "op")),
            *(Column(name, "right") for name in ("kernel", "stride", "padding", "dilation")),
            Column("rounding"),
            Column("in -> out", "right", wrap=Wrap.ARROWS),
        ],
        title,
    )
    for op in ops:
        adaptive = op.op.startswith("adaptive") or op.op == "interpolate"
        grid.add_row(
            Text(op.id),  # a module path of the user's model: text, not markup
            "module" if op.kind == "module" else f"F.{op.func}",
            op.op,
            "-" if adaptive else pair(op.kernel),
            "-" if adaptive else pair(op.stride),
            "-" if adaptive else pair(op.padding),
            "-" if adaptive else pair(op.dilation),
            op.rounding,
            f"{shape(op.in_hw)} -> {shape(op.out_hw)}",
        )
    return grid


def source_output_line(trace: Trace) -> str:
    """Which output of a forward that returns several the report is about, and why; ""
    for a forward that returns one tensor."""
    if trace.output_key is None:
        return ""
    why = "asked for" if trace.output_given else "the largest downsample; --source-output chooses"
    return (
        f"source output: {trace.output_key} of the {trace.returns} of {len(trace.outputs)} "
        f"the forward returns ({why})"
    )


def outputs_table(trace: Trace) -> Grid:
    """Every tensor the forward returns; ``*`` marks the one the report is about."""
    grid = Grid(
        [
            Column(""),
            Column("output"),
            *(Column(name, "right") for name in ("shape", "ch", "down", "RF")),
        ],
        f"outputs: the forward returns a {trace.returns} of {len(trace.outputs)}",
        key=1,
    )
    mask = trace.mask.key if trace.mask is not None and trace.mask.rule is not None else None
    for o in trace.outputs:
        grid.add_row(
            "*" if o.key == trace.output_key else "",
            escape(str(o.key)),
            shape(o.shape),
            "mask" if o.key == mask else str(o.channels),
            describe_factor(o.downsample) if o.spatial or o.key == mask else "-",
            rf(o.receptive_field) if o.spatial else "-",
        )
    return grid


def mask_line(trace: Trace) -> str:
    """What a forward of (img, img_mask) returns of its mask; "" for any other forward."""
    m = trace.mask
    if m is None:
        return ""
    traced = (
        f"traced with an all-ones {shape((1, *trace.input_shape[2:]))} mask as '{m.input.mask}'"
    )
    if m.key is None:
        return f"mask: {traced}; no output is made from it"
    if m.rule is None:
        return f"mask: {traced}; output {m.key} is made from it by {m.made_by}"
    return f"mask: output {m.key} is {m.rule.describe(m.input.mask)} ({traced})"


def render_inspect(report: InspectReport, console: Console) -> None:
    t = report.trace
    where = {"meta": "meta device", "fake": "fake tensors", "cpu": "real CPU tensors"}[t.device]
    head = f"[bold]{escape(report.backbone)}[/bold]"
    flow(console, [head, f"input {shape(t.input_shape)}", f"(traced on {where})"])
    if t.note:
        console.print(f"[yellow]note:[/yellow] {escape(t.note)}")
    show(stage_table(t), console)
    flow(console, _totals(t))
    if t.outputs:
        console.print()
        show(outputs_table(t), console)
        console.print(escape(source_output_line(t)))
    if t.mask is not None:
        console.print(escape(mask_line(t)))
    console.print()
    show(reduction_table(t.reductions), console)
    h, w = report.rules
    f = report.features
    if f is not None:
        console.print(
            f"features: {f.path} {stage_output(f)} at downsample "
            f"{describe_factor(f.downsample)}; the stages after it form the head"
        )
    rule = f"size rule{' of ' + f.path if f else ''}: {h.format('H')}, {w.format('W')}"
    smallest = f"(smallest input {h.minimum}x{w.minimum})"
    if t.one_size:  # the note says why
        smallest = f"(at {t.input_shape[2]}x{t.input_shape[3]} only: the model takes one size)"
    flow(console, [escape(rule), smallest])
    if report.sizes:
        names = ("input", "predicted", "traced", "check")
        table = Grid([Column(n, "right") for n in names], "output size by input size")
        for c in report.sizes:
            table.add_row(
                shape(c.input_hw),
                shape(c.predicted_hw),
                shape(c.traced_hw) if c.traced_hw else "not spatial",
                "ok" if c.ok else Text("MISMATCH", style="bold red"),
            )
        show(table, console)


def _totals(t: Trace) -> list[str]:
    """The fields of a trace's summary line: output, downsample, params, MACs."""
    return [
        f"output {shape(t.output_shape)}",
        f"downsample {describe_factor(t.downsample)}",
        f"params {count(t.params)}",
        f"MACs {count(t.macs)} ({si(t.macs)})",
    ]


def render_list(rows: Sequence[ListedBackbone], console: Console) -> None:
    table = Grid(
        [
            Column("backbone"),
            Column("family"),
            Column("in", "right"),
            Column("description", wrap=Wrap.WORDS),
        ]
    )
    for row in rows:
        table.add_row(
            escape(row.spec), escape(row.family), str(row.in_chans or "-"), escape(row.description)
        )
    show(table, console)


def _arrow(a: str, b: str) -> str:
    return a if a == b else f"{a} -> {b}"


def _ratio(a: int, b: int) -> str:
    return f"x{b / a:.2f}" if a else "-"


def render_apply(result: ApplyResult, console: Console) -> None:
    before, after = result.before, result.after
    head = f"[bold]{escape(result.backbone.spec)}[/bold] + recipe "
    head += f"[bold]{escape(result.recipe.name)}[/bold]"
    flow(console, [head, f"input {shape(before.input_shape)} -> {shape(after.input_shape)}"])
    show(_diff_grid(before, after), console)
    h, w = after.size_rules()
    flow(console, [*_totals(after), f"size rule {h.format('H')}, {w.format('W')}"])
    if before.outputs:
        console.print(escape(source_output_line(before)))
    console.print()
    edits = Grid(
        [
            Column("#"),
            Column("op"),
            Column("path", wrap=Wrap.WORDS),
            Column("attribute"),
            Column("old -> new", wrap=Wrap.WORDS),
        ],
        "edits",
    )
    for group in _grouped(result.edits):
        e = group[0]
        path = e.path or "(model)"
        if len(group) > 1:
            path += f" and {len(group) - 1} more like it"
        edits.add_row(
            str(e.op_index), e.op, escape(path), e.attribute, escape(f"{e.old} -> {e.new}")
        )
    show(edits, console)


def _diff_grid(before: Trace, after: Trace) -> Grid:
    """The stages before and after a recipe, side by side as ``old -> new``."""
    from bbswap.surgery.apply import stage_diff

    def column(name: str, footer: str, justify: Justify = "right") -> Column:
        return Column(name, justify, footer, Wrap.ARROWS)

    macs = f"{_arrow(count(before.macs), count(after.macs))} ({_ratio(before.macs, after.macs)})"
    grid = Grid(
        [
            Column("stage", footer="total"),
            column("output", _arrow(shape(before.output_shape), shape(after.output_shape)), "left"),
            column(
                "down",
                _arrow(describe_factor(before.downsample), describe_factor(after.downsample)),
            ),
            column("RF", _arrow(rf(before.receptive_field), rf(after.receptive_field))),
            column("params", _arrow(count(before.params), count(after.params))),
            column("MACs", macs),
        ]
    )
    for d in stage_diff(before, after):
        b, a = d.before, d.after
        grid.add_row(
            Text(d.path, style="" if a else "strike dim"),
            _arrow(shape(b.out_shape) if b else "-", shape(a.out_shape) if a else "-"),
            _arrow(
                describe_factor(b.downsample) if b else "-",
                describe_factor(a.downsample) if a else "-",
            ),
            _arrow(rf(b.receptive_field) if b else "-", rf(a.receptive_field) if a else "-"),
            _arrow(count(b.params) if b else "-", count(a.params) if a else "-"),
            _arrow(si(b.macs) if b else "-", si(a.macs) if a else "-"),
        )
    return grid


def _grouped(edits: Sequence[Edit]) -> list[list[Edit]]:
    """Consecutive edits that differ only in their path (a Dropout after each block)."""
    groups: list[list[Edit]] = []
    for e in edits:
        last = groups[-1][0] if groups else None
        same = last is not None and (last.op_index, last.attribute, last.old, last.new) == (
            e.op_index,
            e.attribute,
            e.old,
            e.new,
        )
        if same and e.kind is EditKind.APPEND:
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def render_ops(ops: Sequence[OpInfo], console: Console) -> None:
    for op in ops:
        console.print(f"[bold]{op.name}[/bold]: {escape(op.summary)}")
        for f in op.fields:
            console.print(Padding(Text(_field_line(f)), (0, 0, 0, 4)))


def _field_line(f: Field) -> str:
    """``name (kind, required or default; one of ...): help``."""
    req = (
        "required" if f.required else "optional" if f.default is None else f"default {f.default!r}"
    )
    extra = f"; one of {', '.join(f.choices)}" if f.choices else ""
    return f"{f.name} ({f.kind}, {req}{extra}): {f.help}"


def render_verify(report: VerifyReport, console: Console) -> None:
    table = Grid(
        [Column("check"), Column("result"), Column("detail", wrap=Wrap.WORDS)],
        f"verify {report.target}",
    )
    for c in report.checks:
        table.add_row(
            c.name,
            Text("ok", style="green") if c.ok else Text("FAILED", style="bold red"),
            escape(c.detail),
        )
    show(table, console)


def render_export(exported: Exported, console: Console) -> None:
    render_verify(exported.report, console)
    if exported.load is not None:
        load = exported.load
        console.print(
            f"loaded {load.loaded} tensors from the checkpoint"
            + (f"; {len(load.missing)} missing" if load.missing else "")
            + (f"; {len(load.unexpected)} unexpected" if load.unexpected else "")
            + (f" ({escape(load.note)})" if load.note else "")
        )
    console.print(
        f"wrote {escape(str(exported.path))} (class {exported.emitted.class_name})", soft_wrap=True
    )
    if exported.weights_path is not None:
        console.print(
            f"wrote {escape(str(exported.weights_path))} (its state_dict)", soft_wrap=True
        )


_FIT_COLUMNS = (
    Column(""),
    Column("edits", wrap=Wrap.ITEMS),
    Column("mode"),
    Column("output"),
    Column("MACs", "right"),
    Column("vs best", "right"),
    Column("params", "right"),
    Column("RF", "right"),
    Column("act.", "right"),
    Column("exact", wrap=Wrap.WORDS),
)


def _candidate_cells(c: Candidate, best: int) -> list[str | Text]:
    """A fit candidate's row after its mark: its edits, costs, and whether it is exact."""
    if c.failed:
        refused = Text(f"refused: {c.error}", style="dim")
        return [escape(c.label or "as is"), c.mode, "-", "-", "-", "-", "-", "-", refused]
    t = c.trace
    exact = "yes" if c.ok else "rounding" if c.rounding_only else "no"
    if c.ok and c.dilate_refused is not None:
        exact = "yes (dilate refused)"
    return [
        escape(c.label or "as is"),
        c.mode,
        f"{len(t.outputs)} outputs" if c.recipe.taps else shape(t.output_shape),
        si(t.macs),
        f"x{t.macs / best:.2f}" if best else "-",
        count(t.params),
        rf(t.receptive_field),
        size_bytes(t.activation_bytes),
        exact,
    ]


def render_fit(result: FitResult, top: int, console: Console) -> None:
    src = result.source
    winner = result.winner.trace.input_shape if result.winner.result else src.input_shape
    head = f"[bold]{escape(result.backbone.spec)}[/bold] -> {escape(result.target.describe())}"
    counts = f"{result.evaluated} candidates evaluated, each checked at {len(result.probes)}"
    flow(console, [head, f"input {shape(winner)}; {counts} input sizes"])
    if result.source.outputs:
        console.print(escape(source_output_line(result.source)))
    best = result.winner.trace.macs if result.winner.result else 0
    table = Grid(_FIT_COLUMNS, key=1)
    for i, c in enumerate(result.candidates[:top]):
        table.add_row("*" if i == 0 and c.ok else "", *_candidate_cells(c, best))
    show(table, console)
    w = result.winner
    if w.result is not None and w.recipe.taps:
        _render_taps(w, console)
    elif w.result is not None:
        h, wr = w.trace.size_rules()
        fields = [f"winner: {escape(w.label or 'as is')} ({w.mode});"]
        fields += [f"output {shape(w.trace.output_shape)},", f"{count(w.trace.macs)} MACs,"]
        flow(console, [*fields, f"{h.format('H')},", wr.format("W")], gap=" ")
    probes = [f"{shape(p)}," for p in result.probes]
    probes[-1] = probes[-1].rstrip(",")
    tail = [f"(from {shape(result.smallest)},", "the smallest input accepted)"]
    flow(console, ["probe sizes:", *probes, *tail], gap=" ")
    if result.outputs is not None:
        console.print(escape(f"returns {result.outputs.describe()}"))
    hidden = len(result.candidates) - top
    if hidden > 0:
        console.print(f"({hidden} more candidates; --top {len(result.candidates)} shows all)")


def _render_taps(w: Candidate, console: Console) -> None:
    """The winner of a fit to several targets: each output, the stage it taps, its size."""
    console.print(
        f"winner: {escape(w.label or 'as is')} ({w.mode}); {len(w.trace.outputs)} outputs "
        f"(a {w.recipe.returns or 'list'}), {count(w.trace.macs)} MACs"
    )
    table = Grid([Column(name) for name in ("output", "taps", "shape", "down", "size rule")])
    for tap, out in zip(w.recipe.taps, w.trace.outputs):
        h, wr = w.trace.size_rules(out.chain)
        projected = out.channels != _tapped_channels(w, tap["at"])
        table.add_row(
            escape(str(out.key)),
            escape(tap["at"]) + (" + 1x1 conv, BN" if projected else ""),
            shape(out.shape),
            describe_factor(out.downsample).removeprefix("1/"),
            f"{h.format('H')}, {wr.format('W')}",
        )
    show(table, console)


def _tapped_channels(w: Candidate, at: str) -> int | None:
    stage = w.result.before.stage(at) if w.result is not None else None
    return stage.channels if stage is not None else None


def render_matrix(result: Matrix, console: Console) -> None:
    """One row per backbone: its own output, then per target stride the MACs of the
    winning plan and its size rule, or why there is none."""
    what = f"{result.channels} channels" if result.channels else "own channels"
    steps = "inspect, fit, emit, verify" if result.verify else "inspect, fit (meta device)"
    aims = [f"{what} at 1/{', 1/'.join(map(str, result.strides))}"] if result.strides else []
    together = " + ".join(t.describe() for t in result.targets)
    held = f"a {result.returns} of {together}" if result.returns else together
    aims += [held] if result.targets else []
    console.print(
        f"[bold]support matrix[/bold] {escape(' '.join(result.patterns))}: "
        f"{escape('; '.join(aims))}, {result.rounding} rounding; {steps}"
    )
    table = Grid(
        [
            Column("backbone"),
            Column("features", "right", wrap=Wrap.WORDS),
            *(Column(f"1/{s}", wrap=Wrap.WORDS) for s in result.strides),
            *([Column(escape(together), wrap=Wrap.WORDS)] if result.targets else []),
            *([Column("emitted", wrap=Wrap.WORDS)] if result.verify else []),
            Column("time", "right"),
        ]
    )
    for row in result.rows:
        own = "-"
        if row.channels is not None and row.downsample is not None:
            own = f"{row.channels} @ 1/{describe_factor(row.downsample)}"
        if row.reason:
            cells: list[str | Text] = [Text(f"x {row.reason}", style="red")]
            cells += ["" for _ in [*result.strides, *result.targets[:1]][1:]]
        else:
            cells = [_matrix_cell(c) for c in row.cells]
        extra = [escape(row.emit_mode or "-")] if result.verify else []
        table.add_row(escape(row.spec), own, *cells, *extra, f"{row.seconds:.1f}s")
    show(table, console)
    for row in result.rows:
        why = [(row.reason, row.detail)] if row.reason else []
        why += [
            (together if c.targets else f"1/{c.stride}", c.detail) for c in row.cells if not c.ok
        ]
        for where, detail in why:
            console.print(f"  {escape(row.spec)} {escape(where)}: {escape(detail)}", soft_wrap=True)
    for mode in dict.fromkeys(r.emit for r in result.rows if r.import_reason):
        console.print(
            f"{escape(mode)}: {sum(r.emit == mode for r in result.rows)} backbones", soft_wrap=True
        )
    console.print(escape(matrix_summary(result)), soft_wrap=True)


def matrix_summary(result: Matrix) -> str:
    """'68 of 68 backbones reach every target (...); 12 refused as following no size
    rule: ...'."""
    steps = "inspect, fit, emit, verify" if result.verify else "inspect, fit on the meta device"
    failed = [r.spec for r in result.failed]
    partly = [r.spec for r in result.rows if r.refused_in_part]
    refused = [r.spec for r in result.rows if r.refused]
    text = f"{result.passed} of {result.cnns} backbones reach every target ({steps})"
    if partly:
        text += (
            f"; {len(partly)} reach every target but those refused as taking one input size: "
            f"{', '.join(partly)}"
        )
    if failed:
        text += f"; {len(failed)} do not: {', '.join(failed)}"
    if refused:
        text += f"; {len(refused)} refused as following no size rule: {', '.join(refused)}"
    return text


def _matrix_cell(cell: Cell) -> str | Text:
    if not cell.ok:
        return Text(f"x {cell.reason}", style="red")
    mark = " ok" if cell.verified else ""
    return f"{si(cell.macs or 0)} {cell.rule}{mark}"


def matrix_markdown(title: str, result: Matrix, families: dict[str, str] | None = None) -> str:
    """A matrix as a Markdown section: a summary, a table, and the failures with reasons."""
    families = families or {}
    lines = [f"## {title}", "", matrix_summary(result) + ".", ""]
    head = ["backbone", *(["family"] if families else []), "features"]
    together = " + ".join(t.describe() for t in result.targets)
    head += [f"1/{s}" for s in result.strides] + ([together] if result.targets else [])
    head += ["emitted"] if result.verify else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.rows:
        own = "-"
        if row.channels is not None and row.downsample is not None:
            own = f"{row.channels} @ 1/{describe_factor(row.downsample)}"
        if row.reason:
            cells = [f"**{row.reason}**", *("" for _ in [*result.strides, *result.targets[:1]][1:])]
        else:
            cells = [
                f"{si(c.macs or 0)}MACs {c.rule}" + (", verified" if c.verified else "")
                if c.ok
                else f"**{c.reason}**"
                for c in row.cells
            ]
        cols = [f"`{row.spec}`", *([families.get(row.spec, "")] if families else []), own, *cells]
        if result.verify:
            cols.append(row.emit_mode or "-")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |")
    reasons = dict.fromkeys(r.emit for r in result.rows if r.import_reason)
    if reasons:
        lines += ["", "Emitted in `--import` mode, and why:", ""]
        lines += [
            f"- {why}: {sum(r.emit == why for r in result.rows)} backbones" for why in reasons
        ]
    failures = [
        (r.spec, where, detail)
        for r in result.rows
        for where, detail in (
            [("", r.detail)]
            if r.reason
            else [
                (f" {together}" if c.targets else f" 1/{c.stride}", c.detail)
                for c in r.cells
                if not c.ok
            ]
        )
    ]
    if failures:
        lines += ["", "Failures, with the whole message:", ""]
        lines += [f"- `{spec}`{where}: {detail}" for spec, where, detail in failures]
    return "\n".join(lines) + "\n"


def render_cross_check(check: CrossCheck, console: Console) -> None:
    """bbswap's, thop's and torchinfo's totals in one table, and what each counts."""
    grid = Grid(
        [
            Column("counter"),
            Column("device"),
            Column("input"),
            *(Column(name, "right") for name in ("params", "MACs", "bbswap MACs", "vs bbswap")),
        ],
        f"cross-check  input {shape(check.input_shape)}",
    )
    for c in check.counts:
        diff = c.macs_difference
        grid.add_row(
            str(c.counter),
            c.device,
            shape(c.input_shape),
            count(c.params) if c.params is not None else "-",
            count(c.macs) if c.macs is not None else "failed",
            count(c.bbswap_macs),
            f"{diff:+,}" if diff is not None else "-",
        )
    show(grid, console)
    for c in check.counts:
        words = c.counts + (f"; {c.misses}" if c.misses else "")
        console.print(f"{c.counter}: {escape(words)}")
        if c.error:
            console.print(f"  {c.counter} failed {escape(c.error)}")
    console.print(
        f"bbswap finds {count(check.functional_macs)} MACs in functional calls outside "
        "leaf modules (what module-call counters cannot see)"
    )
