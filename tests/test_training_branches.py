"""A forward that branches on ``self.training`` is refused where bbswap writes it out.

torch.fx traces a forward once with Python booleans, so ``if self.training:`` keeps only
one branch. bbswap traces each forward it rewrites or writes out in train mode and in
eval mode and compares the graphs: a difference beyond dropout and batch-norm statistics
is one line naming the module (its path when nested), exit 2, nothing written. Functional
dropout and batch norm with ``training=self.training`` pass, and the written forward reads
``self.training`` again, so it behaves as the source in both modes.

Fixtures: tests/fixtures/training_models.py; the zoo and torchvision's ResNets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, cli, import_plain, ok
from recipe_helpers import recipe
from torch import fx

from bbswap.backbones.registry import resolve
from bbswap.errors import SurgeryError
from bbswap.search.fit import fit
from bbswap.surgery.apply import apply_recipe
from bbswap.surgery.fx_trace import require_one_forward, trace_children_as_leaves
from bbswap.tracing.tracer import build_on_meta
from bbswap.zoo import ZOO

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "training_models.py"
BAD = Path(__file__).resolve().parent / "fixtures" / "bad_models.py"
POOL = {"op": "pool", "stride": 2}
NESTED_POOL = {"op": "stride", "at": "blocks.1.avg_pool2d()", "stride": 1, "mode": "stride"}


def spec(name: str) -> str:
    return f"{FIXTURES}:{name}"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fit_refuses_a_root_forward_that_branches(tmp_path: Path):
    out = tmp_path / "out.py"
    result = cli(
        "fit", spec("RootBranch"), "--channels", 32, "--stride", 4, "--input", "1x3x64x64",
        "-o", out, "--save-recipe", tmp_path / "r.toml",
    )  # fmt: skip
    assert_one_line_error(
        result, "the model's forward (RootBranch)", "self.training", "torch.randn_like"
    )
    assert list(tmp_path.iterdir()) == []


def test_apply_refuses_a_root_forward_that_branches(tmp_path: Path):
    (tmp_path / "pool.toml").write_text('name = "pool"\n[[ops]]\nop = "pool"\nstride = 2\n')
    result = cli("apply", spec("RootBranch"), tmp_path / "pool.toml", "--input", "1x3x64x64")
    assert_one_line_error(result, "the model's forward (RootBranch)", "self.training")


def test_a_nested_block_is_named_by_its_path(tmp_path: Path):
    with pytest.raises(SurgeryError, match=r"^'blocks\.1' \(BranchBlock\) branches on self"):
        apply_recipe(spec("NestedBranch"), recipe(NESTED_POOL), "1x3x64x64")
    (tmp_path / "r.toml").write_text(
        'name = "r"\n[[ops]]\nop = "stride"\nat = "blocks.1.avg_pool2d()"\nstride = 1\n'
        'mode = "stride"\n'
    )
    out = tmp_path / "out.py"
    result = cli(
        "apply", spec("NestedBranch"), tmp_path / "r.toml", "--input", "1x3x64x64", "-o", out
    )
    assert_one_line_error(result, "'blocks.1' (BranchBlock)", "self.training")
    assert not out.exists()


def test_fit_avoids_a_branching_block_it_need_not_rewrite():
    """Candidates that edit the branching block fail; another one wins."""
    result = fit(spec("NestedBranch"), channels=16, stride=4, input_shape="1x3x64x64")
    assert result.winner.ok
    refused = [c for c in result.candidates if c.failed]
    assert any("'blocks.1' (BranchBlock) branches on self.training" in c.error for c in refused)


def test_functional_dropout_and_batch_norm_follow_the_mode(tmp_path: Path):
    out = tmp_path / "drop.py"
    result = cli(
        "fit", spec("DropoutOnly"), "--channels", 32, "--stride", 4, "--input", "1x3x64x64",
        "--json", "-o", out,
    )  # fmt: skip
    ok(result)
    text = out.read_text()
    assert "training=True" not in text and "training=False" not in text
    assert "training = self.training" in text
    module = import_plain(out)
    model = module.DropoutOnlyC32S4()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        a, b = model(x), model(x)
        model.train()
        torch.manual_seed(1)
        c = model(x)
    torch.testing.assert_close(a, b)  # eval: no dropout, running statistics
    assert not torch.allclose(a, c)  # train: dropout and batch statistics


def test_modes_are_restored():
    """Tracing in both modes gives every module back its own flag."""
    model = resolve(f"{BAD}:MixedTraining").build()
    model.stem.eval()
    flags = [m.training for m in model.modules()]
    trace_children_as_leaves(model)
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_pass(name: str):
    """The forward of every zoo model and of each of its blocks (the modules surgery
    rewrites) is the same in both modes, as far as torch.fx can trace it. A block's
    stochastic depth is a module of its own, so it stays a call."""
    model = build_on_meta(resolve(name).build)
    require_one_forward(model)
    for path, module in model.named_modules():
        if not any(True for _ in module.children()):
            continue
        try:
            graph = trace_children_as_leaves(module, path)
        except SurgeryError:
            raise
        except Exception:  # a forward fx cannot trace is not this test's
            continue
        assert isinstance(graph, fx.Graph)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnets_pass(name: str):
    pytest.importorskip("torchvision")
    result = fit(f"tv:{name}", channels=256, stride=16, input_shape="1x3x64x64")
    assert result.winner.ok
