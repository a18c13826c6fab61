"""The one place image files and encoded image bytes become RGB ``uint8`` ``H×W×3`` arrays.

Every reader (training sources, RecordIO, verification sets, IJB, identify/embed, the
detect-align-embed pipeline, calibration) calls `read_image` (a path) or `decode_image` (bytes)
and gets the same contract: an RGB uint8 array, or `UserError` naming the file/record.

Before anything is decoded:

* a path must be a regular file (a FIFO would block forever, ``/dev/zero`` never ends, a
  directory is not an image) of at most `MAX_FILE_BYTES`;
* the size the header claims (PNG IHDR, JPEG SOFn, GIF, BMP, WebP, TIFF) must be at most
  `MAX_PIXELS` (a 20000x20000 PNG of zeros is 400 KB on disk and 1.2 GB decoded); formats whose
  header we cannot read are refused;
* what the decoder prints on stderr (libjpeg, libpng) is kept off the console; a JPEG whose data
  ends early ("premature end") is refused instead of being padded with grey.

Conversions, the same for every caller: gray -> RGB; 16-bit -> 8-bit (top byte); CMYK -> RGB;
an alpha channel is composited onto white (a transparent background is not black hair);
animated images (GIF, APNG, WebP) give their first frame; JPEG EXIF orientation is applied.
"""
from __future__ import annotations

import os
import stat
import struct
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from marginface.errors import UserError
from marginface.io.atomic import atomic_write_bytes

MAX_PIXELS = 40_000_000  # 40 megapixels: bigger than any camera photo of a face we need, 120 MB as RGB
MAX_FILE_BYTES = 256 << 20  # an image file larger than this is refused before it is read

_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10 decodes straight to RGB

PathLike = Union[str, Path]


# ------------------------------------------------------------------------------ header sizes
def _jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:  # stray bytes between segments: decoders skip them, so do we
            i = data.find(b"\xff", i)
            if i < 0:
                return None
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        length = struct.unpack_from(">H", data, i + 2)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any frame header
            return None
        i += 2 + length
    return None


def _tiff_size(data: bytes) -> Optional[tuple[int, int]]:
    end = "<" if data[:2] == b"II" else ">"
    try:
        offset = struct.unpack_from(end + "I", data, 4)[0]
        count = struct.unpack_from(end + "H", data, offset)[0]
        found = {}
        for k in range(min(count, 4096)):
            tag, kind, _, value = struct.unpack_from(end + "HHI4s", data, offset + 2 + 12 * k)
            if tag in (256, 257):
                found[tag] = struct.unpack_from(end + ("H" if kind == 3 else "I"), value)[0]
        return found[256], found[257]
    except (struct.error, KeyError):
        return None


