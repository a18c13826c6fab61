"""Verification pair sets: one in-memory form (`PairSet`) and readers for the formats in use.

Formats:
- insightface ``.bin`` (LFW, CFP-FP, AgeDB-30, ...): pickled ``(jpeg_list, issame_list)``, read
  with a restricted unpickler because a pickle can run arbitrary code;
- an LFW-style directory ``root/<name>/<name>_%04d.jpg`` with the official ``pairs.txt``;
- a pairs CSV (``file_x,file_y[,Decision|same]``) with paths relative to the CSV;
- pairs sampled from labelled images (`pairs_from_identities`).

`PairList` is the image-less form of a CSV (paths + labels) for unaligned photos that a
detection/alignment step must process before they can become a `PairSet`.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import io
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from marginface.data.align import align_face
from marginface.data.detect.aligned import detect_faces
from marginface.data.images import decode_image, read_image
from marginface.data.pairs import PairSet, pairs_from_identities, sample_pair_indices  # noqa: F401  (public here)
from marginface.data.sources import FolderSource
from marginface.io.textfiles import check_regular_file, csv_rows, read_text
from marginface.errors import UserError

ImageSize = Union[int, tuple[int, int]]  # an int means square; a tuple is (height, width)

# How the faces of a pair set are aligned (`load_pair_set(align=)`, `marginface eval --align`):
# auto = a landmark file when the set has one, a given detector, else the images as they are (a
# pairs CSV refuses whole photos); detect = every image through the detector; landmarks = the
# set's landmark file (LFW directories); none = the images as they are, resized.
ALIGN_MODES = ("auto", "detect", "landmarks", "none")


@dataclass
class PairList:
    """Pairs of image files (not read), e.g. unaligned photos for the detect-align-embed path."""

    name: str
    paths_a: list[Path]
    paths_b: list[Path]
    issame: Optional[np.ndarray]  # K bool, None = unlabelled

    def __post_init__(self) -> None:
        if len(self.paths_a) != len(self.paths_b):
            raise ValueError(f"pair list {self.name!r}: {len(self.paths_a)} vs {len(self.paths_b)} paths")
        if self.issame is not None and len(self.issame) != len(self.paths_a):
            raise ValueError(f"pair list {self.name!r}: {len(self.paths_a)} pairs but {len(self.issame)} labels")

    def __len__(self) -> int:
        return len(self.paths_a)


# ---------------------------------------------------------------------------------------------
# images


def _hw(image_size: ImageSize) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def resize_image(image: np.ndarray, image_size: Optional[ImageSize]) -> np.ndarray:
    """Resize an RGB image to ``image_size`` if given and different (area filter when shrinking)."""
    if image_size is None:
        return image
    height, width = _hw(image_size)
    if image.shape[:2] == (height, width):
        return image
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _stack_images(images: Sequence[np.ndarray], source: str, labels: Sequence[str]) -> np.ndarray:
    """Stack equally sized images; name the first odd one out otherwise."""
    if not images:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    shape = images[0].shape
    for image, label in zip(images, labels):
        if image.shape != shape:
            raise UserError(
                f"{source}: {label} is {image.shape[1]}x{image.shape[0]} but the first image is "
                f"{shape[1]}x{shape[0]}; the images of a pair set must share one size (`marginface eval` resizes "
                f"them to the model's input size; in Python: load_pair_set(..., image_size=...))"
            )
    return np.stack(images)


# ---------------------------------------------------------------------------------------------
# insightface .bin


def _numpy_global(module: str, name: str):
    """Resolve numpy's own pickling helpers without touching the deprecated numpy.core alias."""
    for candidate in (module.replace("numpy.core", "numpy._core"), module):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"cannot resolve {module}.{name}")


# (module, name) -> what these files may reference. Nothing here can run code: numpy array
# reconstruction, dtype construction and bytes decoding of Python-3 written protocol-2 pickles.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_PLAIN_GLOBALS = {
    ("_codecs", "encode"): __import__("_codecs").encode,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "bytearray"): bytearray,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
}


class _RefusedGlobal(Exception):
    pass


