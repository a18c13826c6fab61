"""Reading ``.npz`` archives without letting them choose how much we allocate.

A 4 MB zip of zeros inflates to gigabytes; numpy would allocate whatever a member's ``.npy``
header says. `load_npz` checks, before loading anything, every member's declared uncompressed
size (at most `MAX_MEMBER_BYTES`, and at most `MAX_RATIO` times its compressed size once above
`RATIO_FLOOR`) and that its ``.npy`` header's shape times item size fits in that declared size.
Pickled (object) arrays are refused. Plain ``.npy`` files read with ``mmap_mode="r"`` need none of
this: the file size bounds them.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Union

import numpy as np

from marginface.errors import UserError

MAX_MEMBER_BYTES = 8 << 30  # 8 GiB: a 4M x 512 float32 gallery
MAX_RATIO = 64  # float embeddings barely compress; text columns maybe 10x; a zip bomb 1000x
RATIO_FLOOR = 64 << 20  # below this, any ratio is fine


def _check_member(path: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> None:
    where = f"{path}: member {info.filename}"
    if info.file_size > max_bytes:
        raise UserError(f"{where} would inflate to {info.file_size / 2**30:.1f} GiB, above the "
                        f"{max_bytes / 2**30:.1f} GiB limit")
    if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(1, info.compress_size):
        raise UserError(f"{where} inflates {info.file_size // max(1, info.compress_size)}x "
                        f"({info.compress_size} -> {info.file_size} bytes): refused as a zip bomb")
    if not info.filename.endswith(".npy"):
        return
    with z.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f, max_header_size=10_000)
        except (ValueError, OSError, SyntaxError) as exc:
            raise UserError(f"{where}: not a .npy array ({str(exc)[:160]})") from None
    if dtype.hasobject:
        raise UserError(f"{where}: holds Python objects (pickles); refused")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > info.file_size:
        raise UserError(f"{where}: header claims shape {shape} ({need} bytes) but the member holds "
                        f"{info.file_size} bytes")


def load_npz(path: Union[str, Path], max_bytes: int = MAX_MEMBER_BYTES) -> dict[str, np.ndarray]:
    """``{name: array}`` of an ``.npz`` whose every member passed the checks above."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            for info in infos:
                _check_member(path, z, info, max_bytes)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npz archive ({str(exc)[:160]})") from None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npz archive ({str(exc)[:160]})") from None
