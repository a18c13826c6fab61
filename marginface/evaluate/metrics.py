"""Face-verification metrics from pair scores (pure numpy).

Scores are cosine similarities of L2-normalised embeddings; higher means "same person".

`verification_metrics` reproduces the accuracy protocol of the ArcFace paper's evaluation code
(insightface ``verification.py``, the numbers every paper reports for LFW / CFP-FP / AgeDB-30):

- it works on the squared Euclidean distance of unit vectors, ``d = 2 - 2 * cos``;
- a pair is predicted "same" when ``d < t`` for ``t`` on the grid ``np.arange(0, 4, 0.01)``;
- the pairs are split into ``nfolds`` consecutive folds without shuffling (sklearn
  ``KFold(shuffle=False)`` sizes: the first ``n % nfolds`` folds get one extra pair); with
  ``nfolds == 1`` the single fold is both training and test set, as insightface's ``LFold`` does;
- for each fold the threshold with the best accuracy on the *other* folds is chosen (ties -> the
  lowest grid threshold, as ``np.argmax``) and the accuracy is measured on the held-out fold;
- ``accuracy`` / ``accuracy_std`` are the mean / population std (``np.std``) over folds.

The threshold-free metrics (AUC, EER, TAR@FAR) use the exact ROC of the scores.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DISTANCE_GRID = np.arange(0, 4, 0.01)  # insightface's threshold grid on squared distance
DEFAULT_FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def _check_inputs(scores, issame) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(issame).reshape(-1)
    if s.size == 0:
        raise ValueError("verification metrics need at least one pair, got none")
    if s.shape != y.shape:
        raise ValueError(f"scores and issame differ in length: {s.size} scores, {y.size} labels")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("issame must be booleans or 0/1")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} non-finite values (NaN/inf)")
    return s, y


def fold_bounds(n: int, nfolds: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``nfolds`` consecutive folds over ``n`` items, sklearn KFold sizes."""
    if nfolds < 1:
        raise ValueError(f"nfolds must be >= 1, got {nfolds}")
    if nfolds > n:
        raise ValueError(f"cannot split {n} pairs into {nfolds} folds")
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    stops = np.cumsum(sizes)
    return [(int(stop - size), int(stop)) for stop, size in zip(stops, sizes)]


def _correct_counts(dist: np.ndarray, issame: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Number of correctly classified pairs for each grid threshold (same <=> d < t)."""
    pos = np.sort(dist[issame])
    neg = np.sort(dist[~issame])
    # searchsorted(side="left") counts the elements strictly below t: exactly `d < t`.
    pos_accepted = np.searchsorted(pos, grid, side="left")
    neg_accepted = np.searchsorted(neg, grid, side="left")
    return pos_accepted + (neg.size - neg_accepted)


def kfold_accuracy(
    dist: np.ndarray, issame: np.ndarray, nfolds: int = 10, grid: np.ndarray = DISTANCE_GRID
) -> tuple[np.ndarray, np.ndarray]:
    """insightface's k-fold protocol on distances: (held-out accuracy, chosen threshold) per fold."""
    n = dist.size
    bounds = fold_bounds(n, nfolds)
    per_fold = np.stack([_correct_counts(dist[a:b], issame[a:b], grid) for a, b in bounds])
    total = per_fold.sum(axis=0)
    accuracies, thresholds = [], []
    for k, (a, b) in enumerate(bounds):
        if nfolds == 1:  # insightface's LFold: train on the test set itself
            train_correct = total
        else:
            train_correct = total - per_fold[k]
        # Same denominator for every threshold, so comparing counts equals comparing accuracies.
        best = int(np.argmax(train_correct))
        thresholds.append(grid[best])
        accuracies.append(per_fold[k, best] / (b - a))
    return np.asarray(accuracies, dtype=np.float64), np.asarray(thresholds, dtype=np.float64)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values get the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0  # ranks first+1 .. first+count
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, counts)
    return ranks


def _require_both_classes(issame: np.ndarray, what: str) -> None:
    n_pos = int(issame.sum())
    if n_pos == 0 or n_pos == issame.size:
        only = "positive" if n_pos else "negative"
        raise ValueError(f"{what} needs both positive and negative pairs; got only {only} pairs")


