"""Reading the text files users hand us (label lists, landmark files, CSVs, pairs files, configs).

`read_text` decodes UTF-8 (a BOM is dropped) and refuses, with one line naming ``file:line``,
bytes that are not UTF-8 and NUL bytes (which end paths early and upset the csv module).
`csv_rows` turns the csv module's own errors (a field beyond its 131072-character limit, a bad
quote) into the same kind of line. Neither raises anything but `UserError` for bad content.
"""
from __future__ import annotations

import csv
import io
import os
import stat
from pathlib import Path
from typing import Iterator, Union

from marginface.errors import UserError


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 ``data`` -> str; `UserError` naming ``where`` and the line of the first bad byte."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}:{_line_of(data, exc.start)}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                        f"save the file as UTF-8") from None
    nul = text.find("\0")
    if nul >= 0:
        raise UserError(f"{where}:{text.count(chr(10), 0, nul) + 1}: holds a NUL byte (a binary file, not text)")
    return text


def check_regular_file(path: Union[str, Path], what: str = "file") -> None:
    """`UserError` unless ``path`` is a regular file: reading a FIFO blocks forever and a device
    such as ``/dev/zero`` never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a directory, expected a {what}")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special"
        raise UserError(f"{path}: is {kind}, not a regular file; expected a {what}")


def read_text(path: Union[str, Path], what: str = "file") -> str:
    """A UTF-8 text file as str (see the module doc); a missing or unreadable file is a `UserError`."""
    path = Path(path)
    check_regular_file(path, what)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a {what}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    return decode_text(data, str(path))


def csv_rows(text: str, where: str, reader=None) -> Iterator[tuple[int, list]]:
    """``(line_number, row)`` for each CSV row of ``text`` (or of an existing ``csv`` reader over
    it); csv-module errors become `UserError` naming ``where`` and the line."""
    rows = reader if reader is not None else csv.reader(io.StringIO(text))
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UserError(f"{where}:{rows.line_num}: bad CSV ({exc})") from None
        yield rows.line_num, row
