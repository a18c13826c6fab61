"""Training data sources: an image folder, a list file, VGGFace2, RecordIO packs, synthetic faces.

Every source follows one protocol, which the trainer and ``FaceDataset`` code against:

* ``len(source)``; ``source.num_classes``; ``source.labels`` (int64, one per image, 0..C-1)
* ``source.read(i)`` -> RGB uint8 ``H×W×3``; a bad image raises ``UserError`` naming the file/record
* ``source.describe()`` -> one line for logs
* optional: ``source.name(i)`` (file/record of image i, for messages) and ``source.read_bytes(i)``
  (the encoded bytes, so converters can copy JPEGs without re-encoding)

``open_source(spec)`` picks the reader from what ``spec`` points at.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from marginface.data.align import align_face, crop_box
from marginface.data.images import read_image
from marginface.data.recordio import RecordIOSource
from marginface.data.synthetic import SyntheticSource
from marginface.io.textfiles import csv_rows, read_text
from marginface.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def list_image_files(root: str | Path, recursive: bool = True) -> list[Path]:
    """The image files under ``root`` (at any depth, or directly in it), sorted by path; hidden
    files and folders (``.name``) are skipped. Empty when there are none."""
    root = Path(root)
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


@runtime_checkable
class Source(Protocol):
    num_classes: int
    labels: np.ndarray

    def __len__(self) -> int: ...

    def read(self, i: int) -> np.ndarray: ...

    def describe(self) -> str: ...


read_image_file = read_image  # the old name; `marginface.data.images.read_image` is the one reader


def source_item_name(source: Any, i: int) -> str:
    """What to call image ``i`` of any source in a message."""
    name = getattr(source, "name", None)
    return name(i) if callable(name) else f"{type(source).__name__} image {i}"


class _FileListSource:
    """Shared body of the file-based sources: ``paths`` + ``labels``."""

    paths: list[Path]
    labels: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        return read_image(self.paths[i])

    def name(self, i: int) -> str:
        return str(self.paths[i])


class _EncodedFileSource(_FileListSource):
    """File sources whose files are the training images as they are (no per-image transform)."""

    def read_bytes(self, i: int) -> bytes:
        try:
            return self.paths[i].read_bytes()
        except OSError as e:
            raise UserError(f"{self.paths[i]}: cannot read image ({e.strerror or e})") from None


class FolderSource(_EncodedFileSource):
    """``root/<identity>/*.jpg|png|...``; identities sorted by name get labels 0..C-1."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: not a directory")
        self.identities: list[str] = []
        self.paths = []
        labels: list[int] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = sorted(
                p for p in folder.iterdir()
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
            )
            if not images:
                continue  # an empty identity folder would be a class with no samples
            labels.extend([len(self.identities)] * len(images))
            self.identities.append(folder.name)
            self.paths.extend(images)
        if not self.paths:
            raise UserError(f"{self.root}: no images found in identity sub-folders (expected root/<identity>/*.jpg)")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.identities)

    def describe(self) -> str:
        return f"image folder {self.root}: {len(self)} images, {self.num_classes} identities"


def parse_list_line(line: str) -> list[str]:
    """``path<TAB>label`` or ``path label`` -> fields (a path may hold spaces when tabs separate)."""
    text = line.strip()
    if not text:
        return []
    parts = text.split("\t") if "\t" in text else text.rsplit(None, 1)
    return [p.strip() for p in parts if p.strip()]


class ListSource(_EncodedFileSource):
    """A list file of ``relative/path.jpg<TAB>label`` lines (arcface_paddle's ``label.txt``).

    Paths are relative to ``root`` (default: the list file's folder). Every referenced image must
    exist; that is checked at open (one ``stat`` per line) so a typo fails before training starts.
    """

    def __init__(self, list_path: str | Path, root: str | Path | None = None):
        self.list_path = Path(list_path)
        self.root = Path(root) if root is not None else self.list_path.parent
        if not self.list_path.is_file():
            raise UserError(f"{self.list_path}: list file not found")
        self.paths = []
        labels: list[int] = []
        line_of: list[int] = []
        for line_no, line in enumerate(read_text(self.list_path, "list file").splitlines(), 1):
            fields = parse_list_line(line)
            if not fields:
                continue
            where = f"{self.list_path}:{line_no}"
            if len(fields) != 2:
                raise UserError(f"{where}: expected 'path<TAB>label', got {line.strip()!r}")
            rel, label_text = fields
            try:
                label = int(label_text)
            except ValueError:
                raise UserError(f"{where}: label {label_text!r} is not an integer") from None
            if label < 0:
                raise UserError(f"{where}: label {label} is negative")
            path = self.root / rel
            if not path.is_file():
                raise UserError(f"{where}: image {rel} not found under {self.root}")
            self.paths.append(path)
            labels.append(label)
            line_of.append(line_no)
        if not self.paths:
            raise UserError(f"{self.list_path}: list has no entries")
        top = max(labels)
        if top >= len(labels):  # labels are class indices 0..C-1 and every class has an image
            raise UserError(f"{self.list_path}:{line_of[labels.index(top)]}: label {top} is too large: labels are class "
                            f"indices 0..C-1 and the list has only {len(labels)} images")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1

    def describe(self) -> str:
        return f"list file {self.list_path}: {len(self)} images, {self.num_classes} identities"


def _find_first(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


def _read_vggface2_csv(path: Path, columns: int) -> dict[str, np.ndarray]:
    """``NAME_ID,v1..vN`` rows -> {name: float32[N]}; bad rows raise ``UserError`` (file:line)."""
    table: dict[str, np.ndarray] = {}
    for line_no, row in csv_rows(read_text(path, "CSV file"), str(path)):
        if not row or (line_no == 1 and row[0].strip().upper() == "NAME_ID"):
            continue
        if len(row) != columns + 1:
            raise UserError(f"{path}:{line_no}: expected NAME_ID and {columns} numbers, got {len(row) - 1} values")
        try:
            values = np.asarray([float(v) for v in row[1:]], dtype=np.float64)
        except ValueError:
            raise UserError(f"{path}:{line_no}: non-numeric value in {row[:columns + 1]!r}"[:300]) from None
        if not np.isfinite(values).all() or np.abs(values).max() > 1e6:
            raise UserError(f"{path}:{line_no}: coordinates must be finite pixel positions, got {row[1:]!r}"[:300])
        table[row[0].strip()] = values.astype(np.float32)
    return table


class VGGFace2Source(_FileListSource):
    """VGGFace2 as distributed: ``<split>_list.txt`` + ``bb_landmark/loose_landmark_<split>.csv``.

    Images (``root/<split>/n000002/0001_01.jpg``, or directly under ``root``) are loose, unaligned
    crops; ``read`` aligns each to the ArcFace template from its 5 landmarks. An image without
    landmarks falls back to a square crop of its loose box (``loose_bb_<split>.csv``).
    """

    def __init__(self, root: str | Path, split: str = "train", image_size: int | tuple[int, int] = 112):
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.list_path = self.root / f"{split}_list.txt"
        if not self.list_path.is_file():
            raise UserError(f"{self.root}: no {split}_list.txt (not a VGGFace2 directory)")
        image_root = self.root / split if (self.root / split).is_dir() else self.root
        landmark_csv = _find_first(self.root, [f"bb_landmark/loose_landmark_{split}.csv", f"loose_landmark_{split}.csv"])
        bbox_csv = _find_first(self.root, [f"bb_landmark/loose_bb_{split}.csv", f"loose_bb_{split}.csv"])
        if landmark_csv is None and bbox_csv is None:
            raise UserError(f"{self.root}: neither loose_landmark_{split}.csv nor loose_bb_{split}.csv found")
        landmarks = _read_vggface2_csv(landmark_csv, 10) if landmark_csv else {}
        boxes = _read_vggface2_csv(bbox_csv, 4) if bbox_csv else {}
        self.paths, self.landmarks, self.boxes = [], [], []
        identity_of: list[str] = []
        for line_no, line in enumerate(read_text(self.list_path, "list file").splitlines(), 1):
            rel = line.strip()
            if not rel:
                continue
            name_id = rel.rsplit(".", 1)[0]
            if name_id not in landmarks and name_id not in boxes:
                raise UserError(f"{self.list_path}:{line_no}: {rel} has neither landmarks nor a box in the CSVs")
            path = image_root / rel
            if not path.is_file():
                raise UserError(f"{self.list_path}:{line_no}: image {rel} not found under {image_root}")
            pts = landmarks.get(name_id)
            self.landmarks.append(None if pts is None else pts.reshape(5, 2))
            self.boxes.append(boxes.get(name_id))
            self.paths.append(path)
            identity_of.append(rel.replace("\\", "/").split("/")[0])
        if not self.paths:
            raise UserError(f"{self.list_path}: list has no entries")
        self.identities = sorted(set(identity_of))
        label_of = {name: i for i, name in enumerate(self.identities)}
        self.labels = np.asarray([label_of[n] for n in identity_of], dtype=np.int64)
        self.num_classes = len(self.identities)

    def read(self, i: int) -> np.ndarray:
        image = read_image(self.paths[i])
        if self.landmarks[i] is not None:
            return align_face(image, self.landmarks[i], size=self.image_size)
        x, y, w, h = self.boxes[i]
        return crop_box(image, (x, y, x + w, y + h), size=self.image_size)

    def describe(self) -> str:
        return f"VGGFace2 {self.root} ({self.split}): {len(self)} images, {self.num_classes} identities, aligned on read"


class SubsetSource:
    """Images ``indices`` of another source, labels renumbered 0..K-1 in order of first class id."""

    def __init__(self, source: Any, indices: Sequence[int] | np.ndarray, description: str = "subset"):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        old = np.asarray(source.labels)[self.indices]
        self.classes, self.labels = np.unique(old, return_inverse=True)
        self.labels = self.labels.astype(np.int64).reshape(-1)
        self.num_classes = int(self.classes.size)
        self.description = description

    def __len__(self) -> int:
        return int(self.indices.size)

    def read(self, i: int) -> np.ndarray:
        return self.source.read(int(self.indices[i]))

    def name(self, i: int) -> str:
        return source_item_name(self.source, int(self.indices[i]))

    def describe(self) -> str:
        return f"{self.description} of {self.source.describe()}: {len(self)} images, {self.num_classes} identities"


def split_by_identity(source: Any, val_fraction: float, seed: int = 0) -> tuple[SubsetSource, SubsetSource]:
    """Split into (train, val) with disjoint identities; each side's labels are renumbered 0..K-1."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if source.num_classes < 2:
        raise UserError(f"{source.describe()}: need at least 2 identities to split by identity")
    order = np.random.default_rng(seed).permutation(source.num_classes)
    n_val = min(max(1, int(round(val_fraction * source.num_classes))), source.num_classes - 1)
    is_val = np.zeros(source.num_classes, dtype=bool)
    is_val[order[:n_val]] = True
    val_mask = is_val[np.asarray(source.labels)]
    return (
        SubsetSource(source, np.flatnonzero(~val_mask), "train split"),
        SubsetSource(source, np.flatnonzero(val_mask), "validation split"),
    )


def is_paddle_layout(path: Path) -> bool:
    """arcface_paddle's training folder: ``label.txt`` (``images/x.jpg<TAB>label``) beside ``images/``."""
    return (path / "label.txt").is_file() and (path / "images").is_dir()


def few_identities_warning(source: Any) -> str | None:
    """The one-line warning for a dataset with fewer than 2 identities (nothing to tell apart), or None."""
    n = int(source.num_classes)
    if n >= 2:
        return None
    hint = ""
    if isinstance(source, FolderSource):
        hint = (" (an image folder needs one sub-folder per identity: root/<identity>/*.jpg; a folder with "
                "a list file is read as a list when it is label.txt beside images/, else pass the .txt itself)")
    return f"{source.describe()}: only {n} identit{'y' if n == 1 else 'ies'}; training and pair sampling need at least 2{hint}"


def open_source(spec: str | Path, *, warn: bool = True, **kw: Any) -> Any:
    """The source ``spec`` points at: ``synthetic``, a RecordIO pack, a list file, VGGFace2, an
    arcface_paddle folder (``label.txt`` + ``images/``), an image folder. A dataset with fewer than
    2 identities is opened, with one ``warning:`` line on stderr (``warn=False``: none)."""
    source = _open_source(spec, **kw)
    message = few_identities_warning(source) if warn else None
    if message:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    return source


def _open_source(spec: str | Path, **kw: Any) -> Any:
    if str(spec) == "synthetic":
        return SyntheticSource(**kw)
    path = Path(spec)
    if path.is_dir():
        if (path / "train.rec").is_file():
            return RecordIOSource(path / "train.rec", path / "train.idx", **kw)
        if (path / "train_list.txt").is_file():
            return VGGFace2Source(path, **kw)
        if is_paddle_layout(path):
            return ListSource(path / "label.txt", **kw)
        return FolderSource(path, **kw)
    if path.is_file():
        if path.suffix == ".rec":
            return RecordIOSource(path, path.with_suffix(".idx"), **kw)
        if path.suffix == ".txt":
            return ListSource(path, **kw)
        raise UserError(f"{path}: not a training source (expected a RecordIO .rec, a .txt list, or a directory)")
    raise UserError(f"{path}: no such file or directory (and not 'synthetic')")