def roc_auc(scores, issame) -> float:
    """Exact ROC AUC (probability a positive outscores a negative, ties count 1/2)."""
    s, y = _check_inputs(scores, issame)
    _require_both_classes(y, "ROC AUC")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores, issame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(far, tar, thresholds)``; a pair is accepted when ``score >= threshold``.

    Thresholds are the distinct scores in decreasing order, preceded by ``+inf`` (nothing
    accepted), so the curve starts at (0, 0) and ends at (1, 1).
    """
    s, y = _check_inputs(scores, issame)
    _require_both_classes(y, "ROC curve")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # Last index of each run of equal scores: all tied pairs are accepted together.
    run_ends = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    true_acc = np.cumsum(y_sorted)[run_ends]
    false_acc = (run_ends + 1) - true_acc
    far = np.r_[0.0, false_acc / float((~y).sum())]
    tar = np.r_[0.0, true_acc / float(y.sum())]
    thresholds = np.r_[np.inf, s_sorted[run_ends]]
    return far, tar, thresholds


def equal_error_rate(far: np.ndarray, tar: np.ndarray) -> float:
    """Where the ROC crosses FAR == FRR (= 1 - TAR), linearly interpolated between ROC points."""
    gap = far - (1.0 - tar)  # non-decreasing along the curve, -1 at (0,0) and +1 at (1,1)
    i = int(np.argmax(gap >= 0))
    if gap[i] == 0 or i == 0:
        return float(far[i])
    d_far, d_tar = far[i] - far[i - 1], tar[i] - tar[i - 1]
    alpha = (1.0 - tar[i - 1] - far[i - 1]) / (d_far + d_tar)
    return float(far[i - 1] + alpha * d_far)


def far_key(far: float) -> str:
    """``1e-3`` -> ``"1e-3"`` (short, stable keys for reports)."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def tar_at_far(
    scores, issame, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS
) -> dict[str, float]:
    """TAR at the most lenient threshold whose FAR <= target, for each reachable target.

    A target is reported only when there are enough negatives to measure it
    (``n_neg * far >= 1``); smaller FARs would be read off zero false accepts and mean nothing.
    """
    s, y = _check_inputs(scores, issame)
    _require_both_classes(y, "TAR@FAR")
    n_neg = int((~y).sum())
    far, tar, _ = roc_curve(s, y)
    false_accepts = np.rint(far * n_neg)
    result: dict[str, float] = {}
    for target in far_targets:
        if n_neg * target < 1 - 1e-9:
            continue
        # Count-based comparison avoids float trouble at FAR == target exactly.
        allowed = math.floor(n_neg * target + 1e-9)
        idx = int(np.nonzero(false_accepts <= allowed)[0][-1])
        result[far_key(target)] = float(tar[idx])
    return result


VAL_DISTANCE_GRID = np.arange(0, 4, 0.001)  # insightface calculate_val's finer grid on squared distance
VAL_FAR_TARGETS = (1e-3,)  # the FAR insightface's verification.py reports VAL at


def _interpolated_threshold(far: np.ndarray, grid: np.ndarray, target: float) -> float:
    """The threshold at which the (non-decreasing) ``far`` curve over ``grid`` reaches ``target``,
    linearly interpolated as scipy's ``interp1d(far, grid, kind="slinear")(target)`` does: on a
    run of equal FARs it takes the last grid point of the run; between two FAR values it
    interpolates between the last point of the lower run and the first of the higher one; at the
    top FAR itself, the first point reaching it. 0.0 when ``far`` never reaches ``target``."""
    if far.max() < target:
        return 0.0
    if target == far[-1]:
        return float(grid[int(np.searchsorted(far, target, side="left"))])
    i = int(np.searchsorted(far, target, side="right")) - 1  # last index with far <= target
    if i < 0:
        raise ValueError(f"FAR target {target} is below the smallest FAR {far[0]}")
    if far[i] == target:
        return float(grid[i])
    alpha = (target - far[i]) / (far[i + 1] - far[i])
    return float(grid[i] + alpha * (grid[i + 1] - grid[i]))


def _val_far(dist: np.ndarray, issame: np.ndarray, threshold: float) -> tuple[float, float]:
    accepted = dist < threshold
    return float((accepted & issame).sum() / issame.sum()), float((accepted & ~issame).sum() / (~issame).sum())


