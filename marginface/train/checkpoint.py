"""Atomic checkpoints: write a temp file, fsync, rename; load with torch's restricted unpickler.

A crash (even SIGKILL) mid-write leaves the previous checkpoint intact: the rename is the commit
(`marginface.io.atomic`); the temp file such a kill leaves is removed by the next save or resume.
Loading uses ``weights_only=True`` so a checkpoint can hold tensors, numbers, strings and
containers only; nothing in it can run code.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch


from marginface.config import Config, from_dict
from marginface.errors import UserError
from marginface.inference import ModelInfo, pick_threshold
from marginface.io.atomic import atomic_save_torch, remove_stale_temps
from marginface.io.trust import read_weights
from marginface.train.setup import build_model


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (`marginface.io.atomic.atomic_save_torch`):
    temp files a killed save left beside it are removed first; a failed write (full disk) is a
    `UserError` naming the file, and the previous checkpoint stays."""
    atomic_save_torch(obj, path)


def remove_stale_checkpoint_temps(ckpt_dir: Path) -> list[Path]:
    """The temp files saves of ``ckpt_dir/*.pt`` killed mid-write left behind (ours only)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed: list[Path] = []
    for ckpt in {p.name for p in ckpt_dir.iterdir() if p.suffix == ".pt"} | {"last.pt", "best.pt"}:
        removed += remove_stale_temps(ckpt_dir / ckpt)
    return removed


# Step-numbered snapshots (``train.snapshot_every`` / ``train.keep_snapshots``): RUN/snapshots/step_000500.pt,
# each a whole checkpoint (resumable with --resume-from, evaluable by path). Only files of exactly these
# names (and the classifier shard files of a Partial FC snapshot) are ever removed by the retention.
SNAPSHOT_DIR = "snapshots"
_SNAPSHOT = re.compile(r"^step_(\d{6,})\.pt$")
_SNAPSHOT_TEMP = re.compile(r"^\.?step_\d{6,}(-head-s\d+\.rank\d+-of\d+)?\.pt\.[a-z0-9_]{8}\.tmp$")


def snapshot_name(step: int) -> str:
    """``step_000500`` (at least six digits, so names sort by step)."""
    return f"step_{int(step):06d}"


def snapshot_interval(every: int, keep: int, checkpoint_every: int) -> int:
    """Steps between snapshots: ``train.snapshot_every``; when only ``train.keep_snapshots`` is set, every
    ``train.checkpoint_every`` steps; 0 = no snapshots."""
    return every or (checkpoint_every if keep > 0 else 0)


def list_snapshots(folder: Path) -> list:
    """``[(step, path), ...]`` of the snapshots in ``folder``, oldest first (our names only)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _SNAPSHOT.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _shard_files(folder: Path, name: str) -> list:
    pattern = re.compile(rf"^{re.escape(name)}-head-s\d+\.rank\d+-of\d+\.pt$")
    return [p for p in Path(folder).iterdir() if pattern.match(p.name)]


def prune_snapshots(folder: Path, keep: int, upto_step: Optional[int] = None) -> list:
    """Keep the newest ``keep`` snapshots (``keep`` <= 0: all) among those at or before ``upto_step``;
    delete the older ones with their classifier shard files; returns what was deleted.

    Snapshots past ``upto_step`` (left by a continuation this run was resumed before) are neither
    counted nor removed here: the run rewrites each of them when it reaches its step."""
    if keep <= 0:
        return []
    snaps = [(s, p) for s, p in list_snapshots(folder) if upto_step is None or s <= upto_step]
    removed = []
    for _, p in snaps[:-keep]:
        for f in [p, *_shard_files(folder, p.stem)]:
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def remove_stale_snapshot_temps(folder: Path) -> list:
    """The temp files of snapshot saves killed mid-write (ours only, by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _SNAPSHOT_TEMP.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: Path) -> dict:
    ckpt = read_weights(path, "marginface checkpoint", "a run directory or a .pt checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path}: not a marginface checkpoint (no 'model' entry)")
    return ckpt


def resolve_checkpoint(model_path: str, prefer: str = "best") -> Path:
    """A run directory, a checkpoints directory or a .pt file -> the checkpoint file to use."""
    p = Path(model_path)
    if p.is_file():
        return p
    for cand in (p / "checkpoints" / f"{prefer}.pt", p / "checkpoints" / "last.pt", p / f"{prefer}.pt", p / "last.pt"):
        if cand.is_file():
            return cand
    raise UserError(f"{model_path}: no checkpoint found (expected a .pt file or a run directory with checkpoints/)")


def load_backbone(model_path: str, prefer: str = "best"):
    """The trained backbone of a run directory or checkpoint, in eval mode, on the CPU (see
    `backbone_from_checkpoint`)."""
    path = resolve_checkpoint(model_path, prefer)
    return backbone_from_checkpoint(path, load_checkpoint(path))


def backbone_from_checkpoint(path: Path, ckpt: dict):
    """The backbone a loaded checkpoint holds, in eval mode, with ``info``
    (`marginface.inference.ModelInfo`: input size, the normalisation it was trained with, the
    eval-time threshold) and, for older callers, ``normalize`` and ``checkpoint_path``. Weights
    holding NaN/inf (a diverged run) are refused: evaluating or exporting them would only fail later."""
    cfg = from_dict(Config, ckpt.get("config") or {}, where=f"{path}: ")
    cfg.model.pretrained = None  # the checkpoint holds the weights; the original file may be gone
    state = ckpt["model"] if isinstance(ckpt["model"], dict) else {}
    bad = next((k for k, v in state.items()
                if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"{path}: weight '{bad}' holds NaN or inf values (did training diverge?); refusing to load it")
    model = build_model(cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit {cfg.model.backbone}: {str(exc).splitlines()[0]}") from None
    model.eval()
    threshold, threshold_source = pick_threshold(ckpt.get("last_eval") or {}, cfg.eval.best_metric)
    model.info = ModelInfo(input_size=cfg.model.input_size, embedding_size=model.embedding_size,
                           normalize=cfg.data.input_norm, threshold=threshold, threshold_source=threshold_source,
                           source=str(path), kind="checkpoint", precision="fp32", backbone=cfg.model.backbone)
    model.normalize = model.info.normalize
    model.checkpoint_path = str(path)
    return model
