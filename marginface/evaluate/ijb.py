"""IJB-B / IJB-C 1:1 template verification in insightface's layout.

Layout (``ROOT`` is e.g. ``IJBC/``; the prefix ``ijbc`` / ``ijbb`` is read off the file names)::

    ROOT/meta/ijbc_face_tid_mid.txt        image name, template id, media id (one face per line)
    ROOT/meta/ijbc_template_pair_label.txt template id 1, template id 2, label (1 same, 0 different)
    ROOT/meta/ijbc_name_5pts_score.txt     image name, 10 landmark numbers (x1 y1 ... x5 y5), detector score
    ROOT/loose_crop/<image name>           the loosely cropped face images

Protocol (insightface ``eval_ijbc.py``; see docs/evaluation.md):

1. align each image with its 5 landmarks onto the ArcFace template (`align_face`);
2. embed the image and its mirror image and add them (flip-sum); the feature keeps its norm;
3. optionally multiply each feature by its detector score (insightface's default: on);
4. media pooling: inside a template, the features of one media id (frames of one video, or one
   photo) are averaged; the template feature is the *sum* of its media features, L2-normalised;
5. the score of a template pair is the cosine of the two template features;
6. report TAR at FAR 1e-6 .. 1e-1 (only the targets the number of negative pairs supports) and AUC,
   with the flip-sum features and (a ``noflip`` block) with the plain ones of the same passes.

Lines are matched by image name (insightface assumes the two meta files list faces in the same
order; joining by name gives the same result when they do and a clear error when they do not).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from marginface.data.align import align_face
from marginface.data.images import read_image
from marginface.errors import UserError
from marginface.evaluate.metrics import equal_error_rate, roc_auc, roc_curve, tar_at_far
from marginface.evaluate.runner import _inference_model, embed_views
from marginface.inference import EmbedOptions, ModelInfo

IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IJB_OPTIONS = EmbedOptions(batch_size=128)  # the defaults of `evaluate_ijb` and its parts
_SUFFIXES = ("_face_tid_mid.txt", "_template_pair_label.txt", "_name_5pts_score.txt")


@dataclass
class IJBProtocol:
    """The parsed meta files. Face arrays have one row per line of ``face_tid_mid``."""

    name: str  # "ijbc" / "ijbb"
    root: Path
    image_dir: Path
    faces: list[str]  # image name per face
    templates: np.ndarray  # N int64
    medias: np.ndarray  # N int64
    landmarks: np.ndarray  # N×5×2 float64
    det_scores: np.ndarray  # N float64
    pairs: np.ndarray  # K×2 int64 template ids
    labels: np.ndarray  # K bool


def find_ijb_prefix(root: Union[str, Path]) -> Optional[str]:
    """``"ijbc"`` for a directory holding ``meta/ijbc_template_pair_label.txt`` etc., else None."""
    meta = Path(root) / "meta"
    if not meta.is_dir():
        return None
    hits = sorted(p.name[: -len(_SUFFIXES[1])] for p in meta.glob("*" + _SUFFIXES[1]))
    return hits[0] if hits else None


def is_ijb_dir(path: Union[str, Path]) -> bool:
    return Path(path).is_dir() and find_ijb_prefix(path) is not None


def _read_rows(path: Path, fields: Union[int, Sequence[int]], what: str) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise UserError(f"{path}: IJB meta file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    allowed = (fields,) if isinstance(fields, int) else tuple(fields)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in allowed:
            raise UserError(f"{path}: line {number}: expected {what} ({' or '.join(map(str, allowed))} fields), "
                            f"got {len(parts)}: {line.strip()[:80]!r}")
        rows.append((number, parts))
    if not rows:
        raise UserError(f"{path}: empty")
    return rows


def _ints(path: Path, number: int, values: Sequence[str]) -> list[int]:
    try:
        ints = [int(v) for v in values]
    except ValueError:
        raise UserError(f"{path}: line {number}: expected integers, got {' '.join(values)!r}") from None
    if any(not -2**63 <= v < 2**63 for v in ints):  # ids are stored as int64
        raise UserError(f"{path}: line {number}: id out of the 64-bit integer range: {' '.join(values)[:80]!r}")
    return ints


def read_ijb(root: Union[str, Path]) -> IJBProtocol:
    """Parse an insightface-layout IJB-B/IJB-C directory (see the module doc)."""
    root = Path(root)
    prefix = find_ijb_prefix(root)
    if prefix is None:
        raise UserError(f"{root}: not an IJB directory (expected meta/<ijbb|ijbc>{_SUFFIXES[1]})")
    meta = root / "meta"
    tid_mid, pair_file, lmk_file = (meta / (prefix + s) for s in _SUFFIXES)

    faces, templates, medias = [], [], []
    for number, parts in _read_rows(tid_mid, 3, "'image template_id media_id'"):
        faces.append(parts[0])
        tid, mid = _ints(tid_mid, number, parts[1:])
        templates.append(tid)
        medias.append(mid)

    pairs, labels = [], []
    for number, parts in _read_rows(pair_file, 3, "'template1 template2 label'"):
        t1, t2, label = _ints(pair_file, number, parts)
        if label not in (0, 1):
            raise UserError(f"{pair_file}: line {number}: label must be 0 or 1, got {label}")
        pairs.append((t1, t2))
        labels.append(bool(label))

    landmark_of: dict[str, tuple[np.ndarray, float]] = {}
    for number, parts in _read_rows(lmk_file, 12, "'image x1 y1 ... x5 y5 score'"):
        try:
            values = np.array([float(v) for v in parts[1:]])
        except ValueError:
            raise UserError(f"{lmk_file}: line {number}: landmarks and score must be numbers") from None
        if not np.isfinite(values).all():
            raise UserError(f"{lmk_file}: line {number}: non-finite landmark or score")
        landmark_of[parts[0]] = (values[:10].reshape(5, 2), float(values[10]))
    missing = [f for f in faces if f not in landmark_of]
    if missing:
        raise UserError(f"{lmk_file}: no landmarks for {len(missing)} image(s) of {tid_mid.name}, "
                        f"e.g. {missing[0]!r}")

    known = set(templates)
    for (t1, t2) in pairs:
        for t in (t1, t2):
            if t not in known:
                raise UserError(f"{pair_file}: template {t} has no faces in {tid_mid.name}")
    return IJBProtocol(
        name=prefix,
        root=root,
        image_dir=root / "loose_crop",
        faces=faces,
        templates=np.asarray(templates, dtype=np.int64),
        medias=np.asarray(medias, dtype=np.int64),
        landmarks=np.stack([landmark_of[f][0] for f in faces]),
        det_scores=np.array([landmark_of[f][1] for f in faces]),
        pairs=np.asarray(pairs, dtype=np.int64).reshape(-1, 2),
        labels=np.asarray(labels, dtype=bool),
    )


# ---------------------------------------------------------------------------------------------
# pure numpy: pooling and scores


def template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Media pooling: ``(sorted unique template ids, L2-normalised T×D template features)``.

    Within a template, the features of each media id are averaged; the template feature is the
    sum over its media, then L2-normalised (an all-zero template stays zero).
    """
    feats = np.asarray(features, dtype=np.float64)
    templates, medias = np.asarray(templates).reshape(-1), np.asarray(medias).reshape(-1)
    if feats.ndim != 2 or not (len(feats) == len(templates) == len(medias)):
        raise ValueError(f"features {feats.shape}, templates {templates.shape}, medias {medias.shape} do not match")
    # One group per (template, media); group means, then summed per template.
    keys = np.stack([templates, medias], axis=1)
    groups, group_of = np.unique(keys, axis=0, return_inverse=True)
    group_of = group_of.reshape(-1)
    sums = np.zeros((len(groups), feats.shape[1]))
    np.add.at(sums, group_of, feats)
    counts = np.bincount(group_of, minlength=len(groups)).astype(np.float64)
    media_means = sums / counts[:, None]
    unique_templates, template_of_group = np.unique(groups[:, 0], return_inverse=True)
    pooled = np.zeros((len(unique_templates), feats.shape[1]))
    np.add.at(pooled, template_of_group.reshape(-1), media_means)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return unique_templates, pooled / np.where(norms == 0, 1.0, norms)


