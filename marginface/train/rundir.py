"""The run-directory policy: what counts as a run, when a start may (not) touch one, what --resume uses.

A run directory holds ``config.yaml``, ``checkpoints/{last,best}.pt``, ``snapshots/step_NNNNNN.pt``
(optional), ``log.jsonl``, ``tensorboard/`` and ``report.*``. The rules, so that nothing a run has
produced is lost by accident:

* a fresh start refuses a directory that already holds a run (``--resume`` continues it,
  ``--overwrite`` deletes its files first, or another ``--out``);
* ``--resume`` continues from ``checkpoints/last.pt``; when that is missing but other checkpoints
  are there it refuses and names them (``--resume-from PATH`` picks one), it never starts over;
* on resume, ``log.jsonl`` loses its lines past the checkpoint's step (they are trained again), so
  the log holds each step once however the previous session ended.

`resolve_run` turns the command line's ``--config/--set/--out/--resume/--resume-from/--overwrite``
into the config, directory and checkpoint of the run (`marginface train` is its only caller).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from marginface.config import Config, read_config_file
from marginface.errors import UserError
from marginface.io.atomic import atomic_write_text, remove_stale_temps
from marginface.train.checkpoint import (SNAPSHOT_DIR, list_snapshots, remove_stale_checkpoint_temps,
                                         remove_stale_snapshot_temps)
from marginface.train.runconfig import config_from_dict, load_config

# the files and folders a training run writes into its directory (all removed by --overwrite)
RUN_ENTRIES = ("checkpoints", SNAPSHOT_DIR, "log.jsonl", "tensorboard", "wandb", "wandb_id.txt", "report.json",
               "report.md", "roc.png", "scores.png")


def checkpoints(run_dir: Path) -> list:
    """The checkpoint files of a run (``checkpoints/*.pt`` without the Partial FC shard files)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("*.pt") if "-head-s" not in p.name and p.is_file())


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` has checkpoints, a log or a report of a training run."""
    run_dir = Path(run_dir)
    if checkpoints(run_dir) or list_snapshots(run_dir / SNAPSHOT_DIR):
        return True
    return any((run_dir / name).is_file() and (run_dir / name).stat().st_size > 0
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
    snaps = list_snapshots(run_dir / SNAPSHOT_DIR)
    if snaps:
        parts.append(f"{len(snaps)} snapshot(s) up to {SNAPSHOT_DIR}/{snaps[-1][1].name}")
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
    others = checkpoints(run_dir) + [p for _, p in reversed(list_snapshots(run_dir / SNAPSHOT_DIR))]
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
    stale += remove_stale_snapshot_temps(run_dir / SNAPSHOT_DIR)
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


# ------------------------------------------------------------------------------ which run, which config
RUNS_ROOT = Path("runs")


def pick_run_dir(out: Optional[str], name: str, resume: bool) -> Path:
    """``--out`` as given; otherwise runs/<name> (a fresh -2, -3... when it already holds a run).

    With ``resume`` and no ``out``, the newest runs/<name>* that has a last checkpoint.
    """
    if out:
        return Path(out)
    root = RUNS_ROOT
    if resume:
        cands = sorted((p for p in root.glob(f"{name}*") if (p / "checkpoints" / "last.pt").is_file()),
                       key=lambda p: (p / "checkpoints" / "last.pt").stat().st_mtime)
        if not cands:
            raise UserError(f"--resume: no run of {name!r} with checkpoints/last.pt under {root}/ (use --out RUN_DIR)")
        return cands[-1]
    path, k = root / name, 1
    while path.exists() and any(path.iterdir()):
        k += 1
        path = root / f"{name}-{k}"
    return path


def run_config(run_dir: Path, checkpoint: Optional[Path], overrides: list,
               note: Optional[Callable[[str], None]] = None) -> Config:
    """The config of the run being resumed: its config.yaml; when that is empty or unreadable (a kill while
    it was written by an older version), the config saved in the checkpoint, with a note."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        if checkpoint is None:
            return load_config(None, overrides)  # killed before it was written: nothing trained either
        problem = "is missing"
    else:
        try:
            problem = "" if read_config_file(str(path)) else "is empty"
        except UserError as exc:
            problem = f"is unreadable ({exc})"
        if not problem:
            return load_config(str(path), overrides)
    saved = (peek(checkpoint) or {}).get("config") if checkpoint is not None else None
    if not saved:
        where = f" nor a config in {checkpoint}" if checkpoint is not None else " and no checkpoint holds one"
        raise UserError(f"--resume: {path} {problem}{where}; pass the run's config with --config")
    if note is not None:
        note(f"{path} {problem}; resuming with the config saved in {checkpoint}")
    return config_from_dict(saved, overrides, where=f"{checkpoint}: ")


class RunPlan(NamedTuple):
    """What `marginface train` starts: the config, the run directory, whether it resumes and from what."""
    cfg: Config
    run_dir: Path
    resume: bool
    resume_from: Optional[Path]


def resolve_run(config: Optional[str], overrides: Optional[list], out: Optional[str], *, resume: bool = False,
                resume_from: Optional[str] = None, overwrite: bool = False,
                note: Optional[Callable[[str], None]] = None) -> RunPlan:
    """The run the command line asks for, refused (one `UserError` line) before anything is touched when
    it would lose work: a fresh start into a run without --overwrite, --overwrite with --resume, ..."""
    overrides = overrides or []
    resume_from = Path(resume_from) if resume_from else None
    resume = resume or resume_from is not None
    if overwrite and resume:
        raise UserError("--overwrite starts the run afresh; it cannot be combined with --resume/--resume-from")
    if resume:
        if resume_from is not None:
            if not resume_from.is_file():
                raise UserError(f"--resume-from {resume_from}: checkpoint not found")
            if not out and resume_from.parent.name not in ("checkpoints", SNAPSHOT_DIR):
                raise UserError(f"--resume-from {resume_from}: name the run directory to continue with --out")
            run_dir = Path(out) if out else resume_from.parent.parent
        elif out:
            run_dir = Path(out)
        else:  # the newest run of this config's name
            run_dir = pick_run_dir(None, load_config(config, overrides).name, True)
        checkpoint = resume_from or resume_checkpoint(run_dir)  # refuses: checkpoints but no last.pt
        cfg = load_config(config, overrides) if config else run_config(run_dir, checkpoint, overrides, note)
    else:
        cfg = load_config(config, overrides)
        run_dir = pick_run_dir(out, cfg.name, False)
        require_fresh(run_dir, overwrite, dry_run=True)  # refuse now; the trainer clears it
    return RunPlan(cfg, run_dir, resume, resume_from)
