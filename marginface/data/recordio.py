"""insightface RecordIO packs (``train.rec`` + ``train.idx`` + ``property``), read without mxnet.

Layout (dmlc-core RecordIO, as written by mxnet's ``MXIndexedRecordIO``):

* every record part: ``uint32 magic 0xced7230a``, ``uint32 lrecord`` (upper 3 bits: cflag, lower 29:
  length), then ``length`` payload bytes zero-padded to a multiple of 4. cflag 0 is a whole record;
  1/2/3 are the start/middle/end of a record the writer split wherever the payload contained the
  magic word at a 4-byte aligned offset (the magic itself is dropped and re-inserted on read).
* payload: the image-record header ``<IfQQ`` (flag, label, id, id2); when ``flag > 0`` a float32
  array of ``flag`` labels follows the header, then the encoded image (JPEG/PNG).
* ``.idx``: one ``key<TAB>byte_offset`` line per record.
* insightface packs start with record 0 whose label array is ``(first identity record, end)``:
  images are keys ``1 .. label[0]-1``; keys ``label[0] .. label[1]-1`` hold one record per identity
  whose label array is that identity's ``(first image key, end image key)``. Packs whose record 0 has
  ``flag == 0`` are plain: every key is an image.
"""
from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from marginface.data import images
from marginface.io.textfiles import read_text
from marginface.errors import UserError
from marginface.io.atomic import atomic_path, atomic_write_text, ensure_dir, write_error

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEADER = struct.Struct("<II")
IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
_MAX_LENGTH = 1 << 29


class IRHeader(NamedTuple):
    """Image-record header; ``label`` is a float or, when ``flag > 0``, a float32 array."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(label: float | Sequence[float], payload: bytes, record_id: int = 0, id2: int = 0) -> bytes:
    """Image-record payload: header (+ label array when ``label`` is a sequence) + ``payload``."""
    if np.ndim(label) == 0:
        return IR_HEADER.pack(0, float(label), record_id, id2) + payload
    labels = np.asarray(label, dtype="<f4").ravel()
    return IR_HEADER.pack(labels.size, 0.0, record_id, id2) + labels.tobytes() + payload


def unpack_record(record: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a record payload into its header and the image bytes that follow."""
    if len(record) < IR_HEADER.size:
        raise UserError(f"{where}: {len(record)} bytes is shorter than the {IR_HEADER.size}-byte image-record header")
    flag, label, rid, id2 = IR_HEADER.unpack_from(record)
    body_start = IR_HEADER.size
    if flag > 0:
        body_start += 4 * flag
        if len(record) < body_start:
            raise UserError(f"{where}: header announces {flag} labels but the record is only {len(record)} bytes")
        label = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_HEADER.size).copy()
    return IRHeader(flag, label, rid, id2), record[body_start:]


def first_label(header: IRHeader) -> float:
    """The class label of an image record (the first entry when the header holds an array)."""
    return float(header.label[0]) if header.flag > 0 else float(header.label)


def read_idx(idx_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)`` int64 arrays from an ``.idx`` file; bad lines raise ``UserError`` (file:line)."""
    try:
        text = Path(idx_path).read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise UserError(f"{idx_path}: index file not found") from None
    fast = _parse_idx_fast(text)
    if fast is not None:
        return fast
    keys: list[int] = []
    offsets: list[int] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise UserError(f"{idx_path}:{line_no}: expected 'key<TAB>offset', got {line.strip()!r}")
        try:
            key, offset = int(fields[0]), int(fields[1])
        except ValueError:
            raise UserError(f"{idx_path}:{line_no}: key and offset must be integers, got {line.strip()!r}") from None
        if offset < 0:
            raise UserError(f"{idx_path}:{line_no}: negative offset {offset}")
        if not -2**63 <= key < 2**63 or offset >= 2**63:
            raise UserError(f"{idx_path}:{line_no}: key or offset beyond the 64-bit integer range")
        keys.append(key)
        offsets.append(offset)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def _parse_idx_fast(text: str) -> tuple[np.ndarray, np.ndarray] | None:
    """C-speed parse of a well-formed index (MS1M has millions of lines); None sends the caller
    to the line-by-line parser, which names the bad line."""
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(text, dtype=np.int64, sep=" ") if text.strip() else np.zeros(0, np.int64)
        except (ValueError, DeprecationWarning):
            return None
    if values.size != 2 * lines or (values.size and values[1::2].min() < 0):
        return None
    limits = np.iinfo(np.int64)
    if values.size and (values.max() == limits.max or values.min() == limits.min):
        return None  # numpy saturates numbers beyond int64: let the line parser name the line
    return values[0::2].copy(), values[1::2].copy()


class RecordIOReader:
    """Random access to the records of a ``.rec`` file through its ``.idx``.

    The file handle is opened lazily and re-opened after ``fork`` (the pid is checked on every
    read), so each DataLoader worker reads through its own handle; pickling drops the handle.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise UserError(f"{self.rec_path}: RecordIO file not found")
        self.file_size = self.rec_path.stat().st_size
        keys, offsets = read_idx(self.idx_path)
        if keys.size == 0:
            raise UserError(f"{self.idx_path}: index is empty")
        past_end = np.flatnonzero(offsets + _PART_HEADER.size > self.file_size)
        if past_end.size:
            i = int(past_end[0])
            raise UserError(
                f"{self.idx_path}:{i + 1}: offset {offsets[i]} of key {keys[i]} is past the end of "
                f"{self.rec_path.name} ({self.file_size} bytes): the .rec is truncated or the .idx belongs to another file"
            )
        self.keys = keys
        self.offsets = offsets
        # numpy lookup instead of a dict: millions of keys as Python ints would cost ~100 bytes each
        # in every DataLoader worker
        self._order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[self._order]
        duplicate = np.flatnonzero(np.diff(self._sorted_keys) == 0)
        if duplicate.size:
            raise UserError(f"{self.idx_path}: key {self._sorted_keys[duplicate[0]]} appears more than once")
        self._file = None
        self._pid = -1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return int(self.keys.size)

    def has_keys(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``keys`` the index lists."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_keys, keys), self._sorted_keys.size - 1)
        return self._sorted_keys[pos] == keys

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        found = self.has_keys(keys)
        if not found.all():
            raise UserError(f"{self.idx_path}: no record with key {keys[~found][0]}")
        return self.offsets[self._order[np.searchsorted(self._sorted_keys, keys)]]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, -1

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._file

    def offset(self, key: int) -> int:
        return int(self.offsets_of(np.asarray([key]))[0])

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (multi-part records joined)."""
        f = self._handle()
        pos = self.offset(key)
        parts: list[bytes] = []
        while True:
            f.seek(pos)
            head = f.read(_PART_HEADER.size)
            if len(head) < _PART_HEADER.size:
                raise UserError(f"{self.rec_path}: record {key} is truncated (file ends at byte {self.file_size})")
            magic, lrecord = _PART_HEADER.unpack(head)
            if magic != MAGIC:
                raise UserError(f"{self.rec_path}: record {key} at byte {pos} has bad magic 0x{magic:08x}")
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            data = f.read(length)
            if len(data) < length:
                raise UserError(
                    f"{self.rec_path}: record {key} is truncated (needs {length} bytes at byte "
                    f"{pos + _PART_HEADER.size}, file ends at byte {self.file_size})"
                )
            parts.append(data)
            if cflag in (0, 3):
                break
            if cflag == 2 and len(parts) == 1:
                raise UserError(f"{self.rec_path}: record {key} starts with a middle part (cflag 2)")
            pos += _PART_HEADER.size + ((length + 3) & ~3)
        return _MAGIC_BYTES.join(parts)

    def read_header(self, key: int) -> IRHeader:
        return unpack_record(self.read(key), f"{self.rec_path} record {key}")[0]

    def read_first_labels(self, keys: np.ndarray) -> np.ndarray:
        """Class labels (float64) of many image records at once.

        Gathers the first bytes of each record straight from a memory map (one page touch per
        record), falling back to a full read for the rare records whose header is split.
        """
        keys = np.asarray(keys, dtype=np.int64)
        if keys.size == 0:
            return np.zeros(0, dtype=np.float64)
        offsets = self.offsets_of(keys)
        need = _PART_HEADER.size + IR_HEADER.size + 4  # part header, IR header, first label of an array
        mm = np.memmap(self.rec_path, dtype=np.uint8, mode="r")
        labels = np.empty(keys.size, dtype=np.float64)
        slow = np.zeros(keys.size, dtype=bool)
        chunk = 1 << 18  # bounds the gather index array to ~75 MB
        for lo in range(0, keys.size, chunk):
            off = offsets[lo : lo + chunk]
            raw = np.asarray(mm[np.minimum(off[:, None] + np.arange(need), self.file_size - 1)])
            words = raw[:, :16].copy().view("<u4")  # magic, lrecord, flag, label bits
            magic, lrecord, flag = words[:, 0], words[:, 1], words[:, 2]
            scalar = words[:, 3].view("<f4")
            array0 = raw[:, 32:36].copy().view("<f4")[:, 0]
            length = lrecord & _LENGTH_MASK
            header_bytes = IR_HEADER.size + np.where(flag > 0, 4, 0)
            labels[lo : lo + chunk] = np.where(flag > 0, array0, scalar)
            slow[lo : lo + chunk] = (
                (magic != MAGIC)
                | ((lrecord >> 29) != 0)
                | (length < header_bytes)
                | (off + _PART_HEADER.size + length > self.file_size)
            )
        del mm
        for i in np.flatnonzero(slow).tolist():  # errors and split records take the careful path
            labels[i] = first_label(self.read_header(int(keys[i])))
        return labels


class RecordIOWriter:
    """Writes ``.rec`` + ``.idx`` in the layout mxnet/dmlc write (readable by both)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii")

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def write(self, key: int, payload: bytes) -> None:
        """Append one record; payloads holding the magic word are split the way dmlc splits them."""
        if len(payload) >= _MAX_LENGTH:
            raise ValueError(f"record {key}: {len(payload)} bytes exceeds the RecordIO limit of 2^29")
        self._idx.write(f"{int(key)}\t{self._rec.tell()}\n")
        cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i : i + 4] == _MAGIC_BYTES]
        start = 0
        for n, cut in enumerate(cuts):
            self._write_part(1 if n == 0 else 2, payload[start:cut])
            start = cut + 4
        self._write_part(3 if cuts else 0, payload[start:])

    def _write_part(self, cflag: int, data: bytes) -> None:
        self._rec.write(_PART_HEADER.pack(MAGIC, (cflag << 29) | len(data)))
        self._rec.write(data)
        self._rec.write(b"\0" * (-len(data) % 4))


