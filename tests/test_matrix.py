"""``bbswap matrix``: which backbones reach which target strides, the MACs of each winning
plan, and why not.

One row per backbone, one cell per stride; a backbone that fails (refused, no exact plan)
is a row or a cell saying why in a few words, never the end of the sweep, and the
command exits 0. User errors in the command itself (strides, rounding, patterns, specs)
are one line and exit status 2. Checked on the command line (text and ``--json``) and
through the Python API ``bbswap.search.matrix.matrix``; the fits run on the meta device, and
``--verify`` (the default; ``--no-verify`` here, for speed) emits and checks each winner
on CPU with one intra-op thread.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import assert_one_line_error, cli, ok
from recipe_helpers import one_thread

import bbswap
import bbswap.cli.render
from bbswap.cli.render import si
from bbswap.errors import BackboneNotFound, InvalidArgument
from bbswap.search.fit import FitResult, fit
from bbswap.search.matrix import Matrix, expand, matrix

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VIT = f"{FIXTURES / 'token_models.py'}:TinyViT"
ALEXNET = f"{FIXTURES / 'exact_models.py'}:AlexNetLike"
GRAY = f"{FIXTURES / 'ocr_like.py'}:GrayNet"  # one input channel, no in_chans argument
TEXT_LINE = f"{FIXTURES / 'ocr_like.py'}:TextLineVGG"  # one channel, rejects H < 32
CONVNEXT = f"{FIXTURES / 'exact_models.py'}:ConvNeXtLike"


pytestmark = pytest.mark.usefixtures("frozen_progress_clock")


@functools.cache
def fitted(spec: str, **kwargs: Any) -> FitResult:
    return fit(spec, **kwargs)


@functools.cache
def api(patterns: tuple[str, ...], **kwargs: Any) -> Matrix:
    """The Python API, on the meta device unless a test asks for verification."""
    kwargs.setdefault("verify", False)
    return matrix(patterns, **kwargs)


def row_cells(text: str, spec: str) -> list[str]:
    """The cells of a backbone's table row (columns are two or more spaces apart; the
    lines under the table say why a cell failed: ``  spec 1/3: ...``)."""
    row = re.compile(rf"\s+{re.escape(spec)}\s{{2,}}")
    rows = [line for line in text.splitlines() if row.match(line)]
    assert len(rows) == 1, (spec, text)
    return re.split(r"\s{2,}", rows[0].strip())


def words(text: str) -> str:
    """The text with every run of whitespace one space (a long first line wraps)."""
    return " ".join(text.split())


# -- two zoo backbones at three strides ----------------------------------------------------------


@pytest.fixture(scope="module")
def two_run() -> tuple[str, Matrix]:
    """The command's table, and the Matrix it rendered (caught on its way to the renderer)."""
    seen: list[Matrix] = []
    render = bbswap.cli.render.render_matrix

    def catch(result: Matrix, console: Any) -> None:
        seen.append(result)
        render(result, console)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bbswap.cli.render, "render_matrix", catch)
        text = ok(
            cli("matrix", "resnet18", "mobilenet_v2", "--stride", "8,16,32", "--no-verify")
        ).stdout
    assert len(seen) == 1
    return text, seen[0]


@pytest.fixture
def two(two_run: tuple[str, Matrix]) -> str:
    return two_run[0]


def header_cells(text: str) -> list[str]:
    header = next(line for line in text.splitlines() if "backbone" in line)
    return re.split(r"\s{2,}", header.strip())