def template_pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine score of each template pair (template features already L2-normalised)."""
    template_ids = np.asarray(template_ids)
    pairs = np.asarray(pairs).reshape(-1, 2)
    rows = np.searchsorted(template_ids, pairs)
    rows = np.clip(rows, 0, len(template_ids) - 1)
    if not np.array_equal(template_ids[rows], pairs):
        bad = pairs[template_ids[rows] != pairs][0]
        raise ValueError(f"template {bad} of the pair list has no feature")
    return np.einsum("kd,kd->k", template_feats[rows[:, 0]], template_feats[rows[:, 1]])


def ijb_metrics(scores, labels, far_targets: Sequence[float] = IJB_FAR_TARGETS) -> dict:
    """TAR@FAR (only targets with ``n_neg * far >= 1``), AUC, EER and pair counts."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    far, tar, _ = roc_curve(s, y)
    return {
        "tar_at_far": tar_at_far(s, y, far_targets),
        "auc": roc_auc(s, y),
        "eer": equal_error_rate(far, tar),
        "pos_mean": float(s[y].mean()),
        "neg_mean": float(s[~y].mean()),
        "pairs": int(s.size),
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
    }


# ---------------------------------------------------------------------------------------------
# images -> features


class _Prepared:
    """A model already in its fast eval form (fused once, not per batch), as a plain callable."""

    def __init__(self, model):
        self.info = ModelInfo.of(model)
        self._was_training = isinstance(model, torch.nn.Module) and model.training
        if isinstance(model, torch.nn.Module):
            model.eval()
        self._model = model
        self.net, self.channels_last = _inference_model(model)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)

    def restore(self) -> None:
        if isinstance(self._model, torch.nn.Module):
            self._model.train(self._was_training)


