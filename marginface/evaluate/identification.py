"""1:N identification (MegaFace-style): chunked cosine search, CMC and open-set TPIR@FPIR.

Protocol (also in docs/evaluation.md):

- **Enrolment.** Gallery features of one identity are pooled into one template: the mean of the
  L2-normalised features, normalised again. Distractors (e.g. MegaFace's 1M faces) are added as
  candidates of their own that match no probe. The candidate list is
  ``[identity templates (in order of first appearance); distractors]``.
- **Scores** are cosines between the L2-normalised probe and each candidate.
- **Mated probes** (identity enrolled): the *rank* of the mate is
  ``1 + #{other candidates whose score >= the mate's score}``, so ties count against the probe.
  CMC(r) = fraction of mated probes with rank <= r (closed-set identification rate; rank-1, rank-5).
- **Non-mated probes** (identity not enrolled) must be rejected: their top-1 score over all
  candidates is what a threshold has to stay below.
- **Open set** (NIST FRVT 1:N terms): at threshold ``T`` (accept a candidate when score > T)
  ``FPIR(T)`` = fraction of non-mated probes whose top-1 score > T, ``TPIR(T)`` = fraction of
  mated probes whose mate is at rank 1 with score > T. For a target FPIR ``f`` the threshold is
  the most lenient one with ``FPIR <= f``: ``T`` = the ``(floor(f * n_nonmated) + 1)``-th highest
  non-mated top-1 score. A target is reported only when ``n_nonmated * f >= 1``.

The search never holds the full ``probes × candidates`` score matrix: the candidates are processed
in chunks (default 65,536 rows) on CPU or GPU with one matmul each, keeping a running top-k or
running counts, so 1M distractors × 512-d (2 GB as float32, may be an ``np.memmap``) fit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from marginface.data.images import read_image
from marginface.data.sources import FolderSource, list_image_files
from marginface.data.verification import resize_image
from marginface.errors import UserError
from marginface.evaluate.metrics import far_key
from marginface.evaluate.report import json_safe, write_atomic
from marginface.evaluate.runner import embed_images
from marginface.inference import EmbedOptions, ModelInfo
from marginface.io.atomic import atomic_write, atomic_write_text, ensure_dir

Device = Union[str, torch.device]
FOLDER_OPTIONS = EmbedOptions(batch_size=128)  # the defaults of the folder/feature-file functions
DEFAULT_CHUNK = 65536
DEFAULT_FPIR_TARGETS = (1e-1, 1e-2, 1e-3)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation; all-zero rows stay zero."""
    norms = x.norm(dim=1, keepdim=True)
    return x / torch.where(norms == 0, torch.ones_like(norms), norms)


def _as_matrix(name: str, array, dim: Optional[int] = None) -> np.ndarray:
    a = np.asarray(array) if not isinstance(array, np.ndarray) else array  # keeps np.memmap lazy
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D N×D array, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} has {a.shape[1]} dimensions, the probes have {dim}")
    return a


def _chunks(base: np.ndarray, chunk_size: int, device: Device, normalize: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start row, chunk as float32 tensor on device)`` over ``base``, one chunk in memory at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, base.shape[0], chunk_size):
        rows = np.ascontiguousarray(base[start : start + chunk_size], dtype=np.float32)
        if not rows.flags.writeable:  # a read-only np.memmap: torch.from_numpy warns on those
            rows = rows.copy()
        chunk = torch.from_numpy(rows).to(device)
        yield start, (_unit_rows(chunk) if normalize else chunk)


