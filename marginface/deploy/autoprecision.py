"""``--precision auto``: the fastest compiled inference path whose accuracy was checked, once per
machine and model.

`choose_precision` compiles the model for each of fp32 / bf16 / x86 int8 (`deploy.compiled`;
what this CPU or install cannot build is skipped with the reason), embeds the calibration batch
with each and compares it with eager fp32: a path whose smallest cosine to fp32 is below its bound
(``ACCURACY_BOUNDS``, the bounds tests/test_compiled.py holds the compiled paths to) is never
picked. The checked paths and eager fp32 are then timed at batch 1, interleaved round by round
(a change of load on a shared machine hits them alike), and the checked path with the fastest round
wins (other jobs only add time; medians are reported too).

The choice is cached as JSON next to the model file (``<checkpoint or package>.precision.json``,
written atomically through `marginface.io.atomic`), one entry per CPU: the key is
`hardware.isa_key` (the ISA flags oneDNN and Inductor use, plus any ``ONEDNN_MAX_CPU_ISA`` cap),
so a machine of another CPU family decides again, and an entry also records the model's weights
fingerprint and the torch version (a retrained model or a torch upgrade decides again). A cached
choice costs no compiling beyond the chosen path itself; deciding costs one compile per path
(15-30 s each on 2 cores for mbf) plus a few seconds of timing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from marginface import hardware
from marginface.deploy.compiled import PRECISIONS, CompiledEmbedder
from marginface.errors import UserError
from marginface.inference import ModelInfo
from marginface.io.atomic import atomic_write_json
from marginface.io.texttable import MAX_WIDTH, table, wrap

log = logging.getLogger(__name__)

# smallest cosine to eager fp32 over the calibration batch that a path must reach
ACCURACY_BOUNDS = {"fp32": 0.9999, "bf16": 0.995, "int8": 0.98}
CACHE_SUFFIX = ".precision.json"
CACHE_FORMAT = 1
AUTO = "auto"  # the --precision value that asks `choose_precision`
EAGER = "eager-fp32"  # what `PrecisionChoice.precision` is when no compiled path passed

Builder = Callable[..., object]  # (model, precision, batch_size=, calibration=) -> embedder


@dataclass
class PathResult:
    """One compiled path: ``status`` "ok" (checked, timed), "inaccurate" (below its bound) or
    "skipped" (could not be built here; ``reason`` says why)."""

    precision: str
    status: str
    bound: float
    min_cosine: Optional[float] = None
    latency_ms: Optional[float] = None  # median at batch 1
    best_ms: Optional[float] = None  # fastest round's median at batch 1: what the choice compares
    compile_s: Optional[float] = None
    reason: str = ""


@dataclass
class PrecisionChoice:
    """What `choose_precision` decided and why (``to_dict`` is its JSON form)."""

    precision: str  # one of PRECISIONS, or EAGER when no compiled path passed its check
    isa: str
    paths: dict = field(default_factory=dict)  # precision -> PathResult
    eager_ms: Optional[float] = None  # eager fp32 at batch 1, timed in the same rounds (median)
    eager_best_ms: Optional[float] = None  # its fastest round
    cached: bool = False
    cache_path: Optional[str] = None
    fingerprint: str = ""
    torch: str = torch.__version__
    embedders: dict = field(default_factory=dict, repr=False)  # batch-1 embedders built while deciding

    @property
    def speedup_vs_eager(self) -> Optional[float]:
        chosen = self.paths.get(self.precision)
        if chosen is None or chosen.best_ms is None or not self.eager_best_ms:
            return None
        return round(self.eager_best_ms / chosen.best_ms, 2)

    def to_dict(self) -> dict:
        return {"precision": self.precision, "isa": self.isa, "cached": self.cached, "cache_path": self.cache_path,
                "eager_ms": self.eager_ms, "eager_best_ms": self.eager_best_ms, "speedup_vs_eager": self.speedup_vs_eager,
                "paths": {name: asdict(p) for name, p in self.paths.items()},
                "fingerprint": self.fingerprint, "torch": self.torch}

    def lines(self) -> list[str]:
        return choice_lines(self.to_dict())


def choice_lines(choice: dict) -> list[str]:
    """The human-readable table of a choice (`PrecisionChoice.to_dict`, e.g. ``bench``'s
    ``precision_auto``): every path, its check and time, and which one auto took (within 100 columns)."""
    speedup = choice.get("speedup_vs_eager")
    out = wrap(f"precision auto ({'cached' if choice.get('cached') else 'measured'}; CPU {choice['isa']}): "
               f"{choice['precision']}" + (f", {speedup}x eager fp32 at batch 1" if speedup else ""))
    rows = [["path", "batch 1 ms", "best round", "min cosine", "bound", "check", ""]]
    if choice.get("eager_ms") is not None:
        rows.append(["eager fp32", f"{choice['eager_ms']:.2f}", f"{choice.get('eager_best_ms') or float('nan'):.2f}",
                     "", "", "reference", ""])
    skipped = []
    for name, p in choice["paths"].items():
        label = f"compiled {name}"
        if p["status"] == "skipped":
            skipped.append(f"{label} skipped: {p['reason']}")
            continue
        timed = p["latency_ms"] is not None
        rows.append([label, f"{p['latency_ms']:.2f}" if timed else "not timed",
                     f"{p.get('best_ms') or float('nan'):.2f}" if timed else "", f"{p['min_cosine']:.5f}",
                     str(p["bound"]), "ok" if p["status"] == "ok" else "FAILED the bound",
                     "<- auto" if name == choice["precision"] else ""])
    out += ["  " + line for line in table(rows, max_width=MAX_WIDTH - 2, align="lrrrrll").splitlines()]
    for line in skipped:
        out += wrap(line, indent="  ")
    return out


def model_fingerprint(model: torch.nn.Module, image_shape: tuple) -> str:
    """sha256 of the weights (names, shapes, dtypes, bytes) and the input shape: a cached choice
    belongs to these weights only."""
    digest = hashlib.sha256(repr(tuple(image_shape)).encode())
    for name, value in model.state_dict().items():
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            shape = tuple(t.shape)
            t = t.reshape(-1)
            digest.update(f"{name}:{shape}:{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:20]


def default_cache_path(model_or_path) -> Optional[Path]:
    """``<file>.precision.json`` beside a checkpoint or compiled package (``best.pt`` ->
    ``best.precision.json``), from a path or from a loaded model's ``info.source``; None for a
    model without a file (nothing is cached then)."""
    if isinstance(model_or_path, (str, Path)):
        source = Path(model_or_path)
    else:
        source = ModelInfo.of(model_or_path).source
        if not source:
            return None
        source = Path(source)
    if source.is_dir():
        return source / ("model" + CACHE_SUFFIX)
    return source.with_suffix(CACHE_SUFFIX)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # our own derived file: decide again and rewrite it
        log.warning("%s: unreadable precision cache (%s); deciding again", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data


def _from_entry(entry: dict, isa: str, path: Path) -> PrecisionChoice:
    paths = {name: PathResult(**p) for name, p in entry["paths"].items()}
    return PrecisionChoice(precision=entry["precision"], isa=isa, paths=paths, eager_ms=entry.get("eager_ms"),
                           eager_best_ms=entry.get("eager_best_ms"),
                           cached=True, cache_path=str(path), fingerprint=entry["fingerprint"], torch=entry["torch"])


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=1).min())


def _median_ms(fn, x, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def choose_precision(model: torch.nn.Module, calibration: torch.Tensor, *,
                     cache_path: Union[str, Path, None] = None, precisions=PRECISIONS,
                     bounds: Optional[dict] = None, rounds: int = 5, runs: int = 10, refresh: bool = False,
                     build: Builder = CompiledEmbedder) -> PrecisionChoice:
    """The fastest compiled path of ``model`` that reproduces eager fp32 on ``calibration`` (a
    normalised ``N×3×H×W`` float batch, e.g. 32 faces) within ``bounds`` (default
    ``ACCURACY_BOUNDS``), timed at batch 1 (``rounds`` interleaved rounds of ``runs`` calls, the
    median of each round; paths compared by their fastest round).

    ``cache_path`` (see `default_cache_path`): reuse the choice recorded there for this CPU
    (`hardware.isa_key`), these weights and this torch, with no compiling; otherwise decide and add
    this CPU's entry to the file atomically (a write failure is logged, the choice still returned).
    ``refresh``: decide again even when cached. ``build``: the embedder factory (tests inject one).
    """
    bounds = {**ACCURACY_BOUNDS, **(bounds or {})}
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise UserError(f"precision auto: candidates must be among {', '.join(PRECISIONS)}, got {list(precisions)}")
    calibration = torch.as_tensor(calibration).float().cpu()
    if calibration.ndim != 4 or len(calibration) < 1:
        raise UserError(f"precision auto: the calibration batch must be N×3×H×W, got {tuple(calibration.shape)}")
    hardware.flush_denormals()
    isa = hardware.isa_key()
    fingerprint = model_fingerprint(model, tuple(calibration.shape[1:]))
    path = Path(cache_path) if cache_path is not None else None
    data = _read_cache(path) if path is not None else {}
    entry = data.get("entries", {}).get(isa) if data else None
    if (entry and not refresh and entry.get("fingerprint") == fingerprint and entry.get("torch") == torch.__version__
            and entry.get("precision") in tuple(precisions) + (EAGER,)
            and all(entry["paths"].get(p, {}).get("bound") == bounds[p] for p in precisions)):
        return _from_entry(entry, isa, path)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            reference = model(calibration).float()
        results, runners = {}, {}
        for precision in precisions:
            result = PathResult(precision, "skipped", bounds[precision])
            results[precision] = result
            try:
                t0 = time.perf_counter()
                embedder = build(model, precision, batch_size=1, calibration=calibration)
                out = torch.as_tensor(embedder(calibration)).float()  # compiles on the first call
                result.compile_s = round(time.perf_counter() - t0, 1)
            except UserError as exc:  # e.g. int8 without torchao, a graph export cannot take
                result.reason = str(exc)
                continue
            result.min_cosine = round(_min_cosine(out, reference), 6)
            if not result.min_cosine >= bounds[precision]:  # NaN fails too
                result.status = "inaccurate"
                result.reason = f"min cosine {result.min_cosine} to eager fp32 < {bounds[precision]}"
                continue
            result.status = "ok"
            runners[precision] = embedder
        x1 = calibration[:1]

        def eager(x):
            with torch.inference_mode():
                return model(x)
        timed = {EAGER: eager, **runners}
        samples: dict = {name: [] for name in timed}
        names = list(timed)
        for fn in timed.values():  # warm-up
            fn(x1)
        for r in range(max(1, rounds)):
            for name in names[r % len(names):] + names[: r % len(names)]:
                samples[name].append(_median_ms(timed[name], x1, max(1, runs)))
    finally:
        model.train(was_training)
    for name in runners:
        results[name].latency_ms = round(statistics.median(samples[name]), 3)
        results[name].best_ms = round(min(samples[name]), 3)
    # Compared by the fastest round: on a shared machine other jobs only ever add time, and a burst
    # in one round must not decide (the medians are reported too).
    ok = [p for p in precisions if results[p].status == "ok"]
    chosen = min(ok, key=lambda p: results[p].best_ms) if ok else EAGER
    choice = PrecisionChoice(chosen, isa, results, round(statistics.median(samples[EAGER]), 3),
                             round(min(samples[EAGER]), 3), False, str(path) if path else None, fingerprint,
                             embedders=runners)
    if path is not None:
        entries = dict(data.get("entries", {})) if data else {}
        entries[isa] = {k: v for k, v in choice.to_dict().items() if k not in ("isa", "cached", "cache_path")}
        entries[isa]["decided_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            atomic_write_json(path, {"format": CACHE_FORMAT, "entries": entries})
        except UserError as exc:  # a read-only model folder: still use the choice, decide again next time
            log.warning("%s; precision auto will decide again next time", exc)
            choice.cache_path = None
    return choice


def auto_embedder(model: torch.nn.Module, calibration: torch.Tensor, *, batch_size: Optional[int] = None,
                  cache_path: Union[str, Path, None] = None, **kwargs):
    """``(embedder, choice)``: the model compiled at the precision `choose_precision` picks (or the
    eager model itself when no compiled path passed), for ``batch_size``-image calls (None: the
    compiled default chunk). A batch-1 embedder built while deciding is reused, not compiled again."""
    choice = choose_precision(model, calibration, cache_path=cache_path, **kwargs)
    if choice.precision == EAGER:
        return model, choice
    if batch_size == 1 and choice.precision in choice.embedders:
        return choice.embedders[choice.precision], choice
    choice.embedders.clear()  # the batch-1 embedders: not what is asked for, free their memory
    build = kwargs.get("build", CompiledEmbedder)
    return build(model, choice.precision, batch_size=batch_size, calibration=calibration), choice