def test_table_has_a_row_per_backbone_and_a_cell_per_stride(two):
    lines = two.splitlines()
    assert lines[0] == (
        "support matrix resnet18 mobilenet_v2: own channels at 1/8, 1/16, 1/32, any rounding; "
        "inspect, fit (meta device)"
    )
    assert header_cells(two) == ["backbone", "features", "1/8", "1/16", "1/32", "time"]
    expected_features = {"resnet18": "512 @ 1/32", "mobilenet_v2": "1280 @ 1/32"}
    for spec, features in expected_features.items():
        cells = row_cells(two, spec)
        assert cells[:2] == [spec, features]
        assert len(cells) == 6 and re.fullmatch(r"\d+\.\ds", cells[-1])
        for cell in cells[2:5]:
            assert re.fullmatch(r"\d+\.\d\d [kMG] (ceil|floor)", cell), (spec, cell)
        # fewer MACs at a coarser stride
        macs = [
            float(c.split()[0]) * {"k": 1e3, "M": 1e6, "G": 1e9}[c.split()[1]] for c in cells[2:5]
        ]
        assert macs[0] > macs[1] > macs[2]
    assert lines[-1] == ("2 of 2 backbones reach every target (inspect, fit on the meta device)")
    assert not re.search(r"\sx [a-z]", two)  # no failed cell


def test_a_cell_is_the_fit_of_the_same_target(two_run):
    text, shown = two_run
    winner = fitted("resnet18", channels=512, stride=16, rounding="any").winner
    assert row_cells(text, "resnet18")[3] == f"{si(winner.trace.macs)} {winner.rule}"
    for result in (shown, api(("resnet18",), strides=(16,))):
        cell = next(c for c in result.rows[0].cells if c.stride == 16)
        assert (cell.stride, cell.ok, cell.macs) == (16, True, winner.trace.macs)
        assert (cell.plan, cell.rule, cell.verified) == (winner.label, winner.rule, None)


def test_the_rendered_rows(two_run):
    result = two_run[1]
    assert result.patterns == ("resnet18", "mobilenet_v2")
    assert (result.strides, result.channels, result.rounding, result.verify) == (
        (8, 16, 32),
        None,
        "any",
        False,
    )
    assert result.passed == 2
    assert [r.spec for r in result.rows] == ["resnet18", "mobilenet_v2"]
    for row in result.rows:
        assert row.ok and row.reason == "" and row.emit == ""
        assert row.downsample == (32, 32)
        assert [c.stride for c in row.cells] == [8, 16, 32]
        assert all(c.ok and c.macs and c.rule == "ceil" for c in row.cells)
    assert [r.channels for r in result.rows] == [512, 1280]
    assert result.rows[0].cells[2].plan == "no stride change"


# -- --verify, a user file and a refused backbone -------------------------------------------------


@pytest.fixture(scope="module")
def verified() -> str:
    result = cli("matrix", "resnet18", ALEXNET, VIT, "--channels", 256, "--stride", 16, "--verify")
    return ok(result).stdout


def test_verify_emits_and_checks_each_winner(verified):
    assert words(verified).startswith(
        f"support matrix resnet18 {ALEXNET} {VIT}: 256 channels at 1/16, any rounding; "
        "inspect, fit, emit, verify "
    )
    assert header_cells(verified) == ["backbone", "features", "1/16", "emitted", "time"]
    resnet = row_cells(verified, "resnet18")
    assert resnet[1] == "512 @ 1/32"
    assert re.fullmatch(r"\d+\.\d\d G ceil ok", resnet[2])
    assert resnet[3] == "bundled"
    user = row_cells(verified, ALEXNET)
    assert user[1] == "16 @ 1/32"
    assert re.fullmatch(r"\d+\.\d\d M ceil ok", user[2])
    assert user[3] == "bundled"


def test_a_refused_backbone_is_a_row_not_the_end(verified):
    vit = row_cells(verified, VIT)
    assert vit[1:] == ["-", "x not a CNN: token output", "-", vit[-1]]
    assert (
        f"  {VIT} not a CNN: token output: {VIT} has no feature map that follows the input "
        "size: its features are tokens on its 14x14 grid"
    ) in verified
    assert verified.splitlines()[-1] == (
        "2 of 2 backbones reach every target (inspect, fit, emit, verify); "
        f"1 refused as following no size rule: {VIT}"
    )


