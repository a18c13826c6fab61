"""Library side of ``marginface data ...``: inspect a dataset, convert between formats, align photos.

Each function returns a JSON-ready dict so the CLI can print it as text or ``--json``.
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from marginface.data.align import align_face
from marginface.data.images import read_image
from marginface.data.images import imwrite_rgb
from marginface.data.recordio import write_pack
from marginface.data.sources import (
    IMAGE_EXTENSIONS,
    FolderSource,
    ListSource,
    open_source,
    parse_list_line,
    few_identities_warning,
    source_item_name,
)
from marginface.data.verification import load_pair_set
from marginface.errors import UserError
from marginface.io.atomic import atomic_write, atomic_write_bytes, atomic_write_text, ensure_dir

_SOURCE_FORMATS = {
    "RecordIOSource": "recordio",
    "FolderSource": "folder",
    "ListSource": "list",
    "VGGFace2Source": "vggface2",
    "SyntheticSource": "synthetic",
}
_HISTOGRAM_EDGES = (1, 2, 5, 10, 20, 50, 100, 200, 500)


def _looks_like_pair_set(path: Path) -> bool:
    """``.bin``, pairs ``.csv``, an LFW directory, or an LFW-style ``pairs.txt`` (not a training list)."""
    if path.is_dir():
        return (path / "pairs.txt").is_file() and not (path / "train.rec").is_file()
    suffix = path.suffix.lower()
    if suffix in {".bin", ".csv"}:
        return True
    if suffix == ".txt" and path.is_file():
        if path.name == "pairs.txt":
            return True
        with open(path, encoding="utf-8", errors="replace") as f:
            first_line = next((line for line in f if line.strip()), "")
        listed = parse_list_line(first_line)
        if len(listed) == 2 and Path(listed[0]).suffix.lower() in IMAGE_EXTENSIONS:
            return False  # a training list: image path + label
        # LFW headers are "folds pairs"; pair rows have 3 or 4 fields
        first = first_line.split()
        return (len(first) == 2 and all(v.isdigit() for v in first)) or len(first) in (3, 4)
    return False


def images_per_identity(labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Summary and histogram of how many images each identity has."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    histogram: dict[str, int] = {}
    edges = list(_HISTOGRAM_EDGES) + [None]
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = int(((counts >= lo) & (counts < hi)).sum()) if hi else int((counts >= lo).sum())
        if n:
            histogram[f"{lo}" if hi == lo + 1 else (f"{lo}-{hi - 1}" if hi else f"{lo}+")] = n
    return {
        "min": int(counts.min()),
        "max": int(counts.max()),
        "mean": round(float(counts.mean()), 2),
        "median": float(np.median(counts)),
        "empty_identities": int((counts == 0).sum()),
        "histogram": histogram,
    }


def _size_key(image: np.ndarray) -> str:
    return f"{image.shape[0]}x{image.shape[1]}"


def inspect_path(path: str | Path, max_check: int | None = 100_000) -> dict[str, Any]:
    """``{"format", "identities", "images", "pairs", "unreadable", ...}`` for any dataset path.

    Training sources decode every image (an evenly spaced sample of ``max_check`` when larger) to
    list the unreadable ones; pair sets are loaded through ``verification.load_pair_set``.
    """
    path = Path(path)
    if str(path) != "synthetic" and not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if str(path) != "synthetic" and _looks_like_pair_set(path):
        pair_set = load_pair_set(path)
        issame = pair_set.issame
        return {
            "format": "pairs-bin" if path.suffix == ".bin" else ("pairs-csv" if path.suffix == ".csv" else "lfw"),
            "identities": None,
            "images": int(len(pair_set.images)),
            "pairs": int(len(pair_set.pairs)),
            "unreadable": [],
            "positive_pairs": None if issame is None else int(issame.sum()),
            "negative_pairs": None if issame is None else int((~issame).sum()),
            "image_sizes": {_size_key(pair_set.images[0]): int(len(pair_set.images))},
        }
    source = open_source(path)  # a dataset with < 2 identities: one warning line on stderr
    n = len(source)
    check = np.arange(n) if max_check is None or n <= max_check else np.linspace(0, n - 1, max_check).astype(np.int64)
    unreadable: list[str] = []
    sizes: Counter[str] = Counter()
    for i in check.tolist():
        try:
            sizes[_size_key(source.read(i))] += 1
        except UserError as e:
            unreadable.append(str(e))
    return {
        "format": _SOURCE_FORMATS.get(type(source).__name__, type(source).__name__),
        "identities": int(source.num_classes),
        "images": int(n),
        "pairs": None,
        "unreadable": unreadable,
        "checked_images": int(check.size),
        "images_per_identity": images_per_identity(source.labels, source.num_classes),
        "image_sizes": dict(sizes.most_common(10)),
        "description": source.describe(),
        "warnings": [w for w in [few_identities_warning(source)] if w],
    }


def _encoded(image_rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise UserError("JPEG encoding failed")
    return buf.tobytes()


def _is_jpeg_or_png(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"


def source_to_pack(source: Any, dst: Path, image_size: int | None = None, quality: int = 95) -> dict[str, Any]:
    """Any training source -> insightface pack; original JPEG/PNG bytes are kept when no resize is needed."""
    order = np.argsort(np.asarray(source.labels), kind="stable")  # packs hold identities as key ranges
    skipped: list[str] = []
    shape: list[tuple[int, int]] = []  # (h, w) of the pack, fixed by the first readable image
    copied = 0

    def items() -> Iterator[tuple[bytes, int]]:
        nonlocal copied
        for i in order.tolist():
            try:
                image = source.read(i)
            except UserError as e:
                skipped.append(str(e))
                continue
            if not shape:
                shape.append((image_size, image_size) if image_size else image.shape[:2])
            h, w = shape[0]
            raw = source.read_bytes(i) if isinstance(source, (FolderSource, ListSource)) else None
            if image.shape[:2] == (h, w) and raw is not None and _is_jpeg_or_png(raw):
                copied += 1
                yield raw, int(source.labels[i])
            else:
                if image.shape[:2] != (h, w):
                    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
                yield _encoded(image, quality), int(source.labels[i])

    # the property line needs the size, known only after the first image: write with a guess, fix after
    write_pack(dst, items(), int(source.num_classes), (112, 112))
    if not shape:
        raise UserError(f"{source.describe()}: no readable images to convert")
    atomic_write_text(dst / "property", f"{int(source.num_classes)},{shape[0][0]},{shape[0][1]}\n")
    return {
        "format": "recordio", "path": str(dst), "images": len(order) - len(skipped),
        "identities": int(source.num_classes), "copied_unchanged": copied, "skipped": skipped,
    }


def pack_to_folder(source: Any, dst: Path) -> dict[str, Any]:
    """RecordIO pack -> ``dst/<label>/<key>.jpg`` (bytes copied; zero-padded labels keep the order)."""
    width = len(str(max(source.num_classes - 1, 0)))
    skipped: list[str] = []
    for i in range(len(source)):
        try:
            data = source.read_bytes(i)
        except UserError as e:
            skipped.append(str(e))
            continue
        if not _is_jpeg_or_png(data):
            skipped.append(f"{source_item_name(source, i)}: payload is not a JPEG or PNG image")
            continue
        folder = dst / f"{int(source.labels[i]):0{width}d}"
        ensure_dir(folder)
        suffix = ".png" if data.startswith(b"\x89PNG") else ".jpg"
        atomic_write_bytes(folder / f"{int(source.keys[i])}{suffix}", data, durable=False)
    return {"format": "folder", "path": str(dst), "images": len(source) - len(skipped),
            "identities": int(source.num_classes), "skipped": skipped}


def pair_set_to_folder(path: Path, dst: Path) -> dict[str, Any]:
    """Verification set -> ``dst/images/NNNNN.png`` + ``dst/pairs.csv`` (file_x, file_y, Decision)."""
    pair_set = load_pair_set(path)
    ensure_dir(dst / "images")
    for i, image in enumerate(pair_set.images):  # PNG: the set's images are kept losslessly
        imwrite_rgb(dst / "images" / f"{i:05d}.png", image)
    with atomic_write(dst / "pairs.csv", "w") as f:
        writer = csv.writer(f)
        writer.writerow(["file_x", "file_y"] + (["Decision"] if pair_set.issame is not None else []))
        for k, (a, b) in enumerate(pair_set.pairs.tolist()):
            row = [f"images/{a:05d}.png", f"images/{b:05d}.png"]
            if pair_set.issame is not None:
                row.append("Yes" if pair_set.issame[k] else "No")
            writer.writerow(row)
    return {"format": "pairs-csv", "path": str(dst / "pairs.csv"), "images": int(len(pair_set.images)),
            "pairs": int(len(pair_set.pairs))}


def convert(src: str | Path, dst: str | Path, image_size: int | None = None, quality: int = 95) -> dict[str, Any]:
    """Convert between formats.

    * folder / list / VGGFace2 / synthetic -> RecordIO pack (``dst/train.rec``, ``.idx``, ``property``)
    * RecordIO pack -> image folder ``dst/<label>/<key>.jpg``
    * verification ``.bin`` (any pair set) -> ``dst/images/*.png`` + ``dst/pairs.csv``
    """
    src_path, dst_path = Path(src), Path(dst)
    if dst_path.exists() and (not dst_path.is_dir() or any(dst_path.iterdir())):
        raise UserError(f"{dst_path}: output exists and is not an empty directory")
    if str(src) != "synthetic" and _looks_like_pair_set(src_path):
        return pair_set_to_folder(src_path, dst_path)
    source = open_source(src)
    ensure_dir(dst_path)
    if type(source).__name__ == "RecordIOSource":
        return pack_to_folder(source, dst_path)
    return source_to_pack(source, dst_path, image_size, quality)


_FORMAT_NAMES = {"recordio": "RecordIO pack", "folder": "image folder", "pairs-csv": "pairs CSV + images"}


def format_convert_summary(src: str | Path, info: dict[str, Any], max_skipped: int = 5) -> str:
    """The text `marginface data convert` prints: one line saying what was written, then the
    skipped images (at most ``max_skipped``, then how many more)."""
    what = _FORMAT_NAMES.get(info.get("format", ""), str(info.get("format")))
    parts = [f"{info.get('images', 0)} images"]
    if info.get("identities") is not None:
        parts[0] += f" of {info['identities']} identities"
    if info.get("pairs") is not None:
        parts.append(f"{info['pairs']} pairs")
    if info.get("copied_unchanged") is not None:
        parts.append(f"{info['copied_unchanged']} copied without re-encoding")
    skipped = list(info.get("skipped") or [])
    if skipped:
        parts.append(f"{len(skipped)} unreadable skipped")
    lines = [f"converted {src} -> {info.get('path')} ({what}): " + ", ".join(parts)]
    lines += [f"  skipped {item}" for item in skipped[:max_skipped]]
    if len(skipped) > max_skipped:
        lines.append(f"  ... and {len(skipped) - max_skipped} more (--json lists them all)")
    return "\n".join(lines)


def align_folder(src: str | Path, dst: str | Path, detector: Any, size: int | tuple[int, int] = 112,
                 progress: Any = None) -> dict[str, Any]:
    """Detect and align every image under ``src`` into ``dst`` (same relative paths).

    Images with several faces use the largest; those with none, and unreadable files, are listed
    (all of them) and not written. ``progress(done, total)`` is called after each image.
    """
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.is_dir():
        raise UserError(f"{src_path}: not a directory")
    files = sorted(p for p in src_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"{src_path}: no images found")
    report: dict[str, Any] = {"images": len(files), "aligned": 0, "no_face": [], "multiple_faces": [], "unreadable": []}
    for done, file in enumerate(files, 1):
        _align_one(file, src_path, dst_path, detector, size, report)
        if progress is not None:
            progress(done, len(files))
    return report


def _align_one(file: Path, src_path: Path, dst_path: Path, detector: Any, size, report: dict) -> None:
    rel = file.relative_to(src_path)
    try:
        image = read_image(file)
    except UserError as e:
        report["unreadable"].append(str(e))
        return
    faces = detector.detect(image)
    if not faces:
        report["no_face"].append(str(rel))
        return
    if len(faces) > 1:
        report["multiple_faces"].append(f"{rel} ({len(faces)} faces, largest used)")
    crop = align_face(image, faces[0].landmarks, size=size)
    out = dst_path / rel
    ensure_dir(out.parent)
    imwrite_rgb(out, crop)  # UserError naming the file when it cannot be written
    report["aligned"] += 1
