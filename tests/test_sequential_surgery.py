"""Surgery on a model that is itself a container: a root ``nn.Sequential`` (CRNN-style OCR
trunks, ``nn.Sequential(*list(resnet.children())[:-2])``) or a module whose forward runs
each of its children.

A module appended to such a model's output is registered among its children, so the
container's own forward would run it too, before the appended call runs it again. These
tests count the appended module's calls with a forward hook, in the patched model and in
the emitted file imported in a fresh process, and compare values with the source model
(same weights) followed by the appended op.

Fixtures: tests/fixtures/sequential_models.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import cli, import_plain, ok
from recipe_helpers import one_thread, randomize_batchnorm, recipe
from torch import nn

from bbswap.backbones.registry import resolve
from bbswap.codegen.export import export
from bbswap.surgery.apply import apply_recipe

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sequential_models.py"
POOL = {"op": "pool", "stride": 2}
PROJECT = {"op": "project", "channels": 128}


def spec(name: str) -> str:
    return f"{FIXTURES}:{name}"


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def calls(model: nn.Module, name: str, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How often the child ``name`` runs in one eval forward of ``model``, and the output."""
    seen: list[int] = []
    handle = model.get_submodule(name).register_forward_hook(lambda *_: seen.append(1))
    try:
        with torch.no_grad():
            out = model.eval()(x)
    finally:
        handle.remove()
    return len(seen), out