def test_verified_cells_in_the_python_api():
    result = api((ALEXNET,), strides=(16,), channels=256, verify=True)
    row = result.rows[0]
    assert row.ok and row.emit == "bundled" and row.channels == 16
    cell = row.cells[0]
    assert cell.ok and cell.verified is True and cell.rule == "ceil"
    assert "exact ceil at" in cell.plan
    assert cell.macs == fitted(ALEXNET, channels=256, stride=16, rounding="any").winner.trace.macs


def test_json(tmp_path):
    data = json.loads(
        ok(cli("matrix", "resnet18", VIT, "--stride", 16, "--json", "--no-verify")).stdout
    )
    assert data["schema"] == "bbswap.matrix/1"
    assert data["patterns"] == ["resnet18", VIT]
    assert data["strides"] == [16]
    assert (data["channels"], data["rounding"], data["verify"], data["passed"]) == (
        None,
        "any",
        False,
        1,
    )
    resnet, vit = data["rows"]
    assert resnet["spec"] == "resnet18" and resnet["ok"] is True and resnet["reason"] is None
    assert resnet["channels"] == 512 and resnet["downsample"] == [32, 32]
    assert resnet["emit"] is None
    [cell] = resnet["cells"]
    want = fitted("resnet18", channels=512, stride=16, rounding="any").winner
    assert cell == {
        "stride": 16,
        "ok": True,
        "macs": want.trace.macs,
        "plan": want.label,
        "rule": "ceil",
        "targets": None,
        "verified": None,
        "reason": None,
        "detail": None,
    }
    assert vit["spec"] == VIT and vit["ok"] is False
    assert vit["reason"] == "not a CNN: token output"
    assert vit["detail"].startswith(f"{VIT} has no feature map that follows the input size")
    assert vit["cells"] == [] and vit["channels"] is None and vit["downsample"] is None


# -- cells that fail -----------------------------------------------------------------------------


def test_an_impossible_stride_is_a_cell_with_its_reason():
    text = ok(cli("matrix", "resnet18", "--stride", "3,32", "--no-verify")).stdout
    cells = row_cells(text, "resnet18")
    assert cells[2] == "x no exact plan"
    assert re.fullmatch(r"\d+\.\d\d G ceil", cells[3])
    assert "  resnet18 1/3: resnet18 cannot reach stride 3: its features are at 1/32" in text
    assert text.splitlines()[-1] == (
        "0 of 1 backbones reach every target (inspect, fit on the meta device); 1 do not: resnet18"
    )
    row = api(("resnet18",), strides=(3,)).rows[0]
    assert not row.ok and row.reason == ""
    [cell] = row.cells
    assert (cell.ok, cell.reason, cell.macs, cell.verified) == (False, "no exact plan", None, None)
    assert cell.detail.startswith("resnet18 cannot reach stride 3")


def test_rounding_decides_the_even_kernel_cells():
    floor = api((CONVNEXT,), strides=(16, 32)).rows[0]
    assert floor.ok and [c.rule for c in floor.cells] == ["floor", "floor"]
    assert floor.cells[0].plan == "features.6: stride 1"
    # ceil: the even windows that round down pad each input by its size
    ceil = api((CONVNEXT,), strides=(16, 32), rounding="ceil").rows[0]
    assert ceil.ok and [c.rule for c in ceil.cells] == ["ceil", "ceil"]
    assert all("exact ceil at features.0" in c.plan for c in ceil.cells)
    data = json.loads(
        ok(
            cli("matrix", CONVNEXT, "--stride", 16, "--rounding", "floor", "--json", "--no-verify")
        ).stdout
    )
    assert data["rounding"] == "floor" and data["rows"][0]["cells"][0]["rule"] == "floor"


# -- user errors: one line, exit status 2 -------------------------------------------------------

