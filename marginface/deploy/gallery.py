"""Face galleries: enrolment from identity folders, exact cosine search, and the legacy ``.npz`` file.

The gallery file is chosen by suffix (`open_gallery`): ``.sqlite`` / ``.db`` is the SQLite store
(`marginface.deploy.gallery_store.GalleryStore`: one row per enrolled image, safe for several
processes, `enroll_store` adds to it); ``.npz`` is the legacy format, read for search (and by
`gallery_store.convert_npz`) but never enrolled into, because it is rewritten whole.

`Gallery` is the in-memory form either file loads into (``Gallery.load``: an ``.npz``, or a
snapshot of an SQLite gallery's templates): ``names``, ``embeddings`` (K×D float32 unit
templates: per identity the mean of the L2-normalised image embeddings, renormalised), ``counts``,
``model_fingerprint`` + ``model_probe`` (to refuse a search with a different model). The ``.npz``
is written atomically and read without pickle.

Search is exact cosine similarity in numpy, chunked (``chunk_size`` rows at a time, so a
million-entry gallery never needs a K×Q similarity matrix in memory) with a per-chunk
``argpartition`` top-k merged across chunks. With ``index="faiss"`` (or ``"auto"`` on large
galleries when the ``faiss`` package is installed) an exact ``IndexFlatIP`` does the same.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

from marginface.data.sources import list_image_files
# the in-memory gallery and its search live with the SQLite store (each loads into the other);
# re-exported here, where they have always been imported from
from marginface.deploy.gallery_store import (  # noqa: F401
    FAISS_AUTO_MIN, FORMAT, PROBE_MIN_COSINE, Gallery, GalleryStore, _faiss, check_probe, is_sqlite_path, top_k_cosine,
)
from marginface.deploy.embedder import FaceEmbedder, face_info
from marginface.errors import UserError
from marginface.inference import ModelInfo


# ---------------------------------------------------------------------------------------------- opening
def open_gallery(path: Union[str, Path]):
    """A gallery to search, by suffix: ``.sqlite``/``.db`` -> `GalleryStore`, ``.npz`` -> legacy `Gallery`.

    Both have ``check_model``, ``search``-style ``matches``, ``list`` and ``len``."""
    path = Path(path)
    if is_sqlite_path(path):
        return GalleryStore(path)
    if path.suffix.lower() == ".npz":
        return Gallery.load(path)
    raise UserError(f"{path}: gallery files end in .sqlite or .db (or .npz, the legacy read-only format)")


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- enrolment
def _identity_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory (expected one sub-folder of images per identity)")
    identity_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not identity_dirs:
        raise UserError(f"{folder}: no identity folders (expected {folder}/<name>/*.jpg)")
    return identity_dirs


def embed_identities(embedder, folder: Union[str, Path], *, skip_no_face: bool = False, skip=None,
                     progress=None):
    """Yield ``(name, files, embeddings n×D unit, hashes)`` per identity folder of ``folder``, plus
    the skipped images through ``skipped`` entries of the result: with ``skip_no_face`` every image
    that cannot be used (no face, unreadable, not an image) is listed there and the others go on;
    without it the first such image is the error.

    ``skip(name, sha256) -> bool`` leaves images out before they are embedded (already enrolled).
    Returns a generator; its items are dicts with ``name``, ``files``, ``embeddings``, ``sha256``,
    ``skipped`` (list of {"file", "reason"}), ``already`` (images skipped by ``skip``).
    """
    for d in _identity_dirs(Path(folder)):
        files, hashes, crops, skipped, already = [], [], [], [], 0
        for f in list_image_files(d, recursive=False):  # one identity's photos, sorted
            try:
                digest = file_sha256(f)
            except OSError as exc:
                if not skip_no_face:
                    raise UserError(f"{f}: cannot be read ({exc.strerror or exc})") from None
                skipped.append({"file": str(f), "reason": f"cannot be read ({exc.strerror or exc})"})
                continue
            if skip is not None and skip(d.name, digest):
                already += 1
                continue
            try:
                crops.append(embedder.largest_face(f).crop)
            except UserError as exc:
                if not skip_no_face:
                    raise
                reason = str(exc)
                reason = reason[len(str(f)) + 2:] if reason.startswith(f"{f}: ") else reason
                skipped.append({"file": str(f), "reason": reason})
                continue
            files.append(f)
            hashes.append(digest)
        emb = embedder.embed_crops(np.stack(crops)) if crops else None
        if progress is not None:
            progress(d.name, len(crops))
        yield {"name": d.name, "files": files, "embeddings": emb, "sha256": hashes, "skipped": skipped,
               "already": already}


def skipped_summary(skipped: list, shown: int = 3) -> str:
    """`` (N images skipped: a.jpg: no face found, ... and K more)`` for an error line; "" for none."""
    if not skipped:
        return ""
    first = "; ".join(f"{item['file']}: {item['reason']}" for item in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f" ({len(skipped)} image(s) skipped: {first}{more})"


def _model_name(embedder) -> str:
    return str(ModelInfo.of(embedder.model).source or type(embedder.model).__name__)


def enroll(embedder, folder: Union[str, Path], *, progress=None, min_images: int = 1,
           skip_no_face: bool = False) -> tuple[Gallery, dict]:
    """Build an in-memory gallery (one template per identity) from ``folder/<identity>/*`` with a `FaceEmbedder`.

    Returns ``(gallery, report)``; the report lists ``skipped`` images (no face, when
    ``skip_no_face``) and empty identities. Without ``skip_no_face`` an image without a face is
    an error naming it. `enroll_store` adds the same images to an SQLite gallery instead.
    """
    folder = Path(folder)
    names, vectors, counts = [], [], []
    skipped: list[dict] = []
    empty: list[str] = []
    for item in embed_identities(embedder, folder, skip_no_face=skip_no_face, progress=progress):
        skipped += item["skipped"]
        if len(item["files"]) < min_images:
            empty.append(item["name"])
            continue
        centre = item["embeddings"].astype(np.float64).mean(0)
        norm = np.linalg.norm(centre)
        names.append(item["name"])
        vectors.append((centre / (norm if norm > 0 else 1.0)).astype(np.float32))
        counts.append(len(item["files"]))
    if not names:
        raise UserError(f"{folder}: no identity with a usable face image" + skipped_summary(skipped))
    fingerprint, probe = embedder.fingerprint()
    gallery = Gallery(np.array(names), np.stack(vectors), np.array(counts), fingerprint, probe, _model_name(embedder),
                      getattr(embedder, "normalize", "") or "")
    return gallery, {"identities": len(names), "images": int(sum(counts)), "skipped": skipped,
                     "empty_identities": empty}


def check_enroll_target(db: Union[str, Path], folder: Union[str, Path, None] = None) -> None:
    """UserError for a gallery file one cannot enroll into (checked before any model loads):
    a legacy ``.npz``, another suffix, a file that is not our SQLite gallery, or a bad ``folder``."""
    db = Path(db)
    if db.suffix.lower() == ".npz":
        raise UserError(f"{db}: .npz galleries are read-only (legacy); enroll into a .sqlite gallery "
                        f"(`marginface gallery convert {db} {db.with_suffix('.sqlite')}` keeps its identities)")
    if not is_sqlite_path(db):
        raise UserError(f"{db}: gallery files end in .sqlite or .db")
    if folder is not None:
        _identity_dirs(Path(folder))  # bad folders fail before the gallery file is created
    if db.is_file() and db.stat().st_size > 0:
        GalleryStore(db).close()  # not SQLite / another format version: refused now


def enroll_store(embedder, folder: Union[str, Path], db: Union[str, Path], *, replace: bool = False,
                 skip_no_face: bool = False, progress=None) -> dict:
    """Add ``folder/<identity>/*`` to the SQLite gallery ``db`` (created when missing) in one transaction.

    Images already enrolled under the same identity (same file bytes) are not embedded again
    and add nothing; ``replace=True`` replaces every row of the identities in ``folder``. The
    embedder must be the gallery's model (checked before anything is embedded).
    """
    db, folder = Path(db), Path(folder)
    check_enroll_target(db, folder)
    fingerprint, probe = embedder.fingerprint()
    skip, existing = None, None  # skip: already-enrolled images (set below for an existing gallery)
    if db.is_file() and db.stat().st_size > 0:  # an existing gallery: same model, and what it already holds
        existing = GalleryStore(db)
        existing.check_model(fingerprint, probe, embedder=embedder)
        if not replace:
            hashes_of: dict[str, set] = {}

            def skip(name: str, digest: str) -> bool:
                if name not in hashes_of:
                    hashes_of[name] = set(existing.rows(name)["sha256"])
                return digest in hashes_of[name]
    names, vectors, sources, hashes = [], [], [], []
    skipped: list[dict] = []
    empty: list[str] = []
    already = 0
    for item in embed_identities(embedder, folder, skip_no_face=skip_no_face, progress=progress, skip=skip):
        skipped += item["skipped"]
        already += item["already"]
        if not item["files"]:
            if not item["already"]:
                empty.append(item["name"])
            continue
        names += [item["name"]] * len(item["files"])
        vectors.append(item["embeddings"])
        sources += [str(f) for f in item["files"]]
        hashes += item["sha256"]
    if existing is not None:
        existing.close()
    if not names and not already:
        raise UserError(f"{folder}: no identity with a usable face image" + skipped_summary(skipped))
    identities = sorted(set(names))
    with GalleryStore(db, create=True) as store:  # created only now: a failed enrolment leaves no empty file
        added = 0
        if names:
            result = store.add(names, np.concatenate(vectors), sources=sources, sha256=hashes,
                               fingerprint=fingerprint, probe=probe, model_name=_model_name(embedder),
                               replace=replace, normalize=getattr(embedder, "normalize", "") or "")
            added, already = result["added"], already + result["already_enrolled"]
        return {"identities": len(identities), "images": len(names), "added": added, "already_enrolled": already,
                "replace": replace, "skipped": skipped, "empty_identities": empty, "db": str(db),
                "dim": store.dim, "model_fingerprint": store.model_fingerprint, "gallery_identities": len(store)}


# ---------------------------------------------------------------------------------------------- deciding
UNKNOWN = "unknown"  # what text output prints for a face below the threshold (``identity`` is None)


def decide(matches: list[dict], threshold: float) -> dict:
    """Apply the verification threshold to a search's matches (best first):
    ``{"identity": best name or None, "known": bool, "similarity": best or None, "threshold",
    "matches": [... each with "known"]}``. A best match at or below ``threshold`` is unknown."""
    rows = [{**m, "known": bool(m["similarity"] > threshold)} for m in matches]
    best = rows[0] if rows else None
    known = bool(best and best["known"])
    return {"identity": best["identity"] if known else None, "known": known,
            "similarity": None if best is None else float(best["similarity"]), "threshold": float(threshold),
            "matches": rows}


def search_face(embedder, gallery, image, *, top_k: int = 5, threshold: Optional[float] = None,
                index: str = "auto", face: Union[str, int] = "largest") -> dict:
    """Who is the face in ``image``? `decide` of the gallery's ``top_k`` matches for one face of the
    photo (the largest, or ``face`` = index), plus ``face`` (`face_info`: which face was used) and
    ``threshold_source``. ``threshold``: default the embedder's (the model's, else the default)."""
    picked = embedder.pick_face(image, face)
    query = embedder.embed_crops(picked[1].crop[None])[0]
    result = decide(gallery.matches(query, top_k, index=index),
                    embedder.threshold if threshold is None else float(threshold))
    result["threshold_source"] = embedder.threshold_source if threshold is None else "given"
    result["face"] = face_info(*picked)
    return result


def identify_folder(known: Union[str, Path, Gallery, GalleryStore], unknown_dir: Union[str, Path], *, model,
                    threshold: Optional[float] = None, top_k: int = 1, recursive: bool = False,
                    **options) -> dict:
    """Name the people in a folder of photos (``face_recognition known/ unknown/``).

    ``known``: a folder of identity sub-folders (``known/<name>/*.jpg``, enrolled in memory; images
    without a face are skipped and listed) or a gallery (a file for `open_gallery`, or an open one).
    ``model``: a `FaceEmbedder` or a model path (``options``: ``normalize``, ``detector_weights``,
    ``flip``, ``trust_code``). Returns ``{"rows": [...], "threshold", "threshold_source", "known",
    "unknown_dir", "identities", "skipped"}`` with one row per photo of ``unknown_dir`` (sorted):
    ``{"file", "identity" (None below the threshold), "known", "similarity", "face", "matches"}``;
    a photo without a face gets ``identity`` None, ``known`` False and ``error``.
    """
    embedder = model if isinstance(model, FaceEmbedder) else FaceEmbedder(model, **options)
    unknown_dir = Path(unknown_dir)
    if not unknown_dir.is_dir():
        raise UserError(f"{unknown_dir}: not a directory (expected the photos to identify)")
    photos = list_image_files(unknown_dir, recursive=recursive)
    if not photos:
        raise UserError(f"{unknown_dir}: no images found")
    skipped: list[dict] = []
    if isinstance(known, (str, Path)) and Path(known).is_dir():
        gallery, report = enroll(embedder, known, skip_no_face=True)  # enrolled here, by this model
        skipped, where = report["skipped"], str(known)
    else:
        gallery, where = (known, "gallery") if isinstance(known, (Gallery, GalleryStore)) else \
            (open_gallery(known), str(known))
        gallery.check_model(*embedder.fingerprint(), where=where, embedder=embedder)  # enrolled elsewhere: same model?
    rows = []
    for photo in photos:
        try:
            found = search_face(embedder, gallery, photo, top_k=top_k, threshold=threshold)
        except UserError as exc:
            if "no face" not in str(exc):
                raise
            rows.append({"file": _relative(photo, unknown_dir), "identity": None, "known": False,
                         "similarity": None, "face": None, "matches": [], "error": "no face found"})
            continue
        rows.append({"file": _relative(photo, unknown_dir), "identity": found["identity"], "known": found["known"],
                     "similarity": found["similarity"], "face": found["face"], "matches": found["matches"]})
    return {"rows": rows, "threshold": embedder.threshold if threshold is None else float(threshold),
            "threshold_source": embedder.threshold_source if threshold is None else "given",
            "known": where, "unknown_dir": str(unknown_dir), "identities": len(gallery), "skipped": skipped}


def format_identify_rows(result: dict) -> str:
    """Text output of `identify_folder`: ``file,identity,similarity`` lines (``unknown`` below the
    threshold, ``no_face`` for a photo without one), the `face_recognition` CLI's shape."""
    lines = []
    for row in result["rows"]:
        name = row["identity"] if row["known"] else ("no_face" if row.get("error") else UNKNOWN)
        sim = "" if row["similarity"] is None else f"{row['similarity']:.4f}"
        lines.append(f"{row['file']},{name},{sim}")
    return "\n".join(lines)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
