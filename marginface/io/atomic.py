"""One way to write a file: a temp file beside it, flush + fsync, rename, fsync the folder.

A crash, a kill or a full disk never leaves a half-written file under the real name: either the
new content is there in full or the previous file is untouched. The temp file is named
``.<name>.<random>.tmp`` in the same folder (same file system, so the rename is atomic); on any
exception it is removed. An ``OSError`` while writing (ENOSPC, EFBIG, EACCES, ...) becomes one
`UserError` line naming the file: ``<path>: could not write (No space left on device)``.

Only `marginface.errors` is imported from the package, so any module may use this one.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Union

from marginface.errors import UserError

PathLike = Union[str, Path]


def temp_name_pattern(name: str) -> "re.Pattern[str]":
    """The names `atomic_write` gives its temp files for a target called ``name``:
    ``.<name>.<8 random chars>.tmp`` (and ``<name>.<8 random chars>.tmp``, what checkpoint saves
    before this module named theirs)."""
    return re.compile(r"\.?" + re.escape(name) + r"\.[a-z0-9_]{8}\.tmp\Z")


def write_error(path: PathLike, exc: OSError) -> UserError:
    """The one-line error for a failed write of ``path``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return UserError(f"{path}: could not write ({reason})")


def fsync_dir(folder: PathLike) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse a directory fd)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(folder), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(path: PathLike) -> list[Path]:
    """Remove temp files a killed `atomic_write` of ``path`` left behind (``.<name>.<random>.tmp``
    in the same folder, and nothing else); return what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    pattern = temp_name_pattern(path.name)
    for entry in path.parent.iterdir():
        if pattern.match(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def ensure_dir(folder: PathLike) -> Path:
    """``mkdir -p folder``; an OSError (full disk, no permission, a file in the way) is a `UserError`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(f"{folder}: could not create the folder ({reason})") from None
    return folder


@functools.lru_cache(maxsize=None)
def _default_mode() -> int:
    """What ``open(path, "w")`` would give a new file (0o666 less the umask). Read once: setting the
    umask to read it is process-wide, so it is not done on every write while threads run."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that wants a file name (``np.save``, ONNX,
    a zip library); when the block ends without an error it is fsynced and renamed to ``path``.
    On any exception the temp file is removed and ``path`` is left as it was.

    ``durable=False`` skips the fsyncs (for the many small files of an image folder: a crash
    still never leaves a partial file under the real name, but a power loss may lose the newest)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from None
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            if durable:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            os.chmod(tmp, _default_mode())  # mkstemp makes 0600; our files are ordinary files
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None, *,
                 durable: bool = True) -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: f.write(...)``: ``f`` is an open temp file (``mode`` "wb" or
    "w"); on leaving the block it is flushed, fsynced and renamed to ``path`` (see `atomic_path`)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    path = Path(path)
    with atomic_path(path, durable=False) as tmp:  # the fsyncs happen here, on the open handle
        try:
            with open(tmp, mode, encoding=encoding) as handle:
                yield handle
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
        except OSError as exc:
            raise write_error(path, exc) from None
    if durable:
        fsync_dir(path.parent)  # the rename itself


def atomic_write_bytes(path: PathLike, data: bytes, *, durable: bool = True) -> Path:
    with atomic_write(path, "wb", durable=durable) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, **dumps_kw) -> Path:
    """``obj`` as JSON (serialised first, so an unserialisable object writes nothing)."""
    text = json.dumps(obj, indent=indent, **dumps_kw) + "\n"
    return atomic_write_text(path, text)


def atomic_save_torch(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; temp files an earlier killed save left beside
    ``path`` are removed first (only ours: ``.<name>.<random>.tmp``)."""
    import torch  # only callers that save tensors pay for it

    remove_stale_temps(path)
    with atomic_write(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except Exception:
            if writer.error is not None:  # torch turns the file's OSError into an opaque RuntimeError
                raise write_error(path, writer.error) from None
            raise
    return Path(path)


class _RecordingWriter:
    """A file's ``write``/``flush`` that remember the OSError a failed write raised."""

    def __init__(self, handle: IO[bytes]):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as exc:
            self.error = exc
            raise
