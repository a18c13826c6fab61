"""marginface.io.progress: one line redrawn on a terminal, a line every N seconds elsewhere, a smoothed
ETA after a few items, nothing with enabled=False, and only ever on the stream it was given (stderr)."""
import io
import time

import pytest

from marginface.io.progress import Progress, Working, counter, format_duration, phase


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def screen(text: str) -> list:
    """What a terminal shows: each line's last redraw (after the last carriage return)."""
    return [line.split("\r")[-1].replace("\x1b[K", "") for line in text.split("\n")]


def test_terminal_line_has_an_eta_after_three_items_and_ends_once():
    clock, out = Clock(), Terminal()
    bar = Progress("align", 10, unit="images", stream=out, clock=clock, redraw_s=0)
    assert bar.tty
    for i in range(1, 4):
        clock.t += 1.0
        bar.update()
        if i < 3:
            assert "eta" not in screen(out.getvalue())[-1]
    assert "eta 0:07" in screen(out.getvalue())[-1]  # 7 left at 1 s each
    assert "[######..............]  30%" in screen(out.getvalue())[-1]
    bar.write("a message")
    for _ in range(7):
        clock.t += 1.0
        bar.update()
    bar.close()
    bar.close()  # a second close draws nothing
    shown = [line for line in screen(out.getvalue()) if line]
    assert shown[0] == "a message"
    assert len(shown) == 2 and shown[1].startswith("align: 10/10 images [####################] 100%")
    assert "done in 0:10" in shown[1]
    assert out.getvalue().endswith("\n")


def test_eta_is_smoothed_so_a_slow_first_item_fades():
    clock = Clock()
    bar = Progress("train", 100, stream=io.StringIO(), clock=clock, tty=False, every_s=1e9)
    clock.t += 30.0  # start-up inside the first step
    bar.update()
    for _ in range(19):
        clock.t += 1.0
        bar.update()
    assert 80 <= bar.eta <= 84  # 80 steps left at ~1 s (the first step's 30 s has faded; the mean says 196)


def test_log_style_prints_every_n_seconds_and_nothing_for_short_steps():
    clock, out = Clock(), io.StringIO()
    quick = Progress("enroll", 5, stream=out, clock=clock, every_s=10)
    for _ in range(5):
        clock.t += 0.5
        quick.update()
    quick.close()
    assert out.getvalue() == ""  # 2.5 s in all: no line
    slow = Progress("enroll", 30, unit="images", stream=out, clock=clock, every_s=10)
    for _ in range(30):
        clock.t += 1.0
        slow.update()
    slow.close()
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["enroll: 10/30 images (33%)", "enroll: 20/30 images (67%)",
                                                      "enroll: 30/30 images (100%)"]  # the last state once
    assert "\r" not in out.getvalue() and "eta 0:10" in lines[1]


def test_disabled_prints_nothing_and_phase_lines():
    out = io.StringIO()
    bar = Progress("x", 3, stream=out, enabled=False, every_s=0)
    bar.update(3)
    bar.write("hidden")
    bar.close()
    phase("loading torch...", enabled=False, stream=out)
    phase("loading torch...", stream=out)  # not a terminal: nothing (an error stays the one line)
    assert out.getvalue() == ""
    term = Terminal()
    phase("loading torch...", stream=term)
    phase("loading torch...", enabled=False, stream=term)
    assert term.getvalue() == "loading torch...\n"


def test_unknown_total_and_counter_callback(capsys):
    clock, out = Clock(), io.StringIO()
    bar = Progress("embedding", None, unit="faces", stream=out, clock=clock, every_s=0)
    clock.t += 2
    bar.update(4)
    assert out.getvalue().startswith("embedding: 4 faces")
    callback = counter("pairs", 3, unit="pairs")
    callback(1)
    callback(3, "ignored extra argument")
    callback.close()
    assert capsys.readouterr().out == ""  # never stdout
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05"


def test_terminal_line_fits_the_width():
    out = Terminal()
    bar = Progress("a-very-long-step-name", 10, stream=out, redraw_s=0, width=40)
    bar.update(postfix="x" * 200)
    assert max(len(line) for line in screen(out.getvalue())) <= 39


def test_a_failed_step_clears_its_line_and_prints_no_final_state():
    out = Terminal()
    with pytest.raises(ValueError):
        with Progress("align", 10, stream=out, redraw_s=0) as bar:
            bar.update(4)
            raise ValueError("boom")
    assert screen(out.getvalue()) == [""] and "4/10" in out.getvalue()
    log = io.StringIO()
    with pytest.raises(ValueError):
        with Progress("align", 10, stream=log, every_s=0) as bar:
            bar.update(4)
            raise ValueError("boom")
    assert log.getvalue().splitlines() == [bar.line()]  # the update's line only, no "done"


def test_working_says_what_and_how_long():
    log = io.StringIO()
    with Working("compiling the model (int8)", stream=log, every_s=0.01):
        time.sleep(0.05)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("compiling the model (int8): still working (0:00)")
    assert lines[-1] == "compiling the model (int8): done in 0:00"
    short = io.StringIO()
    with Working("quick", stream=short, every_s=10):
        pass
    assert short.getvalue() == ""  # off a terminal a short step says nothing
    term = Terminal()
    with Working("exporting onnx", stream=term, tick_s=0.01):
        time.sleep(0.03)
    assert screen(term.getvalue())[0].startswith("exporting onnx: done in 0:00")
    term = Terminal()
    with pytest.raises(RuntimeError):
        with Working("exporting onnx", stream=term, tick_s=0.01):
            time.sleep(0.03)
            raise RuntimeError("failed")
    assert screen(term.getvalue()) == [""]  # a failure leaves no half line before its error
    quiet = io.StringIO()
    with Working("x", stream=quiet, enabled=False):
        pass
    assert quiet.getvalue() == ""