def _webp_size(data: bytes) -> Optional[tuple[int, int]]:
    kind = data[12:16]
    try:
        if kind == b"VP8 ":
            w, h = struct.unpack_from("<HH", data, 26)
            return w & 0x3FFF, h & 0x3FFF
        if kind == b"VP8L":
            b = int.from_bytes(data[21:25], "little")
            return (b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1
        if kind == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    except struct.error:
        return None
    return None


def image_format(data: bytes) -> Optional[str]:
    """``"jpeg"``, ``"png"``, ``"gif"``, ``"bmp"``, ``"webp"``, ``"tiff"`` from the first bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\0", b"MM\0*"):
        return "tiff"
    return None


def header_size(data: bytes) -> Optional[tuple[int, int]]:
    """``(width, height)`` that the image header claims, read without decoding; None if unknown."""
    fmt = image_format(data)
    try:
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "png":
            if data[12:16] != b"IHDR":
                return None
            return struct.unpack_from(">II", data, 16)
        if fmt == "gif":
            return struct.unpack_from("<HH", data, 6)
        if fmt == "bmp":
            if struct.unpack_from("<I", data, 14)[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
                return struct.unpack_from("<HH", data, 18)
            w, h = struct.unpack_from("<ii", data, 18)
            return abs(w), abs(h)
        if fmt == "webp":
            return _webp_size(data)
        if fmt == "tiff":
            return _tiff_size(data)
    except struct.error:
        return None
    return None


def _has_alpha(data: bytes, fmt: str) -> bool:
    if fmt == "png":
        return data[25:26] in (b"\x04", b"\x06") or b"tRNS" in data[:4096]
    if fmt == "webp":
        return data[12:16] == b"VP8L" or (data[12:16] == b"VP8X" and bool(data[20] & 0x10))
    return fmt in ("tiff", "bmp")  # cheap to look at the decoded channels


# ------------------------------------------------------------------------------ decoder chatter
class _Quiet:
    """Send fd 2 to a scratch file while a decoder runs; returns what it printed.

    libjpeg and libpng print warnings straight to the C stderr, which would put junk lines
    around our one ``error:`` line (and into ``--json`` runs' logs). One scratch file per process.
    """

    _lock = threading.Lock()
    _file = None
    _pid = -1

    @classmethod
    def _after_fork(cls) -> None:  # a DataLoader worker gets a fresh lock and its own scratch file
        cls._lock, cls._file, cls._pid = threading.Lock(), None, -1

    def __enter__(self):
        self._lock.acquire()
        self.text, self._saved = "", None
        try:
            if _Quiet._file is None or _Quiet._pid != os.getpid():
                _Quiet._file, _Quiet._pid = tempfile.TemporaryFile(buffering=0), os.getpid()
            self._saved = os.dup(2)
            os.dup2(_Quiet._file.fileno(), 2)
        except OSError:  # no stderr (a daemon) or no temp dir: decode without capturing
            if self._saved is not None:
                os.close(self._saved)
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            self._lock.release()
            return False
        os.dup2(self._saved, 2)
        os.close(self._saved)
        fd = _Quiet._file.fileno()
        self.text = ""
        if os.lseek(fd, 0, os.SEEK_CUR):  # the decoder wrote something (fd 2 shared this offset)
            os.lseek(fd, 0, os.SEEK_SET)
            self.text = os.read(fd, 4096).decode("utf-8", "replace")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        self._lock.release()
        return False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Quiet._after_fork)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    image = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(image * (255.0 / max(float(image.max()), 1e-6)), 0, 255).astype(np.uint8)


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[:, :, 3:4].astype(np.float32) / 255.0
    rgb = rgba[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ the contract
def check_header(data: bytes, where: str) -> str:
    """The format of ``data``; `UserError` when it is not an image we read or claims too many pixels."""
    if not len(data):
        raise UserError(f"{where}: image is empty (0 bytes)")
    fmt = image_format(data)
    if fmt is None:
        raise UserError(f"{where}: not a readable image (not a JPEG, PNG, GIF, BMP, WebP or TIFF file; "
                        f"starts with {bytes(data[:4]).hex()})")
    size = header_size(data)
    if size is None:
        raise UserError(f"{where}: not a readable image (corrupt {fmt.upper()}: no image size in its header)")
    width, height = size
    if width < 1 or height < 1:
        raise UserError(f"{where}: {fmt.upper()} header claims an empty {width}x{height} image")
    if width * height > MAX_PIXELS:
        raise UserError(f"{where}: {fmt.upper()} header claims {width}x{height} pixels "
                        f"({width * height / 1e6:.0f} megapixels), above the {MAX_PIXELS // 1_000_000}-megapixel "
                        f"limit (marginface.data.images.MAX_PIXELS)")
    return fmt


def _decode_rgb(buf: np.ndarray) -> Optional[np.ndarray]:
    if _IMREAD_RGB is not None:
        return cv2.imdecode(buf, _IMREAD_RGB)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return None if bgr is None else bgr[:, :, ::-1]


def decode_image(data: Union[bytes, bytearray, memoryview, np.ndarray], where: str = "image") -> np.ndarray:
    """Encoded image bytes -> RGB uint8 ``H×W×3``; anything unreadable raises `UserError` naming ``where``."""
    if isinstance(data, np.ndarray):
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        raw_bytes = buf.tobytes()
    else:
        raw_bytes = bytes(data)
        buf = np.frombuffer(raw_bytes, dtype=np.uint8)
    fmt = check_header(raw_bytes, where)
    alpha = _has_alpha(raw_bytes, fmt)
    try:
        with _Quiet() as quiet:
            image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if alpha else _decode_rgb(buf)
            if alpha and image is not None and not (image.ndim == 3 and image.shape[2] == 4):
                alpha, image = False, _decode_rgb(buf)  # no alpha after all: the usual path
    except cv2.error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:160]
        raise UserError(f"{where}: not a readable image ({fmt.upper()} decoder: {first})") from None
    if image is None:
        raise UserError(f"{where}: not a readable image (corrupt {fmt.upper()} data)")
    if "premature end" in quiet.text.lower():
        raise UserError(f"{where}: not a readable image (truncated {fmt.upper()}: its data ends before the last row)")
    if alpha:
        image = _composite_white(_to_uint8(image)[:, :, [2, 1, 0, 3]])
    return np.ascontiguousarray(image)


def read_image(path: PathLike) -> np.ndarray:
    """An image file -> RGB uint8 ``H×W×3``; `UserError` naming the file when it is not a regular
    file, too large, not an image, corrupt, or claims more than `MAX_PIXELS` pixels."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise UserError(f"{path}: is {kind}, not an image file")
    if st.st_size == 0:
        raise UserError(f"{path}: image file is empty")
    if st.st_size > MAX_FILE_BYTES:
        raise UserError(f"{path}: {st.st_size / 2**20:.0f} MiB is larger than the "
                        f"{MAX_FILE_BYTES >> 20} MiB limit for an image file")
    try:
        with open(path, "rb") as f:  # O_NONBLOCK is moot: only regular files get here
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    return decode_image(data, str(path))


def as_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """An in-memory image (gray ``H×W``, ``H×W×1``, RGB, RGBA; uint8/uint16/float) -> RGB uint8."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise UserError(f"{name}: expected an H×W, H×W×3 or H×W×4 image, got shape {arr.shape}")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise UserError(f"{name}: {arr.shape[1]}x{arr.shape[0]} pixels is above the "
                        f"{MAX_PIXELS // 1_000_000}-megapixel limit")
    arr = _to_uint8(arr)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = _composite_white(arr)
    return np.ascontiguousarray(arr)


def imwrite_rgb(path: PathLike, image: np.ndarray, params: Sequence[int] = ()) -> Path:
    """RGB uint8 ``H×W×3`` -> an image file (format from the suffix), written whole or not at all
    (temp file + rename, `marginface.io.atomic`). A failed encode or write is a `UserError` naming
    the file (``cv2.imwrite`` would only return False)."""
    path = Path(path)
    try:
        ok, buf = cv2.imencode(path.suffix or ".png", np.ascontiguousarray(image[..., ::-1]), list(params))
    except cv2.error as exc:
        raise UserError(f"{path}: cannot encode the image ({str(exc).strip().splitlines()[-1][:200]})") from None
    if not ok:
        raise UserError(f"{path}: cannot encode the image")
    return atomic_write_bytes(path, buf.tobytes(), durable=False)
