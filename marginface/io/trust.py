"""Which model files run code when loaded, found without loading them.

A TorchScript archive holds Python-like code that ``torch.jit.load`` compiles and runs; a compiled
package (``.pt2``, AOTInductor) holds a shared library that opening it loads into the process.
Neither may be opened unless the user says they trust the file (``--trust-code``). Detection
reads the zip's member names with `zipfile` only: nothing in the file is unpickled or executed.
Checkpoints (``torch.load(weights_only=True)``) and ONNX files run no code; `read_weights` is the
one place that reads such a file (checkpoints, state dicts, pretrained weights).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

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


def _load_failure(path: Path, exc: Exception) -> str:
    """Why torch.load refused a file, in words: torch's own text is a bare number ("105": the first
    byte of a file that is not a pickle) or a paragraph about ``weights_only``."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if not head.startswith(b"\x80"):  # every pickle protocol >= 2 starts with PROTO (0x80)
            return "neither a PyTorch zip archive nor a pickle"
        if first.isdigit() or "weights_only" in first or "Weights only" in first:
            return "an old-format pickle holding Python objects; it cannot load without running code"
    if "Weights only" in first or "weights_only" in first:
        return "it holds Python objects besides tensors, so loading it would run code"
    if first.isdigit():
        return f"unreadable pickle data ({type(exc).__name__})"
    return first[:200]


def read_weights(path: Union[str, Path], what: str, expected: str) -> Any:
    """What a checkpoint / state-dict file holds (tensors, numbers, strings, containers only), read
    with ``torch.load(weights_only=True)`` after refusing files that would run code. ``what`` names
    the file in errors ("marginface checkpoint"); ``expected`` says what to give instead."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    kind = code_kind(path)  # zip member names only; torch.load would hand TorchScript to torch.jit.load
    if kind is not None:
        raise UserError(f"{path}: {WHY[kind]}; not a training checkpoint or state dict (give {expected})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign, or a pickle that would run code: one clear line
        raise UserError(f"{path}: not a readable {what} ({_load_failure(path, exc)})") from None
