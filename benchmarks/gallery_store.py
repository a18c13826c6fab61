"""Enrol and search throughput of the SQLite gallery (`marginface.deploy.gallery_store`) on
synthetic entries: random unit vectors, one image per identity.

For each size N it measures, on a fresh file:
- bulk enrolment: N identities added ``--batch`` rows per `GalleryStore.add` (one transaction each);
- single enrolments: ``--single`` more `add` calls of one identity each (one transaction each, the
  cost of one `marginface gallery enroll` minus the model), as enrolls per second;
- exact search straight from the file (templates streamed ``chunk_size`` rows at a time, one read
  transaction), for 1 query and for a batch of ``--batch-queries``;
- loading the templates into memory (`snapshot`) and searching the in-memory `Gallery`.

Prints one JSON object. Usage:
    python benchmarks/gallery_store.py [--sizes 10000,100000,1000000] [--dim 512] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from marginface.deploy.gallery_store import GalleryStore


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed(fn, repeat: int = 1):
    """(result, best seconds of ``repeat`` runs)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def bench_size(root: Path, n: int, dim: int, batch: int, single: int, nq: int, chunk: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    db = root / f"bench_{n}.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    probe = unit_rows(rng, 1, dim)[0]
    row: dict = {"entries": n, "dim": dim}
    with GalleryStore(db, create=True) as store:
        t = time.perf_counter()
        for start in range(0, n, batch):
            m = min(batch, n - start)
            store.add([f"id{start + i:08d}" for i in range(m)], unit_rows(rng, m, dim),
                      fingerprint="bench", probe=probe)
        bulk = time.perf_counter() - t
        row["bulk_enroll_s"] = round(bulk, 2)
        row["bulk_enroll_rows_per_s"] = round(n / bulk)
        t = time.perf_counter()
        for j in range(single):
            store.add([f"single{j:06d}"], unit_rows(rng, 1, dim), fingerprint="bench", probe=probe)
        one = time.perf_counter() - t
        row["single_enrolls"] = single
        row["single_enroll_per_s"] = round(single / one, 1)
        row["single_enroll_ms"] = round(1000 * one / single, 2)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        row["file_mb"] = round(db.stat().st_size / 2**20, 1)
        total = len(store)

        q1 = unit_rows(rng, 1, dim)
        qb = unit_rows(rng, nq, dim)
        _, s1 = timed(lambda: store.search(q1, 5, index="exact", chunk_size=chunk), repeat=2)
        _, sb = timed(lambda: store.search(qb, 5, index="exact", chunk_size=chunk), repeat=1)
        row["search_from_file_1_query_s"] = round(s1, 3)
        row[f"search_from_file_{nq}_queries_s"] = round(sb, 3)
        row["search_from_file_queries_per_s"] = round(nq / sb, 1)
        row["search_from_file_entries_per_s"] = round(total / s1)

        gallery, load = timed(lambda: store.snapshot(chunk), repeat=1)
    row["snapshot_load_s"] = round(load, 2)
    _, m1 = timed(lambda: gallery.search(q1, 5, index="exact"), repeat=3)
    _, mb = timed(lambda: gallery.search(qb, 5, index="exact"), repeat=2)
    row["search_in_memory_1_query_ms"] = round(1000 * m1, 2)
    row[f"search_in_memory_{nq}_queries_ms"] = round(1000 * mb, 1)
    row["search_in_memory_queries_per_s"] = round(nq / mb, 1)
    del gallery
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated entry counts")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=10000, help="rows per bulk add (one transaction)")
    ap.add_argument("--single", type=int, default=200, help="one-identity adds timed after the bulk load")
    ap.add_argument("--batch-queries", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=65536)
    ap.add_argument("--dir", help="where the gallery files go (default: a temporary folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the gallery files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="gallery_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            results.append(bench_size(root, n, args.dim, args.batch, args.single, args.batch_queries,
                                      args.chunk_size, args.seed))
            if not args.keep:
                for f in root.glob(f"bench_{n}.sqlite*"):
                    f.unlink()
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "python": platform.python_version(), "numpy": np.__version__},
                      "chunk_size": args.chunk_size, "batch": args.batch, "results": results}, indent=1))


if __name__ == "__main__":
    main()