class _TooLarge(Exception):
    pass


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that admits only the globals a verification .bin needs.

    Nothing it builds may be larger than the file itself (``limit`` bytes): ``bytearray(n)`` and
    numpy's ``_reconstruct(cls, shape, dtype)`` take a size from the pickle, and a 40-byte file
    asking for ``bytearray(2**33)`` must not get 8 GiB."""

    def __init__(self, file, *, limit: int, **kw):
        super().__init__(file, **kw)
        self.limit = limit

    def _bounded(self, what: str, make, size_of):
        def build(*args):
            size = size_of(*args)
            if size > self.limit:
                raise _TooLarge(f"{what} of {size} bytes")
            return make(*args)
        return build

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            found = _numpy_global(module, name)
            if name == "_reconstruct":
                return self._bounded("an array", found, _reconstruct_bytes)
            return found
        if (module, name) in _PLAIN_GLOBALS:
            found = _PLAIN_GLOBALS[(module, name)]
            if found is bytearray:
                return self._bounded("a bytearray", bytearray,
                                     lambda *a: a[0] if a and isinstance(a[0], int) else 0)
            return found
        raise _RefusedGlobal(f"{module}.{name}")


def _reconstruct_bytes(cls=None, shape=(0,), dtype=b"b", *rest) -> int:
    try:
        dims = [int(shape)] if np.ndim(shape) == 0 else [int(d) for d in shape]
        return int(np.prod(dims, dtype=object)) * max(1, np.dtype(dtype if not isinstance(dtype, bytes) else dtype.decode()).itemsize)
    except Exception:
        return 0


def _as_encoded_bytes(item) -> Optional[np.ndarray]:
    if isinstance(item, (bytes, bytearray)):
        return np.frombuffer(bytes(item), dtype=np.uint8)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.reshape(-1)
    return None


def load_bin(path: Union[str, Path], image_size: Optional[ImageSize] = None, name: Optional[str] = None) -> PairSet:
    """Read an insightface verification ``.bin``: images ``2i`` and ``2i+1`` form pair ``i``.

    Identical encoded images are stored once (LFW repeats some), so ``images`` may be fewer than
    ``2 * len(pairs)``. Images must share a size unless ``image_size`` is given.
    """
    path = Path(path)
    check_regular_file(path, "verification .bin")
    try:
        data = path.read_bytes()  # in memory: a length in the pickle cannot make a read allocate more
        content = _BinUnpickler(io.BytesIO(data), encoding="bytes", limit=len(data)).load()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except _TooLarge as exc:
        raise UserError(f"{path}: the pickle asks for {exc}, more than the {len(data)}-byte file could hold; "
                        f"not a verification .bin") from None
    except _RefusedGlobal as exc:
        raise UserError(
            f"{path}: refuses to load global {exc} (a verification .bin holds only images and labels; "
            "this pickle could run code)"
        ) from None
    except Exception as exc:  # truncated / corrupt pickles raise many exception types
        raise UserError(f"{path}: not a readable verification .bin (truncated or not a pickle: {exc})") from None

    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise UserError(f"{path}: expected a pickled (images, issame) pair, got {type(content).__name__}")
    bins, issame_list = content
    if not isinstance(bins, (list, tuple)) or not isinstance(issame_list, (list, tuple, np.ndarray)):
        raise UserError(f"{path}: expected (list of encoded images, list of bools), got "
                        f"({type(bins).__name__}, {type(issame_list).__name__})")
    if not bins:
        raise UserError(f"{path}: holds no images")
    if len(bins) % 2:
        raise UserError(f"{path}: {len(bins)} images, an odd count; pairs need 2 images each")
    if len(bins) != 2 * len(issame_list):
        raise UserError(f"{path}: {len(bins)} images for {len(issame_list)} labels; expected 2 images per label")
    try:
        issame = np.array([bool(x) for x in issame_list], dtype=bool)
    except (TypeError, ValueError):
        raise UserError(f"{path}: issame list holds non-boolean values") from None

    index_of: dict[bytes, int] = {}
    images: list[np.ndarray] = []
    labels: list[str] = []
    flat_index = np.empty(len(bins), dtype=np.int64)
    for i, item in enumerate(bins):
        data = _as_encoded_bytes(item)
        if data is None:
            raise UserError(f"{path}: image {i} is a {type(item).__name__}, not encoded image bytes")
        key = hashlib.blake2b(data.tobytes(), digest_size=16).digest()  # not the whole JPEG as key
        if key not in index_of:
            image = decode_image(data, f"{path}: image {i} (pair {i // 2})")
            index_of[key] = len(images)
            images.append(resize_image(image, image_size))
            labels.append(f"image {i}")
        flat_index[i] = index_of[key]
    return PairSet(
        name=name or path.stem,
        images=_stack_images(images, str(path), labels),
        pairs=flat_index.reshape(-1, 2),
        issame=issame,
    )


# ---------------------------------------------------------------------------------------------
# LFW directory + pairs.txt


def _parse_lfw_pairs(pairs_file: Path) -> tuple[list[tuple[int, str, int, str, int]], Optional[int]]:
    """Parse the official pairs.txt -> ((line number, name1, n1, name2, n2) per pair, the number of
    folds the header declares: ``nfolds npairs``; None for a one-number View 1 header)."""
    lines = read_text(pairs_file, "pairs file").splitlines()
    numbered = [(i + 1, line.split()) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise UserError(f"{pairs_file}: empty pairs file")
    header_no, header = numbered[0]
    try:
        counts = [int(x) for x in header]
    except ValueError:
        counts = []
    # "nfolds npairs" (View 2), or a single "npairs" (View 1 DevTrain/DevTest files).
    if len(counts) == 2:
        expected = counts[0] * 2 * counts[1]
    elif len(counts) == 1:
        expected = 2 * counts[0]
    else:
        raise UserError(f"{pairs_file}: line {header_no}: expected a header 'nfolds npairs', got {' '.join(header)!r}")

    pairs = []
    for line_no, fields in numbered[1:]:
        try:
            if len(fields) == 3:
                name, n1, n2 = fields
                pairs.append((line_no, name, int(n1), name, int(n2)))
            elif len(fields) == 4:
                name1, n1, name2, n2 = fields
                pairs.append((line_no, name1, int(n1), name2, int(n2)))
            else:
                raise ValueError
        except ValueError:
            raise UserError(
                f"{pairs_file}: line {line_no}: expected 'name n1 n2' or 'name1 n1 name2 n2', "
                f"got {' '.join(fields)!r}"
            ) from None
    if len(pairs) != expected:
        raise UserError(f"{pairs_file}: header (line {header_no}) promises {expected} pairs, found {len(pairs)}")
    if len(counts) == 2 and counts[0] < 1:
        raise UserError(f"{pairs_file}: line {header_no}: the header declares {counts[0]} folds; expected 'nfolds npairs' "
                        f"with nfolds >= 1")
    return pairs, (counts[0] if len(counts) == 2 else None)


def read_landmarks_file(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """``relative/path.jpg x1 y1 ... x5 y5`` per line (the seed projects' LFW landmark file) ->
    {path: 5×2 float array}; points in order left eye, right eye, nose, left and right mouth corner.
    Each entry is also found by its file name alone (LFW file names hold the person's name, so
    they are unique), as openvino's reader looks them up."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    for line_no, line in enumerate(read_text(path, "landmark file").splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        if len(fields) != 11:
            raise UserError(f"{path}: line {line_no}: expected an image path and 10 numbers, got {len(fields)} fields")
        try:
            values = np.asarray([float(v) for v in fields[1:]], np.float64)
        except ValueError:
            raise UserError(f"{path}: line {line_no}: landmark values must be numbers") from None
        if not np.isfinite(values).all() or np.abs(values).max() > 1e6:
            raise UserError(f"{path}: line {line_no}: landmark values must be finite pixel positions")
        out[fields[0]] = values.astype(np.float32).reshape(5, 2)
    for key in list(out):  # by file name too, unless two entries share one
        name = key.replace("\\", "/").rsplit("/", 1)[-1]
        if name != key:
            out.setdefault(name, out[key])
    return out


def _detected_crop(detector, image: np.ndarray, size: ImageSize, file: Path, hint: str = "") -> np.ndarray:
    """The largest face of a photo, aligned at ``size`` (`detect_faces`: the path `FaceEmbedder`
    and ``marginface verify`` take); none is one line naming the file."""
    faces = detect_faces(detector, image, size)
    if not faces:
        raise UserError(f"{file}: no face found to align{hint}")
    return faces[0].crop


def _aligner(root: Path, landmarks: Union[str, Path, None], detector, image_size: Optional[ImageSize],
             warn: bool = True):
    """image, relative path, file -> the face crop: by landmark file, by detector, or resized as is."""
    size = image_size or 112
    points = read_landmarks_file(landmarks) if landmarks else None
    warned = []

    def prepare(image: np.ndarray, rel: str, file: Path) -> np.ndarray:
        if points is not None:
            found = points.get(rel, points.get(file.name))  # "Name/Name_0001.jpg" or just "Name_0001.jpg"
            if found is None:
                raise UserError(f"{landmarks}: no landmarks for {rel}")
            return align_face(image, found, size)
        if detector is not None:
            return _detected_crop(detector, image, size, file, " (give a landmarks file instead)")
        if warn and not warned and image.shape[:2] != _hw(size):  # not already aligned crops: say so, once
            warned.append(True)
            print(f"warning: {root}: no landmarks.txt and no detector, so faces are used unaligned "
                  f"({image.shape[1]}x{image.shape[0]} photos resized to {_hw(size)[1]}x{_hw(size)[0]}); expect "
                  f"accuracy far below the aligned figure (add landmarks.txt, align by a detector, or run "
                  f"`marginface data align`)", file=sys.stderr, flush=True)
        return resize_image(image, image_size)

    return prepare


def _check_align(align: str, detector) -> None:
    if align not in ALIGN_MODES:
        raise UserError(f"align must be one of {', '.join(ALIGN_MODES)}, got {align!r}")
    if align == "detect" and detector is None:
        raise UserError("align='detect' needs a detector (marginface.data.detect.build_detector)")


def load_lfw_dir(
    root: Union[str, Path],
    pairs_file: Union[str, Path, None] = None,
    image_size: Optional[ImageSize] = None,
    name: Optional[str] = None,
    landmarks: Union[str, Path, None] = None,
    detector=None,
    *,
    align: str = "auto",
) -> PairSet:
    """Read an LFW-layout directory with the official ``pairs.txt`` (default ``root/pairs.txt``;
    ``pairs_file`` may live anywhere).

    Pairs keep the file's order, so consecutive folds match the official folds when
    ``nfolds`` equals the header's fold count. ``align`` (`ALIGN_MODES`): ``auto`` aligns the
    faces to the ArcFace template from a landmark file (``landmarks``, anywhere; default
    ``root/landmarks.txt`` when present), else by ``detector`` (an object with ``detect(rgb) ->
    faces``) when given, else reads them as they are (already aligned crops) resized to
    ``image_size``; ``landmarks`` requires the landmark file; ``detect`` runs the detector on every
    image (a landmark file is not used); ``none`` resizes the images as they are.
    """
    _check_align(align, detector)
    root = Path(root)
    pairs_path = Path(pairs_file) if pairs_file is not None else root / "pairs.txt"
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    if not pairs_path.is_file():
        raise UserError(f"{pairs_path}: pairs file not found")
    if landmarks is None and align in ("auto", "landmarks") and (root / "landmarks.txt").is_file():
        landmarks = root / "landmarks.txt"
    if align == "landmarks" and landmarks is None:
        raise UserError(f"{root}: no landmarks.txt to align by (align=landmarks); name the landmark file "
                        f"(marginface eval --landmarks FILE, data.val_landmarks in training)")
    if align in ("detect", "none"):
        landmarks = None
    prepare = _aligner(root, landmarks, detector if align in ("auto", "detect") else None, image_size,
                       warn=align != "none")
    entries, n_folds = _parse_lfw_pairs(pairs_path)

    index_of: dict[Path, int] = {}
    images: list[np.ndarray] = []
    labels: list[str] = []
    pairs = np.empty((len(entries), 2), dtype=np.int64)
    issame = np.empty(len(entries), dtype=bool)
    for k, (line_no, name1, n1, name2, n2) in enumerate(entries):
        for j, (person, number) in enumerate(((name1, n1), (name2, n2))):
            file = root / person / f"{person}_{number:04d}.jpg"
            if file not in index_of:
                if not file.is_file():
                    raise UserError(f"{pairs_path}: line {line_no}: image {file} does not exist")
                index_of[file] = len(images)
                images.append(prepare(read_image(file), f"{person}/{file.name}", file))
                labels.append(str(file))
            pairs[k, j] = index_of[file]
        issame[k] = name1 == name2
    return PairSet(
        name=name or root.resolve().name,
        images=_stack_images(images, str(root), labels),
        pairs=pairs,
        issame=issame,
        n_folds=n_folds,
    )


# ---------------------------------------------------------------------------------------------
# pairs CSV

_YES = {"yes", "y", "true", "1", "same"}
_NO = {"no", "n", "false", "0", "different"}


def read_pair_list_csv(path: Union[str, Path], name: Optional[str] = None) -> PairList:
    """Read a pairs CSV (``file_x,file_y`` and optionally ``Decision`` Yes/No or ``same`` 1/0)
    into a `PairList` of paths resolved against the CSV's folder; images are not opened."""
    path = Path(path)
    text = read_text(path, "pairs CSV")
    reader = csv.DictReader(io.StringIO(text))
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise UserError(f"{path}:1: bad CSV header ({exc})") from None
    reader.fieldnames = columns
    missing = [c for c in ("file_x", "file_y") if c not in columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {columns}")
    label_column = next((c for c in ("Decision", "same") if c in columns), None)

    paths_a: list[Path] = []
    paths_b: list[Path] = []
    labels: list[bool] = []
    for line_no, row in csv_rows(text, str(path), reader):
        file_x, file_y = (row.get("file_x") or "").strip(), (row.get("file_y") or "").strip()
        if not file_x or not file_y:
            raise UserError(f"{path}: line {line_no}: empty file_x or file_y")
        paths_a.append(path.parent / file_x)
        paths_b.append(path.parent / file_y)
        if label_column is not None:
            value = (row.get(label_column) or "").strip().lower()
            if value not in _YES | _NO:
                raise UserError(f"{path}: line {line_no}: {label_column} must be Yes/No or 1/0, got {value!r}")
            labels.append(value in _YES)
    if not paths_a:
        raise UserError(f"{path}: no pairs")
    issame = np.array(labels, dtype=bool) if label_column is not None else None
    return PairList(name=name or path.stem, paths_a=paths_a, paths_b=paths_b, issame=issame)


ALIGNED_CROP_SIZES = ((112, 112), (112, 96))  # (h, w) of the ArcFace and SphereFace aligned crops


def looks_aligned(image: np.ndarray, image_size: Optional[ImageSize]) -> bool:
    """Whether an image is already an aligned face crop: the model's input size, or one of the
    field's aligned crop sizes (`ALIGNED_CROP_SIZES`). A photo of any other size must be detected
    and aligned first; resizing it whole gives meaningless scores."""
    shape = tuple(image.shape[:2])
    return shape in ALIGNED_CROP_SIZES or (image_size is not None and shape == _hw(image_size))


def load_pairs_csv(
    path: Union[str, Path], image_size: Optional[ImageSize] = None, name: Optional[str] = None, *,
    detector=None, allow_unaligned: bool = False, align: str = "auto",
) -> PairSet:
    """Read a pairs CSV and its (aligned) images into a `PairSet`; unlabelled CSVs give
    ``issame=None``.

    With ``image_size`` (evaluation) and ``align="auto"`` every image must look like an aligned
    face crop (`looks_aligned`): a photo of another size is detected and aligned by ``detector``
    when one is given, else refused with one line naming it and the option that aligns;
    ``align="detect"`` runs the detector on every image; ``align="none"`` (or
    ``allow_unaligned=True``) resizes photos whole instead."""
    _check_align(align, detector)
    if align == "landmarks":
        raise UserError(f"{path}: a pairs CSV has no landmark file; align by landmarks applies to LFW directories "
                        f"(use detect)")
    allow_unaligned = allow_unaligned or align == "none"
    pair_list = read_pair_list_csv(path, name)
    index_of: dict[Path, int] = {}
    images: list[np.ndarray] = []
    labels: list[str] = []
    pairs = np.empty((len(pair_list), 2), dtype=np.int64)
    for k, pair in enumerate(zip(pair_list.paths_a, pair_list.paths_b)):
        for j, file in enumerate(pair):
            key = file.resolve()
            if key not in index_of:
                if not file.is_file():
                    raise UserError(f"{path}: pair {k + 1}: image {file} does not exist")
                index_of[key] = len(images)
                image = read_image(file)
                if align == "detect":
                    image = _detected_crop(detector, image, image_size or 112, file)
                elif image_size is not None and not allow_unaligned and not looks_aligned(image, image_size):
                    image = _align_photo(image, file, path, image_size, detector)
                images.append(resize_image(image, image_size))
                labels.append(str(file))
            pairs[k, j] = index_of[key]
    return PairSet(
        name=pair_list.name,
        images=_stack_images(images, str(path), labels),
        pairs=pairs,
        issame=pair_list.issame,
    )


def _align_photo(image: np.ndarray, file: Path, csv_path, image_size: ImageSize, detector) -> np.ndarray:
    """The largest face of a photo aligned to ``image_size`` by ``detector``; without one, the
    refusal that names the photo and the option that aligns."""
    h, w = _hw(image_size)
    if detector is None:
        raise UserError(
            f"{file}: a {image.shape[1]}x{image.shape[0]} photo, not an aligned {w}x{h} face crop; evaluating it would "
            f"squash the whole photo. Pass --align detect to `marginface eval` (data.val_align: detect in training) "
            f"to detect and align each face, or use `marginface verify --pairs {csv_path} --model M`, or align the "
            f"images first (`marginface data align`)")
    return _detected_crop(detector, image, (h, w), file)


# ---------------------------------------------------------------------------------------------
# dispatch and sampling


def _given_file(path: Union[str, Path, None], label: str) -> Optional[Path]:
    """A file the user named outside a set's folder (``pairs_file``, ``landmarks``); missing is one
    line naming where it was given (``label``: a config key or an option) and the path tried."""
    if path is None or str(path) == "":
        return None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{label}: {path} {'is not a file' if path.exists() else 'not found'}")
    return path


def load_pair_set(path: Union[str, Path], image_size: Optional[ImageSize] = None, *, detector=None,
                  align: str = "auto", sample_pairs: int = 0, seed: int = 0,
                  pairs_file: Union[str, Path, None] = None, landmarks: Union[str, Path, None] = None,
                  file_labels: tuple[str, str] = ("pairs file", "landmark file")) -> PairSet:
    """Load any supported pair set: ``.bin``, a directory with ``pairs.txt`` (LFW layout), a
    pairs ``.txt`` (images beside it), a ``.csv``, or with ``sample_pairs`` > 0 an identity folder
    (``root/<identity>/*.jpg``) from which that many balanced pairs are sampled (seeded; half
    same, half different), the seed FaceID projects' validation.

    ``pairs_file`` and ``landmarks`` name an LFW directory's pairs and landmark files kept
    elsewhere (they apply to directories and pairs ``.txt`` sets; a missing one is an error naming
    ``file_labels``). ``align`` (`ALIGN_MODES`) says how faces are aligned; ``detect`` needs
    ``detector``. A ``.bin`` holds aligned crops and is read as it is."""
    _check_align(align, detector)
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: pair set not found")
    pairs_file = _given_file(pairs_file, file_labels[0])
    landmarks = _given_file(landmarks, file_labels[1])
    lfw = dict(image_size=image_size, detector=detector, align=align, landmarks=landmarks)
    if path.is_dir():
        if pairs_file is not None or (path / "pairs.txt").is_file():
            return load_lfw_dir(path, pairs_file=pairs_file, **lfw)
        if sample_pairs > 0:
            return _sampled_folder_pairs(path, image_size, sample_pairs, seed, detector=detector, align=align)
        raise UserError(f"{path}: directory has no pairs.txt; not an LFW-style pair set (to sample pairs from an "
                        f"identity folder: --sample-pairs N with marginface eval, data.val_sample_pairs in training)")
    suffix = path.suffix.lower()
    if suffix == ".bin":
        return load_bin(path, image_size)
    if suffix == ".csv":
        return load_pairs_csv(path, image_size, detector=detector, align=align)
    if suffix == ".txt":
        return load_lfw_dir(path.parent, pairs_file=path, **lfw)
    raise UserError(f"{path}: unknown pair-set format (expected .bin, .csv, pairs .txt or an LFW directory)")


def _sampled_folder_pairs(root: Path, image_size: Optional[ImageSize], n_pairs: int, seed: int, *, detector=None,
                          align: str = "auto") -> PairSet:
    """``n_pairs`` balanced pairs sampled from an identity folder (`sample_pair_indices`, seeded);
    only the images the pairs use are read (and, with ``align="detect"``, detected and aligned)."""
    if align == "landmarks":
        raise UserError(f"{root}: an identity folder has no landmark file; align by landmarks applies to LFW "
                        f"directories (use detect)")
    src = FolderSource(root)
    pairs, issame = sample_pair_indices(src.labels, n_pairs, seed)
    used, remapped = np.unique(pairs, return_inverse=True)
    images = []
    for i in used:
        image = src.read(int(i))
        if align == "detect":
            image = _detected_crop(detector, image, image_size or 112, src.paths[int(i)])
        images.append(resize_image(image, image_size))
    return PairSet(name=root.resolve().name, images=_stack_images(images, str(root), [str(src.paths[int(i)]) for i in used]),
                   pairs=remapped.reshape(-1, 2), issame=issame)
