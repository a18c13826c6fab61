"""RunLogger: one record per call in log.jsonl, console lines without a terminal, clean close."""
import json

import pytest

from marginface.train.loggers import RunLogger


def test_records_are_json_lines_appended_across_loggers(tmp_path, capsys):
    log = RunLogger(tmp_path, total_steps=10, console=True, tensorboard=False)
    log.record("train", 1, {"loss": 2.5, "lr": 0.1})
    log.progress(1, 2.5, 0.1, 123.4, 75.0)
    log.message("hello")
    log.close()
    resumed = RunLogger(tmp_path, total_steps=10, start_step=1, console=False, tensorboard=False)
    resumed.record("eval", 2, {"lfw/accuracy": 0.9})
    resumed.progress(2, 1.0, 0.1, 1.0, 1.0)  # console off: prints nothing
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("eval", 2)]
    assert rows[0]["loss"] == 2.5 and rows[1]["lfw/accuracy"] == 0.9 and "time" in rows[0]
    err = capsys.readouterr().err  # pytest's stderr is not a terminal: plain lines, no progress bar
    assert "step 1/10" in err and "loss 2.5000" in err and "eta 1:15" in err and "hello" in err
    assert err.count("step ") == 1


def test_tensorboard_scalars_skip_nan(tmp_path):
    log = RunLogger(tmp_path, total_steps=1, console=False, tensorboard=True)
    if log._tb is None:
        pytest.skip("tensorboard is not installed")
    written = []
    log._tb.add_scalar = lambda key, value, step: written.append((key, value, step))
    log.scalars(3, {"a": 1.0, "b": float("nan"), "c": "text"}, prefix="train/")
    log.close()
    assert written == [("train/a", 1.0, 3)]
