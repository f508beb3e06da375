"""The code in an emitted file that loads the weights written with it, and no others.

With carried weights the emitted file names the weights file and its SHA-256 in two
module constants, defines an error for a file of other bytes, and gives the patched class
a ``from_checkpoint`` classmethod. The loader reads the file (by default the one beside the
module), hashes the very bytes it is about to load, refuses them when the hash is not the
recorded one, and loads them with ``strict=True``. It needs only torch (safetensors, for a
``.safetensors`` file, is imported inside the loader).
"""

from __future__ import annotations

from dataclasses import dataclass

from bbswap.codegen.source import string
from bbswap.codegen.text import Place, as_source

FILE_CONSTANT = "WEIGHTS_FILE"
HASH_CONSTANT = "WEIGHTS_SHA256"
ERROR_CLASS = "WeightsMismatchError"
LOADER = "from_checkpoint"
# the modules the loader imports, by the name each binds
IMPORTS = {"hashlib": "import hashlib", "io": "import io", "pathlib": "import pathlib"}


@dataclass(frozen=True)
class WeightsCode:
    constants: str  # the two constants and the error class, at the top level
    method: str  # the classmethod, not indented
    class_doc: tuple[str, ...]  # the paragraph the patched class's docstring gains

    @property
    def names(self) -> set[str]:
        """The top-level names this code defines or imports."""
        return {FILE_CONSTANT, HASH_CONSTANT, ERROR_CLASS, *IMPORTS}


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _constants(file_name: str, sha256: str) -> str:
    return (
        f"# the weights written with this file; {LOADER}() refuses any file of other bytes\n"
        f"{FILE_CONSTANT} = {string(file_name)}\n"
        f"{HASH_CONSTANT} = {string(sha256)}\n\n\n"
        f"class {ERROR_CLASS}(RuntimeError):\n"
        f'    """A weights file whose SHA-256 is not {HASH_CONSTANT}: other weights."""'
    )


def _load_lines(file_name: str) -> list[str]:
    """The statements that turn the checked bytes ``data`` into ``state``."""
    if file_name.endswith(".safetensors"):
        return [
            "from safetensors.torch import load",
            "",
            "state = load(data)",
        ]
    return ['state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)']


def _method(class_name: str, file_name: str) -> str:
    doc = [
        "The model with the weights written with this file, from ``path`` (by default",
        f"{FILE_CONSTANT} beside this module), on ``device``. The file's SHA-256 must be",
        f"{HASH_CONSTANT}, else {ERROR_CLASS} names both hashes; the state_dict then loads",
        "with strict=True. The model is returned in training mode, as built.",
    ]
    body = [
        '"""' + "\n".join(as_source(line, Place.DOCSTRING) for line in doc) + '\n"""',
        f"default = pathlib.Path(__file__).with_name({FILE_CONSTANT})",
        "file = default if path is None else pathlib.Path(path)",
        "data = file.read_bytes()",
        "digest = hashlib.sha256(data).hexdigest()",
        f"if digest != {HASH_CONSTANT}:",
        f"    raise {ERROR_CLASS}(",
        '        f"{file} has SHA-256 {digest}, but the weights written with this file "',
        f'        f"({{{FILE_CONSTANT}}}) have SHA-256 {{{HASH_CONSTANT}}}; not loading them"',
        "    )",
        *_load_lines(file_name),
        "model = cls()",
        "model.load_state_dict(state, strict=True)",
        "return model.to(device)",
    ]
    head = [
        "@classmethod",
        f"def {LOADER}(",
        '    cls, path: str | pathlib.Path | None = None, device: str | torch.device = "cpu"',
        f") -> {string(class_name)}:",
    ]
    lines = head + [("    " + line if line else "") for line in "\n".join(body).splitlines()]
    return "\n".join(lines)


def weights_code(class_name: str, file_name: str, sha256: str) -> WeightsCode:
    """The loader code for ``file_name`` of hash ``sha256`` (lowercase hex)."""
    if not _is_sha256(sha256):
        raise ValueError(f"not a SHA-256 in lowercase hex: {sha256[:80]!r}")
    doc = (
        f"{LOADER}() builds it with the weights written with this file ({FILE_CONSTANT}),",
        f"refusing a file whose SHA-256 is not {HASH_CONSTANT}.",
    )
    return WeightsCode(_constants(file_name, sha256), _method(class_name, file_name), doc)