ERRORS = {
    "stride-not-a-number": (["resnet18", "--stride", "8,x"], ["malformed --stride '8,x'"]),
    "stride-0": (["resnet18", "--stride", "0"], ["malformed --stride '0'", "positive integers"]),
    "stride-empty-part": (["resnet18", "--stride", "8,,16"], ["malformed --stride '8,,16'"]),
    "stride-per-axis": (["resnet18", "--stride", "16x8"], ["malformed --stride '16x8'"]),
    "rounding": (
        ["resnet18", "--rounding", "sideways"],
        ["--rounding 'sideways' is not one of ceil, floor, any"],
    ),
    "pattern": (["nosuch*"], ["pattern 'nosuch*' matches no backbone", "bbswap list"]),
    "pattern-among-others": (["resnet18", "nosuch*"], ["pattern 'nosuch*' matches no backbone"]),
    "unknown-spec": (["nosuch"], ["unknown backbone 'nosuch'", "resnet18"]),
    "missing-file": ([f"{FIXTURES / 'nosuch.py'}:Net"], ["nosuch.py"]),
    "channels-0": (["resnet18", "--channels", "0"], ["--channels must be positive, got 0"]),
    "in-chans-0": (["resnet18", "--in-chans", "0"], ["--in-chans must be positive, got 0"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line(case):
    args, fragments = ERRORS[case]
    assert_one_line_error(cli("matrix", *args), *fragments)
    assert_one_line_error(cli("matrix", *args, "--json"), *fragments)


def test_python_api_errors():
    # the library names its parameters; the command line words them as flags
    with pytest.raises(InvalidArgument, match=r"^strides must list positive strides, got \[0\]"):
        matrix("resnet18", strides=[0])
    with pytest.raises(InvalidArgument, match=r"got \[\]"):
        matrix("resnet18", strides=[])
    with pytest.raises(InvalidArgument, match=r"^channels must be positive"):
        matrix("resnet18", channels=-1)
    with pytest.raises(InvalidArgument, match="pattern 'nosuch\\*' matches no backbone"):
        matrix(["resnet18", "nosuch*"])
    with pytest.raises(BackboneNotFound):
        matrix("nosuch")


# -- patterns ------------------------------------------------------------------------------------


def test_a_pattern_covers_exactly_the_zoo_resnets():
    want = [b.spec for b in bbswap.list_backbones("resnet*")]
    assert want == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    data = json.loads(ok(cli("matrix", "resnet*", "--stride", 32, "--json", "--no-verify")).stdout)
    assert data["patterns"] == ["resnet*"]
    assert [r["spec"] for r in data["rows"]] == want
    assert data["passed"] == len(want)
    assert all(r["cells"][0]["plan"] == "no stride change" for r in data["rows"])


def test_expand_orders_and_dedupes():
    assert expand(["resnet1*"]) == ["resnet18", "resnet101", "resnet152"]
    assert expand(["resnet50", "resnet*", "resnet18"]) == [
        "resnet50",
        "resnet18",
        "resnet34",
        "resnet101",
        "resnet152",
    ]
    assert expand(["densenet1?0"]) == ["densenet100"]
    assert expand([VIT]) == [VIT]  # a spec without wildcards stands as it is
    assert expand(["*net*"]) == [b.spec for b in bbswap.list_backbones() if "net" in b.spec]


def test_a_row_holds_how_its_file_was_emitted_as_data():
    from bbswap.search.matrix import Row

    assert (Row("x").emit_mode, Row("x").emit) == ("", "")
    assert (Row("x", emitted=True).emit_mode, Row("x", emitted=True).emit) == ("bundled",) * 2
    imported = Row("x", emitted=True, import_reason="a lambda in forward")
    assert imported.emit_mode == "--import"
    assert imported.emit == "--import (a lambda in forward)"


# -- one-channel user files: each backbone's own input channels ----------------------------------


def test_a_one_channel_file_is_traced_with_one_channel():
    text = ok(cli("matrix", GRAY, TEXT_LINE, "--no-verify")).stdout
    gray = row_cells(text, GRAY)
    assert gray[1] == "32 @ 1/32"
    for cell in gray[2:5]:
        assert re.fullmatch(r"\d+\.\d\d [kMG] ceil", cell), cell
    # the text-line extractor is inspected and fitted (1 channel) at probe sizes it accepts
    # (from 32x8), not below, where its forward fails; its last 2x2 conv padded on one side,
    # it reaches every target
    line = row_cells(text, TEXT_LINE)
    assert line[1] == "32 @ 1/16x4"
    for cell in line[2:5]:
        assert re.fullmatch(r"\d+\.\d\d [kMG] ceil", cell), cell
    assert "forward" not in text and "channels instead" not in text
    row = api((GRAY, TEXT_LINE), strides=(16,))
    assert [r.in_chans for r in row.rows] == [1, 1]
    want = fitted(GRAY, channels=32, stride=16, rounding="any").winner
    assert row.rows[0].cells[0].macs == want.trace.macs
    assert want.trace.input_shape[1] == 1


def test_in_chans_gives_every_plan_that_many_input_channels():
    result = api((GRAY,), strides=(16,), in_chans=3, verify=True)
    row = result.rows[0]
    assert row.ok and row.in_chans == 1 and row.emit == "bundled"
    [cell] = row.cells
    assert cell.verified is True
    want = fitted(GRAY, channels=32, stride=16, rounding="any", in_chans=3).winner
    assert want.result.surgery.in_chans == 3 and cell.macs == want.trace.macs
    data = json.loads(
        ok(cli("matrix", GRAY, "--stride", 16, "--in-chans", 3, "--no-verify", "--json")).stdout
    )
    assert data["rows"][0]["cells"][0]["macs"] == want.trace.macs


# -- worker processes ----------------------------------------------------------------------------


def timeless(data: dict[str, Any]) -> dict[str, Any]:
    """A matrix's JSON without each row's time."""
    return {**data, "rows": [{k: v for k, v in r.items() if k != "seconds"} for r in data["rows"]]}


@pytest.mark.parametrize("verify", ["--no-verify", "--verify"])
def test_jobs_2_gives_the_rows_of_jobs_1_in_order(verify):
    args = ("matrix", ALEXNET, VIT, CONVNEXT, "--stride", "16,32", verify, "--json")
    serial = json.loads(ok(cli(*args, "--jobs", 1)).stdout)
    parallel = json.loads(ok(cli(*args, "--jobs", 2)).stdout)
    assert [r["spec"] for r in parallel["rows"]] == [ALEXNET, VIT, CONVNEXT]
    assert timeless(parallel) == timeless(serial)
    assert [r["ok"] for r in serial["rows"]] == [True, False, True]
    if verify == "--verify":
        fitted_rows = (serial["rows"][0], serial["rows"][2])
        assert all(c["verified"] for r in fitted_rows for c in r["cells"])


def test_jobs_progress_names_a_backbone_not_yet_done():
    calls: list[tuple[int, int, str | None]] = []
    specs = [ALEXNET, GRAY, CONVNEXT]
    found = matrix(specs, strides=(16,), verify=False, jobs=0, progress=lambda *a: calls.append(a))
    assert [r.spec for r in found.rows] == specs
    assert calls[0] == (0, 3, ALEXNET) and calls[-1] == (3, 3, None)
    done = [c[0] for c in calls]
    assert done == sorted(done) and all(c[2] in specs for c in calls[:-1])


def test_negative_jobs_is_a_user_error():
    assert_one_line_error(cli("matrix", "resnet18", "--jobs", "-1"), "--jobs must be 0")
    with pytest.raises(InvalidArgument, match=r"^jobs must be 0 \(one per core\) or more"):
        matrix("resnet18", jobs=-1)


def test_markdown_has_a_column_for_the_targets_cell():
    from bbswap.cli.render import matrix_markdown

    found = api((ALEXNET, VIT), strides=(16,), targets=("32x8:64",))
    lines = matrix_markdown("sample", found).splitlines()
    header = next(line for line in lines if line.startswith("| backbone"))
    assert header == "| backbone | features | 1/16 | 32x8:64 |"
    alexnet = next(line for line in lines if line.startswith(f"| `{ALEXNET}`"))
    cell = found.rows[0].cells[1]
    assert alexnet.count("|") == header.count("|") and cell.targets
    assert ("MACs" if cell.ok else cell.reason) in alexnet.split("|")[4]
    vit = next(line for line in lines if line.startswith(f"| `{VIT}`"))
    assert vit.count("|") == header.count("|")


def test_a_worker_that_dies_fails_its_row_and_the_sweep_goes_on(tmp_path):
    """A worker that dies takes its pool down: the backbone it was trying fails its row
    (after a try in a process of its own), the others are tried in a new pool."""
    dies = tmp_path / "dies.py"
    dies.write_text(
        "import os\n"
        "from torch import nn\n\n\n"
        "class Dies(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        os._exit(9)  # as a process killed for memory ends\n"
    )
    specs = [ALEXNET, f"{dies}:Dies", "resnet18", "tv:resnet18"]
    found = matrix(specs, strides=(16,), verify=False, jobs=2)
    assert [row.spec for row in found.rows] == specs
    alexnet, died, *others = found.rows
    assert died.reason == "worker died" and not died.ok and not died.refused
    assert "killed, perhaps for memory" in died.detail
    assert alexnet.ok and all(row.ok for row in others)
    result = cli("matrix", *specs, "--stride", 16, "--no-verify", "--jobs", 2)
    assert result.exit_code == 0 and "worker died" in result.stdout  # a row, as any failure


def _greedy(tmp_path: Path, share: float) -> str:
    """A model file that takes ``share`` of the free memory (never written: the system
    would grant it, a worker's limit need not)."""
    from bbswap.search.matrix import _available_memory

    free = _available_memory()
    if free is None:
        pytest.skip("no /proc/meminfo: the workers get no memory share here")
    greedy = tmp_path / "greedy.py"
    greedy.write_text(
        "import torch\n"
        "from torch import nn\n\n\n"
        "class Greedy(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 8, 3, stride=2)\n"
        f"        self.cache = torch.empty({int(free * share)}, dtype=torch.uint8,"
        " device='cpu')\n\n"
        "    def forward(self, x):\n"
        "        return self.conv(x)\n"
    )
    return f"{greedy}:Greedy"


def test_a_worker_past_all_the_memory_fails_its_row_and_the_sweep_goes_on(tmp_path):
    found = matrix([_greedy(tmp_path, 1.5), ALEXNET], strides=(16,), verify=False, jobs=2)
    greedy_row, alexnet_row = found.rows
    assert not greedy_row.ok
    assert "allocate" in " ".join([greedy_row.detail, *(c.detail for c in greedy_row.cells)])
    assert alexnet_row.ok


def test_a_row_past_a_workers_share_of_memory_is_tried_last_with_all_of_it(tmp_path):
    """A model that holds three tenths of the free memory, built more than once in its
    row: past a worker's half share, so the row fails in the pool and again in a process
    beside another; the last try, with no other process at work, has the whole of it,
    and that row stands."""
    found = matrix([_greedy(tmp_path, 0.3), ALEXNET], strides=(16,), verify=False, jobs=2)
    greedy_row, alexnet_row = found.rows
    assert greedy_row.ok, greedy_row.detail or [c.detail for c in greedy_row.cells]
    assert alexnet_row.ok


def test_only_a_row_that_failed_otherwise_than_by_the_search_is_tried_last_alone():
    from bbswap.search.matrix import Cell, Row, _not_of_the_search

    searched = Cell(16, False, reason="no exact plan", searched=True)
    unverified = Cell(16, False, reason="verification fails")
    one_size = Cell(32, False, reason="fixed size: one input size", one_size=True, searched=True)
    assert not _not_of_the_search(Row("a", cells=(searched,)))
    assert not _not_of_the_search(Row("a", cells=(Cell(8, True), one_size)))
    assert not _not_of_the_search(Row("a", reason="not a CNN", refused=True))
    assert _not_of_the_search(Row("a", cells=(searched, unverified)))
    assert _not_of_the_search(Row("a", reason="worker died"))


def test_a_row_failed_after_another_in_the_same_worker_is_tried_again_alone(tmp_path):
    """A backbone that leaves state behind in its process (here a flag on torch; in a
    sweep, memory the allocator keeps) makes the next one in the same worker fail; the
    sweep tries that row again in a process of its own, and the second try stands."""
    from bbswap.search.matrix import _pool_rows, _rows_in_workers, _Task

    models = tmp_path / "leaky.py"
    models.write_text(
        "import torch\n"
        "from torch import nn\n\n\n"
        "class Leaky(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.bbswap_left_behind = True\n"
        "        self.conv = nn.Conv2d(3, 8, 3, stride=2)\n\n"
        "    def forward(self, x):\n"
        "        return self.conv(x)\n\n\n"
        "class Fragile(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        if getattr(torch, 'bbswap_left_behind', False):\n"
        "            raise RuntimeError('something was left behind')\n"
        "        self.conv = nn.Conv2d(3, 8, 3, stride=2)\n\n"
        "    def forward(self, x):\n"
        "        return self.conv(x)\n"
    )
    specs = [f"{models}:Leaky", f"{models}:Fragile"]
    task = _Task((2,), None, False, "any", (None, None, (), "list"))
    one_worker, lost = _pool_rows(dict(enumerate(specs)), task, False, [1], None, 0, 0)
    assert lost == []
    assert one_worker[0].ok and not one_worker[1].ok
    assert "something was left behind" in one_worker[1].detail
    leaky, fragile = _rows_in_workers(specs, task, False, 1, None)
    assert leaky.ok and fragile.ok, fragile.detail


def test_one_target_without_returns_is_fitted_as_fit_fits_it():
    """One target and no ``returns``: the cell is fit's shorthand (one output, the tensor
    itself), so a model whose grid only its own forward lays out (a ViT) is fitted as
    ``fit --target`` fits it; ``returns`` asks for the list of one, tapped at a stage."""
    from bbswap.search.fit import fit

    pytest.importorskip("timm")
    specs = (ALEXNET, "timm:vit_tiny_patch16_224")
    alone = api(specs, strides=(), targets=("32x8:64",))
    assert alone.returns == ""
    for row, spec in zip(alone.rows, specs):
        want = fit(spec, channels=64, stride="32x8", rounding="any")
        assert row.cells[0].ok and row.cells[0].plan == want.winner.label
        assert row.cells[0].macs == want.winner.trace.macs
    listed = api((ALEXNET,), strides=(), targets=("32x8:64",), returns="list")
    cell = listed.rows[0].cells[0]
    assert listed.returns == "list"
    assert "taps" in cell.plan if cell.ok else "a list of 32x8:64" in cell.detail
    shown = cli("matrix", ALEXNET, "--target", "32x8:64", "--no-verify")
    assert "a list of" not in shown.stdout and "32x8:64" in shown.stdout


def test_running_out_of_memory_is_no_bug_and_any_other_error_is():
    from bbswap.search.matrix import OUT_OF_MEMORY, brief

    def raised(error: BaseException) -> BaseException:
        try:
            raise error
        except BaseException as caught:  # with its traceback, as a sweep catches it
            return caught

    reason, detail = brief(raised(MemoryError()))
    assert reason == OUT_OF_MEMORY == "out of memory"
    assert detail.startswith("MemoryError: out of memory at test_matrix.py:")
    reason, detail = brief(raised(RuntimeError("index 3 is out of bounds")))
    assert reason == "bug: RuntimeError"
    assert detail.startswith("RuntimeError: index 3 is out of bounds at test_matrix.py:")