def ijb_image_views(
    model,
    protocol: IJBProtocol,
    *,
    options: Optional[EmbedOptions] = None,
    flip: Optional[bool] = None,
    batch_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    normalize: Optional[str] = None,
    workers: int = 4,
    align: Optional[Callable] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``(plain, mirrored)`` ``N×D`` float32 features (not normalised), one row per line of
    ``face_tid_mid``; ``mirrored`` is None without ``flip``.

    Images are read, aligned and embedded in batches (IJB-C's 469k faces never sit in memory at
    once); each distinct image name is embedded once.
    """
    if align is None:
        align = align_face
    options = EmbedOptions.make(options, default=IJB_OPTIONS, flip=flip, batch_size=batch_size, device=device,
                                normalize=normalize, amp_dtype=amp_dtype)
    size = ModelInfo.of(model).image_size
    names = list(dict.fromkeys(protocol.faces))
    first_row = {}
    for row, face in enumerate(protocol.faces):
        first_row.setdefault(face, row)

    def load(name: str) -> np.ndarray:
        path = protocol.image_dir / name
        if not path.is_file():
            raise UserError(f"{path}: image listed in the IJB meta files does not exist")
        return align(read_image(path), protocol.landmarks[first_row[name]], size=size)

    prepared = _Prepared(model)
    plain, mirrored = [], []
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            step = options.batch_size
            for start in range(0, len(names), step):
                batch = np.stack(list(pool.map(load, names[start : start + step])))
                p, m = embed_views(prepared, batch, options=options, optimize=False)
                plain.append(p)
                mirrored.append(m)
                if progress is not None:
                    progress(min(start + step, len(names)), len(names))
    finally:
        prepared.restore()
    row_of = {name: i for i, name in enumerate(names)}
    rows = np.array([row_of[f] for f in protocol.faces])  # back to one row per face line

    def per_face(views: list) -> np.ndarray:
        return np.concatenate(views)[rows].astype(np.float32, copy=False)

    return per_face(plain), (per_face(mirrored) if options.flip else None)


def ijb_image_features(model, protocol: IJBProtocol, **kwargs) -> np.ndarray:
    """``N×D`` float32 flip-sum features (plain ones without ``flip``), not normalised, one per
    line of ``face_tid_mid``; keyword arguments as `ijb_image_views`."""
    plain, mirrored = ijb_image_views(model, protocol, **kwargs)
    return plain if mirrored is None else plain + mirrored


def evaluate_ijb(
    model,
    root: Union[str, Path],
    *,
    options: Optional[EmbedOptions] = None,
    flip: Optional[bool] = None,
    detector_score: bool = True,
    batch_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    normalize: Optional[str] = None,
    workers: int = 4,
    far_targets: Sequence[float] = IJB_FAR_TARGETS,
    amp_dtype: Optional[torch.dtype] = None,
    return_scores: bool = False,
):
    """The full IJB 1:1 protocol on ``root``: metrics dict (plus ``(scores, labels)`` on request).

    As for the pair sets, the top level is the flip-sum result and ``noflip`` holds the metrics of
    the plain features, which come from the same forward passes (the plain view is one half of the
    flip-sum), so they cost nothing extra. With ``flip=False`` the top level is the plain result
    and there is no ``noflip`` block. The returned scores are the top level's.
    """
    protocol = read_ijb(root)
    options = EmbedOptions.make(options, default=IJB_OPTIONS, flip=flip, batch_size=batch_size, device=device,
                                normalize=normalize, amp_dtype=amp_dtype)
    flip = options.flip
    plain, mirrored = ijb_image_views(model, protocol, options=options, workers=workers)

    def scores_of(features: np.ndarray) -> tuple[np.ndarray, int]:
        if detector_score:
            features = features * protocol.det_scores[:, None]
        ids, template_feats = template_features(features, protocol.templates, protocol.medias)
        return template_pair_scores(ids, template_feats, protocol.pairs), len(ids)

    plain_scores, n_templates = scores_of(plain)
    plain_metrics = ijb_metrics(plain_scores, protocol.labels, far_targets)
    if mirrored is None:
        metrics, scores = plain_metrics, plain_scores
    else:
        scores = scores_of(plain + mirrored)[0]  # the same float32 sum as `ijb_image_features`
        metrics = ijb_metrics(scores, protocol.labels, far_targets)
        metrics["noflip"] = {k: v for k, v in plain_metrics.items() if k not in ("pairs", "positives", "negatives")}
    metrics.update({"name": protocol.name, "images": len(set(protocol.faces)), "templates": n_templates,
                    "flip": flip, "detector_score": detector_score})
    return (metrics, (scores, protocol.labels)) if return_scores else metrics