def _sorted_candidates(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by score descending, equal scores by index ascending."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.argsort(values, dim=1, descending=True, stable=True)
    return values.gather(1, by_score), indices.gather(1, by_score)


def _chunk_topk(sim: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of each row of ``sim`` with ties broken by the lower column.

    ``torch.topk`` picks arbitrarily among values tied at the k-th place; rows where that happens
    (more than k values >= the k-th value) are redone with a stable full sort.
    """
    k = min(k, sim.shape[1])
    values, cols = torch.topk(sim, k, dim=1)
    boundary_ties = (sim >= values[:, -1:]).sum(dim=1) > k
    if bool(boundary_ties.any()):
        rows = torch.nonzero(boundary_ties).flatten()
        order = torch.argsort(sim[rows], dim=1, descending=True, stable=True)[:, :k]
        values[rows], cols[rows] = sim[rows].gather(1, order), order
    return _sorted_candidates(values, cols + offset)


def search(
    queries,
    gallery,
    k: int = 5,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    query_batch: int = 4096,
    device: Device = "cpu",
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows by cosine for each query: ``(scores Q×k float32, indices Q×k int64)``.

    Rows are sorted by score descending; equal scores by gallery index ascending (deterministic,
    whatever the chunking). With ``normalize=False`` the inputs are taken as already normalised
    (the score is the plain dot product). ``k`` larger than the gallery returns every row.
    """
    q = _as_matrix("queries", queries)
    g = _as_matrix("gallery", gallery, q.shape[1])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if g.shape[0] == 0:
        raise ValueError("the gallery is empty")
    k = min(k, g.shape[0])
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(device)
    qt = _unit_rows(qt) if normalize else qt
    best_v = torch.full((len(q), 0), -math.inf, device=device)
    best_i = torch.zeros((len(q), 0), dtype=torch.int64, device=device)
    for start, chunk in _chunks(g, chunk_size, device, normalize):
        parts_v, parts_i = [], []
        for qs in range(0, len(q), query_batch):
            v, i = _chunk_topk(qt[qs : qs + query_batch] @ chunk.T, k, start)
            parts_v.append(v)
            parts_i.append(i)
        # Earlier chunks hold lower indices, so a stable sort of [running, new] keeps index order on ties.
        merged_v, merged_i = torch.cat([best_v, torch.cat(parts_v)], 1), torch.cat([best_i, torch.cat(parts_i)], 1)
        order = torch.argsort(merged_v, dim=1, descending=True, stable=True)[:, :k]
        best_v, best_i = merged_v.gather(1, order), merged_i.gather(1, order)
    return best_v.cpu().numpy(), best_i.cpu().numpy()



def top_k_cosine(gallery, queries, k: int, *, chunk_size: int = DEFAULT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The one exact top-``k`` cosine search for unit-length rows (the gallery store's form of
    `search`): ``(indices Q×k int64, similarities Q×k float32)``, ordered by similarity, then
    index; the gallery is read ``chunk_size`` rows at a time. An empty gallery or no queries give
    empty results."""
    g = np.asarray(gallery) if not isinstance(gallery, np.ndarray) else gallery
    q = np.asarray(queries, np.float32)
    k = max(0, min(int(k), len(g)))
    if k == 0 or len(q) == 0:
        return np.zeros((len(q), k), np.int64), np.zeros((len(q), k), np.float32)
    scores, indices = search(q, g, k, chunk_size=max(1, int(chunk_size)), normalize=False)
    return indices.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)

def enroll(features, identities: Sequence) -> tuple[np.ndarray, list]:
    """One template per identity: mean of the L2-normalised features, normalised again.

    Returns ``(templates I×D float32, identity labels in order of first appearance)``.
    """
    feats = _as_matrix("gallery features", features).astype(np.float64)
    ids = list(identities)
    if len(ids) != len(feats):
        raise ValueError(f"{len(feats)} gallery features but {len(ids)} identity labels")
    if not ids:
        raise ValueError("the gallery is empty")
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    unit = feats / np.where(norms == 0, 1.0, norms)
    order: dict = {}
    for label in ids:
        order.setdefault(label, len(order))
    index = np.array([order[label] for label in ids])
    sums = np.zeros((len(order), feats.shape[1]))
    np.add.at(sums, index, unit)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.where(norms == 0, 1.0, norms)).astype(np.float32), list(order)


def _distractor_matrices(distractors, dim: int) -> list:
    """None, one N×D matrix, or a list of them -> a list of matrices.

    A list is searched part after part and never concatenated, so each part (e.g. a 1M-row
    ``np.memmap`` of precomputed features) stays on disk until its chunks are read.
    """
    if distractors is None:
        return []
    many = isinstance(distractors, (list, tuple)) and all(
        isinstance(d, np.ndarray) and d.ndim == 2 for d in distractors)
    parts = list(distractors) if many else [distractors]
    return [_as_matrix("distractors", d, dim) for d in parts]


def identification_metrics(
    probe_features,
    probe_ids: Sequence,
    gallery_features,
    gallery_ids: Sequence,
    distractors=None,
    *,
    ranks: Sequence[int] = (1, 5, 10),
    fpir_targets: Sequence[float] = DEFAULT_FPIR_TARGETS,
    chunk_size: int = DEFAULT_CHUNK,
    query_batch: int = 4096,
    device: Device = "cpu",
) -> dict:
    """Closed-set CMC and open-set TPIR@FPIR of probes against an enrolled gallery (+ distractors).

    See the module doc for the protocol. Keys: ``rank_<r>`` for each of ``ranks`` (over the mated
    probes), ``cmc`` (identification rate at ranks 1..max(ranks)), ``tpir_at_fpir`` and
    ``fpir_thresholds`` (keys like ``"1e-2"``), ``probes``, ``mated_probes``, ``non_mated_probes``,
    ``gallery_identities``, ``distractors``. Rates without probes of their kind are NaN / absent.
    ``distractors`` is one N×D matrix or a list of them (see `_distractor_matrices`).
    """
    probes = _as_matrix("probe features", probe_features)
    dim = probes.shape[1]
    probe_ids = list(probe_ids)
    if len(probe_ids) != len(probes):
        raise ValueError(f"{len(probes)} probe features but {len(probe_ids)} identity labels")
    if len(probes) == 0:
        raise ValueError("no probes")
    templates, enrolled = enroll(_as_matrix("gallery features", gallery_features, dim), gallery_ids)
    distractor_sets = _distractor_matrices(distractors, dim)
    n_distractors = sum(d.shape[0] for d in distractor_sets)
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive integers, got {list(ranks)}")
    slot = {label: i for i, label in enumerate(enrolled)}
    mate = np.array([slot.get(label, -1) for label in probe_ids], dtype=np.int64)
    mated = mate >= 0

    pt = _unit_rows(torch.from_numpy(np.ascontiguousarray(probes, dtype=np.float32)).to(device))
    mate_t = torch.from_numpy(mate).to(device)
    sources = [(templates, False)] + [(d, True) for d in distractor_sets]

    def score_blocks(base: np.ndarray, normalize: bool):
        for start, chunk in _chunks(base, chunk_size, device, normalize):
            for qs in range(0, len(probes), query_batch):
                yield start, chunk.shape[0], slice(qs, qs + query_batch), pt[qs : qs + query_batch] @ chunk.T

    # Pass 1: each mated probe's score with its own template, read off the same matmuls as pass 2,
    # so a candidate identical to the mate ties with it exactly.
    mate_score = torch.full((len(probes),), math.nan, device=device)
    for start, size, sl, sim in score_blocks(templates, False):
        local = mate_t[sl] - start
        rows = torch.nonzero((local >= 0) & (local < size)).flatten()
        mate_score[sl.start + rows] = sim[rows, local[rows]]
    # Pass 2: per probe, how many other candidates score >= its mate, and the best score overall.
    higher = torch.zeros(len(probes), dtype=torch.int64, device=device)
    top1 = torch.full((len(probes),), -math.inf, device=device)
    offset = 0
    for base, normalize in sources:
        for start, size, sl, sim in score_blocks(base, normalize):
            top1[sl] = torch.maximum(top1[sl], sim.max(dim=1).values)
            cols = torch.arange(offset + start, offset + start + size, device=device)
            not_mate = cols[None, :] != mate_t[sl, None]
            higher[sl] += ((sim >= mate_score[sl, None]) & not_mate).sum(dim=1)
        offset += base.shape[0]

    rank = (higher + 1).cpu().numpy()
    top1_np = top1.cpu().numpy().astype(np.float64)
    mate_np = mate_score.cpu().numpy().astype(np.float64)
    n_mated, n_non = int(mated.sum()), int((~mated).sum())
    max_rank = max(ranks)
    cmc = [float(np.mean(rank[mated] <= r)) if n_mated else math.nan for r in range(1, max_rank + 1)]
    result: dict = {f"rank_{r}": cmc[r - 1] for r in ranks}
    result["cmc"] = cmc
    tpir, thresholds = {}, {}
    if n_non and n_mated:
        nonmated_top1 = np.sort(top1_np[~mated])[::-1]
        hit_rank1 = rank[mated] == 1
        for target in fpir_targets:
            if n_non * target < 1 - 1e-9:
                continue
            allowed = math.floor(n_non * target + 1e-9)
            threshold = -math.inf if allowed >= n_non else float(nonmated_top1[allowed])
            tpir[far_key(target)] = float(np.mean(hit_rank1 & (mate_np[mated] > threshold)))
            thresholds[far_key(target)] = threshold
    result.update({
        "tpir_at_fpir": tpir,
        "fpir_thresholds": thresholds,
        "probes": len(probes),
        "mated_probes": n_mated,
        "non_mated_probes": n_non,
        "gallery_identities": len(enrolled),
        "distractors": n_distractors,
    })
    return result


def evaluate_identification(
    model,
    gallery_images: np.ndarray,
    gallery_ids: Sequence,
    probe_images: np.ndarray,
    probe_ids: Sequence,
    distractor_images: Optional[np.ndarray] = None,
    *,
    options: Optional[EmbedOptions] = None,
    flip: Optional[bool] = None,
    batch_size: Optional[int] = None,
    device: Optional[Device] = None,
    normalize: Optional[str] = None,
    **metric_kwargs,
) -> dict:
    """Embed (flip-sum) aligned RGB uint8 images with ``model`` and run `identification_metrics`.
    ``options``: `EmbedOptions` (the loose keywords override it)."""
    options = EmbedOptions.make(options, flip=flip, batch_size=batch_size, device=device, normalize=normalize)
    device = options.device

    def embed(images):
        return embed_images(model, images, options=options)

    if len(gallery_images) == 0 or len(probe_images) == 0:
        raise UserError("identification needs at least one gallery image and one probe image")
    distractors = embed(distractor_images) if distractor_images is not None and len(distractor_images) else None
    return identification_metrics(embed(probe_images), probe_ids, embed(gallery_images), gallery_ids,
                                  distractors, device=device, **metric_kwargs)


# ---------------------------------------------------------------------------------------------
# identity folders on disk (`marginface identify`)

IMAGES_PER_BLOCK = 2048  # images decoded at once: bounded memory whatever the folder size


def _identity_folder(role: str, root: Union[str, Path]):
    """``root/<identity>/*.jpg`` as a `FolderSource`; its errors say which folder (gallery/probes) failed."""
    try:
        return FolderSource(root)
    except UserError as exc:
        # "gallery: <path>: ..."; a folder itself named like its role reads "--gallery gallery: ...", not twice
        prefix = f"--{role} " if str(exc).startswith(f"{role}:") else f"{role}: "
        raise UserError(f"{prefix}{exc}") from None


def _open_feature_matrix(path: Path) -> np.ndarray:
    """A ``.npy`` N×D float feature matrix, memory-mapped (1M × 512 stays on disk)."""
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: distractor feature file not found") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npy feature matrix ({exc})") from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.floating):
        raise UserError(f"{path}: expected an N×D float feature matrix, got shape {matrix.shape} {matrix.dtype}")
    rows = max(1, (64 << 20) // max(1, matrix.shape[1] * matrix.itemsize))  # one pass, 64 MB at a time
    for start in range(0, matrix.shape[0], rows):
        finite = np.isfinite(matrix[start:start + rows]).all(axis=1)
        if not finite.all():
            raise UserError(f"{path}: row {start + int(np.argmin(finite))} holds NaN or inf; "
                            f"distractor features must be finite")
    return matrix


def image_files(root: Path, what: str = "distractors") -> list[Path]:
    """Every image under ``root`` (any depth: MegaFace's distractors sit in nested folders), sorted."""
    if not root.is_dir():
        raise UserError(f"{what}: {root}: not a directory")
    files = list_image_files(root)
    if not files:
        raise UserError(f"{what}: {root}: no images found")
    return files


def embed_image_files(model, read: Callable[[int], np.ndarray], count: int, *,
                      options: Optional[EmbedOptions] = None, flip: Optional[bool] = None,
                      batch_size: Optional[int] = None, device: Optional[Device] = None,
                      normalize: Optional[str] = None, amp_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """``count×D`` float32 features of the images ``read(i)`` returns (RGB uint8, resized to the
    model's input as the pair-set readers do), decoded ``IMAGES_PER_BLOCK`` at a time so memory
    stays bounded whatever the count; flip-sum unless ``flip=False``. ``options``: `EmbedOptions`
    (batch 128 by default; the loose keywords override it)."""
    options = EmbedOptions.make(options, default=FOLDER_OPTIONS, flip=flip, batch_size=batch_size, device=device,
                                normalize=normalize, amp_dtype=amp_dtype)
    info = ModelInfo.of(model)
    blocks = []
    for start in range(0, count, IMAGES_PER_BLOCK):
        stop = min(start + IMAGES_PER_BLOCK, count)
        images = np.stack([resize_image(read(i), info.image_size) for i in range(start, stop)])
        blocks.append(embed_images(model, images, options=options))
        if not np.isfinite(blocks[-1]).all():
            raise UserError(f"{info.source or 'model'}: the model gave NaN/inf embeddings "
                            f"(broken weights or an overflow at this precision)")
    return np.concatenate(blocks).astype(np.float32, copy=False)


def save_features(out: Union[str, Path], features: np.ndarray, files: Sequence[Path]) -> dict:
    """Write ``out`` (.npy, N×D float32) and beside it ``<out>.txt`` (the image paths, one per row,
    in row order), each atomically; returns the paths. What ``marginface embed`` writes for
    ``identify --distractors``."""
    out = Path(out)
    if out.suffix.lower() != ".npy":
        raise UserError(f"--out {out}: the feature file must end in .npy")
    if len(features) != len(files):
        raise ValueError(f"{len(features)} feature rows for {len(files)} files")
    listing = out.with_name(out.name[:-4] + ".txt")
    with atomic_write(out, "wb") as handle:  # a handle: np.save would append ".npy" to a temp name
        np.save(handle, np.ascontiguousarray(features, dtype=np.float32))
    atomic_write_text(listing, "".join(f"{p}\n" for p in files))
    return {"features": str(out), "files": str(listing)}


def _open_distractors(spec: Union[str, Path]) -> Union[np.ndarray, list[Path]]:
    """A distractor argument: a feature matrix (``.npy``) or the image files of a folder."""
    path = Path(spec)
    if path.is_dir():
        return image_files(path)
    if path.suffix.lower() == ".npy":
        return _open_feature_matrix(path)
    raise UserError(f"distractors: {path}: expected a folder of images or a .npy feature matrix")


def evaluate_identification_folders(
    model,
    gallery: Union[str, Path],
    probes: Union[str, Path],
    distractors: Sequence[Union[str, Path]] = (),
    *,
    options: Optional[EmbedOptions] = None,
    flip: Optional[bool] = None,
    batch_size: Optional[int] = None,
    device: Optional[Device] = None,
    normalize: Optional[str] = None,
    ranks: Sequence[int] = (1, 5),
    fpir_targets: Sequence[float] = DEFAULT_FPIR_TARGETS,
    chunk_size: int = DEFAULT_CHUNK,
    amp_dtype: Optional[torch.dtype] = None,
    log=None,
) -> dict:
    """`identification_metrics` of identity folders ``gallery`` and ``probes`` (``DIR/<identity>/*.jpg``).

    Probes whose identity has no gallery folder are the non-mated (open-set) probes. Each
    distractor is a folder of images (any depth, no identities) or a ``.npy`` N×D feature matrix
    made with the same model and flip setting (memory-mapped). Images are resized to the model's
    input size as the pair-set readers do, then embedded with `embed_images` (flip-sum unless
    ``flip=False``), ``IMAGES_PER_BLOCK`` at a time. The result adds ``gallery_images``, ``flip``,
    ``fpir_targets`` (as requested; `tpir_at_fpir` holds those the non-mated probes support) and
    ``sources`` (the paths) to the metrics.
    """
    options = EmbedOptions.make(options, default=FOLDER_OPTIONS, flip=flip, batch_size=batch_size, device=device,
                                normalize=normalize, amp_dtype=amp_dtype)
    flip, device = options.flip, options.device
    # Every cheap check before the first (slow) forward pass.
    gallery_src, probe_src = _identity_folder("gallery", gallery), _identity_folder("probes", probes)
    opened = [(Path(spec), _open_distractors(spec)) for spec in distractors]
    if not set(probe_src.identities) & set(gallery_src.identities):
        raise UserError(f"probes: none of the {probe_src.num_classes} identities of {probes} has a folder in "
                        f"the gallery {gallery} (identity folder names must match)")

    def embed(what: str, read, count: int) -> np.ndarray:
        if log:
            log(f"embedding {what}: {count} images")
        return embed_image_files(model, read, count, options=options)

    gallery_feats = embed("gallery", gallery_src.read, len(gallery_src))
    dim = gallery_feats.shape[1]
    for path, part in opened:  # checked before embedding the probes and distractor folders
        if isinstance(part, np.ndarray) and part.shape[1] != dim:
            raise UserError(f"{path}: distractor features have {part.shape[1]} dimensions, the model's have {dim}")
    probe_feats = embed("probes", probe_src.read, len(probe_src))
    distractor_feats = []
    for path, part in opened:
        if isinstance(part, np.ndarray):
            distractor_feats.append(part)
        else:
            files = part
            distractor_feats.append(embed(f"distractors {path}", lambda i: read_image(files[i]), len(files)))

    def names(src) -> list[str]:  # identity labels are the folder names, so gallery and probes match by name
        return [src.identities[label] for label in src.labels]

    if log:
        log(f"searching {len(probe_feats)} probes against {gallery_src.num_classes} identities + "
            f"{sum(len(d) for d in distractor_feats)} distractors")
    result = identification_metrics(probe_feats, names(probe_src), gallery_feats, names(gallery_src),
                                    distractor_feats or None, ranks=ranks, fpir_targets=fpir_targets,
                                    chunk_size=chunk_size, device=device)
    result.update({"gallery_images": len(gallery_src), "flip": flip, "fpir_targets": list(fpir_targets),
                   "sources": {"gallery": str(gallery), "probes": str(probes),
                               "distractors": [str(path) for path, _ in opened]}})
    return result


def _rate(value) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


def _rank_keys(result: dict) -> list[str]:
    return sorted((k for k in result if k.startswith("rank_")), key=lambda k: int(k[5:]))


def format_identification(result: dict) -> str:
    """Console summary: counts, rank-r rates, TPIR@FPIR with its threshold."""
    lines = [f"gallery: {result['gallery_identities']} identities ({result['gallery_images']} images); "
             f"probes: {result['probes']} ({result['mated_probes']} mated, {result['non_mated_probes']} non-mated); "
             f"distractors: {result['distractors']}; {'flip-sum' if result['flip'] else 'no flip'}"]
    lines.append("  ".join(f"rank-{k[5:]} {_rate(result[k])}" for k in _rank_keys(result)))
    for key, tpir in result["tpir_at_fpir"].items():
        lines.append(f"TPIR@FPIR={key} {_rate(tpir)} (threshold {result['fpir_thresholds'][key]:.4f})")
    missing = [far_key(t) for t in result.get("fpir_targets", ()) if far_key(t) not in result["tpir_at_fpir"]]
    if missing:
        lines.append(f"TPIR@FPIR={', '.join(missing)}: not reported ({result['non_mated_probes']} non-mated probes; "
                     f"FPIR f needs at least 1/f probe images whose identity has no gallery folder)")
    return "\n".join(lines)


def write_identification_report(out_dir: Union[str, Path], result: dict) -> dict:
    """``identification.json`` and ``identification.md`` in ``out_dir``, each written atomically."""
    out = ensure_dir(out_dir)
    json_path, md_path = out / "identification.json", out / "identification.md"
    write_atomic(json_path, json.dumps(json_safe(result), indent=2) + "\n")
    src = result["sources"]
    rows = [(f"rank-{k[5:]}", _rate(result[k]), "") for k in _rank_keys(result)]
    rows += [(f"TPIR@FPIR={k}", _rate(v), f"{result['fpir_thresholds'][k]:.4f}")
             for k, v in result["tpir_at_fpir"].items()]
    distractors = f"Distractors: {result['distractors']}"
    if src["distractors"]:
        distractors += " (" + ", ".join(f"`{d}`" for d in src["distractors"]) + ")"
    md = ["# Identification report", "",
          f"Gallery `{src['gallery']}`: {result['gallery_identities']} identities, {result['gallery_images']} images. "
          f"Probes `{src['probes']}`: {result['probes']} ({result['mated_probes']} mated, "
          f"{result['non_mated_probes']} non-mated). {distractors}. "
          f"Embeddings: {'flip-sum' if result['flip'] else 'no flip'}.", "",
          "| metric | value | threshold (cos) |", "|---|---:|---:|"]
    md += [f"| {name} | {value} | {threshold} |" for name, value, threshold in rows]
    md += ["", "Protocol: docs/evaluation.md (1:N identification). Rank-r rates are over the mated probes; "
               "TPIR@FPIR needs non-mated probes (probe identities without a gallery folder).", ""]
    write_atomic(md_path, "\n".join(md))
    return {"json": str(json_path), "md": str(md_path)}
