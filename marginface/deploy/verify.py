"""1:1 verification of photos: two images, or every pair of a pairs CSV (library side of
``marginface verify``)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from marginface.data.verification import read_pair_list_csv
from marginface.errors import UserError
from marginface.evaluate.metrics import verification_metrics


def verify_images(embedder, a: Union[str, Path], b: Union[str, Path]) -> dict:
    """``{"similarity", "same", "threshold", "threshold_source"}`` for the largest face of each image."""
    ea, eb = embedder.embed_many([a, b])
    sim = float(np.dot(ea, eb))
    return {"similarity": sim, "same": bool(sim > embedder.threshold), "threshold": embedder.threshold,
            "threshold_source": embedder.threshold_source, "a": str(a), "b": str(b)}


def verify_pair_list(embedder, csv_path: Union[str, Path], *, nfolds: int = 10) -> dict:
    """Score every pair of a pairs CSV (``file_x,file_y`` [+ ``Decision``/``same``], paths
    relative to the CSV). ``eval`` holds `verification_metrics` when the CSV is labelled."""
    pairs = read_pair_list_csv(csv_path)
    for p in pairs.paths_a + pairs.paths_b:
        if not p.is_file():
            raise UserError(f"{csv_path}: image {p} does not exist")
    n = len(pairs)
    emb = embedder.embed_many(pairs.paths_a + pairs.paths_b)
    scores = np.einsum("kd,kd->k", emb[:n], emb[n:]).astype(np.float64)
    root = Path(csv_path).parent
    rows = []
    for k in range(n):
        row = {"a": _rel(pairs.paths_a[k], root), "b": _rel(pairs.paths_b[k], root),
               "similarity": float(scores[k]), "same": bool(scores[k] > embedder.threshold)}
        if pairs.issame is not None:
            row["label"] = bool(pairs.issame[k])
        rows.append(row)
    result = {"pairs": rows, "eval": None, "threshold": embedder.threshold,
              "threshold_source": embedder.threshold_source}
    if pairs.issame is not None:
        metrics = verification_metrics(scores, pairs.issame, nfolds=min(nfolds, n))
        metrics["name"] = pairs.name
        metrics["accuracy_at_threshold"] = float(np.mean((scores > embedder.threshold) == pairs.issame))
        result["eval"] = metrics
    return result


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)
