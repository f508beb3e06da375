"""Checkpoints in and out: reading a state_dict, loading it with a report, atomic writes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bbswap.errors import InvalidArgument, MissingDependency


@dataclass(frozen=True)
class LoadReport:
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    note: str = ""


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
