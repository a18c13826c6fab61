"""1:1 verification of photos: two images, or every pair of a pairs CSV (library side of
``marginface verify``)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from marginface.data.verification import read_pair_list_csv
from marginface.deploy.embedder import face_info
from marginface.errors import UserError
from marginface.evaluate.metrics import verification_metrics


def verify_images(embedder, a: Union[str, Path, np.ndarray], b: Union[str, Path, np.ndarray], *,
                  face_a: Union[str, int] = "largest", face_b: Union[str, int] = "largest") -> dict:
    """``{"similarity", "same", "threshold", "threshold_source", "a", "b", "face_a", "face_b"}``.

    Each image's face is the largest one unless ``face_a`` / ``face_b`` give an index (0 =
    largest); ``face_a`` / ``face_b`` in the result say which face was used (`face_info`: index,
    box, detector score, number of faces in the photo)."""
    picked = [embedder.pick_face(image, which, name) for image, which, name in ((a, face_a, "a"), (b, face_b, "b"))]
    ea, eb = embedder.embed_crops(np.stack([face.crop for _, face, _ in picked]))
    sim = float(np.dot(ea, eb))
    return {"similarity": sim, "same": bool(sim > embedder.threshold), "threshold": embedder.threshold,
            "threshold_source": embedder.threshold_source, "a": _label(a, "a"), "b": _label(b, "b"),
            "face_a": face_info(*picked[0]), "face_b": face_info(*picked[1])}


def _label(image, default: str) -> str:
    return str(image) if isinstance(image, (str, Path)) else default


def verify_pair_list(embedder, csv_path: Union[str, Path], *, nfolds: int = 10, progress=None) -> dict:
    """Score every pair of a pairs CSV (``file_x,file_y`` [+ ``Decision``/``same``], paths
    relative to the CSV). ``eval`` holds `verification_metrics` when the CSV is labelled.
    ``progress(done, total)``: after each distinct photo's face is found."""
    pairs = read_pair_list_csv(csv_path)
    for p in pairs.paths_a + pairs.paths_b:
        if not p.is_file():
            raise UserError(f"{csv_path}: image {p} does not exist")
    n = len(pairs)
    photos = pairs.paths_a + pairs.paths_b
    distinct = len({str(Path(p).resolve()) for p in photos})
    emb = (embedder.embed_many(photos) if progress is None
           else embedder.embed_many(photos, progress=lambda done: progress(done, distinct)))
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
