"""`marginface train` on the console: start-up phase lines before the first step, and a Ctrl-C during
the final evaluation stops with exit 130 and a line saying what was saved (issue 21)."""
import io
import signal
import sys

import pytest

from marginface import cli
from marginface.train.trainer import Trainer

TINY = ["train.max_steps=2", "train.batch_size=8", "train.log_every=1", "eval.every=0", "model.input_size=32",
        "data.synthetic.identities=8", "data.synthetic.images_per_identity=2", "data.synthetic.val_identities=6",
        "data.synthetic.val_images_per_identity=3", "data.synthetic.val_pairs=20", "schedule.warmup_steps=0"]


def train(tmp_path, name: str) -> int:
    return cli.main(["train", "--out", str(tmp_path / name), "--threads", "1", "--set", *TINY])


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_start_up_says_what_it_does_before_the_first_step(tmp_path, capsys, monkeypatch):
    """On a terminal: a line per start-up phase, then the progress line (moved at every step)."""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert train(tmp_path, "run") == 0
    err = [line.split("\r")[-1].replace("\x1b[K", "") for line in term.getvalue().split("\n")]
    order = ["loading torch and the training code...",
             "building data: rendering 16 synthetic images of 8 identities at 32px...",
             "building validation sets: synthetic (20 pairs over 6 held-out identities)...",
             "building the model: mbf...", "starting the TensorBoard log..."]
    assert [line for line in err if line in order] == order
    assert err.index(order[-1]) < next(i for i, line in enumerate(err) if line.startswith("train: 2/2 steps"))
    assert sum(line.startswith("train: 2/2 steps") for line in err) == 1  # the bar's last state: one line


def test_off_a_terminal_a_bad_config_is_still_one_line(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--set", "optim.lrr=1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[0].startswith("error: ")
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--set", *TINY, "data.train=/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "/nonexistent" in err[0]


@pytest.fixture
def ctrl_c_in_final_evaluation(monkeypatch):
    """Ctrl-C (SIGINT to this process, through the trainer's own handler) ``count`` times while the
    final evaluation computes its metrics, after the last batch was embedded."""
    calls = {"count": 0}
    evaluate = Trainer.evaluate

    def interrupted_evaluate(self):
        results = evaluate(self)
        for _ in range(calls["count"]):
            signal.raise_signal(signal.SIGINT)
        return results

    monkeypatch.setattr(Trainer, "evaluate", interrupted_evaluate)
    return calls


def test_one_ctrl_c_during_the_final_evaluation_exits_130(tmp_path, capsys, ctrl_c_in_final_evaluation):
    ctrl_c_in_final_evaluation["count"] = 1
    assert train(tmp_path, "run") == 130
    err = capsys.readouterr().err
    assert "interrupted after the run finished (step 2)" in err
    assert str(tmp_path / "run" / "report.json") in err and "last.pt, best.pt" in err
    assert (tmp_path / "run" / "report.json").is_file() and (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the process's handler is back


def test_two_ctrl_cs_during_the_final_evaluation_exit_130_saying_what_was_saved(tmp_path, capsys,
                                                                                ctrl_c_in_final_evaluation):
    ctrl_c_in_final_evaluation["count"] = 2
    assert train(tmp_path, "run") == 130
    err = capsys.readouterr().err
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert f"interrupted: state saved in {last} (step 2); continue with marginface train" in err
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
