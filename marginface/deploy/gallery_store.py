"""A face gallery stored in SQLite: one row per enrolled image, one template per identity.

Tables (``FORMAT_VERSION`` 1):

- ``meta(key, value)``: ``format`` (``marginface-gallery``), ``format_version``, ``dim``,
  ``model_fingerprint``, ``model_probe`` (float32 blob), ``model_name``, ``model_normalize`` (the
  enrolment's input normalisation; absent in galleries written before it was recorded), ``generation``.
- ``images(id, identity_id, embedding, source, sha256, count, model_fingerprint, created)``: one
  row per enrolled image; ``embedding`` is the image's unit embedding as a float32 blob,
  ``sha256`` the hash of the image file's bytes (of the embedding's bytes when the caller has no
  file), unique per identity, so enrolling the same image twice adds nothing. ``count`` is 1
  except for templates converted from a legacy ``.npz`` (one row standing for ``count`` images).
- ``identities(id, name, template, images, updated)``: the identity's template, the renormalised
  ``count``-weighted mean of its rows, recomputed from the rows in the transaction that changes
  them; ``images`` is the sum of the counts.

Every write (`add`, `remove`) is one ``BEGIN IMMEDIATE`` transaction that also bumps
``generation``; the database runs in WAL mode with a ``busy_timeout``, so concurrent writers wait
for each other instead of failing, readers never block writers, and a search (one read
transaction) sees the gallery as of one commit. A process killed mid-write leaves the last
committed state (SQLite rolls the unfinished transaction back on the next open).

Search is exact cosine: templates are streamed ``chunk_size`` rows at a time into
`top_k_cosine`; with ``index="faiss"`` (or ``"auto"`` from ``FAISS_AUTO_MIN`` identities when
faiss is installed) an in-process ``IndexFlatIP`` is built and rebuilt whenever ``generation``
has moved since it was built.

`Gallery` (the in-memory form: a snapshot of a store's templates, or a legacy ``.npz`` file) and
the search helpers (`top_k_cosine`, `check_probe`) are defined here too, because each form loads
into the other (`Gallery.load` of a ``.sqlite`` file, `GalleryStore.snapshot`, `convert_npz`);
`marginface.deploy.gallery` re-exports them.
"""
from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from marginface.data.transforms import NORMALIZATIONS
from marginface.errors import UserError
from marginface.evaluate.identification import top_k_cosine  # the one top-k search lives in the lower layer
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
    model_normalize: str = ""  # the enrolment's input normalisation ("" = not recorded)

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
                     model_name=np.array(self.model_name), model_normalize=np.array(self.model_normalize),
                     model_probe=(self.model_probe if self.model_probe is not None
                                  else np.zeros(0, np.float32)).astype(np.float32))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Gallery":
        """A legacy ``.npz`` gallery, or an in-memory snapshot of the templates of a ``.sqlite``/``.db`` one."""
        path = Path(path)
        if path.suffix.lower() in (".sqlite", ".db"):
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
                           str(z["model_name"]) if "model_name" in z.files else "",
                           str(z["model_normalize"]) if "model_normalize" in z.files else "")
        except UserError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: not a readable gallery file ({first})") from None

    # ------------------------------------------------------------------ search
    def check_model(self, fingerprint: str, probe: Optional[np.ndarray], where: str = "gallery", *,
                    embedder=None) -> None:
        """UserError unless the search model embeds like the enrolment model (``embedder``: see `check_probe`)."""
        check_probe(self.dim, self.model_fingerprint, self.model_probe, self.model_name, fingerprint, probe, where,
                    enrolled_normalize=self.model_normalize, embedder=embedder)

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
                enrolled_name: str, fingerprint: str, probe: Optional[np.ndarray], where: str, *,
                enrolled_normalize: str = "", embedder=None) -> None:
    """UserError unless a model (``fingerprint``, ``probe``) embeds like the enrolment model.

    The error says what differs: the embedding size, only the input normalisation (the same model
    read with another ``--normalize``: found by embedding the probe face again with the gallery's
    recorded normalisation, or with each other one, through ``embedder.fingerprint(normalize=)``),
    or the model (and, when the gallery records it, whether the normalisation differs too)."""
    if probe is not None and dim is not None and len(probe) != dim:
        raise UserError(f"{where}: enrolled with {dim}-d embeddings but the model gives {len(probe)}-d; "
                        f"use the model the gallery was enrolled with")
    if enrolled_probe is None or probe is None or fingerprint == enrolled_fingerprint:
        return
    if not _cosine(enrolled_probe, probe) >= PROBE_MIN_COSINE:
        raise UserError(_mismatch(where, enrolled_fingerprint, enrolled_probe, enrolled_name, enrolled_normalize,
                                  fingerprint, embedder))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _mismatch(where: str, enrolled_fingerprint: str, enrolled_probe: np.ndarray, enrolled_name: str,
              enrolled_normalize: str, fingerprint: str, embedder) -> str:
    """The one line of `check_probe`'s refusal."""
    normalize = str(getattr(embedder, "normalize", "") or "")
    if embedder is not None and normalize:
        others = ([enrolled_normalize] if enrolled_normalize and enrolled_normalize != normalize
                  else [n for n in NORMALIZATIONS if n != normalize and not enrolled_normalize])
        for other in others:
            _, again = embedder.fingerprint(normalize=other)
            if _cosine(enrolled_probe, again) >= PROBE_MIN_COSINE:
                return (f"{where}: enrolled with this model but with input normalisation {other!r}, and it is "
                        f"now read with {normalize!r}, so its embeddings differ; pass --normalize {other} "
                        f"(or enroll again)")
    enrolled = f"fingerprint {enrolled_fingerprint}, {enrolled_name or 'unknown'}"
    if enrolled_normalize and normalize and enrolled_normalize != normalize:
        return (f"{where}: enrolled with a different model ({enrolled}) and a different input normalisation "
                f"({enrolled_normalize!r}; this model uses {normalize!r}); this model's fingerprint is {fingerprint}")
    same = f"; both normalise the input with {normalize!r}" if normalize and enrolled_normalize == normalize else ""
    return f"{where}: enrolled with a different model ({enrolled}); this model's is {fingerprint}{same}"


