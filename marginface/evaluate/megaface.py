"""MegaFace challenge 1 (FaceScrub probes against up to 1M distractors), as the devkit defines it and
Face_Pytorch / insightface report it; the "refined" protocol when noise lists are given.

Protocol (also in docs/evaluation.md):

- **Identification, per distractor-set size** s (10, 100, ..., 10^6; the first s distractors of
  the list). For every probe identity with images x_1..x_n and every ordered pair (j, i), i != j,
  the gallery is {x_i} plus the s distractors and x_j is the probe. The rank of the mate x_i is
  ``1 + #{distractors d: cos(x_j, d) >= cos(x_j, x_i)}`` (ties count against the probe).
  CMC(r) = the fraction of the n(n-1) pairs, summed over identities, with rank <= r; rank-1 is
  what papers quote as "MegaFace rank-1 @1M".
- **Verification**: genuine pairs are all same-identity probe pairs (i < j), impostor pairs every
  probe x distractor of the largest size evaluated. At a target FAR f the threshold T is the
  ``(floor(f * n_impostor) + 1)``-th highest impostor score (so at most ``f * n_impostor``
  impostors score above it), and TAR = the fraction of genuine pairs scoring above T. A target is
  reported only when ``n_impostor * f >= 1`` (FAR 1e-6 needs 10^6 impostor pairs).
- **Noise lists** (the "refined" protocol; insightface's ``facescrub_noises.txt`` and
  ``megaface_noises.txt``): a listed probe image is left out; a listed distractor is left out of
  every subset it falls in (a size-s subset keeps the clean ones among the first s). insightface's
  script instead overwrites their features (a noisy probe with its identity's mean, a noisy
  distractor with a vector that matches nothing); for distractors that is the same, for probes the
  mean would count as a correct match, which we do not count at all.

Inputs: the devkit's JSON lists (``facescrub_features_list.json``: ``{"path": [...], "id": [...]}``;
``megaface_features_list.json_<size>_1``: ``{"path": [...]}``), identity folders, image folders or
``.npy`` features (as ``marginface embed`` writes them, with the ``.txt`` path listing beside them).
Everything is exact and chunked: distractor scores are read ``chunk_size`` rows at a time and only a
running top-k is kept (top ``max_rank`` per probe for the CMC, the global top for the FAR threshold).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from marginface.data.images import read_image
from marginface.data.sources import FolderSource
from marginface.errors import UserError
from marginface.evaluate.identification import (DEFAULT_CHUNK, FOLDER_OPTIONS, _open_feature_matrix,
                                                embed_image_files, image_files, search)
from marginface.evaluate.metrics import far_key
from marginface.evaluate.plots import plot_cmc
from marginface.evaluate.report import json_safe, write_atomic
from marginface.inference import EmbedOptions
from marginface.io.atomic import ensure_dir

DEFAULT_SIZES = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
DEFAULT_FAR_TARGETS = (1e-6,)
DEFAULT_MAX_RANK = 100
Device = Union[str, torch.device]


# ---------------------------------------------------------------------------------------------- lists
def read_devkit_list(path: Union[str, Path], *, with_ids: bool) -> tuple[list[str], Optional[list[str]]]:
    """A devkit JSON list: ``(paths, ids)`` (``ids`` None unless ``with_ids``: FaceScrub's list)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: list not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a MegaFace devkit JSON list ({exc})") from None
    paths = data.get("path") if isinstance(data, dict) else None
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise UserError(f'{path}: expected {{"path": ["relative/image.jpg", ...]}} with at least one path')
    if not with_ids:
        return paths, None
    ids = data.get("id")
    if not isinstance(ids, list) or len(ids) != len(paths):
        raise UserError(f'{path}: a probe list needs "id" beside "path", one per path '
                        f'({len(paths)} paths, {len(ids) if isinstance(ids, list) else "no"} ids)')
    return paths, [str(i) for i in ids]


def read_noise_list(path: Union[str, Path]) -> set[str]:
    """A noise list: one image per line (``#`` comments and blank lines skipped); a line with tabs
    names the image in its second field (``megaface_noises.txt``: ``<id>\\t<a/b/c.jpg>``)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: noise list not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable noise list ({exc})") from None
    entries = set()
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.strip().split("\t")
        entries.add((fields[1] if len(fields) > 1 else fields[0]).strip().replace("\\", "/").strip("/"))
    return entries


def noise_mask(paths: Sequence[Union[str, Path]], noises: set[str]) -> np.ndarray:
    """True for each path that a noise entry names: the whole path or its last components
    (``Aaron_Eckhart_221.png`` names ``.../Aaron_Eckhart/Aaron_Eckhart_221.png``)."""
    marked = np.zeros(len(paths), dtype=bool)
    if not noises:
        return marked
    for index, path in enumerate(paths):
        parts = str(path).replace("\\", "/").strip("/").split("/")
        marked[index] = any("/".join(parts[k:]) in noises for k in range(len(parts)))
    return marked


# ---------------------------------------------------------------------------------------------- metrics
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def _groups(ids: Sequence) -> list[np.ndarray]:
    """Row indices of each identity with at least two images (the only ones that make pairs)."""
    order: dict = {}
    for index, label in enumerate(ids):
        order.setdefault(label, []).append(index)
    return [np.asarray(rows) for rows in order.values() if len(rows) >= 2]


def _impostor_top(probes: torch.Tensor, base: np.ndarray, k: int, chunk_size: int, device: Device) -> np.ndarray:
    """The ``k`` highest probe x distractor cosines over all of ``base``, descending."""
    best = torch.empty(0, device=device)
    for start in range(0, base.shape[0], chunk_size):
        rows = np.array(base[start:start + chunk_size], dtype=np.float32)
        chunk = torch.from_numpy(_unit(rows).astype(np.float32)).to(device)
        scores = (probes @ chunk.T).flatten()
        merged = torch.cat([best, scores.topk(min(k, scores.numel())).values])
        best = merged.topk(min(k, merged.numel())).values
    return best.cpu().numpy().astype(np.float64)


def megaface_metrics(probe_features, probe_ids: Sequence, distractor_features, *,
                     sizes: Sequence[int] = DEFAULT_SIZES, max_rank: int = DEFAULT_MAX_RANK,
                     far_targets: Sequence[float] = DEFAULT_FAR_TARGETS, distractor_keep: Optional[np.ndarray] = None,
                     chunk_size: int = DEFAULT_CHUNK, device: Device = "cpu") -> dict:
    """Identification per distractor-set size and verification TAR@FAR (see the module doc).

    ``distractor_features``: N×D (may be an ``np.memmap``), in list order; ``distractor_keep``
    (N bools) marks the rows a noise list leaves in. The size-s subset is the kept rows among the
    first s; sizes above N are skipped (listed under ``sizes_skipped``). Keys: ``identification``
    (size -> ``rank_1``, ``cmc`` at ranks 1..max_rank, ``distractors``), ``rank_1`` (size -> rate),
    ``verification`` (``tar_at_far``, ``thresholds``, ``genuine_pairs``, ``impostor_pairs``,
    ``distractors``), ``probes``, ``probe_identities``, ``mate_pairs``, ``sizes_skipped``.
    """
    probes = _unit(np.asarray(probe_features))
    ids = list(probe_ids)
    if probes.ndim != 2 or len(ids) != len(probes):
        raise ValueError(f"{len(probes)} probe features but {len(ids)} identity labels")
    base = distractor_features if isinstance(distractor_features, np.ndarray) else np.asarray(distractor_features)
    if base.ndim != 2 or base.shape[1] != probes.shape[1]:
        raise UserError(f"distractor features have shape {base.shape}; the probes have {probes.shape[1]} dimensions")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    groups = _groups(ids)
    if not groups:
        raise UserError("megaface: no probe identity has two images, so there is no probe/mate pair")
    keep = np.ones(len(base), dtype=bool) if distractor_keep is None else np.asarray(distractor_keep, dtype=bool)
    if len(keep) != len(base):
        raise ValueError(f"distractor_keep has {len(keep)} entries for {len(base)} distractors")
    clean = base if keep.all() else base[keep]
    kept_before = np.concatenate([[0], np.cumsum(keep)])  # kept rows among the first s: kept_before[s]
    wanted = sorted({int(s) for s in sizes})
    evaluated = [s for s in wanted if 1 <= s <= len(base)]
    result: dict = {"identification": {}, "rank_1": {}, "sizes_skipped": [s for s in wanted if s not in evaluated]}
    # every probe/mate cosine, grouped per probe row: (probe row, mate cosines)
    mates = []
    for rows in groups:
        gram = probes[rows] @ probes[rows].T
        for a, row in enumerate(rows):
            mates.append((row, np.delete(gram[a], a)))
    n_pairs = sum(len(m) for _, m in mates)
    probe_t = torch.from_numpy(probes.astype(np.float32)).to(device)
    for size in evaluated:
        count = int(kept_before[size])
        hits = np.zeros(max_rank, dtype=np.int64)
        if count:
            top, _ = search(probes.astype(np.float32), clean[:count], min(max_rank, count), chunk_size=chunk_size,
                            device=device, normalize=True)
        for row, scores in mates:
            # rank <= r  <=>  the mate beats the r-th best distractor (no r-th one: always)
            thresholds = np.full(max_rank, -np.inf)
            if count:
                thresholds[:top.shape[1]] = top[row]
            hits += (scores[:, None] > thresholds[None, :]).sum(axis=0)
        cmc = (hits / n_pairs).tolist()
        result["identification"][str(size)] = {"rank_1": cmc[0], "cmc": cmc, "distractors": count}
        result["rank_1"][str(size)] = cmc[0]
    genuine = np.concatenate([(probes[r] @ probes[r].T)[np.triu_indices(len(r), 1)] for r in groups])
    largest = int(kept_before[evaluated[-1]]) if evaluated else 0
    n_impostor = len(probes) * largest
    targets = [f for f in far_targets if n_impostor * f >= 1 - 1e-9]
    tar, thresholds = {}, {}
    if targets:
        k = min(n_impostor, max(math.floor(n_impostor * f + 1e-9) + 1 for f in targets))
        top_impostors = _impostor_top(probe_t, clean[:largest], k, chunk_size, device)
        for f in targets:
            allowed = math.floor(n_impostor * f + 1e-9)
            threshold = -math.inf if allowed >= n_impostor else float(top_impostors[allowed])
            tar[far_key(f)] = float(np.mean(genuine > threshold))
            thresholds[far_key(f)] = threshold
    result["verification"] = {"tar_at_far": tar, "thresholds": thresholds, "genuine_pairs": int(len(genuine)),
                              "impostor_pairs": int(n_impostor), "distractors": largest,
                              "far_targets": list(far_targets)}
    result.update(probes=len(probes), probe_identities=len(set(ids)), mate_pairs=int(n_pairs),
                  max_rank=max_rank)
    return result


# ---------------------------------------------------------------------------------------------- files
def _probe_images(probes: Union[str, Path], probe_list: Optional[Union[str, Path]]) -> tuple[list[Path], list[str], list[str]]:
    """``(files, identity per file, path names for noise matching)`` of the probe set."""
    root = Path(probes)
    if probe_list is not None:
        paths, ids = read_devkit_list(probe_list, with_ids=True)
        files = [root / p for p in paths]
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise UserError(f"--probe-list {probe_list}: {missing} not found (paths are relative to --probes {root})")
        return files, ids, paths
    try:
        source = FolderSource(root)
    except UserError as exc:
        raise UserError(f"--probes {exc}") from None
    files = list(source.paths)
    names = [f.relative_to(root).as_posix() for f in files]
    return files, [source.identities[label] for label in source.labels], names


def _distractor_source(distractors: Union[str, Path], distractor_list: Optional[Union[str, Path]]):
    """``(features N×D or None, image files or None, path names)`` in list order."""
    path = Path(distractors)
    if path.suffix.lower() == ".npy":
        if distractor_list is not None:
            raise UserError("--distractor-list orders images to embed; a .npy feature file is already in its order")
        features = _open_feature_matrix(path)
        listing = path.with_name(path.name[:-4] + ".txt")
        names = listing.read_text(encoding="utf-8").splitlines() if listing.is_file() else None
        if names is not None and len(names) != len(features):
            raise UserError(f"{listing}: {len(names)} paths for the {len(features)} rows of {path}")
        return features, None, names
    if not path.is_dir():
        raise UserError(f"--distractors {path}: expected a folder of images or a .npy feature matrix")
    if distractor_list is not None:
        names, _ = read_devkit_list(distractor_list, with_ids=False)
        files = [path / n for n in names]
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise UserError(f"--distractor-list {distractor_list}: {missing} not found "
                            f"(paths are relative to --distractors {path})")
        return None, files, names
    files = image_files(path, "--distractors")
    return None, files, [f.relative_to(path).as_posix() for f in files]


def evaluate_megaface(model, probes: Union[str, Path], distractors: Union[str, Path], *,
                      probe_list=None, distractor_list=None, probe_noises=None, distractor_noises=None,
                      sizes: Sequence[int] = DEFAULT_SIZES, max_rank: int = DEFAULT_MAX_RANK,
                      far_targets: Sequence[float] = DEFAULT_FAR_TARGETS, options: Optional[EmbedOptions] = None,
                      chunk_size: int = DEFAULT_CHUNK, log=None) -> dict:
    """Embed the probes (identity folders, or ``probe_list`` relative to ``probes``) and the
    distractors (an image folder, ``distractor_list`` relative to it, or a ``.npy`` made by
    ``marginface embed`` with the same model), drop what the noise lists name, run `megaface_metrics`.
    Every file and list is checked before the first forward pass."""
    options = options or FOLDER_OPTIONS
    files, ids, probe_names = _probe_images(probes, probe_list)
    features, distractor_files, distractor_names = _distractor_source(distractors, distractor_list)
    removed = {"probes": 0, "distractors": 0}
    if probe_noises is not None:
        drop = noise_mask(probe_names, read_noise_list(probe_noises))
        removed["probes"] = int(drop.sum())
        files = [f for f, d in zip(files, drop) if not d]
        ids = [i for i, d in zip(ids, drop) if not d]
    keep = None
    if distractor_noises is not None:
        if distractor_names is None:
            raise UserError(f"--distractor-noises needs the image paths of {distractors}: the .txt listing "
                            f"`marginface embed` writes beside the .npy is missing")
        keep = ~noise_mask(distractor_names, read_noise_list(distractor_noises))
        removed["distractors"] = int((~keep).sum())
    if not files:
        raise UserError(f"--probes {probes}: no probe image is left")

    def embed(what: str, paths: list) -> np.ndarray:
        if log:
            log(f"embedding {what}: {len(paths)} images")
        return embed_image_files(model, lambda i: read_image(paths[i]), len(paths), options=options)

    probe_features = embed("probes", files)
    if features is None:
        features = embed("distractors", distractor_files)
    elif features.shape[1] != probe_features.shape[1]:
        raise UserError(f"{distractors}: distractor features have {features.shape[1]} dimensions, the model's "
                        f"have {probe_features.shape[1]}")
    if log:
        log(f"MegaFace: {len(files)} probes against up to {len(features)} distractors")
    result = megaface_metrics(probe_features, ids, features, sizes=sizes, max_rank=max_rank, far_targets=far_targets,
                              distractor_keep=keep, chunk_size=chunk_size, device=options.device)
    result.update(noises_removed=removed, flip=options.flip, refined=probe_noises is not None or distractor_noises is not None,
                  sources={"probes": str(probes), "distractors": str(distractors),
                           "probe_list": None if probe_list is None else str(probe_list),
                           "distractor_list": None if distractor_list is None else str(distractor_list),
                           "probe_noises": None if probe_noises is None else str(probe_noises),
                           "distractor_noises": None if distractor_noises is None else str(distractor_noises)})
    return result


def _rate(value) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


def format_megaface(result: dict) -> str:
    """Console summary: rank-1 per distractor-set size, TAR@FAR, the counts."""
    lines = [f"MegaFace{' (refined: noise lists applied)' if result.get('refined') else ''}: "
             f"{result['probes']} probes, {result['probe_identities']} identities, {result['mate_pairs']} probe/mate pairs"]
    for size, row in result["identification"].items():
        lines.append(f"  distractors {int(size):>9,d} ({row['distractors']} used): rank-1 {_rate(row['rank_1'])}")
    if result["sizes_skipped"]:
        lines.append(f"  sizes not evaluated (more than the distractors given): {', '.join(map(str, result['sizes_skipped']))}")
    ver = result["verification"]
    for key, tar in ver["tar_at_far"].items():
        lines.append(f"  verification TAR@FAR={key} {_rate(tar)} (threshold {ver['thresholds'][key]:.4f}; "
                     f"{ver['genuine_pairs']} genuine, {ver['impostor_pairs']} impostor pairs)")
    missing = [far_key(f) for f in ver["far_targets"] if far_key(f) not in ver["tar_at_far"]]
    if missing:
        lines.append(f"  TAR@FAR={', '.join(missing)}: not reported ({ver['impostor_pairs']} impostor pairs; "
                     f"FAR f needs at least 1/f)")
    return "\n".join(lines)


def write_megaface_report(out_dir: Union[str, Path], result: dict, plots: bool = True) -> dict:
    """``megaface.json`` and (with matplotlib) ``megaface_cmc.png`` in ``out_dir``, written atomically."""
    out = ensure_dir(out_dir)
    written = {"json": str(out / "megaface.json")}
    write_atomic(out / "megaface.json", json.dumps(json_safe(result), indent=2) + "\n")
    if plots:
        curves = {f"{int(size):,d} distractors": row["cmc"] for size, row in result["identification"].items()}
        path = plot_cmc(out / "megaface_cmc.png", curves, title="MegaFace identification (CMC)")
        if path is not None:
            written["cmc_plot"] = str(path)
    return written
