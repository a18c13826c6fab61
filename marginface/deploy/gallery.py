"""A face gallery: one unit embedding per enrolled identity, saved as ``.npz``, searched by cosine.

Enrolment (``enroll``) takes a folder of identity folders (``DIR/<name>/*.jpg``), embeds the
largest face of each image, and stores per identity the mean of the L2-normalised embeddings,
renormalised (the usual template). The file holds ``names``, ``embeddings`` (K×D float32),
``counts`` (images used), ``model_fingerprint`` + ``model_probe`` (to refuse a search with a
different model) and ``format``; it is written atomically and read without pickle.

Search is exact cosine similarity in numpy, chunked (``chunk_size`` rows at a time, so a
million-entry gallery never needs a K×Q similarity matrix in memory) with a per-chunk
``argpartition`` top-k merged across chunks. With ``index="faiss"`` (or ``"auto"`` on large
galleries when the ``faiss`` package is installed) an exact ``IndexFlatIP`` does the same.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from marginface.errors import UserError

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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, format=np.array(FORMAT), names=self.names, embeddings=self.embeddings,
                         counts=self.counts, model_fingerprint=np.array(self.model_fingerprint),
                         model_name=np.array(self.model_name),
                         model_probe=(self.model_probe if self.model_probe is not None
                                      else np.zeros(0, np.float32)).astype(np.float32))
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Gallery":
        path = Path(path)
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
        if probe is not None and len(probe) != self.dim:
            raise UserError(f"{where}: enrolled with {self.dim}-d embeddings but the model gives {len(probe)}-d; "
                            f"use the model the gallery was enrolled with")
        if self.model_probe is None or probe is None or fingerprint == self.model_fingerprint:
            return
        cos = float(np.dot(self.model_probe, probe) /
                    (np.linalg.norm(self.model_probe) * np.linalg.norm(probe) + 1e-12))
        if cos < PROBE_MIN_COSINE:
            raise UserError(f"{where}: enrolled with a different model (fingerprint {self.model_fingerprint}, "
                            f"{self.model_name or 'unknown'}); this model's is {fingerprint}")

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

    def matches(self, query: np.ndarray, top_k: int = 5, **kw) -> list[dict]:
        idx, sims = self.search(query, top_k, **kw)
        return [{"identity": str(self.names[i]), "similarity": float(s), "images": int(self.counts[i])}
                for i, s in zip(idx[0], sims[0])]


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


# ---------------------------------------------------------------------------------------------- enrolment
def enroll(embedder, folder: Union[str, Path], *, progress=None, min_images: int = 1,
           skip_no_face: bool = False) -> tuple[Gallery, dict]:
    """Build a gallery from ``folder/<identity>/*`` with a `FaceEmbedder`.

    Returns ``(gallery, report)``; the report lists ``skipped`` images (no face, when
    ``skip_no_face``) and empty identities. Without ``skip_no_face`` an image without a face is
    an error naming it.
    """
    from marginface.deploy.embedder import iter_image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory (expected one sub-folder of images per identity)")
    identity_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not identity_dirs:
        raise UserError(f"{folder}: no identity folders (expected {folder}/<name>/*.jpg)")
    names, vectors, counts = [], [], []
    skipped: list[dict] = []
    empty: list[str] = []
    for d in identity_dirs:
        files = list(iter_image_files(d))
        crops = []
        for f in files:
            try:
                crops.append(embedder.largest_face(f).crop)
            except UserError as exc:
                if not skip_no_face or "no face" not in str(exc):
                    raise
                skipped.append({"file": str(f), "reason": "no face found"})
        if len(crops) < min_images:
            empty.append(d.name)
            continue
        emb = embedder.embed_crops(np.stack(crops))
        centre = emb.astype(np.float64).mean(0)
        norm = np.linalg.norm(centre)
        names.append(d.name)
        vectors.append((centre / (norm if norm > 0 else 1.0)).astype(np.float32))
        counts.append(len(crops))
        if progress is not None:
            progress(d.name, len(crops))
    if not names:
        raise UserError(f"{folder}: no identity with a usable face image")
    fingerprint, probe = embedder.fingerprint()
    model_name = str(getattr(embedder.model, "model_path", None) or type(embedder.model).__name__)
    gallery = Gallery(np.array(names), np.stack(vectors), np.array(counts), fingerprint, probe, model_name)
    return gallery, {"identities": len(names), "images": int(sum(counts)), "skipped": skipped,
                     "empty_identities": empty}
