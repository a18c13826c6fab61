"""Where training numbers go: a JSON-lines log, TensorBoard, and the console (rank 0 only).

One ``RunLogger`` owns all three so the trainer logs each record once.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from marginface.evaluate.report import format_table  # noqa: F401  (the trainer's console table; lives with the report)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, console: bool = True,
                 tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.console = console
        self._jsonl = open(self.run_dir / "log.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a stripped install still trains
                print("warning: tensorboard is not installed; no event file will be written", file=sys.stderr)
        self._bar = None
        if console and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._last_step = start_step

    def record(self, kind: str, step: int, values: dict) -> None:
        """Append one JSON line ``{"kind", "step", "time", **values}``."""
        self._jsonl.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **values}) + "\n")

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if self._tb is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and value == value:  # skip NaN
                self._tb.add_scalar(prefix + key, value, step)

    def progress(self, step: int, loss: float, lr: float, ips: float, eta_s: float, extra: str = "") -> None:
        if not self.console:
            return
        if self._bar is not None:
            self._bar.update(step - self._last_step)
            self._bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.4g} {ips:.0f} img/s{extra}")
        else:
            print(f"step {step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.4g}  {ips:.1f} img/s  "
                  f"eta {_fmt_eta(eta_s)}{extra}", file=sys.stderr, flush=True)
        self._last_step = step

    def message(self, text: str) -> None:
        if not self.console:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
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
        self._jsonl.close()
