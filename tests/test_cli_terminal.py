"""The command line on a real terminal's terms: tables that fit 80 columns without cutting
an identifier or a number, piped output without trailing spaces, status lines only on a
terminal, and the conventions of a CLI (``--version``, completion, ``--json`` everywhere,
readable metavars, exit status 1 for a failed verification and 2 for a usage error)."""

from __future__ import annotations

import importlib.metadata
import io
import itertools
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import shellingham  # typer's dependency: how it finds the user's shell
import torch
from cli_helpers import assert_one_line_error
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.main import get_command
from typer.testing import CliRunner

import bbswap
import bbswap.cli.progress
import bbswap.search.fit
from bbswap.backbones.registry import list_backbones
from bbswap.cli.app import EXIT_CODES, app
from bbswap.cli.layout import Column, Grid, TrailingSpaceFree, Wrap, show
from bbswap.cli.render import count, reduction_table, render_fit, si, stage_table
from bbswap.codegen.export import export
from bbswap.kinds import Phase
from bbswap.recipes.registry import describe_ops
from bbswap.recipes.toml_io import load_recipe
from bbswap.search.fit import fit
from bbswap.search.matrix import matrix
from bbswap.surgery.apply import apply_recipe
from bbswap.tracing.inspection import inspect_backbone

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "recipes" / "seed-hmer-resnet50.toml"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "named_models.py"
SCRIPT = Path(sys.executable).parent / "bbswap"
NARROW = {"COLUMNS": "80", "LINES": "50", "FORCE_COLOR": None, "BBSWAP_DEBUG": None}
ELLIPSIS = "\N{HORIZONTAL ELLIPSIS}"

pytestmark = pytest.mark.usefixtures("frozen_progress_clock")


def run(*args: Any, env: dict[str, str | None] | None = None) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def narrow(*args: Any) -> str:
    """``bbswap ARGS`` on an 80-column terminal: its stdout, after checking it succeeded."""
    result = run(*args, env=NARROW)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


def assert_fits(text: str, width: int, *whole: str) -> None:
    """No line wider than ``width`` (but for one piece that is wider by itself), no
    ellipsis, no trailing space, and each of ``whole`` on one line, not cut."""
    lines = text.splitlines()
    assert ELLIPSIS not in text
    assert [line for line in lines if line != line.rstrip()] == []
    too_wide = [line for line in lines if len(line) > width and " " in line.strip()]
    assert too_wide == []
    for item in whole:
        pattern = re.compile(rf"(?<![\w.]){re.escape(item)}(?![\w.(])")
        assert any(pattern.search(line) for line in lines), (item, text)


# -- tables at 80 columns ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_report():
    return inspect_backbone("resnet50", "1x3x224x224")


def test_inspect_resnet50_at_80_columns_shows_every_id_and_number_whole(resnet50_report):
    text = narrow("inspect", "resnet50")
    t = resnet50_report.trace
    ids = [s.path for s in t.stages] + [r.id for r in t.reductions]
    figures = [count(s.params) for s in t.stages if s.params] + [count(t.macs), count(t.params)]
    assert "layer2.0.downsample.0" in ids
    assert_fits(text, 80, *ids, *figures, *(si(s.macs) for s in t.stages if s.macs))


def test_inspect_densenet100_at_80_columns_shows_the_functional_ids_whole():
    text = narrow("inspect", "densenet100")
    t = inspect_backbone("densenet100", "1x3x224x224").trace
    ids = [s.path for s in t.stages] + [r.id for r in t.reductions]
    assert "trans1.avg_pool2d()" in ids
    assert_fits(text, 80, *ids, count(t.macs))


def test_fit_at_80_columns_shows_every_candidate_whole():
    text = narrow("fit", "resnet50", "--channels", 684, "--stride", 16)
    result = fit("resnet50", channels=684, stride=16)
    labels = [c.label for c in result.candidates[:5]]
    assert "layer4: stride 1" in labels
    assert_fits(text, 80, *labels, *(count(c.trace.params) for c in result.candidates[:5]))


