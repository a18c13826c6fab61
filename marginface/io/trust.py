"""Which model files run code when loaded, found without loading them.

A TorchScript archive holds Python-like code that ``torch.jit.load`` compiles and runs; a compiled
package (``.pt2``, AOTInductor) holds a shared library that opening it loads into the process.
Neither may be opened unless the user says they trust the file (``--trust-code``). Detection
reads the zip's member names with `zipfile` only: nothing in the file is unpickled or executed.
Checkpoints (``torch.load(weights_only=True)``) and ONNX files run no code.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional, Union

from marginface.errors import UserError

TORCHSCRIPT = "torchscript"
COMPILED = "compiled"

WHY = {
    TORCHSCRIPT: "is a TorchScript archive, which runs code when loaded",
    COMPILED: "is a compiled package, which runs native code when opened",
}


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def code_kind(path: Union[str, Path]) -> Optional[str]:
    """``"torchscript"``, ``"compiled"`` or None (a checkpoint, ONNX, anything else)."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix.lower() == ".pt2":
        return COMPILED
    names = _zip_names(path)
    if any("/data/aotinductor/" in f"/{n}" or n.endswith(".so") for n in names):
        return COMPILED
    if any("/code/" in f"/{n}" or n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
        return TORCHSCRIPT
    return None


def refuse_untrusted(path: Union[str, Path], trust_code: bool, flag: str = "--trust-code") -> Optional[str]:
    """Raise `UserError` when ``path`` would run code and ``trust_code`` is false; else return its
    `code_kind`."""
    kind = code_kind(path)
    if kind is not None and not trust_code:
        raise UserError(f"{path}: {WHY[kind]}; pass {flag} if you trust this file")
    return kind
