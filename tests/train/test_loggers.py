"""RunLogger: one record per call in log.jsonl, console lines without a terminal, clean close."""
import io
import json
import sys

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


# -- train.loggers: wandb (optional) -------------------------------------------------------------
TINY = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=32", "data.synthetic.identities=20",
        "data.synthetic.images_per_identity=4", "data.val=[]", "train.batch_size=16", "train.amp=none",
        "train.log_every=1"]


def test_a_missing_wandb_is_one_line_naming_pip_install_wandb(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from marginface.errors import UserError
    from marginface.train.loggers import check_loggers
    from marginface.train.runconfig import load_config
    from marginface.train.trainer import Trainer

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError, as when not installed
    with pytest.raises(UserError) as info:
        check_loggers(["tensorboard", "wandb"])
    message = str(info.value)
    assert "pip install wandb" in message and "train.loggers" in message and "\n" not in message
    check_loggers(["tensorboard"])  # the default needs no wandb
    with pytest.raises(UserError, match="pip install wandb"):  # before any data is built or step trained
        Trainer(load_config(None, TINY + ["train.loggers=[tensorboard, wandb]", "train.max_steps=1"]), tmp_path)
    assert not (tmp_path / "log.jsonl").exists()
    # the command line: `error: ...`, exit 2, no traceback
    code = ("import sys; sys.modules['wandb'] = None; from marginface.cli import main; "
            f"sys.exit(main(['train', '--out', {str(tmp_path / 'cli')!r}, '--set', 'train.loggers=[wandb]']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "pip install wandb" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_unknown_logger_names_the_key_and_the_loggers():
    from marginface.errors import UserError
    from marginface.train.loggers import LOGGERS
    from marginface.train.runconfig import load_config

    assert load_config(None, ["train.loggers=[]"]).train.loggers == []
    with pytest.raises(UserError) as info:
        load_config(None, ["train.loggers=[tensorboard, mlflow]"])
    assert "'train.loggers'" in str(info.value) and "'mlflow'" in str(info.value)
    assert all(name in str(info.value) for name in LOGGERS)


def test_wandb_offline_logs_the_run_and_a_resume_continues_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the optional wandb package is not installed (pip install wandb)")
    import json

    from marginface.train.runconfig import load_config
    from marginface.train.trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = ["train.loggers=[wandb]", "train.wandb_project=marginface-test"]
    Trainer(load_config(None, TINY + cfg + ["train.max_steps=2"]), tmp_path, console=False).fit()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert run_id and not (tmp_path / "tensorboard").exists()  # tensorboard is not in train.loggers
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
    Trainer(load_config(None, TINY + cfg + ["train.max_steps=3"]), tmp_path, resume=True, console=False).fit()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    assert len(sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # one per session, same id
    steps = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_bar_moves_every_step_and_is_drawn_once_before_the_final_table(tmp_path, monkeypatch, capsys):
    """The bar has an ETA after 3 steps (not after train.log_every), and its final state is drawn once,
    before the final table (the trainer calls end_progress), never again after it."""
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setenv("COLUMNS", "200")  # the bar is cut at the terminal's width
    log = RunLogger(tmp_path, total_steps=40, console=True, tensorboard=False)
    log._bar.redraw_s = 0
    for step in range(1, 41):
        log.tick(step)
        if step == 3:
            assert "eta " in term.getvalue().split("\r")[-1]
        if step % 20 == 0:
            log.progress(step, 1.5, 0.1, 100.0, 0.0)
        if step == 20:
            log.message("eval @ step 20: ...")
    log.end_progress()
    print("the final table")
    log.message("report: ...")
    log.close()
    shown = [line.split("\r")[-1].replace("\x1b[K", "") for line in term.getvalue().split("\n") if line]
    assert shown == ["eval @ step 20: ...", shown[1], "report: ..."]
    assert shown[1].startswith("train: 40/40 steps [####################] 100%") and "loss 1.500" in shown[1]
    assert "step 20/40" not in term.getvalue()  # on a terminal the plain log lines are replaced by the bar
    assert capsys.readouterr().out == "the final table\n"
