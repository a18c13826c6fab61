"""Where training numbers go: a JSON-lines log, TensorBoard, optionally Weights & Biases, and the
console (rank 0 only).

One ``RunLogger`` owns them all so the trainer logs each record once. `LOGGERS` is the one list of
``train.loggers`` names (log.jsonl and the console are always on): ``tensorboard`` (the default) and
``wandb`` (the optional ``wandb`` package; ``WANDB_MODE=offline`` keeps it on this machine, and a
resumed run continues the same wandb run, whose id is kept in ``RUN/wandb_id.txt``).
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Optional

from marginface.errors import UserError
from marginface.evaluate.report import format_table  # noqa: F401  (the trainer's console table; lives with the report)
from marginface.io.atomic import atomic_write_text
from marginface.io.progress import Progress, format_duration, phase

LOGGERS = MappingProxyType({
    "tensorboard": "TensorBoard event files in RUN/tensorboard",
    "wandb": "Weights & Biases (pip install wandb; WANDB_MODE=offline writes RUN/wandb only)",
})
WANDB_ID_FILE = "wandb_id.txt"


def check_loggers(names: Iterable[str], *, imports: bool = True) -> None:
    """``train.loggers`` names only `LOGGERS`; with ``imports``, the packages they need are installed
    (one `UserError` line each, naming the key)."""
    names = list(names)
    for name in names:
        if name not in LOGGERS:
            raise UserError(f"config key 'train.loggers' must name loggers among {', '.join(LOGGERS)}, got {name!r}")
    if imports and "wandb" in names:
        import_wandb()


def import_wandb():
    """The ``wandb`` module, or one `UserError` line saying how to install it."""
    try:
        import wandb  # optional dependency (train.loggers: [wandb])
    except ImportError:
        raise UserError("config key 'train.loggers' names wandb, which is not installed: pip install wandb "
                        "(or remove wandb from train.loggers)") from None
    return wandb


def start_wandb(run_dir: Path, project: str = "", name: str = "", config: Optional[dict] = None):
    """A wandb run logging into ``run_dir/wandb``; the same one again when the run is resumed (its id
    is kept in ``run_dir/wandb_id.txt``). ``WANDB_MODE`` (e.g. ``offline``) is wandb's own setting."""
    wandb = import_wandb()
    run_dir = Path(run_dir)
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)
        atomic_write_text(id_file, run_id + "\n")
    try:
        return wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "marginface", name=name or None,
                          id=run_id, resume="allow", dir=str(run_dir), config=config or {})
    except Exception as exc:  # a third-party failure (no API key, no network): one line, before any step
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"config key 'train.loggers': wandb could not start ({first}); run `wandb login`, or set "
                        "WANDB_MODE=offline to log on this machine only") from None

_fmt_eta = format_duration  # the old name


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, console: bool = True,
                 tensorboard: bool = True, wandb: Optional[dict] = None):
        """``wandb``: None (off) or the keywords of `start_wandb` (``project``, ``name``, ``config``)."""
        self.run_dir = Path(run_dir)
        self._wandb = start_wandb(self.run_dir, **wandb) if wandb is not None else None
        self.total_steps = total_steps
        self.console = console
        self._jsonl = open(self.run_dir / "log.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            phase("starting the TensorBoard log...", enabled=console)  # its import takes seconds
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a stripped install still trains
                print("warning: tensorboard is not installed; no event file will be written", file=sys.stderr)
        # on a terminal: one line redrawn at every step (`tick`), with a smoothed ETA from the third step
        # on; elsewhere (a pipe, a log file) the plain lines of `progress`, every train.log_every steps
        self._bar = None
        self._terminal = console and sys.stderr.isatty()
        if self._terminal:
            self._bar = Progress("train", total_steps, unit="steps", initial=start_step, tty=True)
        self._last_step = start_step

    def tick(self, step: int) -> None:
        """Called after every training step: moves the terminal bar (the logged numbers come with `progress`)."""
        if self._bar is not None:
            self._bar.set(step)
            if step >= self.total_steps:
                self.end_progress()

    def end_progress(self) -> None:
        """Finish the terminal bar (drawn once, in its final state) before the evaluation and the final table."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def record(self, kind: str, step: int, values: dict) -> None:
        """Append one JSON line ``{"kind", "step", "time", **values}``."""
        self._jsonl.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **values}) + "\n")

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if self._tb is None and self._wandb is None:
            return
        numbers = {prefix + key: value for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value}  # no NaN
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None and numbers:
            self._wandb.log(numbers, step=step)

    def progress(self, step: int, loss: float, lr: float, ips: float, eta_s: float, extra: str = "") -> None:
        if not self.console:
            return
        if self._terminal:  # the bar (finished at the last step: nothing more to draw)
            if self._bar is not None:
                self._bar.postfix = f"loss {loss:.3f}  lr {lr:.4g}  {ips:.0f} img/s{extra}"
                self.tick(step)
        else:
            print(f"step {step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.4g}  {ips:.1f} img/s  "
                  f"eta {_fmt_eta(eta_s)}{extra}", file=sys.stderr, flush=True)
        self._last_step = step

    def message(self, text: str) -> None:
        if not self.console:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def image_grid(self, tag: str, images_chw_uint8, step: int) -> None:
        """A sample of training inputs, so users can see what the network sees."""
        if self._tb is not None:
            self._tb.add_images(tag, images_chw_uint8, step, dataformats="NCHW")

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        self._jsonl.close()
