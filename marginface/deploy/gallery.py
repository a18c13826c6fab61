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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from marginface.errors import UserError
from marginface.io.atomic import atomic_write

FORMAT = "marginface-gallery-v1"
PROBE_MIN_COSINE = 0.98  # a search model must embed the fingerprint probe this close to the enrolment model
FAISS_AUTO_MIN = 100_000


@dataclass
class Gallery:
    names: np.ndarray  # K str
    embeddings: np.ndarray  # K×D float32, unit rows
    counts: np.ndarray  # K int
    model_fingerprint: str = ""
    model_probe: Optional[np.ndarray] = None  # D float32
    model_name: str = ""

    def __post_init__(self) -> None:
        self.names = np.asarray(self.names, dtype=str)
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.names) or len(self.counts) != len(self.names):
            raise ValueError(f"gallery arrays disagree: {len(self.names)} names, embeddings "
                             f"{self.embeddings.shape}, {len(self.counts)} counts")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, Path]) -> Path:
        """Write ``path`` atomically (temp file in the same folder, fsync, rename)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise UserError(f"{path}: gallery files end in .npz")
        with atomic_write(path) as f:  # temp file, fsync, rename (marginface.io.atomic)
            np.savez(f, format=np.array(FORMAT), names=self.names, embeddings=self.embeddings,
                     counts=self.counts, model_fingerprint=np.array(self.model_fingerprint),
                     model_name=np.array(self.model_name),
                     model_probe=(self.model_probe if self.model_probe is not None
                                  else np.zeros(0, np.float32)).astype(np.float32))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Gallery":
        """A legacy ``.npz`` gallery, or an in-memory snapshot of the templates of a ``.sqlite``/``.db`` one."""
        path = Path(path)
        if path.suffix.lower() in (".sqlite", ".db"):
            from marginface.deploy.gallery_store import GalleryStore

            with GalleryStore(path) as store:
                return store.snapshot()
        if not path.is_file():
            raise UserError(f"{path}: gallery not found (create it with `marginface gallery enroll`)")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z.files or str(z["format"]) != FORMAT:
                    raise UserError(f"{path}: not a marginface gallery (no {FORMAT!r} format tag)")
                missing = [k for k in ("names", "embeddings", "counts") if k not in z.files]
                if missing:
                    raise UserError(f"{path}: gallery lacks {', '.join(missing)}")
                probe = z["model_probe"] if "model_probe" in z.files else np.zeros(0)
                return cls(z["names"], z["embeddings"], z["counts"],
                           str(z["model_fingerprint"]) if "model_fingerprint" in z.files else "",
                           probe if probe.size else None,
                           str(z["model_name"]) if "model_name" in z.files else "")
        except UserError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: not a readable gallery file ({first})") from None

    # ------------------------------------------------------------------ search
    def check_model(self, fingerprint: str, probe: Optional[np.ndarray], where: str = "gallery") -> None:
        """UserError unless the search model embeds like the enrolment model."""
        check_probe(self.dim, self.model_fingerprint, self.model_probe, self.model_name, fingerprint, probe, where)

    def search(self, queries: np.ndarray, top_k: int = 5, *, chunk_size: int = 65536,
               index: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """``(indices, similarities)``, each ``Q×k`` (best first), of unit ``queries`` (``Q×D`` or ``D``)."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(f"query embeddings have shape {q.shape}; the gallery holds {self.dim}-d embeddings")
        if len(self) == 0:
            raise UserError("the gallery is empty")
        k = max(1, min(int(top_k), len(self)))
        if index not in ("auto", "exact", "faiss"):
            raise UserError(f"index must be auto, exact or faiss, got {index!r}")
        if index == "faiss" or (index == "auto" and len(self) >= FAISS_AUTO_MIN and _faiss() is not None):
            return self._search_faiss(q, k)
        return top_k_cosine(self.embeddings, q, k, chunk_size=chunk_size)

    def _search_faiss(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if faiss is None:
            raise UserError("index=faiss needs the faiss package (pip install faiss-cpu); the exact numpy search needs nothing")
        if getattr(self, "_faiss_index", None) is None:
            self._faiss_index = faiss.IndexFlatIP(self.dim)
            self._faiss_index.add(self.embeddings)
        sims, idx = self._faiss_index.search(np.ascontiguousarray(q), k)
        return idx.astype(np.int64), sims.astype(np.float32)

    def list(self) -> list[dict]:
        """``[{"identity", "images"}]`` sorted by name."""
        return [{"identity": str(n), "images": int(c)} for n, c in sorted(zip(self.names, self.counts))]

    def matches(self, query: np.ndarray, top_k: int = 5, **kw) -> list[dict]:
        idx, sims = self.search(query, top_k, **kw)
        return [{"identity": str(self.names[i]), "similarity": float(s), "images": int(self.counts[i])}
                for i, s in zip(idx[0], sims[0])]


def check_probe(dim: Optional[int], enrolled_fingerprint: str, enrolled_probe: Optional[np.ndarray],
                enrolled_name: str, fingerprint: str, probe: Optional[np.ndarray], where: str) -> None:
    """UserError unless a model (``fingerprint``, ``probe``) embeds like the enrolment model."""
    if probe is not None and dim is not None and len(probe) != dim:
        raise UserError(f"{where}: enrolled with {dim}-d embeddings but the model gives {len(probe)}-d; "
                        f"use the model the gallery was enrolled with")
    if enrolled_probe is None or probe is None or fingerprint == enrolled_fingerprint:
        return
    cos = float(np.dot(enrolled_probe, probe) /
                (np.linalg.norm(enrolled_probe) * np.linalg.norm(probe) + 1e-12))
    if not cos >= PROBE_MIN_COSINE:
        raise UserError(f"{where}: enrolled with a different model (fingerprint {enrolled_fingerprint}, "
                        f"{enrolled_name or 'unknown'}); this model's is {fingerprint}")


def _faiss():
    try:
        import faiss  # type: ignore

        return faiss
    except Exception:
        return None


def top_k_cosine(gallery: np.ndarray, queries: np.ndarray, k: int, *, chunk_size: int = 65536
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of unit ``queries`` (Q×D) against ``gallery`` (K×D), reading
    the gallery ``chunk_size`` rows at a time. Results are ordered by similarity, then index."""
    gallery = np.asarray(gallery, np.float32)
    queries = np.asarray(queries, np.float32)
    n, nq = len(gallery), len(queries)
    k = min(k, n)
    best_idx = np.zeros((nq, 0), np.int64)
    best_sim = np.zeros((nq, 0), np.float32)
    for start in range(0, n, max(1, int(chunk_size))):
        sims = queries @ gallery[start : start + chunk_size].T  # Q×c
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < sims.shape[1] else np.tile(np.arange(sims.shape[1]), (nq, 1))
        cand_sim = np.take_along_axis(sims, part, axis=1)
        all_idx = np.concatenate([best_idx, part + start], axis=1)
        all_sim = np.concatenate([best_sim, cand_sim], axis=1)
        # sort by similarity (desc), then index (asc) for deterministic ties
        order = np.lexsort((all_idx, -all_sim), axis=1)[:, :k] if nq else np.zeros((0, k), np.int64)
        best_idx = np.take_along_axis(all_idx, order, axis=1)
        best_sim = np.take_along_axis(all_sim, order, axis=1)
    return best_idx, best_sim


# ---------------------------------------------------------------------------------------------- opening
def open_gallery(path: Union[str, Path]):
    """A gallery to search, by suffix: ``.sqlite``/``.db`` -> `GalleryStore`, ``.npz`` -> legacy `Gallery`.

    Both have ``check_model``, ``search``-style ``matches``, ``list`` and ``len``."""
    from marginface.deploy.gallery_store import GalleryStore, is_sqlite_path

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
    the skipped images (no face, when ``skip_no_face``) through ``skipped`` entries of the result.

    ``skip(name, sha256) -> bool`` leaves images out before they are embedded (already enrolled).
    Returns a generator; its items are dicts with ``name``, ``files``, ``embeddings``, ``sha256``,
    ``skipped`` (list of {"file", "reason"}), ``already`` (images skipped by ``skip``).
    """
    from marginface.deploy.embedder import iter_image_files

    for d in _identity_dirs(Path(folder)):
        files, hashes, crops, skipped, already = [], [], [], [], 0
        for f in iter_image_files(d):
            digest = file_sha256(f)
            if skip is not None and skip(d.name, digest):
                already += 1
                continue
            try:
                crops.append(embedder.largest_face(f).crop)
            except UserError as exc:
                if not skip_no_face or "no face" not in str(exc):
                    raise
                skipped.append({"file": str(f), "reason": "no face found"})
                continue
            files.append(f)
            hashes.append(digest)
        emb = embedder.embed_crops(np.stack(crops)) if crops else None
        if progress is not None:
            progress(d.name, len(crops))
        yield {"name": d.name, "files": files, "embeddings": emb, "sha256": hashes, "skipped": skipped,
               "already": already}


def _model_name(embedder) -> str:
    from marginface.inference import ModelInfo

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
        raise UserError(f"{folder}: no identity with a usable face image")
    fingerprint, probe = embedder.fingerprint()
    gallery = Gallery(np.array(names), np.stack(vectors), np.array(counts), fingerprint, probe, _model_name(embedder))
    return gallery, {"identities": len(names), "images": int(sum(counts)), "skipped": skipped,
                     "empty_identities": empty}


def check_enroll_target(db: Union[str, Path], folder: Union[str, Path, None] = None) -> None:
    """UserError for a gallery file one cannot enroll into (checked before any model loads):
    a legacy ``.npz``, another suffix, a file that is not our SQLite gallery, or a bad ``folder``."""
    from marginface.deploy.gallery_store import GalleryStore, is_sqlite_path

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
    from marginface.deploy.gallery_store import GalleryStore

    db, folder = Path(db), Path(folder)
    check_enroll_target(db, folder)
    fingerprint, probe = embedder.fingerprint()
    skip, existing = None, None  # skip: already-enrolled images (set below for an existing gallery)
    if db.is_file() and db.stat().st_size > 0:  # an existing gallery: same model, and what it already holds
        existing = GalleryStore(db)
        existing.check_model(fingerprint, probe)
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
        raise UserError(f"{folder}: no identity with a usable face image")
    identities = sorted(set(names))
    with GalleryStore(db, create=True) as store:  # created only now: a failed enrolment leaves no empty file
        added = 0
        if names:
            result = store.add(names, np.concatenate(vectors), sources=sources, sha256=hashes,
                               fingerprint=fingerprint, probe=probe, model_name=_model_name(embedder),
                               replace=replace)
            added, already = result["added"], already + result["already_enrolled"]
        return {"identities": len(identities), "images": len(names), "added": added, "already_enrolled": already,
                "replace": replace, "skipped": skipped, "empty_identities": empty, "db": str(db),
                "dim": store.dim, "model_fingerprint": store.model_fingerprint, "gallery_identities": len(store)}