def decode_image(data: bytes, where: str) -> np.ndarray:
    """A record's JPEG/PNG payload -> RGB uint8 (`marginface.data.images.decode_image`, which also
    bounds the pixel count); insightface packs hold nothing else, so other payloads are refused."""
    if not (data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"):
        raise UserError(f"{where}: payload is not a JPEG or PNG image (starts with {data[:4].hex() or 'nothing'})")
    return images.decode_image(data, where)


def read_property(path: Path) -> tuple[int, int, int] | None:
    """``(num_classes, height, width)`` from an insightface ``property`` file, or None if absent."""
    if not path.is_file():
        return None
    text = read_text(path, "property file").strip()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UserError(f"{path}:1: expected 'num_classes,height,width', got {text!r}")
    return values  # type: ignore[return-value]


class RecordIOSource:
    """Training source over an insightface pack; labels come from the record headers, read once."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None):
        self.reader = RecordIOReader(rec_path, idx_path)
        self.rec_path = self.reader.rec_path
        first = int(self.reader.keys[0])
        head = self.reader.read_header(first)
        if head.flag > 0 and first == 0:
            # insightface layout: record 0 says images are keys 1 .. label[0]-1; the index bounds how
            # many there can be, checked before the key range is allocated
            end_value = float(head.label[0])
            if not np.isfinite(end_value) or end_value != round(end_value) or not 1 < end_value <= len(self.reader) + 1:
                raise UserError(
                    f"{self.rec_path}: header record 0 announces image keys 1..{end_value - 1:g}, but "
                    f"{self.reader.idx_path.name} lists only {len(self.reader)} records"
                )
            end = int(end_value)
            keys = np.arange(1, max(end, 1), dtype=np.int64)
            missing = keys[~self.reader.has_keys(keys)]
            if end <= 1 or missing.size:
                raise UserError(
                    f"{self.rec_path}: header record 0 announces image keys 1..{end - 1}"
                    + (f" but key {missing[0]} is not in {self.reader.idx_path.name}" if missing.size else "")
                )
            self.keys = keys
        else:
            self.keys = self.reader.keys.copy()
        raw = self.reader.read_first_labels(self.keys)
        prop = read_property(self.rec_path.parent / "property")
        if prop and not 1 <= prop[0] <= len(self.keys):
            raise UserError(f"{self.rec_path.parent / 'property'}: says {prop[0]} classes for {len(self.keys)} "
                            f"images in {self.rec_path.name}; expected 1..{len(self.keys)}")
        # labels are class indices 0..C-1: at most one class per image, so a label of 1e12 in a small
        # pack is refused here instead of sizing a class table by it
        bound = prop[0] if prop else len(self.keys)
        bad = ~np.isfinite(raw) | (raw < 0) | (raw != np.round(raw)) | (raw >= bound)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{self.rec_path}: record {self.keys[i]} has label {raw[i]:g}, expected a class index "
                            f"0..{bound - 1} ({'the property file' if prop else 'one class per image at most'})")
        self.labels = raw.astype(np.int64)
        seen = int(self.labels.max()) + 1
        self.image_shape = prop[1:] if prop else None
        self.num_classes = prop[0] if prop else seen
        if seen > self.num_classes:
            raise UserError(f"{self.rec_path.parent / 'property'}: says {self.num_classes} classes but labels reach {seen - 1}")

    def __len__(self) -> int:
        return int(self.keys.size)

    def read_bytes(self, i: int) -> bytes:
        key = int(self.keys[i])
        return unpack_record(self.reader.read(key), f"{self.rec_path} record {key}")[1]

    def read(self, i: int) -> np.ndarray:
        return decode_image(self.read_bytes(i), f"{self.rec_path} record {int(self.keys[i])}")

    def name(self, i: int) -> str:
        return f"{self.rec_path} record {int(self.keys[i])}"

    def describe(self) -> str:
        return f"RecordIO {self.rec_path}: {len(self)} images, {self.num_classes} identities"


def write_pack(
    dst_dir: str | Path,
    items: "Sequence[tuple[bytes, int]] | object",
    num_classes: int,
    image_size: tuple[int, int] = (112, 112),
) -> Path:
    """Write an insightface-layout pack (``train.rec``/``.idx``/``property``) into ``dst_dir``.

    ``items`` yields ``(encoded_image, label)`` sorted by label, so each identity is one key range.
    """
    dst = ensure_dir(dst_dir)
    # both files are written under temp names and renamed when complete; a failure (full disk,
    # bad item) removes the temp files and leaves an earlier pack in dst as it was
    with atomic_path(dst / "train.rec") as tmp_rec, atomic_path(dst / "train.idx") as tmp_idx:
        try:
            _write_pack_records(tmp_rec, tmp_idx, items, num_classes)
        except OSError as exc:
            raise write_error(dst / "train.rec", exc) from None
    atomic_write_text(dst / "property", f"{num_classes},{image_size[0]},{image_size[1]}\n")
    return dst


def _write_pack_records(tmp_rec: Path, tmp_idx: Path, items, num_classes: int) -> None:
    ranges: dict[int, list[int]] = {}
    with RecordIOWriter(tmp_rec, tmp_idx) as writer:
        # record 0 must come first in the file; its final value is patched in place below
        writer.write(0, pack_record([0.0, 0.0], b""))
        key, last_label = 1, -1
        for data, label in items:  # type: ignore[attr-defined]
            label = int(label)
            if label < last_label:
                raise ValueError("write_pack: items must be sorted by label")
            if label >= num_classes:
                raise ValueError(f"write_pack: label {label} >= num_classes {num_classes}")
            last_label = label
            ranges.setdefault(label, [key, key])[1] = key + 1
            writer.write(key, pack_record(float(label), data, record_id=key))
            key += 1
        first_identity_key = key
        for label in range(num_classes):
            start, end = ranges.get(label, (0, 0))
            writer.write(key, pack_record([float(start), float(end)], b"", record_id=key))
            key += 1
    with open(tmp_rec, "r+b") as f:  # same size as the placeholder, so offsets stay valid
        f.seek(_PART_HEADER.size)
        f.write(pack_record([float(first_identity_key), float(key)], b""))