def val_at_far(scores, issame, far_targets: Sequence[float] = VAL_FAR_TARGETS, nfolds: int = 10,
               grid: np.ndarray = VAL_DISTANCE_GRID) -> dict[str, dict]:
    """insightface's VAL@FAR (``calculate_val`` in ``recognition/arcface_torch/eval/verification.py``).

    On squared distances ``d = 2 - 2 * cos`` and the same consecutive folds as the accuracy: for
    each fold, the FAR of ``d < t`` on the *other* folds is computed for every ``t`` of
    ``np.arange(0, 4, 0.001)``; the threshold reaching ``far_target`` is interpolated on that curve
    (0 when it never does); VAL (true accept rate) and FAR are measured on the held-out fold at it.
    ``{"1e-3": {"val": mean, "val_std": population std, "far": mean}}`` per target. Unlike
    ``tar_at_far`` (the exact ROC of all pairs), the threshold is learnt on other folds, so the FAR
    achieved scatters around the target. Empty when a fold lacks positive or negative pairs.
    """
    s, y = _check_inputs(scores, issame)
    dist = 2.0 - 2.0 * s
    bounds = fold_bounds(s.size, nfolds)
    if any(not 0 < int(y[a:b].sum()) < b - a for a, b in bounds):
        return {}
    # false accepts of each grid threshold, per fold: counts of negatives with d < t
    neg_counts = np.stack([np.searchsorted(np.sort(dist[a:b][~y[a:b]]), grid, side="left") for a, b in bounds])
    neg_sizes = np.array([int((~y[a:b]).sum()) for a, b in bounds])
    result: dict[str, dict] = {}
    for target in far_targets:
        vals, fars = [], []
        for k, (a, b) in enumerate(bounds):
            train = np.arange(len(bounds)) != k if nfolds > 1 else np.ones(1, bool)
            far_train = neg_counts[train].sum(0) / neg_sizes[train].sum()
            threshold = _interpolated_threshold(far_train, grid, target)
            val, far = _val_far(dist[a:b], y[a:b], threshold)
            vals.append(val)
            fars.append(far)
        result[far_key(target)] = {"val": float(np.mean(vals)), "val_std": float(np.std(vals)),
                                   "far": float(np.mean(fars))}
    return result


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def verification_metrics(
    scores,
    issame,
    *,
    nfolds: int = 10,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
) -> dict:
    """All verification metrics of cosine ``scores`` for pairs labelled ``issame``.

    Keys: ``accuracy``, ``accuracy_std`` (insightface k-fold protocol, see module doc),
    ``threshold`` (cosine) / ``threshold_distance`` (squared distance) of the best grid threshold
    on the whole set, ``accuracy_same`` / ``accuracy_diff`` at that threshold, ``auc``, ``eer``,
    ``tar_at_far`` (keys like ``"1e-3"``), ``pos_mean``, ``neg_mean``, ``pairs``, ``nfolds``.
    With only one class present ``auc``/``eer`` are NaN (null in JSON), ``tar_at_far`` is empty,
    the mean/accuracy of the missing class is NaN, and ``note`` (only then) says why in one
    sentence (`single_class_note`). All values are plain Python numbers.
    """
    s, y = _check_inputs(scores, issame)
    dist = 2.0 - 2.0 * s
    fold_acc, _ = kfold_accuracy(dist, y, nfolds)

    best = int(np.argmax(_correct_counts(dist, y, DISTANCE_GRID)))
    t = float(DISTANCE_GRID[best])
    accepted = dist < t
    both_classes = 0 < int(y.sum()) < y.size
    if both_classes:
        far, tar, _ = roc_curve(s, y)
        auc, eer = roc_auc(s, y), equal_error_rate(far, tar)
        tars = tar_at_far(s, y, far_targets)
    else:
        auc, eer, tars = float("nan"), float("nan"), {}
    result = {
        "accuracy": float(fold_acc.mean()),
        "accuracy_std": float(fold_acc.std()),
        "threshold": 1.0 - t / 2.0,
        "threshold_distance": t,
        "accuracy_same": _mean_or_nan(accepted[y].astype(np.float64)),
        "accuracy_diff": _mean_or_nan((~accepted[~y]).astype(np.float64)),
        "auc": auc,
        "eer": eer,
        "tar_at_far": tars,
        "val_at_far": val_at_far(s, y, nfolds=nfolds) if both_classes else {},  # insightface's protocol
        "pos_mean": _mean_or_nan(s[y]),
        "neg_mean": _mean_or_nan(s[~y]),
        "pairs": int(s.size),
        "nfolds": int(nfolds),
    }
    if not both_classes:
        result["note"] = single_class_note(y)
    return result


def single_class_note(issame) -> str:
    """Why AUC, EER and TAR@FAR are missing for a set holding one kind of pair only."""
    y = np.asarray(issame, dtype=bool)
    kind, other = ("same-person", "different-person") if y.all() else ("different-person", "same-person")
    return (f"all {y.size} pairs are {kind} pairs: AUC, EER and TAR@FAR need {other} pairs too, so they are "
            f"not computed (NaN/null); accuracy only measures how many {kind} pairs pass the threshold")
