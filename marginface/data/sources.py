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


def vggface2_list_names(split: str = "train") -> list[str]:
    """Where a VGGFace2 directory keeps its image list, in the order looked at."""
    return [f"{split}_list.txt", f"meta/{split}_list.txt"]


def vggface2_csv_names(kind: str, split: str = "train") -> list[str]:
    """Where a VGGFace2 directory keeps ``loose_landmark_<split>.csv`` (``kind="landmark"``) or
    ``loose_bb_<split>.csv`` (``kind="bb"``), in the order looked at."""
    name = f"loose_{kind}_{split}.csv"
    return [f"bb_landmark/{name}", name, f"meta/bb_landmark/{name}", f"meta/{name}"]


def _csv_in(path: Path, kind: str, split: str) -> Path | None:
    """A given CSV, or the ``loose_<kind>_<split>.csv`` in a given folder (openvino's
    ``--train_landmarks $ROOT/bb_landmark/``); None when the folder has none."""
    if path.is_dir():
        return _find_first(path, [f"loose_{kind}_{split}.csv"])
    return path


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

    Each file may live elsewhere: ``list_file`` (default: ``root/<split>_list.txt``, else
    ``root/meta/<split>_list.txt``), ``landmarks`` and ``boxes`` (a CSV, or the folder holding
    ``loose_landmark_<split>.csv`` / ``loose_bb_<split>.csv``; default: `vggface2_csv_names`
    under ``root``). A landmark folder also supplies the box CSV beside it.
    """

    def __init__(self, root: str | Path, split: str = "train", image_size: int | tuple[int, int] = 112, *,
                 list_file: str | Path | None = None, landmarks: str | Path | None = None,
                 boxes: str | Path | None = None):
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        if list_file is not None:
            self.list_path = Path(list_file)
            if not self.list_path.is_file():
                raise UserError(f"{self.list_path}: VGGFace2 list file not found")
        else:
            tried = vggface2_list_names(split)
            found = _find_first(self.root, tried)
            if found is None:
                raise UserError(f"{self.root}: no {' or '.join(tried)} (not a VGGFace2 directory; data.train_list "
                                f"names a list kept elsewhere)")
            self.list_path = found
        image_root = self.root / split if (self.root / split).is_dir() else self.root
        if landmarks is not None:
            landmark_csv = _csv_in(Path(landmarks), "landmark", split)
        else:
            landmark_csv = _find_first(self.root, vggface2_csv_names("landmark", split))
        if boxes is not None:
            bbox_csv = _csv_in(Path(boxes), "bb", split)
        elif landmarks is not None and Path(landmarks).is_dir():
            bbox_csv = _csv_in(Path(landmarks), "bb", split)
        else:
            bbox_csv = _find_first(self.root, vggface2_csv_names("bb", split))
        for csv_file in (landmark_csv, bbox_csv):
            if csv_file is not None and not csv_file.is_file():
                raise UserError(f"{csv_file}: VGGFace2 CSV not found")
        if landmark_csv is None and bbox_csv is None:
            places = [str(p) for p in (landmarks, boxes) if p is not None] or [
                f"{self.root}/{{{','.join(vggface2_csv_names('landmark', split) + vggface2_csv_names('bb', split))}}}"]
            raise UserError(f"neither loose_landmark_{split}.csv nor loose_bb_{split}.csv found (tried "
                            f"{', '.join(places)}); data.train_landmarks / data.train_boxes name them")
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
        if _find_first(path, vggface2_list_names("train")) is not None:
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


TRAIN_FILE_KEYS = ("train_list", "train_landmarks", "train_boxes")  # data.<key>: a file of data.train kept elsewhere


def _is_labelled_list(list_file: Path) -> bool:
    """Whether a list's first entry is ``path<TAB>label`` (a list file) rather than a bare path (VGGFace2)."""
    for line in read_text(list_file, "list file").splitlines():
        fields = parse_list_line(line)
        if fields:
            return len(fields) == 2 and fields[1].lstrip("-").isdigit()
    return False


def open_train_source(data: Any, *, warn: bool = True) -> Any:
    """The training source of a config's ``data`` section: ``data.train`` (`open_source`), with
    ``data.train_list``, ``data.train_landmarks`` and ``data.train_boxes`` naming files kept
    outside the folder conventions (empty/None: the convention). With ``train_list`` set,
    ``data.train`` is the image folder: a list of ``path<TAB>label`` lines is read as a list file
    (`ListSource`, paths under ``data.train``), a list of bare paths as VGGFace2 (landmark/box
    CSVs from the other two keys or ``data.train``'s own). A missing file names its key."""
    given = {key: getattr(data, key, None) or None for key in TRAIN_FILE_KEYS}
    if not any(given.values()):
        return open_source(data.train, warn=warn)
    for key, value in given.items():
        if value is not None and not Path(value).exists():
            raise UserError(f"config key 'data.{key}': {value} not found")
    root = Path(data.train)
    keys = ", ".join(f"data.{k}" for k, v in given.items() if v)
    if str(data.train) == "synthetic" or not root.is_dir():
        raise UserError(f"config key(s) {keys} name files of an image dataset, but data.train={data.train} is not "
                        f"an image folder")
    if (root / "train.rec").is_file():
        raise UserError(f"config key(s) {keys} name files of an image dataset, but data.train={root} is a RecordIO "
                        f"pack")
    list_file = given["train_list"]
    if list_file is None and _find_first(root, vggface2_list_names("train")) is None:
        raise UserError(f"config key(s) {keys} need the image list: no {' or '.join(vggface2_list_names('train'))} "
                        f"in data.train={root} (set data.train_list)")
    if list_file is not None and Path(list_file).is_dir():
        raise UserError(f"config key 'data.train_list': {list_file} is a directory, not a list file")
    if list_file is not None and _is_labelled_list(Path(list_file)):
        if given["train_landmarks"] or given["train_boxes"]:
            raise UserError(f"config key 'data.train_list': {list_file} is a labelled list (path<TAB>label) of "
                            f"aligned images; data.train_landmarks / data.train_boxes apply to VGGFace2 lists only")
        source = ListSource(list_file, root=root)
    else:
        source = VGGFace2Source(root, list_file=list_file, landmarks=given["train_landmarks"],
                                boxes=given["train_boxes"])
    message = few_identities_warning(source) if warn else None
    if message:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    return source
