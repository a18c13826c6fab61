"""Evaluation reports: run a suite of sets, write ``report.json`` / ``report.md`` / plots, compare runs.

- `evaluate_suite(model, paths)`: every set (``.bin``, LFW directory, pairs ``.txt``/``.csv``,
  IJB-B/C directory) evaluated with the flip-sum embedding (the top-level keys of the design
  contract) and also without it (a nested ``noflip`` block) from the same forward passes. Returns the ``eval`` object and the pair scores for plotting.
- `write_report(out_dir, report, curves=None)`: ``report.json`` (valid JSON: NaN -> null),
  ``report.md`` (one table, set x metric) and, with matplotlib, ``roc.png`` (all sets, log FAR)
  and ``scores.png`` (same/different score histograms; needs the pair scores). The trainer calls
  it at the end of a run with its report only: the ROC then goes through each set's operating
  points and there is no histogram.
- `compare_reports(a, b)`: two runs' ``eval`` side by side with the difference.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from marginface.data.verification import load_pair_set
from marginface.errors import UserError
from marginface.evaluate.ijb import evaluate_ijb, is_ijb_dir
from marginface.evaluate.plots import plot_roc, plot_score_histograms
from marginface.evaluate.runner import evaluate_pair_set
from marginface.inference import EmbedOptions, ModelInfo
from marginface.io.atomic import atomic_write_text, ensure_dir
from marginface.io.texttable import MAX_WIDTH, table
from marginface.jsonout import json_safe  # one implementation; re-exported here

Curves = dict  # set name -> (scores, issame)


# ---------------------------------------------------------------------------------------------
# running the suite


SUITE_OPTIONS = EmbedOptions(batch_size=128)  # the defaults of `evaluate_suite` and its parts


def evaluate_pair_set_both(model, pair_set, *, options: Optional[EmbedOptions] = None, flip: Optional[bool] = None,
                           batch_size: Optional[int] = None, device: Optional[Union[str, torch.device]] = None,
                           normalize: Optional[str] = None, amp_dtype: Optional[torch.dtype] = None,
                           nfolds: Optional[int] = None) -> tuple[dict, tuple]:
    """`marginface.evaluate.runner.evaluate_pair_set` with ``return_scores`` and the suite's
    defaults (`SUITE_OPTIONS`, batch 128): ``(metrics, (scores, issame))``. The one pair-set
    evaluation is the runner's; training and ``marginface eval`` report the same keys."""
    options = EmbedOptions.make(options, default=SUITE_OPTIONS, flip=flip, batch_size=batch_size, device=device,
                                normalize=normalize, amp_dtype=amp_dtype)
    return evaluate_pair_set(model, pair_set, options=options, nfolds=nfolds, return_scores=True)


def _unique_name(name: str, taken: Mapping) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name}-{k}" in taken:
        k += 1
    return f"{name}-{k}"


def evaluate_suite(
    model,
    paths: Sequence[Union[str, Path]],
    *,
    options: Optional[EmbedOptions] = None,
    flip: Optional[bool] = None,
    batch_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    normalize: Optional[str] = None,
    amp_dtype: Optional[torch.dtype] = None,
    nfolds: Optional[int] = None,
    detector_score: bool = True,
    log: Optional[Callable[[str], None]] = None,
    loader: Optional[Callable] = None,
) -> tuple[dict, Curves, dict]:
    """Evaluate ``model`` on each set: ``(eval results by set name, curves, set name -> path)``.

    Pair sets are loaded at the model's ``input_size`` by ``loader(path, image_size=...)``
    (default `load_pair_set`; ``marginface eval`` passes it with its ``--align``, detector,
    ``--sample-pairs`` and file options); an IJB directory runs the IJB template protocol
    (`marginface.evaluate.ijb`). Set names come from the files (``lfw.bin`` -> ``lfw``); a
    repeated name gets ``-2``, ``-3``...
    """
    options = EmbedOptions.make(options, default=SUITE_OPTIONS, flip=flip, batch_size=batch_size, device=device,
                                normalize=normalize, amp_dtype=amp_dtype)
    size = ModelInfo.of(model).input_size
    results: dict = {}
    curves: Curves = {}
    sources: dict = {}
    for path in paths:
        path = Path(path)
        if is_ijb_dir(path):
            if log:
                log(f"evaluating {path} (IJB template protocol)")
            metrics, curve = evaluate_ijb(model, path, options=options, detector_score=detector_score,
                                          return_scores=True)
        else:
            pair_set = (loader or load_pair_set)(path, image_size=size)
            if log:
                log(f"evaluating {pair_set.name}: {len(pair_set)} pairs, {len(pair_set.images)} images")
            metrics, curve = evaluate_pair_set_both(model, pair_set, options=options, nfolds=nfolds)
        name = _unique_name(metrics.get("name") or path.stem, results)
        metrics["name"] = name
        results[name] = metrics
        curves[name] = curve
        sources[name] = str(path)
    return results, curves, sources