def test_apply_seed_recipe_at_80_columns_shows_every_path_whole():
    text = narrow("apply", "resnet50", SEED)
    result = apply_recipe("resnet50", load_recipe(SEED))
    paths = {e.path for e in result.edits if e.path and e.op != "dropout"}  # one per row
    assert "layer2.0.downsample.0" in paths
    assert_fits(text, 80, "layer1.0.dropout", *paths, count(result.after.macs))


def test_list_at_80_columns_shows_every_spec_whole():
    text = narrow("list")
    assert_fits(text, 80, *(b.spec for b in list_backbones("*")))


def test_a_piped_run_with_columns_80_fits_too(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "BBSWAP_DEBUG")}
    proc = subprocess.run(
        [str(SCRIPT), "inspect", "densenet100"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**env, "COLUMNS": "80", "PYTHONPATH": str(Path(bbswap.__file__).parent.parent)},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert_fits(proc.stdout, 80, "trans1.avg_pool2d()", "trans2.avg_pool2d()", "max_pool2d()")


def test_piped_output_has_no_trailing_spaces_and_keeps_one_row_a_line(resnet50_report):
    result = run("inspect", "resnet50")  # no COLUMNS: a pipe's 160 columns
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line for line in lines if line != line.rstrip()] == []
    for stage in resnet50_report.trace.stages:  # each stage on one line, with its type
        assert any(line.split()[:2] == [stage.path, stage.type] for line in lines if line.strip())


# -- the layout itself, at any width ----------------------------------------------------------


def _console(out: io.StringIO, width: int) -> Console:
    """A console of ``width`` columns writing to ``out`` as the command line does."""
    stream: Any = TrailingSpaceFree(out)  # a text stream
    return Console(file=stream, width=width, highlight=False)


def _rendered(grid: Grid, width: int) -> str:
    out = io.StringIO()
    show(grid, _console(out, width))
    return out.getvalue()


@settings(max_examples=40, deadline=None)
@given(width=st.integers(24, 200))
def test_stage_and_reduction_tables_never_cut_an_id_at_any_width(resnet50_report, width):
    t = resnet50_report.trace
    for grid, ids in (
        (stage_table(t), [s.path for s in t.stages] + [s.type for s in t.stages]),
        (reduction_table(t.reductions), [r.id for r in t.reductions]),
    ):
        assert_fits(_rendered(grid, width), width, *ids)


@settings(max_examples=40, deadline=None)
@given(width=st.integers(30, 200))
def test_fit_table_never_cuts_a_candidate_at_any_width(width):
    result = _fit_result()
    out = io.StringIO()
    render_fit(result, 20, _console(out, width))
    edits = [e for c in result.candidates for e in c.label.split(", ")]
    assert_fits(out.getvalue(), width, *edits)


_FITS: dict[str, Any] = {}


def _fit_result() -> Any:
    if "r" not in _FITS:
        _FITS["r"] = fit("resnet50", channels=684, stride=8, allow_truncate=True)
    return _FITS["r"]


@settings(deadline=None)
@given(
    cells=st.lists(
        st.tuples(
            st.from_regex(r"id_[a-z0-9_.]{0,22}[a-z0-9]", fullmatch=True),
            st.lists(st.from_regex(r"[a-z]{1,9}", fullmatch=True), max_size=12),
            st.integers(0, 10**12),
        ),
        min_size=1,
        max_size=6,
    ),
    width=st.integers(20, 160),
)
def test_a_grid_keeps_ids_and_numbers_whole_and_prose_complete(cells, width):
    grid = Grid(
        [Column("id"), Column("prose", wrap=Wrap.WORDS), Column("n", "right", "total")],
        key=0,
    )
    for name, words, n in cells:
        grid.add_row(name, " ".join(words), count(n))
    text = _rendered(grid, width)
    assert_fits(text, width, *(name for name, _, _ in cells), *(count(n) for *_, n in cells))
    tokens = text.split()
    for _, words, _ in cells:  # every word of the prose, whole
        assert all(w in tokens for w in words), (words, text)


