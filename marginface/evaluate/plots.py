"""Evaluation plots as PNG files (matplotlib, Agg backend; skipped with a warning without it).

- `plot_roc`: the ROC curves of all sets on one log-FAR axis. A set given with its pair scores
  gets its exact curve; a set known only from a report (the trainer's ``report.json``) is drawn
  through its operating points (TAR@FAR and the EER point), marked as such.
- `plot_score_histograms`: same / different pair score distributions, one panel per set.
- `plot_cmc`: identification rate against rank (log axis), a line per curve (MegaFace: one per
  distractor-set size).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from marginface.evaluate.metrics import roc_curve
from marginface.io.atomic import atomic_write

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]  # set name -> (scores, issame)


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping evaluation plots (pip install matplotlib)",
                      RuntimeWarning, stacklevel=3)
        return None
    return plt


def operating_points(metrics: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """``(far, tar)`` points a report records for a set: TAR@FAR entries and the EER point."""
    points = []
    for key, tar in (metrics.get("tar_at_far") or {}).items():
        if isinstance(tar, (int, float)) and tar == tar:
            points.append((float(key), float(tar)))
    eer = metrics.get("eer")
    if isinstance(eer, (int, float)) and eer == eer and eer > 0:
        points.append((float(eer), 1.0 - float(eer)))
    points.sort()
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def _has_both_classes(issame: np.ndarray) -> bool:
    return 0 < int(np.sum(issame)) < len(issame)


def plot_roc(path: Path, curves: Optional[Curves] = None, reports: Optional[Mapping[str, Mapping]] = None,
             title: str = "ROC") -> Optional[Path]:
    """One figure, log-scale FAR on x, TAR on y, a line per set; returns the file or None."""
    curves = dict(curves or {})
    reports = {k: v for k, v in (reports or {}).items() if k not in curves}
    drawable = {k: v for k, v in curves.items() if _has_both_classes(np.asarray(v[1]))}
    point_sets = {k: operating_points(m) for k, m in reports.items()}
    point_sets = {k: v for k, v in point_sets.items() if len(v[0])}
    if not drawable and not point_sets:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    smallest = 1.0
    for name, (scores, issame) in drawable.items():
        far, tar, _ = roc_curve(scores, issame)
        n_neg = int(np.sum(~np.asarray(issame, dtype=bool)))
        keep = far > 0  # log axis: FAR 0 cannot be drawn; the first reachable FAR is 1/n_neg
        smallest = min(smallest, 1.0 / max(n_neg, 1))
        ax.step(far[keep], tar[keep], where="post", label=f"{name} ({len(scores)} pairs)")
    for name, (far, tar) in point_sets.items():
        smallest = min(smallest, float(far.min()))
        ax.plot(far, tar, "o--", label=f"{name} (operating points)")
    ax.set_xscale("log")
    ax.set_xlim(10 ** math.floor(math.log10(smallest)), 1.0)
    ax.set_ylim(0.0, 1.005)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(plt, fig, path)


def plot_score_histograms(path: Path, curves: Curves, thresholds: Optional[Mapping[str, float]] = None,
                          bins: int = 50) -> Optional[Path]:
    """Histograms of same-pair and different-pair cosine scores, one panel per set (and the
    set's best threshold as a vertical line when given)."""
    curves = {k: (np.asarray(s, dtype=np.float64), np.asarray(y, dtype=bool)) for k, (s, y) in (curves or {}).items()}
    if not curves:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    n = len(curves)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    for ax, (name, (scores, issame)) in zip(axes.flat, curves.items()):
        if issame.any():
            ax.hist(scores[issame], bins=edges, alpha=0.6, density=True, label=f"same ({int(issame.sum())})")
        if (~issame).any():
            ax.hist(scores[~issame], bins=edges, alpha=0.6, density=True, label=f"different ({int((~issame).sum())})")
        threshold = (thresholds or {}).get(name)
        if isinstance(threshold, (int, float)) and threshold == threshold:
            ax.axvline(threshold, color="k", linestyle=":", label=f"threshold {threshold:.3f}")
        ax.set_title(name)
        ax.set_xlabel("cosine similarity")
        ax.legend(fontsize="x-small")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(plt, fig, path)


def plot_cmc(path: Path, curves: Mapping[str, list], title: str = "CMC") -> Optional[Path]:
    """Cumulative match characteristic: ``curves`` maps a label to its identification rates at
    ranks 1, 2, ...; one figure, rank on a log x axis. Returns the file, or None without curves
    or matplotlib."""
    curves = {k: np.asarray(v, dtype=np.float64) for k, v in curves.items() if len(v)}
    if not curves:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
    for label, rates in curves.items():
        ranks = np.arange(1, len(rates) + 1)
        ax.plot(ranks, rates, marker="." if len(rates) < 20 else None, label=f"{label} (rank-1 {rates[0]:.4f})")
    ax.set_xscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_ylim(0.0, 1.005)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return _save(plt, fig, path)


def _save(plt, fig, path) -> Path:
    """``fig`` as PNG into ``path`` atomically (no half-written image on a full disk), then closed."""
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path