# ---------------------------------------------------------------------------------------------
# JSON


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` atomically (`marginface.io.atomic`): a crash, kill or full disk never
    leaves half a file or a temp file; a failed write is a `UserError` naming ``path``."""
    atomic_write_text(path, text)


def load_report(path: Union[str, Path]) -> dict:
    """``report.json`` of a run directory (or the file itself)."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no report.json (run `marginface eval --model RUN --sets ...` or train first)")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{file}: not a readable report ({str(exc)[:200]})") from None
    except RecursionError:  # "[[[[...": json nests by recursion
        raise UserError(f"{file}: not a readable report (JSON nested too deeply)") from None
    if not isinstance(report, dict) or not isinstance(report.get("eval", {}), dict):
        raise UserError(f"{file}: not a marginface report (no 'eval' object)")
    bad = next((k for k, v in report.get("eval", {}).items() if not isinstance(v, dict)), None)
    if bad is not None:
        raise UserError(f"{file}: not a marginface report ('eval.{bad}' is not an object of metrics)")
    return report


def merge_eval(out_dir: Union[str, Path], results: dict, *, model_info: Optional[dict] = None,
               sources: Optional[dict] = None) -> dict:
    """The report to write into ``out_dir``: its existing ``report.json`` (the training report
    keeps its ``train``/``model``/``best``) with these sets added or replaced in ``eval``."""
    file = Path(out_dir) / "report.json"
    report = load_report(file) if file.is_file() else {}
    report["eval"] = {**report.get("eval", {}), **results}
    if model_info and not report.get("model"):
        report["model"] = model_info
    if sources:
        report["eval_sources"] = {**report.get("eval_sources", {}), **sources}
    return report


# ---------------------------------------------------------------------------------------------
# tables


def _far_sort_key(key: str) -> float:
    try:
        return -float(key)
    except ValueError:
        return 0.0


def headline(metrics: Mapping) -> dict:
    """The scalar metrics of one set, flattened in display order (``tar@1e-3``, ``accuracy_noflip``)."""
    out: dict = {}
    for key in ("accuracy", "accuracy_std"):
        if key in metrics:
            out[key] = metrics[key]
    noflip = metrics.get("noflip")
    if isinstance(noflip, Mapping) and "accuracy" in noflip:
        out["accuracy_noflip"] = noflip["accuracy"]
    for key in ("threshold", "threshold_distance", "auc", "eer"):
        if key in metrics:
            out[key] = metrics[key]
    if isinstance(noflip, Mapping) and "accuracy" not in noflip and "auc" in noflip:
        out["auc_noflip"] = noflip["auc"]  # IJB: no accuracy protocol, its no-flip figure is the AUC
    for key in sorted(metrics.get("tar_at_far") or {}, key=_far_sort_key):
        out[f"tar@{key}"] = metrics["tar_at_far"][key]
    for key in ("accuracy_same", "accuracy_diff", "pos_mean", "neg_mean", "xnorm"):
        if key in metrics:
            out[key] = metrics[key]
    for key in sorted((k for k in metrics if k.startswith("rank_")), key=lambda k: int(k[5:]) if k[5:].isdigit() else 0):
        out[key] = metrics[key]
    for key in sorted(metrics.get("tpir_at_fpir") or {}, key=_far_sort_key):
        out[f"tpir@{key}"] = metrics["tpir_at_fpir"][key]
    for key in ("pairs", "templates", "probes"):
        if key in metrics:
            out[key] = metrics[key]
    return out


def _columns(results: Mapping) -> list[str]:
    columns: list[str] = []
    for metrics in results.values():
        for key in headline(metrics):
            if key not in columns:
                columns.append(key)
    order = {k: i for i, k in enumerate(["accuracy", "accuracy_std", "accuracy_noflip", "threshold",
                                         "threshold_distance", "auc", "auc_noflip", "eer"])}
    tail = ["accuracy_same", "accuracy_diff", "pos_mean", "neg_mean", "xnorm", "pairs", "templates", "probes"]

    def rank(c: str):
        if c in order:
            return (0, order[c], 0.0)
        if c.startswith("tar@"):
            return (1, 0, _far_sort_key(c[4:]))
        if c.startswith("rank_"):
            return (2, int(c[5:]) if c[5:].isdigit() else 0, 0.0)
        if c.startswith("tpir@"):
            return (3, 0, _far_sort_key(c[5:]))
        return (4, tail.index(c) if c in tail else len(tail), 0.0)

    return sorted(columns, key=rank)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(results: dict, columns: Optional[list] = None) -> str:
    """A plain-text table: one row per verification set, one column per headline metric."""
    columns = columns or ["accuracy", "accuracy_std", "threshold", "auc", "eer", "tar@1e-3", "pos_mean", "neg_mean", "xnorm", "pairs"]
    rows = [["set"] + columns]
    for name, m in results.items():
        row = [name]
        for c in columns:
            v = m.get("tar_at_far", {}).get(c.split("@")[1]) if c.startswith("tar@") else m.get(c)
            row.append("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        rows.append(row)
    if len(table(rows, max_width=1 << 30).splitlines()[0]) > MAX_WIDTH:  # too wide: short headers first,
        rows[0] = [SHORT_HEADERS.get(c, c) for c in rows[0]]  # then blocks, each starting with the set names
    return table(rows)


# the console table's headers when the full names make it wider than MAX_WIDTH columns
SHORT_HEADERS = {"accuracy": "acc", "accuracy_std": "acc_std", "accuracy_noflip": "acc_noflip",
                  "accuracy_same": "acc_same", "accuracy_diff": "acc_diff", "threshold": "thresh"}


def format_results_table(results: Mapping) -> str:
    """Plain-text table (set x metric) for the console."""
    flat = {name: {**headline(m), "tar_at_far": m.get("tar_at_far", {})} for name, m in results.items()}
    columns = [c for c in _columns(results) if c != "threshold_distance"]
    notes = [f"note: {name}: {m['note']}" for name, m in results.items() if isinstance(m, Mapping) and m.get("note")]
    return "\n".join([format_table(flat, columns)] + notes)


_MD_NAMES = {
    "accuracy": "accuracy (flip)", "accuracy_noflip": "accuracy (no flip)", "threshold": "threshold (cos)",
    "threshold_distance": "threshold (dist²)", "auc": "AUC", "auc_noflip": "AUC (no flip)", "eer": "EER", "accuracy_same": "same acc",
    "accuracy_diff": "diff acc", "pos_mean": "pos mean", "neg_mean": "neg mean", "xnorm": "XNorm",
}


def format_markdown(report: Mapping, plots: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """``report.md``: model/training summary, one set x metric table, the plots."""
    lines = ["# Evaluation report", ""]
    model = report.get("model") or {}
    if model:
        parts = [f"backbone `{model.get('backbone', '?')}`"]
        if model.get("params") is not None:
            parts.append(f"{model['params'] / 1e6:.2f}M parameters")
        if model.get("embedding_size") is not None:
            parts.append(f"embedding {model['embedding_size']}")
        lines += ["Model: " + ", ".join(parts) + ".", ""]
    train = report.get("train") or {}
    if train:
        ips = train.get("images_per_second")
        lines += [f"Training: {train.get('steps', '?')} steps"
                  + (f", {ips:.1f} images/s" if isinstance(ips, (int, float)) else "")
                  + (f", {train['wall_seconds'] / 60:.1f} min wall" if isinstance(train.get("wall_seconds"), (int, float)) else "")
                  + ".", ""]
    best = report.get("best") or {}
    if best.get("metric"):
        lines += [f"Best checkpoint: {best['metric']} = {_fmt(best.get('value'))} at step {best.get('step')}.", ""]
    results = report.get("eval") or {}
    if not results:
        lines += ["No evaluation sets.", ""]
    else:
        columns = [c for c in _columns(results) if c != "accuracy_std"]
        header = ["set"] + [_MD_NAMES.get(c, c.replace("tar@", "TAR@FAR=").replace("tpir@", "TPIR@FPIR="))
                            for c in columns]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * len(columns)) + "|")
        for name, metrics in results.items():
            flat = headline(metrics)
            cells = [name]
            for c in columns:
                if c == "accuracy" and "accuracy_std" in flat and flat.get("accuracy") is not None:
                    cells.append(f"{_fmt(flat['accuracy'])} ± {_fmt(flat['accuracy_std'])}")
                else:
                    cells.append(_fmt(flat.get(c)))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Accuracy: mean ± std over 10 folds, each fold's threshold chosen on the other 9 "
                      "(insightface protocol, see docs/evaluation.md). Thresholds are the best on the whole set. "
                      "Scores are cosine similarities.", ""]
    for note in notes:
        lines += [note, ""]
    for plot in plots:
        lines += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# writing


def write_report(out_dir: Union[str, Path], report: Mapping, curves: Optional[Curves] = None, *,
                 plots: bool = True) -> dict:
    """Write ``report.json``, ``report.md`` and (``plots`` and matplotlib) ``roc.png`` /
    ``scores.png`` into ``out_dir``. Returns ``{"report_json", "report_md", "plots": [...]}``.

    ``curves`` maps set names to ``(scores, issame)``; sets without one are plotted from the
    operating points in ``report["eval"]`` and get no histogram.
    """
    out = ensure_dir(out_dir)
    report = json_safe(dict(report))
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    results = report.get("eval") or {}
    curves = {k: v for k, v in (curves or {}).items() if k in results}
    written: list[str] = []
    notes: list[str] = []
    if plots and results:
        roc = hist = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                roc = plot_roc(out / "roc.png", curves, results, title="ROC (flip-sum)")
                thresholds = {k: results[k].get("threshold") for k in curves}
                hist = plot_score_histograms(out / "scores.png", curves, thresholds)
            except Exception as exc:  # a plot must never cost the report (the trainer calls this last)
                warnings.warn(f"could not draw the evaluation plots: {type(exc).__name__}: {exc}")
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        written = [str(p) for p in (roc, hist) if p is not None]
        if roc is not None and len(curves) < len(results):
            notes.append("Sets without pair scores at hand (e.g. the training report) are drawn through "
                         "their operating points; `marginface eval --model RUN --sets ...` draws exact curves "
                         "and score histograms.")
    write_atomic(out / "report.md", format_markdown(report, written, notes))
    return {"report_json": str(out / "report.json"), "report_md": str(out / "report.md"), "plots": written}


# ---------------------------------------------------------------------------------------------
# comparing runs


def compare_reports(a: Mapping, b: Mapping, labels: Sequence[str] = ("a", "b")) -> dict:
    """``{"a", "b", "sets": {set: {metric: {"a", "b", "diff"}}}}`` over the union of sets and
    metrics (``diff`` = b - a; None where either side lacks the number)."""
    ea, eb = a.get("eval") or {}, b.get("eval") or {}
    sets: dict = {}
    for name in list(ea) + [n for n in eb if n not in ea]:
        ha, hb = headline(ea.get(name) or {}), headline(eb.get(name) or {})
        rows = {}
        for metric in _columns({0: {**(ea.get(name) or {})}, 1: {**(eb.get(name) or {})}}):
            va, vb = ha.get(metric), hb.get(metric)
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in (va, vb))
            rows[metric] = {"a": va, "b": vb, "diff": (vb - va) if numeric else None}
        sets[name] = rows
    return json_safe({"a": labels[0], "b": labels[1], "sets": sets})


def format_comparison(comparison: Mapping) -> str:
    """Console table: set, metric, A, B, B - A."""
    rows = [["set", "metric", str(comparison["a"]), str(comparison["b"]), "diff"]]
    for name, metrics in comparison["sets"].items():
        for metric, v in metrics.items():
            diff = v["diff"]
            rows.append([name, metric, _fmt(v["a"]), _fmt(v["b"]),
                         "-" if diff is None else (f"{diff:+.4f}" if isinstance(diff, float) else f"{diff:+d}")])
    legend = []
    if len(rows[0][2]) + len(rows[0][3]) > 40:  # long run paths: A and B in the header, named above the table
        legend = [f"A: {comparison['a']}", f"B: {comparison['b']}"]
        rows[0][2:4] = ["A", "B"]
    return "\n".join(legend + [table(rows, keep=2)])