def _faiss():
    try:
        import faiss  # type: ignore

        return faiss
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------- the SQLite store
FORMAT_NAME = "marginface-gallery"
FORMAT_VERSION = 1
SQLITE_SUFFIXES = (".sqlite", ".db")
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 60_000
PAGE_SIZE = 16384
_PARAMS_PER_QUERY = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identities (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    template BLOB,
    images INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL,
    source TEXT,
    sha256 TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 1,
    model_fingerprint TEXT,
    created REAL NOT NULL,
    UNIQUE (identity_id, sha256)
);
"""

# Tests set this to a callable to stop a write between its image rows and its templates.
_after_rows_hook = None


def is_sqlite_path(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in SQLITE_SUFFIXES


def _unit_template(vectors: np.ndarray, counts: np.ndarray) -> np.ndarray:
    centre = (vectors.astype(np.float64) * counts.astype(np.float64)[:, None]).sum(0)
    norm = np.linalg.norm(centre)
    return (centre / (norm if norm > 0 else 1.0)).astype(np.float32)


def _blob_rows(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)


class GalleryStore:
    """An SQLite gallery file. ``create=True`` makes the file (and its tables) when missing.

    One object holds one connection; use one object per thread/process (it is cheap to open).
    """

    def __init__(self, path: Union[str, Path], *, create: bool = False, busy_timeout_ms: int = BUSY_TIMEOUT_MS):
        self.path = Path(path)
        if not is_sqlite_path(self.path):
            raise UserError(f"{self.path}: SQLite gallery files end in .sqlite or .db")
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if not exists and not create:
            raise UserError(f"{self.path}: gallery not found (create it with `marginface gallery enroll`)")
        if exists:
            with open(self.path, "rb") as f:
                if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                    raise UserError(f"{self.path}: not an SQLite database (not a marginface gallery)")
        elif self.path.is_dir():
            raise UserError(f"{self.path}: is a directory, not a gallery file")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._faiss_index = None
        self._faiss_generation = None
        self._memory: Optional[Gallery] = None
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=busy_timeout_ms / 1000, isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if not exists:  # 16 KiB pages hold seven 512-d rows (4 KiB pages hold one 2 KiB row each)
                self.conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            self._set_wal(busy_timeout_ms)
            self.conn.execute("PRAGMA synchronous = NORMAL")  # WAL: a crash never corrupts; commits survive a process kill
            self.conn.execute("PRAGMA foreign_keys = ON")
            if create:
                self._create_schema()
            self._check_format()
        except UserError:
            self.close()
            raise
        except sqlite3.DatabaseError as exc:
            self.close()
            raise UserError(f"{self.path}: not a readable gallery ({exc})") from None

    # ------------------------------------------------------------------ connection
    def _set_wal(self, busy_timeout_ms: int) -> None:
        # Switching to WAL takes an exclusive lock once per file; a concurrent opener may see "locked".
        deadline = time.monotonic() + busy_timeout_ms / 1000
        while True:
            try:
                mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if str(mode).lower() != "wal":
            raise UserError(f"{self.path}: could not switch the database to WAL mode (got {mode!r})")

    def _create_schema(self) -> None:
        with self._write():
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:  # someone else's database: leave it alone
                raise UserError(f"{self.path}: an SQLite database but not a marginface gallery (no meta table)")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.execute("CREATE INDEX IF NOT EXISTS images_identity ON images(identity_id)")
            for key, value in (("format", FORMAT_NAME), ("format_version", FORMAT_VERSION), ("generation", 0)):
                self.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _check_format(self) -> None:
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            raise UserError(f"{self.path}: an SQLite database but not a marginface gallery (no meta table)")
        meta = dict(self.conn.execute("SELECT key, value FROM meta WHERE key IN ('format', 'format_version')"))
        if meta.get("format") != FORMAT_NAME:
            raise UserError(f"{self.path}: an SQLite database but not a marginface gallery "
                            f"(format {meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{self.path}: gallery format version {meta.get('format_version')!r}; this marginface "
                            f"reads version {FORMAT_VERSION}")
        if not {"identities", "images"} <= tables:
            raise UserError(f"{self.path}: gallery lacks its identities/images tables")

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
            self.conn = None

    def __enter__(self) -> "GalleryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    class _Txn:
        def __init__(self, conn: sqlite3.Connection, begin: str):
            self.conn, self.begin = conn, begin

        def __enter__(self):
            self.nested = self.conn.in_transaction
            if self.nested and self.begin != "BEGIN":
                raise RuntimeError("a gallery write cannot start inside another transaction")
            if not self.nested:  # a read inside a read: part of the outer snapshot
                self.conn.execute(self.begin)
            return self.conn

        def __exit__(self, exc_type, exc, tb):
            if self.nested:
                return False
            if exc_type is None:
                self.conn.execute("COMMIT")
            elif self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            return False

    def _write(self) -> "_Txn":
        """A write transaction: IMMEDIATE takes the write lock up front, so the busy timeout applies."""
        return self._Txn(self.conn, "BEGIN IMMEDIATE")

    def _read(self) -> "_Txn":
        """A read transaction: every SELECT inside sees the same committed snapshot."""
        return self._Txn(self.conn, "BEGIN")

    # ------------------------------------------------------------------ metadata
    def meta(self) -> dict:
        rows = dict(self.conn.execute("SELECT key, value FROM meta"))
        probe = rows.get("model_probe")
        return {"format": rows.get("format"), "format_version": rows.get("format_version"),
                "dim": rows.get("dim"), "model_fingerprint": rows.get("model_fingerprint") or "",
                "model_name": rows.get("model_name") or "", "model_normalize": rows.get("model_normalize") or "",
                "model_probe": np.frombuffer(probe, np.float32).copy() if probe else None,
                "generation": int(rows.get("generation") or 0)}

    @property
    def generation(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    @property
    def dim(self) -> Optional[int]:
        return self.meta()["dim"]

    @property
    def model_fingerprint(self) -> str:
        return self.meta()["model_fingerprint"]

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM identities").fetchone()[0])

    def check_model(self, fingerprint: str, probe: Optional[np.ndarray], where: Optional[str] = None, *,
                    embedder=None) -> None:
        """UserError unless the model (``fingerprint``, ``probe``) embeds like the enrolment model
        (``embedder``: the `FaceEmbedder` behind them, so a mismatch can say whether only the
        normalisation differs; see `check_probe`)."""
        m = self.meta()
        check_probe(m["dim"], m["model_fingerprint"], m["model_probe"], m["model_name"], fingerprint, probe,
                    where or str(self.path), enrolled_normalize=m["model_normalize"], embedder=embedder)

    # ------------------------------------------------------------------ listing
    def list(self) -> list[dict]:
        """``[{"identity", "images"}]`` sorted by name, from one snapshot."""
        return [{"identity": n, "images": int(c)}
                for n, c in self.conn.execute("SELECT name, images FROM identities ORDER BY name")]

    def rows(self, identity: str) -> dict:
        """The image rows of one identity: ``embeddings`` (n×D), ``counts``, ``sources``, ``sha256``."""
        with self._read() as c:
            dim = self.meta()["dim"] or 0
            got = c.execute("SELECT i.embedding, i.count, i.source, i.sha256 FROM images i JOIN identities d "
                            "ON d.id = i.identity_id WHERE d.name = ? ORDER BY i.id", (identity,)).fetchall()
        return {"embeddings": _blob_rows([r[0] for r in got], dim), "counts": np.array([r[1] for r in got], np.int64),
                "sources": [r[2] for r in got], "sha256": [r[3] for r in got]}

    # ------------------------------------------------------------------ writing
    def add(self, names: Sequence[str], embeddings: np.ndarray, *, sources: Optional[Sequence[Optional[str]]] = None,
            sha256: Optional[Sequence[Optional[str]]] = None, counts: Optional[Sequence[int]] = None,
            fingerprint: str = "", probe: Optional[np.ndarray] = None, model_name: str = "",
            replace: bool = False, normalize: str = "") -> dict:
        """Add image rows (``names[i]``, ``embeddings[i]``) in one transaction.

        ``embeddings`` are unit vectors (they are renormalised; non-finite or zero rows are
        refused). ``sha256`` (per row, default: the hash of the embedding's bytes) makes a repeat
        of an (identity, image) pair a no-op. ``replace=True`` first deletes every row of the
        identities named. The model (``fingerprint``, ``probe``) must match the gallery's; the
        first write records it (with ``normalize``, the model's input normalisation). Returns ``{"added", "already_enrolled", "identities", "generation"}``.
        """
        names = [str(n) for n in names]
        emb = np.asarray(embeddings, dtype=np.float64)
        if emb.ndim == 1 and len(names) == 1:
            emb = emb[None]
        if emb.ndim != 2 or len(emb) != len(names):
            raise UserError(f"{self.path}: {len(names)} identity names but embeddings of shape {emb.shape}")
        if not len(names):
            raise UserError(f"{self.path}: nothing to enroll")
        if not np.all(np.isfinite(emb)):
            bad = sorted({names[i] for i in np.nonzero(~np.isfinite(emb).all(1))[0]})
            raise UserError(f"{self.path}: non-finite (NaN/inf) embedding for {', '.join(bad[:5])}; nothing enrolled")
        norms = np.linalg.norm(emb, axis=1)
        if np.any(norms == 0):
            bad = sorted({names[i] for i in np.nonzero(norms == 0)[0]})
            raise UserError(f"{self.path}: all-zero embedding for {', '.join(bad[:5])}; nothing enrolled")
        if any(not n or n != n.strip() or "/" in n for n in names):
            bad = next(n for n in names if not n or n != n.strip() or "/" in n)
            raise UserError(f"{self.path}: bad identity name {bad!r} (empty, padded or containing '/')")
        emb = (emb / norms[:, None]).astype(np.float32)
        if probe is not None:
            probe = np.asarray(probe, np.float32).ravel()
            if not np.all(np.isfinite(probe)):
                raise UserError(f"{self.path}: the model's fingerprint probe embedding is not finite")
        n = len(names)
        sources = list(sources) if sources is not None else [None] * n
        counts_arr = np.asarray(counts if counts is not None else np.ones(n), np.int64)
        if len(sources) != n or len(counts_arr) != n or np.any(counts_arr < 1):
            raise UserError(f"{self.path}: sources/counts must have one entry (count >= 1) per embedding")
        hashes = [h if h else hashlib.sha256(emb[i].tobytes()).hexdigest()
                  for i, h in enumerate(sha256 if sha256 is not None else [None] * n)]
        if len(hashes) != n:
            raise UserError(f"{self.path}: sha256 must have one entry per embedding")
        now = time.time()

        # group rows by identity, dropping repeats of the same image within this call
        order: dict[str, list[int]] = {}
        seen: set = set()
        for i, (name, h) in enumerate(zip(names, hashes)):
            if (name, h) in seen:
                continue
            seen.add((name, h))
            order.setdefault(name, []).append(i)

        with self._write() as c:
            m = self.meta()
            dim = emb.shape[1]
            if m["dim"] is not None and m["dim"] != dim:
                raise UserError(f"{self.path}: the gallery holds {m['dim']}-d embeddings, these are {dim}-d; "
                                f"use the model the gallery was enrolled with")
            if m["model_probe"] is not None or m["model_fingerprint"]:
                check_probe(m["dim"], m["model_fingerprint"], m["model_probe"], m["model_name"], fingerprint,
                            probe, str(self.path), enrolled_normalize=m["model_normalize"])
            else:
                c.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                              [("dim", dim), ("model_fingerprint", fingerprint), ("model_name", model_name),
                               ("model_normalize", normalize or None),
                               ("model_probe", probe.astype(np.float32).tobytes() if probe is not None else None)])
            if m["dim"] is None:  # a gallery enrolled without a model (library callers)
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('dim', ?)", (dim,))
            ids = self._identity_ids(list(order))
            existing = {name: i for name, i in ids.items()}
            if replace and existing:
                c.executemany("DELETE FROM images WHERE identity_id = ?", [(i,) for i in existing.values()])
            new_names = [name for name in order if name not in existing]
            c.executemany("INSERT INTO identities(name, images, updated) VALUES (?, 0, ?)",
                          [(name, now) for name in new_names])
            ids = self._identity_ids(list(order))
            before = c.total_changes
            c.executemany(
                "INSERT OR IGNORE INTO images(identity_id, embedding, source, sha256, count, model_fingerprint, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(ids[name], emb[i].tobytes(), sources[i], hashes[i], int(counts_arr[i]), fingerprint, now)
                 for name, rows in order.items() for i in rows])
            added = c.total_changes - before
            if _after_rows_hook is not None:
                _after_rows_hook()
            fresh = set(new_names) if not replace else set(order)  # identities whose rows are all in this call
            updates = []
            fresh_names = [name for name in order if name in fresh]
            if fresh_names:  # every row is in this call: the templates in one vectorised pass
                rows = np.concatenate([order[name] for name in fresh_names])
                starts = np.cumsum([0] + [len(order[name]) for name in fresh_names[:-1]])
                sums = np.add.reduceat(emb[rows].astype(np.float64) * counts_arr[rows, None], starts, axis=0)
                norms = np.linalg.norm(sums, axis=1, keepdims=True)
                templates = (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32)
                images = np.add.reduceat(counts_arr[rows], starts)
                updates += [(templates[j].tobytes(), int(images[j]), now, ids[name]) for j, name in enumerate(fresh_names)]
            for name, rows in order.items():  # identities with earlier rows: recomputed from all their rows
                if name in fresh:
                    continue
                got = c.execute("SELECT embedding, count FROM images WHERE identity_id = ?", (ids[name],)).fetchall()
                vecs, cnts = _blob_rows([r[0] for r in got], dim), np.array([r[1] for r in got], np.int64)
                updates.append((_unit_template(vecs, cnts).tobytes(), int(cnts.sum()), now, ids[name]))
            c.executemany("UPDATE identities SET template = ?, images = ?, updated = ? WHERE id = ?", updates)
            generation = self._bump(c)
        return {"added": int(added), "already_enrolled": int(n - added),  # repeats within this call included
                "identities": list(order), "generation": generation}

    def _identity_ids(self, names: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in range(0, len(names), _PARAMS_PER_QUERY):
            part = names[s : s + _PARAMS_PER_QUERY]
            q = f"SELECT name, id FROM identities WHERE name IN ({','.join('?' * len(part))})"
            out.update(self.conn.execute(q, part).fetchall())
        return out

    def _bump(self, c: sqlite3.Connection) -> int:
        c.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        return int(c.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def remove(self, names: Iterable[str]) -> dict:
        """Delete identities (and their rows) in one transaction; UserError naming any not enrolled."""
        names = list(dict.fromkeys(str(n) for n in names))
        with self._write() as c:
            ids = self._identity_ids(names)
            missing = [n for n in names if n not in ids]
            if missing:
                raise UserError(f"{self.path}: no enrolled identity {', '.join(repr(n) for n in missing)}; "
                                f"nothing removed")
            images = 0
            for name in names:
                images += c.execute("SELECT COUNT(*) FROM images WHERE identity_id = ?", (ids[name],)).fetchone()[0]
                c.execute("DELETE FROM images WHERE identity_id = ?", (ids[name],))
                c.execute("DELETE FROM identities WHERE id = ?", (ids[name],))
            generation = self._bump(c)
        return {"removed": names, "image_rows": int(images), "generation": generation}

    # ------------------------------------------------------------------ reading templates
    def iter_templates(self, chunk_size: int = 65536):
        """Yield ``(names, templates k×D, images)`` chunks by identity id. Call inside `_read()` for one snapshot."""
        dim = self.meta()["dim"]
        last = -1
        while True:
            got = self.conn.execute("SELECT id, name, template, images FROM identities WHERE id > ? "
                                    "ORDER BY id LIMIT ?", (last, int(chunk_size))).fetchall()
            if not got:
                return
            last = got[-1][0]
            yield ([r[1] for r in got], _blob_rows([r[2] for r in got], dim), np.array([r[3] for r in got], np.int64))

    def snapshot(self, chunk_size: int = 65536) -> Gallery:
        """The whole gallery as an in-memory `Gallery` (templates) from one committed state."""
        with self._read():
            m = self.meta()
            total, dim = len(self), m["dim"] or 0
            names: list[str] = []
            vecs = np.empty((total, dim), np.float32)  # filled in place: no second copy of a large gallery
            counts = np.empty(total, np.int64)
            for n, v, k in self.iter_templates(chunk_size):
                vecs[len(names) : len(names) + len(n)] = v
                counts[len(names) : len(names) + len(n)] = k
                names += n
        g = Gallery(np.array(names, dtype=str), vecs, counts, m["model_fingerprint"], m["model_probe"], m["model_name"],
                    m["model_normalize"])
        g.generation = m["generation"]
        return g

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, top_k: int = 5, *, chunk_size: int = 65536, index: str = "auto"
               ) -> tuple[list[list[str]], np.ndarray, list[list[int]]]:
        """``(names Q×k, similarities Q×k, images Q×k)`` best first, from one committed state."""
        if index not in ("auto", "exact", "faiss", "memory"):
            raise UserError(f"index must be auto, exact, faiss or memory, got {index!r}")
        with self._read():
            m = self.meta()
            total = len(self)
            if not total or m["dim"] is None:
                raise UserError(f"{self.path}: the gallery is empty")
            q = np.asarray(queries, dtype=np.float32)
            if q.ndim == 1:
                q = q[None]
            if q.ndim != 2 or q.shape[1] != m["dim"]:
                raise UserError(f"query embeddings have shape {q.shape}; the gallery holds {m['dim']}-d embeddings")
            if not np.all(np.isfinite(q)):
                raise UserError("query embeddings are not finite (NaN/inf)")
            k = max(1, min(int(top_k), total))
            if index == "faiss" or (index == "auto" and total >= FAISS_AUTO_MIN and _faiss() is not None):
                return self._search_faiss(q, k, m["generation"], chunk_size)
            if index == "memory":
                if self._memory is None or self._memory.generation != m["generation"]:  # stale: reload
                    self._memory = None
                    self._memory = self.snapshot(chunk_size)  # nested in this read transaction: same commit
                idx, sims = top_k_cosine(self._memory.embeddings, q, k, chunk_size=chunk_size)
                return self._memory.names[idx].tolist(), sims, self._memory.counts[idx].tolist()
            best_names = np.zeros((len(q), 0), object)
            best_sim = np.zeros((len(q), 0), np.float32)
            best_img = np.zeros((len(q), 0), np.int64)
            for names, vecs, imgs in self.iter_templates(chunk_size):
                idx, sims = top_k_cosine(vecs, q, k, chunk_size=len(vecs))
                cand_names = np.array(names, object)[idx]
                all_names = np.concatenate([best_names, cand_names], axis=1)
                all_sim = np.concatenate([best_sim, sims], axis=1)
                all_img = np.concatenate([best_img, imgs[idx]], axis=1)
                order = np.argsort(-all_sim, axis=1, kind="stable")[:, :k]  # stable: earlier identity wins ties
                best_names = np.take_along_axis(all_names, order, axis=1)
                best_sim = np.take_along_axis(all_sim, order, axis=1)
                best_img = np.take_along_axis(all_img, order, axis=1)
        return best_names.tolist(), best_sim, best_img.tolist()

    def _search_faiss(self, q: np.ndarray, k: int, generation: int, chunk_size: int):
        faiss = _faiss()
        if faiss is None:
            raise UserError("index=faiss needs the faiss package (pip install faiss-cpu); the exact numpy search needs nothing")
        if self._faiss_index is None or self._faiss_generation != generation:  # stale: the table has changed
            index = faiss.IndexFlatIP(int(self.meta()["dim"]))
            names, images = [], []
            for n, v, c in self.iter_templates(chunk_size):
                index.add(np.ascontiguousarray(v))
                names += n
                images.append(c)
            self._faiss_index, self._faiss_generation = index, generation
            self._faiss_names = np.array(names, object)
            self._faiss_images = np.concatenate(images)
        sims, idx = self._faiss_index.search(np.ascontiguousarray(q), k)
        return self._faiss_names[idx].tolist(), sims.astype(np.float32), self._faiss_images[idx].tolist()

    def matches(self, query: np.ndarray, top_k: int = 5, **kw) -> list[dict]:
        names, sims, images = self.search(query, top_k, **kw)
        return [{"identity": str(n), "similarity": float(s), "images": int(i)}
                for n, s, i in zip(names[0], sims[0], images[0])]

    # ------------------------------------------------------------------ maintenance
    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])


def convert_npz(src: Union[str, Path], dst: Union[str, Path]) -> dict:
    """Copy a legacy ``.npz`` gallery into a new SQLite gallery: each template becomes one row with its count."""
    dst = Path(dst)
    if not is_sqlite_path(dst):
        raise UserError(f"{dst}: the converted gallery must end in .sqlite or .db")
    if dst.exists():
        raise UserError(f"{dst}: already exists; convert into a new file")
    g = Gallery.load(src)
    if not len(g):
        raise UserError(f"{src}: the gallery is empty; nothing to convert")
    with GalleryStore(dst, create=True) as store:
        report = store.add(list(g.names), g.embeddings, sources=[f"{Path(src).name}#{n}" for n in g.names],
                           counts=np.maximum(g.counts, 1), fingerprint=g.model_fingerprint, probe=g.model_probe,
                           model_name=g.model_name, normalize=g.model_normalize)
    return {"source": str(src), "db": str(dst), "identities": len(g), "images": int(np.maximum(g.counts, 1).sum()),
            "generation": report["generation"]}
