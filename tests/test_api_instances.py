"""``fit``, ``apply_recipe`` and ``export`` take a model instance where a spec goes.

The instance comes back as it was (training flags, the same parameter objects with the
same values, its hooks, which never run), and a file emitted from it builds its model
with the builder that makes the same model, checked here in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import bbswap
from bbswap.backbones.instance import InstanceBackbone, instance_backbone
from bbswap.backbones.registry import BackboneKind
from bbswap.errors import ModelError

torchvision = pytest.importorskip("torchvision")

NET_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small CNN of the user's, with constructor arguments."""

    def __init__(self, width: int = 8, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.body = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.down = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.act(self.body(self.act(self.stem(x)))))
        return self.head(x.mean((2, 3)))
'''


class _Snapshot:
    """What an instance must still be afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.training = [m.training for m in model.modules()]
        self.tensors = [(t, t.detach().clone()) for t in (*model.parameters(), *model.buffers())]
        self.hooks = [dict(m._forward_hooks) for m in model.modules()]

    def assert_unchanged(self) -> None:
        assert [m.training for m in self.model.modules()] == self.training
        now = [*self.model.parameters(), *self.model.buffers()]
        assert [id(t) for t in now] == [id(t) for t, _ in self.tensors]
        assert all(torch.equal(t, saved) for t, saved in self.tensors)
        assert [dict(m._forward_hooks) for m in self.model.modules()] == self.hooks


def _watched(model: nn.Module) -> tuple[_Snapshot, list[str]]:
    """Snapshot ``model`` after registering a hook that records every call."""
    calls: list[str] = []
    model.register_forward_hook(lambda module, args, out: calls.append("called"))
    return _Snapshot(model), calls


def test_fit_takes_a_torchvision_instance_and_leaves_it_unchanged() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.layer2.eval()  # a mixed training state must survive as it is
    snapshot, calls = _watched(model)
    found = bbswap.fit(model, channels=256, stride=16)
    by_spec = bbswap.fit("tv:resnet18", channels=256, stride=16)
    assert found.backbone.spec == "tv:resnet18"
    assert found.backbone.kind is BackboneKind.TV
    assert found.winner.trace.output_shape == (1, 256, 14, 14)
    assert [(c.label, c.trace.macs) for c in found.candidates if c.ok] == [
        (c.label, c.trace.macs) for c in by_spec.candidates if c.ok
    ]
    snapshot.assert_unchanged()
    assert calls == []  # the copies do not carry the instance's hooks


def test_apply_recipe_on_an_instance_carries_its_weights() -> None:
    torch.manual_seed(1)
    model = torchvision.models.resnet18()
    snapshot, calls = _watched(model)
    recipe = bbswap.winner_recipe(bbswap.fit(model, channels=64, stride=16))
    result = bbswap.apply_recipe(model, recipe)
    patched = result.model.eval()
    assert not any(t.is_meta for t in patched.parameters())
    assert torch.equal(patched.layer1[0].conv1.weight, model.layer1[0].conv1.weight)
    assert patched.layer1[0].conv1.weight is not model.layer1[0].conv1.weight
    x = torch.randn(1, 3, 37, 53)
    assert patched(x).shape == (1, 64, 3, 4)
    with torch.no_grad():  # the unchanged stem gives the instance's own values
        stem = nn.Sequential(model.conv1, model.bn1, model.relu).eval()
        assert torch.equal(nn.Sequential(patched.conv1, patched.bn1, patched.relu)(x), stem(x))
    model.train()
    snapshot.assert_unchanged()
    assert calls == []


def _run_fresh(code: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_export_of_a_torchvision_instance_round_trips_with_its_weights(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = torchvision.models.resnet18()
    snapshot, calls = _watched(model)
    recipe = bbswap.winner_recipe(bbswap.fit(model, channels=128, stride=16))
    done = bbswap.export(model, recipe, tmp_path / "r18.py")
    assert done.weights_path == tmp_path / "r18.pth"
    source = (tmp_path / "r18.py").read_text()
    assert "Source backbone: tv:resnet18" in source
    assert "from torchvision.models import resnet18" in source
    x = torch.randn(1, 3, 45, 61)
    torch.save(x, tmp_path / "x.pt")
    expected = done.result.model.eval()(x)  # the projection's weights are the export's own
    out = _run_fresh(
        f"""
        import json, torch, r18
        net = r18.{done.emitted.class_name}.from_checkpoint().eval()
        x = torch.load("x.pt")
        y = net(x)
        print(json.dumps({{"shape": list(y.shape), "values": y.flatten().tolist()}}))
        """,
        tmp_path,
    )
    got = json.loads(out)
    assert got["shape"] == list(expected.shape)
    assert torch.allclose(torch.tensor(got["values"]), expected.flatten(), atol=1e-5)
    snapshot.assert_unchanged()
    assert calls == []


def _user_net(tmp_path: Path) -> type[nn.Module]:
    (tmp_path / "net.py").write_text(NET_SOURCE)
    backbone = bbswap.resolve(f"{tmp_path / 'net.py'}:Net")
    return type(backbone.build())


def test_export_of_a_user_file_instance_bundles_its_class(tmp_path: Path) -> None:
    net_class = _user_net(tmp_path)
    torch.manual_seed(3)
    model = net_class(width=12, in_chans=1)
    recipe = bbswap.winner_recipe(bbswap.fit(model, channels=16, stride=4, input_shape="1x1x64x64"))
    with pytest.raises(ModelError) as refused:  # Net() would build another model
        bbswap.export(model, recipe, tmp_path / "out" / "a.py")
    message = str(refused.value)
    assert "\n" not in message
    assert "cannot emit the Net instance" in message and "pass kwargs" in message
    assert not (tmp_path / "out").exists()
    out = tmp_path / "b.py"
    done = bbswap.export(model, recipe, out, kwargs={"width": 12})
    source = out.read_text()
    assert "class Net(nn.Module):" in source  # bundled from the file, as for net.py:Net
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("net" in line for line in imports), imports
    assert "Net(in_chans=1, width=12)" in source
    assert done.report.ok
    x = torch.randn(2, 1, 29, 35)
    torch.save(x, tmp_path / "x.pt")
    expected = done.result.model.eval()(x)
    (tmp_path / "iso").mkdir()  # net.py is not importable from where the file is used
    (tmp_path / "iso" / "b.py").write_text(source)
    (tmp_path / "iso" / "b.pth").write_bytes((tmp_path / "b.pth").read_bytes())
    out_text = _run_fresh(
        f"""
        import torch, b
        y = b.{done.emitted.class_name}.from_checkpoint().eval()(torch.load("../x.pt"))
        torch.save(y, "../y.pt")
        """,
        tmp_path / "iso",
    )
    assert out_text == ""
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-5)


def test_an_instance_of_a_local_class_is_patched_but_not_emitted(tmp_path: Path) -> None:
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.conv(x))

    model = Local()
    found = bbswap.fit(model, channels=8, stride=2, input_shape="1x3x64x64")
    assert found.backbone.spec == "Local" and found.backbone.kind is BackboneKind.INSTANCE
    recipe = bbswap.winner_recipe(found)
    result = bbswap.apply_recipe(model, recipe)
    assert result.model(torch.randn(1, 3, 32, 32)).shape == (1, 8, 16, 16)
    for attempt in (
        lambda: bbswap.export(model, recipe, tmp_path / "local.py"),
        lambda: bbswap.emit(result),
    ):
        with pytest.raises(ModelError, match="not defined at the top of a file") as refused:
            attempt()
        assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_zoo_and_timm_instances_are_named_by_their_builders() -> None:
    zoo = bbswap.resolve("resnet18").build(in_chans=1)
    backbone = instance_backbone(zoo)
    assert isinstance(backbone, InstanceBackbone)
    assert (backbone.spec, backbone.kind, backbone.kwargs) == ("resnet18", "zoo", {"in_chans": 1})
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=7)
    found = bbswap.fit(model, channels=64, stride=16)
    assert found.backbone.spec == "timm:resnet18"
    assert found.backbone.kwargs == {"in_chans": 3, "num_classes": 7}


def test_a_torchvision_instance_with_other_arguments_needs_them() -> None:
    model = torchvision.models.resnet18(num_classes=5)
    assert instance_backbone(model).kind is BackboneKind.INSTANCE
    named = instance_backbone(model, {"num_classes": 5})
    assert (named.spec, named.kwargs) == ("tv:resnet18", {"num_classes": 5})


def test_an_instance_on_the_meta_device_is_planned_but_has_no_weights_to_emit(
    tmp_path: Path,
) -> None:
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    recipe = bbswap.winner_recipe(bbswap.fit(model, channels=64, stride=16))
    result = bbswap.apply_recipe(model, recipe)
    assert result.after.output_shape == (1, 64, 14, 14)
    assert all(p.is_meta for p in result.model.parameters())
    with pytest.raises(ModelError, match="on the meta device: it has no weights") as refused:
        bbswap.export(model, recipe, tmp_path / "m.py")
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []
