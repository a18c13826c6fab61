"""The run-directory policy: what counts as a run, when a start may (not) touch one, what --resume uses.

A run directory holds ``config.yaml``, ``checkpoints/{last,best}.pt``, ``log.jsonl``, ``tensorboard/``
and ``report.*``. The rules, so that nothing a run has produced is lost by accident:

* a fresh start refuses a directory that already holds a run (``--resume`` continues it,
  ``--overwrite`` deletes its files first, or another ``--out``);
* ``--resume`` continues from ``checkpoints/last.pt``; when that is missing but other checkpoints
  are there it refuses and names them (``--resume-from PATH`` picks one), it never starts over;
* on resume, ``log.jsonl`` loses its lines past the checkpoint's step (they are trained again), so
  the log holds each step once however the previous session ended.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from marginface.errors import UserError
from marginface.io.atomic import atomic_write_text, remove_stale_temps
from marginface.train.checkpoint import remove_stale_checkpoint_temps

# the files and folders a training run writes into its directory (all removed by --overwrite)
RUN_ENTRIES = ("checkpoints", "log.jsonl", "tensorboard", "report.json", "report.md", "roc.png", "scores.png")


def checkpoints(run_dir: Path) -> list:
    """The checkpoint files of a run (``checkpoints/*.pt`` without the Partial FC shard files)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("*.pt") if "-head-s" not in p.name and p.is_file())


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` has checkpoints, a log or a report of a training run."""
    run_dir = Path(run_dir)
    return bool(checkpoints(run_dir)) or any((run_dir / name).is_file() and (run_dir / name).stat().st_size > 0
                                             for name in ("log.jsonl", "report.json"))


def peek(path: Path) -> Optional[dict]:
    """``{"step", "best", "config"}`` of a checkpoint without reading its tensors (memory-mapped); None if
    unreadable."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        return None
    return {"step": ckpt.get("step"), "best": ckpt.get("best") or {}, "config": ckpt.get("config")}


def describe(run_dir: Path) -> str:
    """What a run directory holds, in a few words: ``checkpoints/best.pt (step 30), log.jsonl``."""
    run_dir = Path(run_dir)
    parts = []
    for p in checkpoints(run_dir):
        info = peek(p)
        parts.append(f"checkpoints/{p.name} " + (f"(step {info['step']})" if info else "(unreadable)"))
    parts += [name for name in ("log.jsonl", "report.json") if (run_dir / name).is_file()]
    return ", ".join(parts) or "nothing"


def require_fresh(run_dir: Path, overwrite: bool = False, *, dry_run: bool = False) -> None:
    """A fresh start into ``run_dir``: refused when it holds a run, unless ``overwrite`` (which deletes
    the run's own files, and only those, unless ``dry_run``)."""
    run_dir = Path(run_dir)
    if not holds_run(run_dir):
        return
    if not overwrite:
        raise UserError(f"{run_dir} already holds a run ({describe(run_dir)}); continue it with --resume, "
                        f"start it afresh with --overwrite, or choose another --out")
    if dry_run:
        return
    for name in RUN_ENTRIES:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def resume_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``--resume`` continues from: ``checkpoints/last.pt``; None when the run has no
    checkpoint at all (it starts at step 0). Other checkpoints without ``last.pt`` are refused: starting
    over would overwrite them."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        return last
    others = checkpoints(run_dir)
    if others:
        raise UserError(f"--resume: {last} is missing but the run holds {describe(run_dir)}; nothing was "
                        f"changed. Continue from one of them with --resume-from {others[0]}")
    return None


def alternatives_hint(run_dir: Path, broken: Path) -> str:
    """``"; the run also holds checkpoints/best.pt (step 30): ..."`` for an unusable ``broken`` checkpoint."""
    for p in checkpoints(run_dir):
        if p.resolve() == Path(broken).resolve():
            continue
        info = peek(p)
        if info is not None:
            return (f"; the run also holds an intact {p} (step {info['step']}): continue from it with "
                    f"--resume-from {p}")
    return ""


def remove_stale_temp_files(run_dir: Path) -> int:
    """Delete what killed atomic writes left behind (their temp files; the real files are intact).
    Only for the run's own process (rank 0) at start-up, when nothing else writes there."""
    run_dir = Path(run_dir)
    stale = remove_stale_checkpoint_temps(run_dir / "checkpoints")
    for name in ("config.yaml", "log.jsonl", "report.json", "report.md"):
        stale += remove_stale_temps(run_dir / name)
    return len(stale)

def truncate_log(path: Path, step: int, evaluated: bool = True) -> int:
    """Drop the lines of ``log.jsonl`` past ``step`` (and a torn last line), and with ``evaluated`` False
    the evaluation at ``step`` too (the checkpoint predates it; it runs again); returns how many went."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            at = int(record.get("step", 0))
            late = at > step or (at == step and not evaluated and record.get("kind") == "eval")
        except (ValueError, TypeError, AttributeError):
            late = True  # a line torn by a kill mid-write
        if late:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped
