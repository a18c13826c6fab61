"""Atomic checkpoints: write a temp file, fsync, rename; load with torch's restricted unpickler.

A crash (even SIGKILL) mid-write leaves the previous checkpoint intact: the rename is the commit
(`marginface.io.atomic`); the temp file such a kill leaves is removed by the next save or resume.
Loading uses ``weights_only=True`` so a checkpoint can hold tensors, numbers, strings and
containers only; nothing in it can run code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

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