def source_model(name: str, in_chans: int, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = resolve(spec(name), dict(kwargs)).build(in_chans=in_chans)
    randomize_batchnorm(model)
    return model.eval()


CASES = [
    # fixture, input, the source's downsample (H, W)
    ("small_trunk", (1, 3, 40, 52), (4, 4)),
    ("CRNNTrunk", (1, 1, 32, 100), (16, 4)),
    ("ChildrenLoop", (1, 3, 40, 52), (4, 4)),
]


@pytest.mark.parametrize(("name", "shape", "down"), CASES)
def test_one_pool_downsamples_once(name: str, shape: tuple[int, ...], down: tuple[int, int]):
    source = source_model(name, shape[1])
    result = apply_recipe(spec(name), recipe(POOL), "x".join(map(str, shape)), model=source)
    assert result.before.downsample == down
    assert result.after.downsample == (2 * down[0], 2 * down[1])
    x = torch.randn(shape)
    n, out = calls(result.model, "pool", x)
    assert n == 1
    with torch.no_grad():
        want = F.avg_pool2d(source(x), 2, ceil_mode=True)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize(("name", "shape", "down"), CASES)
def test_channel_change_on_a_container(name: str, shape: tuple[int, ...], down: tuple[int, int]):
    result = apply_recipe(spec(name), recipe(PROJECT), "x".join(map(str, shape)))
    assert result.after.output_shape[1] == 128
    assert result.after.downsample == down


def test_emitted_forward_calls_the_pool_once(tmp_path: Path):
    """The written file: the pool appears once in forward, runs once, and the class name
    says the stride the model has."""
    out = tmp_path / "crnn.py"
    source = source_model("CRNNTrunk", 1)
    exported = export(spec("CRNNTrunk"), recipe(POOL), out, input_shape="1x1x32x100")
    assert exported.emitted.class_name.endswith("S32x8")
    text = out.read_text()
    forward = text[text.index("    def forward") : text.index("    @staticmethod")]
    assert forward.count("self.pool(") == 1
    assert "nn.Sequential" not in text.split(f"class {exported.emitted.class_name}")[1]
    # the same weights as the source: equal to the source's output pooled once
    module = import_plain(out)
    model = getattr(module, exported.emitted.class_name)()
    model.load_state_dict(source.state_dict())  # the pool adds no weights: same keys
    x = torch.randn(1, 1, 37, 101)
    n, got = calls(model, "pool", x)
    assert n == 1
    with torch.no_grad():
        torch.testing.assert_close(got, F.avg_pool2d(source(x), 2, ceil_mode=True))
    h, w = model.output_size(37, 101)
    assert got.shape[-2:] == (h, w)


def test_emitted_file_runs_the_pool_once_in_a_fresh_interpreter(tmp_path: Path):
    out = tmp_path / "trunk.py"
    exported = export(spec("small_trunk"), recipe(POOL), out, input_shape="1x3x40x52")
    script = textwrap.dedent(
        f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("trunk", {str(out)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.{exported.emitted.class_name}().eval()
        seen = []
        model.pool.register_forward_hook(lambda *_: seen.append(1))
        with torch.no_grad():
            y = model(torch.randn(1, 3, 40, 52))
        print(len(seen), tuple(y.shape))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    calls_seen, out_shape = run.stdout.strip().split(maxsplit=1)
    assert calls_seen == "1"
    after = exported.result.after
    assert out_shape == str((1, after.output_shape[1], *after.output_size(40, 52)))


def test_fit_channels_and_stride_on_a_crnn_trunk(tmp_path: Path):
    """``bbswap fit FILE:Trunk --channels 128 --stride 8`` writes a verified file."""
    out = tmp_path / "crnn.py"
    result = cli(
        "fit", spec("CRNNTrunk"), "--kw", "valid_tail=False", "--channels", 128,
        "--stride", 8, "--input", "1x1x32x100", "--json", "-o", out,
    )  # fmt: skip
    ok(result)
    module = import_plain(out)
    cls = next(v for k, v in vars(module).items() if k.startswith("CRNNTrunkC128S8"))
    model = cls().eval()
    for h, w in ((32, 100), (31, 57), (48, 160)):
        with torch.no_grad():
            y = model(torch.randn(1, 1, h, w))
        assert tuple(y.shape) == (1, 128, math.ceil(h / 8), math.ceil(w / 8))
        assert cls.output_size(h, w) == y.shape[-2:]


def test_fit_on_a_cut_torchvision_resnet(tmp_path: Path):
    """``nn.Sequential(*list(resnet18().children())[:-2])``: channels and stride at once."""
    pytest.importorskip("torchvision")
    out = tmp_path / "r18.py"
    result = cli(
        "fit", spec("resnet18_trunk"), "--channels", 128, "--stride", 8,
        "--input", "1x3x64x64", "--json", "-o", out,
    )  # fmt: skip
    ok(result)
    module = import_plain(out)
    model = module.ResNet18TrunkC128S8().eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 70, 45))
    assert tuple(y.shape) == (1, 128, 9, 6)


def test_dropout_after_sequential_blocks_of_a_sequential(tmp_path: Path):
    """A dropout op on the class the model itself has: every block but the model gets one,
    and each runs once, in the patched model and in the written file."""
    pytest.importorskip("torchvision")
    out = tmp_path / "r18.py"
    op = {"op": "dropout", "block": "Sequential", "p": 0.1}
    exported = export(spec("resnet18_trunk"), recipe(op), out, input_shape="1x3x64x64")
    source = source_model("resnet18_trunk", 3)
    blocks = [p for p, m in source.named_modules() if p and type(m) is nn.Sequential]
    module = import_plain(out)
    written = getattr(module, exported.emitted.class_name)().eval()
    for model in (exported.result.model.eval(), written):
        drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert len(drops) == len(blocks)
        seen: list[nn.Module] = []
        handles = [d.register_forward_hook(lambda m, *_, s=seen: s.append(m)) for d in drops]
        with torch.no_grad():
            model(torch.randn(1, 3, 40, 40))
        for handle in handles:
            handle.remove()
        assert sorted(map(id, seen)) == sorted(map(id, drops))  # each one, once


@pytest.mark.parametrize("name", ["BlockList", "BlockSequence"])
def test_a_cut_inside_a_looped_container_stops_the_loop_and_keeps_its_first_blocks(
    tmp_path: Path, name: str
):
    # the truncation is written where the loop runs (the root's forward), and the file
    # keeps body.blocks[:2]: the blocks' own names, so the source's state_dict keys; a
    # Sequential looped over is not rewritten into a module the loop cannot iterate
    out = tmp_path / "blocks.py"
    cut = {"op": "truncate", "after": "blocks.1"}
    exported = export(spec(name), recipe(cut), out, input_shape="1x3x64x64")
    text = out.read_text()
    assert "self.blocks = body.blocks[:2]" in text
    source = source_model(name, 3).eval()
    module = import_plain(out)
    model = getattr(module, exported.emitted.class_name)().eval()
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.2.")}
    model.load_state_dict(weights)  # strict: exactly the keys of stem, blocks.0 and .1
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        want = source.blocks[1](source.blocks[0](source.stem(x)))
        got = model(x)
    assert got.shape == (1, 32, 9, 6)
    torch.testing.assert_close(got, want)
