"""Checkpoints in and out: reading a state_dict, loading it with a report, atomic writes,
and where a model's weights came from (:class:`WeightsSource`)."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bbswap.errors import InvalidArgument, MissingDependency, choices


@dataclass(frozen=True)
class LoadReport:
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    note: str = ""


# the suffixes of the checkpoint files a folder given to ``weights`` is searched for
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights loaded into a source backbone came from: what chose them (a
    builder's pretrained tag, or a checkpoint the user gave), the file read and its
    SHA-256 (None when the builder read no single file that can be named)."""

    origin: str  # e.g. "torchvision ResNet18_Weights.IMAGENET1K_V1", "checkpoint"
    path: Path | None
    sha256: str | None


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in lowercase hex, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_of(origin: str, path: Path | None) -> WeightsSource:
    """A :class:`WeightsSource` for ``path``, hashed when it is a file."""
    if path is None or not path.is_file():
        return WeightsSource(origin, path, None)
    return WeightsSource(origin, path, file_sha256(path))


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself, or for a folder the one checkpoint it holds (``.pth``, ``.pt``,
    ``.bin``, ``.ckpt`` or ``.safetensors``); a folder with none or several is an error
    naming what it holds."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted(
        p.name for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES
    )
    if len(found) == 1:
        return path / found[0]
    wanted = ", ".join(CHECKPOINT_SUFFIXES)
    if not found:
        others = sorted(p.name for p in path.iterdir())
        held = f"only {choices(others, 5)}" if others else "nothing"
        raise InvalidArgument(
            f"{{weights}} {path} is a folder without a checkpoint ({wanted}); it holds {held}",
            params=("weights",),
        )
    raise InvalidArgument(
        f"{{weights}} {path} is a folder with {len(found)} checkpoints ({choices(found, 5)}); "
        "give the one to load as a file",
        params=("weights",),
    )


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """A state_dict from ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors``.

    A dict holding the state_dict under ``state_dict`` or ``model`` is unwrapped, and a
    ``module.`` prefix (from DataParallel) is removed; the note says so.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MissingDependency(
                "reading .safetensors needs safetensors: pip install 'bbswap[safetensors]'"
            ) from None
        try:
            state: object = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise InvalidArgument(f"cannot read checkpoint {path}: {_first(error)}") from None
    else:
        try:
            with warnings.catch_warnings():  # torch notes that it checks sparse tensors
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for unreadable files
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise InvalidArgument(f"cannot read checkpoint {path}: {first}") from None
    notes = []
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            notes.append(f"took '{key}' from the checkpoint")
            break
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InvalidArgument(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    odd = [k for k, v in state.items() if v.is_meta or v.layout != torch.strided]
    if odd:
        raise InvalidArgument(
            f"{path}: tensor '{odd[0]}' holds no dense values (a meta or sparse tensor); "
            "a checkpoint must hold the weights themselves"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
        notes.append("removed the 'module.' prefix")
    return state, "; ".join(notes)


def load_into(
    model: nn.Module, state: dict[str, torch.Tensor], what: str, partial: bool
) -> LoadReport:
    """Load ``state``; a mismatch is an error unless ``partial``, which loads what fits."""
    own = model.state_dict()
    missing = tuple(k for k in own if k not in state)
    unexpected = tuple(k for k in state if k not in own)
    wrong = tuple(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if (missing or unexpected or wrong) and not partial:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        ):
            if keys:
                parts.append(
                    f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                )
        raise InvalidArgument(
            f"checkpoint {what} does not fit the backbone: {'; '.join(parts)}; "
            "pass {partial} to load the tensors that fit",
            params=("partial",),
        )
    fitting = {k: v for k, v in state.items() if k in own and k not in wrong}
    model.load_state_dict(fitting, strict=False)
    return LoadReport(len(fitting), missing + wrong, unexpected)


def state_bytes(path: Path, state: dict[str, torch.Tensor]) -> bytes:
    """A state_dict as the bytes of a ``.safetensors`` or ``.pth`` file, by ``path``'s suffix."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save
        except ImportError:
            raise MissingDependency(
                "writing .safetensors needs safetensors: pip install 'bbswap[safetensors]'"
            ) from None
        return bytes(save(state))
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