@given(
    text=st.text(alphabet=" ab\n", max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=6),
)
def test_trailing_spaces_are_dropped_whatever_the_chunks(text, cuts):
    out = io.StringIO()
    stream = TrailingSpaceFree(out)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    for a, b in itertools.pairwise(bounds):
        stream.write(text[a:b])
    assert out.getvalue() == "\n".join(line.rstrip(" ") for line in text.split("\n"))


# -- progress -----------------------------------------------------------------------------------


def test_fit_and_export_report_their_phases_in_order(tmp_path):
    phases: list[Phase] = []
    steps: list[tuple[int, int]] = []
    result = fit(
        "resnet18",
        channels=256,
        stride=16,
        on_phase=phases.append,
        progress=lambda done, total: steps.append((done, total)),
    )
    assert phases == [Phase.TRACE, Phase.CANDIDATES]
    assert steps[-1] == (steps[-1][1], steps[-1][1]) and len(steps) == result.evaluated
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "p"\n[[ops]]\nop = "project"\nchannels = 4\n')
    export(
        f"{FIXTURE}:Tagged",
        load_recipe(recipe),
        tmp_path / "out.py",
        input_shape="1x3x32x32",
        on_phase=phases.append,
    )
    assert phases[2:] == [Phase.BUILD, Phase.EMIT, Phase.VERIFY]


def test_matrix_names_each_backbone_as_it_begins():
    calls: list[tuple[int, int, str | None]] = []
    matrix(
        ["resnet18", "densenet100"],
        strides=(32,),
        verify=False,
        progress=lambda done, total, spec: calls.append((done, total, spec)),
    )
    assert calls == [(0, 2, "resnet18"), (1, 2, "densenet100"), (2, 2, None)]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_status_line_names_each_phase_on_a_terminal(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(bbswap.cli.progress, "DELAY", 0.0)
    with bbswap.cli.progress.activity(False, Phase.TRACE) as status:
        assert status is not None
        for phase in (Phase.CANDIDATES, Phase.BUILD, Phase.EMIT, Phase.VERIFY):
            status.phase(phase)
            time.sleep(0.3)  # the status line refreshes several times a second
        status.step(3, 7)
        time.sleep(0.3)
    shown = terminal.getvalue()
    for phase in (Phase.CANDIDATES, Phase.BUILD, Phase.EMIT, Phase.VERIFY):
        assert bbswap.cli.progress.PHASES[phase] in shown
    assert "evaluating candidates: 3 of 7" in shown


def test_no_status_line_when_quiet_or_not_a_terminal(monkeypatch):
    monkeypatch.setattr(bbswap.cli.progress, "DELAY", 0.0)
    with bbswap.cli.progress.activity(True) as status:
        assert status is None
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with bbswap.cli.progress.activity(False) as status:
        assert status is None
    with bbswap.cli.progress.backbone_bar(False) as bar:
        assert bar is None


def test_apply_o_writes_nothing_to_a_piped_stderr(monkeypatch, tmp_path):
    monkeypatch.setattr(bbswap.cli.progress, "DELAY", 0.0)
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "p"\n[[ops]]\nop = "project"\nchannels = 4\n')
    out = tmp_path / "out.py"
    result = run("apply", f"{FIXTURE}:Tagged", recipe, "-i", "1x3x32x32", "-o", out)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stderr == ""


# -- conventions --------------------------------------------------------------------------------


def test_version_is_the_installed_packages():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"bbswap {importlib.metadata.version('bbswap')}\n"


def test_shell_completion_is_offered(monkeypatch: pytest.MonkeyPatch):
    result = run("--help", env={"COLUMNS": "120"})
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout
    # the shell is found from the process's ancestors, which a test run need not have
    monkeypatch.setattr(shellingham, "detect_shell", lambda: ("bash", "/bin/bash"))
    shown = run("--show-completion")
    assert shown.exit_code == 0, (shown.stdout, shown.stderr)
    assert "complete -o default -F" in shown.stdout and "bbswap" in shown.stdout


def _commands() -> dict[str, Any]:
    group: Any = get_command(app)  # the group of commands
    return dict(group.commands)


def test_every_command_takes_json():
    for name, command in _commands().items():
        flags = {opt for p in command.params for opt in p.opts}
        assert "--json" in flags, name


def test_ops_json_is_the_op_registry_as_data():
    result = run("ops", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["schema"] == "bbswap.ops/1"
    ops = describe_ops()
    assert [o["op"] for o in data["ops"]] == [o.name for o in ops]
    for got, op in zip(data["ops"], ops, strict=True):
        assert got["summary"] == op.summary
        assert [f["name"] for f in got["fields"]] == [f.name for f in op.fields]
        for field, declared in zip(got["fields"], op.fields, strict=True):
            assert field["required"] == declared.required
            assert field["choices"] == list(declared.choices)
            assert field["kind"] == declared.kind and field["help"] == declared.help
    text = run("ops").stdout
    assert all(f"{o.name}: {o.summary}" in text for o in ops)


@pytest.mark.parametrize("name", ["", *sorted(_commands())])
def test_help_shows_readable_metavars(name):
    result = run(*([name] if name else []), "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = result.stdout
    for raw in ("<bool>", "<str>", "<int>", "<float>", "<list[", "{"):
        assert raw not in text, (name, raw, text)


def test_help_documents_the_exit_codes_as_the_readme_does():
    text = " ".join(run("--help", env={"COLUMNS": "200"}).stdout.split())
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for code, what in EXIT_CODES:
        assert f"{code} {what}" in text
        assert f"| {code} | {what} |" in readme


VERIFIED = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)
"""


def test_a_failed_verification_exits_1_and_a_usage_error_2(tmp_path):
    file = tmp_path / "net.py"
    file.write_text(VERIFIED, encoding="utf-8")
    target = f"{file}:Net"
    passed = run("verify", target, "--channels", 8, "--stride", 2, "--sizes", "32x32,33x47")
    assert passed.exit_code == 0, (passed.stdout, passed.stderr)
    failed = run("verify", target, "--channels", 16, "--sizes", "32x32")
    assert_one_line_error(failed, "channels", "16", report=True, status=1)
    assert_one_line_error(run("verify", target, "--channels", "many"), "--channels")
    assert_one_line_error(run("verify", target, "--rounding", "up"), "--rounding 'up'")
    assert_one_line_error(run("verify", target, "--sizes", "0x"), "--sizes")


def test_fit_o_existing_is_refused_before_tracing(tmp_path, monkeypatch):
    out = tmp_path / "backbone.py"
    out.write_text("# mine\n")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("traced")

    monkeypatch.setattr(bbswap.search.fit, "trace", never)
    result = run("fit", "resnet18", "--channels", 64, "--stride", 16, "-o", out)
    assert_one_line_error(result, str(out), "--force")
    assert out.read_text() == "# mine\n"


def _tagged() -> type[torch.nn.Module]:
    sys.path.insert(0, str(FIXTURE.parent))
    try:
        from named_models import Tagged
    finally:
        sys.path.remove(str(FIXTURE.parent))
    return Tagged


def test_fit_o_writes_files_with_the_umask(tmp_path):
    weights = tmp_path / "source.pth"
    torch.save(_tagged()().state_dict(), weights)
    out = tmp_path / "out.py"
    old = os.umask(0o022)
    try:
        result = run(
            "fit", f"{FIXTURE}:Tagged", "--channels", 4, "--stride", 4, "-i", "1x3x32x32",
            "-o", out, "--weights", weights,
        )  # fmt: skip
    finally:
        os.umask(old)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE(out.with_suffix(".pth").stat().st_mode) == 0o644


def test_the_process_ends_with_its_output_whole():
    """The console script skips the interpreter's teardown: what it printed is all there,
    with the command's status."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "bbswap", "ops", "--json"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["schema"] == "bbswap.ops/1"
    bad = subprocess.run(
        [sys.executable, "-m", "bbswap", "inspect", "resnet50", "--input", "1xbad"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
