"""Progress of long steps on stderr: the one place commands say what they are doing.

- `phase(text)`: one line ("loading torch...", "building data: ...") before a step that takes a while,
  on a terminal only (a script meeting bad input still sees exactly one ``error:`` line).
- `Working(what)`: a step with nothing to count (compiling, int8 calibration): its name and the
  seconds it has taken so far, on a terminal every second, elsewhere a line every ``every_s``.
- `Progress(what, total)`: a count of items done. On a terminal it redraws one line in place (a bar,
  the count, a smoothed rate and ETA, at most ``redraw_s`` apart); on a pipe or a log file it prints a
  plain line every ``every_s`` seconds (nothing at all for a step shorter than that), so logs stay
  readable. ``enabled=False`` (``--json`` commands pass ``not args.json`` or leave it to the caller)
  prints nothing.

Everything goes to stderr, never to stdout (which holds a command's results and ``--json`` object).
The ETA is an exponential moving average of the time per item, shown once ``eta_after`` items are
done, so a slow first item (start-up, warm-up) fades out instead of skewing it for the whole run.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from typing import Callable, Optional, TextIO

EVERY_S = float(os.environ.get("MARGINFACE_PROGRESS_EVERY", "10"))  # seconds between lines off a terminal
REDRAW_S = 0.1  # seconds between redraws on a terminal
ETA_AFTER = 3  # items done before an ETA is shown
SMOOTHING = 0.3  # weight of the newest rate sample in the moving average
BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    seconds = int(max(seconds, 0) + 0.5)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def phase(text: str, *, enabled: bool = True, stream: Optional[TextIO] = None, tty: Optional[bool] = None) -> None:
    """One line on stderr saying what happens next, on a terminal only (``tty``: force either way;
    ``enabled=False``: nothing). Off a terminal nothing is printed, so a script that meets bad input
    still gets exactly one ``error:`` line."""
    stream = stream if stream is not None else sys.stderr
    if enabled and (_is_tty(stream) if tty is None else tty):
        print(text, file=stream, flush=True)


class Progress:
    """Items done out of ``total`` (None: unknown), on stderr; see the module docstring.

    ``initial``: items already done (a resumed run); ``unit``: what an item is ("images", "steps");
    ``tty``: force the terminal (True) or log (False) style; ``every_s``: seconds between log lines
    (0: a line at every update); ``clock``: a monotonic time source (tests)."""

    def __init__(self, what: str, total: Optional[int] = None, *, unit: str = "", initial: int = 0,
                 enabled: bool = True, stream: Optional[TextIO] = None, tty: Optional[bool] = None,
                 every_s: Optional[float] = None, redraw_s: float = REDRAW_S, eta_after: int = ETA_AFTER,
                 width: Optional[int] = None, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit = what, (int(total) if total is not None else None), unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else bool(tty)
        self.every_s = EVERY_S if every_s is None else float(every_s)
        self.redraw_s, self.eta_after, self._width = float(redraw_s), int(eta_after), width
        self.clock = clock
        self.done = self.start = int(initial)
        self.postfix = ""
        self._t0 = self._t_sample = clock()
        self._n_sample = self.done
        self._per_item: Optional[float] = None  # smoothed seconds per item
        self._last_draw = -float("inf")
        self._last_line = self._t0
        self._drawn = False  # terminal: a partial line is on screen
        self._printed = False  # log: at least one line was printed
        self._printed_done = -1  # log: the count its last line showed
        self.closed = False

    # ------------------------------------------------------------------ numbers
    @property
    def elapsed(self) -> float:
        return self.clock() - self._t0

    @property
    def eta(self) -> Optional[float]:
        """Smoothed seconds left, or None (no total, or fewer than ``eta_after`` items done yet)."""
        if self.total is None or self._per_item is None or self.done - self.start < self.eta_after:
            return None
        return max(self.total - self.done, 0) * self._per_item

    @property
    def rate(self) -> Optional[float]:
        """Smoothed items per second."""
        return None if not self._per_item else 1.0 / self._per_item

    def _sample(self, now: float) -> None:
        dn = self.done - self._n_sample
        dt = now - self._t_sample
        if dn <= 0 or dt <= 0:
            return
        per_item = dt / dn
        self._per_item = per_item if self._per_item is None else (
            SMOOTHING * per_item + (1 - SMOOTHING) * self._per_item)
        self._t_sample, self._n_sample = now, self.done

    # ------------------------------------------------------------------ updates
    def update(self, n: int = 1, postfix: Optional[str] = None) -> None:
        """``n`` more items done."""
        self.set(self.done + n, postfix)

    def set(self, done: int, postfix: Optional[str] = None) -> None:
        """``done`` items done in all."""
        if self.closed:
            return
        now = self.clock()
        self.done = int(done)
        self._sample(now)
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        if self.tty:
            if now - self._last_draw >= self.redraw_s or (self.total is not None and self.done >= self.total):
                self._draw(now)
        elif now - self._last_line >= self.every_s:
            self._line(now)

    def __call__(self, done: int, total: Optional[int] = None) -> None:
        """The library callback convention ``progress(done, total)``: ``done`` items of ``total`` (which
        may be learnt only when the work starts)."""
        if total is not None:
            self.total = int(total)
        self.set(done)

    def line(self) -> str:
        """The progress text: ``what: done/total unit [bar] pct  rate  eta m:ss  postfix``."""
        parts = []
        if self.total:
            pct = min(self.done / self.total, 1.0)
            count = f"{self.done}/{self.total}" + (f" {self.unit}" if self.unit else "")
            if self.tty:
                filled = int(round(pct * BAR_WIDTH))
                parts.append(f"{count} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {pct * 100:3.0f}%")
            else:
                parts.append(f"{count} ({pct * 100:.0f}%)")
        else:
            parts.append(f"{self.done}" + (f" {self.unit}" if self.unit else ""))
        rate = self.rate
        if rate is not None and self.done - self.start >= self.eta_after:
            parts.append(f"{rate:.1f}/s" if rate >= 1 else f"{1 / rate:.1f} s each")
        eta = self.eta
        if self.total is not None and self.done >= self.total:
            parts.append(f"done in {format_duration(self.elapsed)}")
        elif eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.what}: " + "  ".join(parts)

    def _columns(self) -> int:
        return self._width or shutil.get_terminal_size((100, 24)).columns

    def _draw(self, now: float) -> None:
        text = self.line()[: max(self._columns() - 1, 10)]
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self._drawn, self._last_draw = True, now

    def _line(self, now: float) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._printed, self._last_line, self._printed_done = True, now, self.done

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False

    def write(self, text: str) -> None:
        """A line of its own (a message, a warning) without breaking the progress line."""
        if not self.enabled:
            return
        if self.tty and not self.closed:
            self._clear()
            print(text, file=self.stream, flush=True)
            self._draw(self.clock())
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """The final state once: the terminal line is finished with a newline; a log that printed
        lines gets a last one. Later calls (and updates) do nothing."""
        if self.closed:
            return
        if self.enabled:
            now = self.clock()
            if self.tty and self._drawn:
                self._draw(now)
                self.stream.write("\n")
                self.stream.flush()
            elif not self.tty and self._printed and self._printed_done != self.done:
                self._line(now)
        self._drawn = False
        self.closed = True

    def abort(self) -> None:
        """The step failed: clear the terminal line (its error follows), print no final state."""
        if self.enabled and self.tty:
            self._clear()
            self.stream.flush()
        self._drawn = False
        self.closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type is not None else self.close()


class Working:
    """``with Working("compiling the model (int8)"):`` around a step that reports nothing itself.

    On a terminal a background thread redraws ``what... 12 s`` every ``tick_s``; elsewhere
    ``what: still working (1:10)`` is printed every ``every_s`` (nothing for a shorter step). The end
    says ``what: done in m:ss`` (off a terminal only after such a line); a step that fails clears its
    line and prints nothing more (its error follows)."""

    def __init__(self, what: str, *, enabled: bool = True, stream: Optional[TextIO] = None,
                 tty: Optional[bool] = None, every_s: Optional[float] = None, tick_s: float = 1.0):
        self.what, self.enabled = what, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else bool(tty)
        self.every_s = EVERY_S if every_s is None else float(every_s)
        self.tick_s = float(tick_s)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._said = False

    def _say(self, text: str, end: str) -> None:
        with self._lock:
            self._said = True
            if self.tty:
                self.stream.write("\r" + text[: max(shutil.get_terminal_size((100, 24)).columns - 1, 10)] + "\x1b[K" + end)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def _run(self) -> None:
        interval = self.tick_s if self.tty else self.every_s
        while not self._stop.wait(interval):
            elapsed = format_duration(time.monotonic() - self._t0)
            self._say(f"{self.what}... {elapsed}" if self.tty else f"{self.what}: still working ({elapsed})", "")

    def __enter__(self) -> "Working":
        self._t0 = time.monotonic()
        if self.enabled:
            if self.tty:
                self._say(f"{self.what}...", "")
            if self.tty or self.every_s > 0:
                self._thread = threading.Thread(target=self._run, name="marginface-progress", daemon=True)
                self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is None and self._said:
            self._say(f"{self.what}: done in {format_duration(time.monotonic() - self._t0)}", "\n")
        elif self.tty:
            with self._lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def counter(what: str, total: Optional[int] = None, *, enabled: bool = True, unit: str = "") -> Callable[..., None]:
    """A ``progress(done)`` callback for library functions that report a count (``done`` in all),
    backed by a `Progress`; ``callback.close()`` finishes it."""
    bar = Progress(what, total, unit=unit, enabled=enabled)

    def callback(done: int, *_ignored) -> None:
        bar.set(done)

    callback.close = bar.close  # type: ignore[attr-defined]
    callback.bar = bar  # type: ignore[attr-defined]
    return callback
