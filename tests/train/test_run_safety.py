"""Nothing a training run produced is lost: the run-directory policy, resume from what is there,
no non-finite checkpoint, checkpoints before evaluation, start-up checks, signals during evaluation,
and SIGKILLs at random moments (fault injection) resumed to an exact end."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from marginface import cli
from marginface.train.runconfig import load_config
from marginface.train.checkpoint import load_checkpoint
from marginface.train.trainer import Trainer, TrainingDiverged

# tiny and fast to start (no train.deterministic: it imports torch's compiler stack, 4 s a process)
TINY = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=64",
        "data.synthetic.identities=40", "data.synthetic.images_per_identity=8",
        "data.synthetic.val_identities=20", "data.synthetic.val_images_per_identity=4",
        "data.synthetic.val_pairs=100", "train.batch_size=32", "train.log_every=1", "train.amp=none"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(capsys, out: Path, *sets: str, flags=()) -> tuple:
    """``marginface train --out OUT [flags] --set TINY sets`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = cli.main(["train", "--out", str(out), *flags, "--set", *TINY, *sets])
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def log_steps(run: Path, kind: str = "train") -> list:
    return [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines() if json.loads(x)["kind"] == kind]


def finite_state(ckpt: dict) -> bool:
    tensors = [*ckpt["model"].values(), *ckpt["head"].values()]
    for st in ckpt["optimizer"]["state"].values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ---------------------------------------------------------------------------------- --resume and best.pt
@pytest.fixture
def evaluated_run(tmp_path, capsys):
    """A run of 4 steps evaluated at 2 and 4: checkpoints/last.pt and best.pt, log.jsonl."""
    run = tmp_path / "run"
    rc, err = train(capsys, run, "train.max_steps=4", "eval.every=2")
    assert rc == 0, err
    return run


def test_resume_without_last_pt_refuses_and_names_best(evaluated_run, capsys):
    run = evaluated_run
    (run / "checkpoints" / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    log_before = (run / "log.jsonl").read_text()
    rc, err = train(capsys, run, "train.max_steps=6", flags=["--resume"])
    assert rc == 2
    line = error_line(err)
    assert "last.pt is missing" in line and "best.pt (step" in line and "--resume-from" in line
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before  # nothing restarted
    assert (run / "log.jsonl").read_text() == log_before
    # the explicit way: continue from best.pt
    best_step = load_checkpoint(run / "checkpoints" / "best.pt")["step"]
    rc, err = train(capsys, run, "train.max_steps=6", flags=["--resume-from", str(run / "checkpoints" / "best.pt")])
    assert rc == 0, err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 6
    steps = log_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == 6 and best_step in steps


def test_corrupt_last_pt_points_at_the_intact_best(evaluated_run, capsys):
    run = evaluated_run
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 torn")
    rc, err = train(capsys, run, "train.max_steps=6", flags=["--resume"])
    assert rc == 2
    line = error_line(err)
    assert "last.pt: not a readable marginface checkpoint" in line
    assert f"--resume-from {run / 'checkpoints' / 'best.pt'}" in line


def test_best_pt_is_never_replaced_by_a_worse_one_after_a_restart(evaluated_run, capsys):
    """best.pt records a better value than the checkpoint the run resumes from (as when resuming an older
    checkpoint): the resumed run compares against best.pt, not only against its own record."""
    run = evaluated_run
    best, last = run / "checkpoints" / "best.pt", run / "checkpoints" / "last.pt"
    ckpt = torch.load(best, weights_only=True)
    ckpt["best"]["value"] = 1.01  # better than any accuracy
    torch.save(ckpt, best)
    ckpt = torch.load(last, weights_only=True)
    ckpt["best"]["value"] = 0.0  # the resumed state remembers a worse best
    torch.save(ckpt, last)
    rc, err = train(capsys, run, "train.max_steps=6", "eval.every=2", flags=["--resume"])
    assert rc == 0, err
    assert torch.load(best, weights_only=True)["best"]["value"] == 1.01
    report = json.loads((run / "report.json").read_text())
    assert report["best"]["value"] == 1.01


# ---------------------------------------------------------------------------------- config.yaml
def test_resume_with_an_empty_config_yaml_uses_the_checkpoints_config(tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = train(capsys, run, "train.max_steps=2", "data.val=[]", "model.embedding_size=48")
    assert rc == 0, err
    (run / "config.yaml").write_text("")  # what a kill during a plain write_text left
    capsys.readouterr()
    rc = cli.main(["train", "--out", str(run), "--resume", "--set", "train.max_steps=4"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "config.yaml is empty; resuming with the config saved in" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    assert load_config(str(run / "config.yaml")).model.embedding_size == 48  # rewritten, whole
    assert oct((run / "config.yaml").stat().st_mode & 0o044) == oct(0o044 & ~_umask())
    # a config the checkpoint does not fit: one line, not a size-mismatch traceback
    capsys.readouterr()
    rc = cli.main(["train", "--out", str(run), "--resume", "--set", "train.max_steps=6", "model.embedding_size=32"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "last.pt: does not fit this run's config" in line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_with_a_corrupt_config_yaml_and_no_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: [unclosed\n")
    (run / "log.jsonl").write_text("")
    rc, err = train(capsys, run, flags=["--resume"])
    assert rc == 2
    line = error_line(err)
    assert "config.yaml is unreadable" in line and "--config" in line


# ---------------------------------------------------------------------------------- --out of an existing run
def test_out_of_an_existing_run_is_refused_then_overwrite_starts_afresh(tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = train(capsys, run, "train.max_steps=2", "data.val=[]")
    assert rc == 0, err
    before = (run / "checkpoints" / "last.pt").read_bytes()
    rc, err = train(capsys, run, "train.max_steps=1", "data.val=[]")
    assert rc == 2
    line = error_line(err)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert log_steps(run) == [1, 2]
    rc, err = train(capsys, run, "train.max_steps=1", "data.val=[]", flags=["--overwrite"])
    assert rc == 0, err
    assert log_steps(run) == [1]  # the old log is gone, not appended to
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1
    rc, err = train(capsys, run, flags=["--overwrite", "--resume"])
    assert rc == 2 and "cannot be combined" in error_line(err)


# ---------------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("lr", ["1e6", "1e30"])
def test_divergence_never_saves_a_non_finite_state(tmp_path, lr):
    run = tmp_path / "run"
    cfg = load_config(None, TINY + ["train.max_steps=30", f"optim.lr={lr}", "optim.clip_grad_norm=0",
                                    "train.max_bad_steps=3", "train.checkpoint_every=1", "data.val=[]"])
    with pytest.raises(TrainingDiverged, match=r"at step \d+|last good state \(step \d+\)"):
        Trainer(cfg, run, console=False).fit()
    saved = sorted((run / "checkpoints").glob("*.pt"))
    for path in saved:
        assert finite_state(load_checkpoint(path)), path


def test_an_update_to_non_finite_weights_stops_at_once_naming_the_step(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, TINY + ["train.max_steps=8", "train.checkpoint_every=1", "data.val=[]"])
    trainer = Trainer(cfg, run, console=False)
    step = trainer.optimizer.step

    def poisoned_step(*a, **k):  # the 3rd update overshoots to inf (as lr=inf or an overflow would)
        out = step(*a, **k)
        if trainer.step == 2:
            with torch.no_grad():
                next(trainer.backbone.parameters()).fill_(float("inf"))
        return out

    trainer.optimizer.step = poisoned_step
    with pytest.raises(TrainingDiverged, match=r"at step 3: the update made weights non-finite.*keeps step 2"):
        trainer.fit()
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and finite_state(ckpt)


# ---------------------------------------------------------------------------------- start-up checks
def test_a_checkpoint_is_written_before_each_evaluation(tmp_path, monkeypatch):
    cfg = load_config(None, TINY + ["train.max_steps=6", "eval.every=3", "train.checkpoint_every=100"])
    trainer = Trainer(cfg, tmp_path / "run", console=False)

    def failing_eval():
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(trainer, "evaluate", failing_eval)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("override, expect", [
    ("eval.best_metric=lfw/accuracy", "config key 'eval.best_metric' names set 'lfw', which is not among"),
    ("eval.best_metric=synthetic/acc", "config key 'eval.best_metric': 'acc' is not a metric"),
    ("data.val=[/nonexistent/lfw.bin]", "/nonexistent/lfw.bin: pair set not found"),
    ("train.batch_size=400", "config key 'train.batch_size' = 400 is larger than the training data (320 images"),
    ("train.log_every=0", "config key 'train.log_every' must be >= 1, got 0"),
    ("train.checkpoint_every=0", "config key 'train.checkpoint_every' must be >= 1, got 0"),
])
def test_bad_run_settings_fail_at_start_up_in_one_line(override, expect, dry_run, tmp_path, capsys):
    flags = ["--dry-run"] if dry_run else []
    rc, err = train(capsys, tmp_path / "run", "train.max_steps=2", override, flags=flags)
    assert rc == 2
    assert expect in error_line(err)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


# ---------------------------------------------------------------------------------- signals
SLOW_STEP = """
import sys, time
from marginface.train.runconfig import load_config
from marginface.train.trainer import Trainer
trainer = Trainer(load_config(None, sys.argv[2:]), sys.argv[1], console=False)
step = trainer._train_step
def slow_step(micro):  # the 3rd step takes 60 s (a huge model, a stuck data read)
    out = step(micro)
    if trainer.step == 2:
        print("slow step", flush=True)
        time.sleep(60)
    return out
trainer._train_step = slow_step
try:
    trainer.fit()
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_second_ctrl_c_exits_at_once_keeping_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEP, str(run), *TINY, "data.val=[]", "train.max_steps=5",
                             "train.checkpoint_every=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV, text=True)
    try:
        assert proc.stdout.readline().strip() == "slow step", proc.stderr.read()
        proc.send_signal(signal.SIGINT)  # the first asks for a stop after this step...
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)  # ...the second leaves now
        proc.wait(timeout=10)
        waited = time.time() - t0
    finally:
        proc.kill()
        err = proc.communicate()[1]
    assert proc.returncode == 130, err
    assert waited < 3, f"took {waited:.1f} s after the second Ctrl-C"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2


def start(out: Path, *sets: str, resume: bool = False, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    args = [sys.executable, "-m", "marginface", "train", "--out", str(out), *(["--resume"] if resume else []),
            "--set", *TINY, *sets]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=ENV, text=True)


def test_sigterm_during_a_long_evaluation_stops_within_seconds(tmp_path):
    """Evaluation of 2 x 1200 images one by one takes far longer than the 5 s allowed here; the stop flag is
    checked between its batches. last.pt (written before the evaluation) loads; the resumed run evaluates."""
    run = tmp_path / "run"
    long_eval = ["data.synthetic.val_identities=300", "data.synthetic.val_images_per_identity=4",
                 "data.synthetic.val_pairs=600", "eval.batch_size=1", "eval.every=2", "train.max_steps=4",
                 "train.checkpoint_every=100"]
    proc = start(run, *long_eval, stderr=subprocess.PIPE)
    last = run / "checkpoints" / "last.pt"
    try:
        deadline = time.time() + 120
        while not last.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert last.is_file(), "no checkpoint before the evaluation"
        time.sleep(1.0)  # well inside the evaluation
        assert proc.poll() is None, "the evaluation ended too soon to test"
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        waited = time.time() - t0
    finally:
        proc.kill()
        err = proc.communicate()[1]
    assert proc.returncode == 130, err
    assert waited < 5, f"took {waited:.1f} s to stop"
    assert "during the evaluation at step 2" in err
    assert load_checkpoint(last)["step"] == 2
    assert not log_steps(run, "eval")
    # resumed (with a quicker evaluation): the interrupted evaluation comes first, then training goes on
    proc = start(run, *long_eval, "eval.batch_size=256", resume=True, stderr=subprocess.PIPE)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err
    assert log_steps(run, "eval") == [2, 4] and log_steps(run) == [1, 2, 3, 4]


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    from marginface.train.rundir import truncate_log

    log = tmp_path / "log.jsonl"
    lines = [{"kind": "train", "step": 1}, {"kind": "train", "step": 2}, {"kind": "eval", "step": 2},
             {"kind": "train", "step": 3}]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st')  # torn by a kill
    assert truncate_log(log, 2) == 2
    assert [json.loads(x) for x in log.read_text().splitlines()] == lines[:3]
    assert truncate_log(log, 2, evaluated=False) == 1  # the checkpoint predates the evaluation at step 2
    assert [json.loads(x) for x in log.read_text().splitlines()] == lines[:2]


# ---------------------------------------------------------------------------------- fault injection
def _fault_injection(run: Path, kills: int, seed: int) -> dict:
    """``kills`` SIGKILLs at random moments (start-up, steps, checkpoint writes, evaluations), each run
    resumed with --resume; then one resumed run to a few steps past the last checkpoint. The kills are
    placed by steps (not seconds) so a faster machine makes the same test. Returns the final step count
    and timings."""
    rng = random.Random(seed)
    sets = ["train.checkpoint_every=1", "eval.every=5"]
    t_start, progress = time.time(), []
    last = run / "checkpoints" / "last.pt"
    for k in range(kills):
        proc = start(run, *sets, "train.max_steps=10000", resume=k > 0)
        try:
            if k % 4 == 3:  # somewhere in start-up: imports, data, config.yaml, log truncation, first steps
                time.sleep(rng.uniform(0.3, 5.0))
            else:  # somewhere in training: 1 to 4 logged lines after this session's start, then a bit
                before = len(_lines(run)) if (run / "log.jsonl").is_file() else 0
                want = before + rng.randint(1, 4)
                deadline = time.time() + 60
                while time.time() < deadline and proc.poll() is None:
                    if (run / "log.jsonl").is_file() and len(_lines(run)) >= want:
                        break
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.4))
            assert proc.poll() is None, "the run ended before its kill"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        for path in sorted((run / "checkpoints").glob("*.pt")) if (run / "checkpoints").is_dir() else []:
            load_checkpoint(path)  # every checkpoint loads after every kill
        progress.append(load_checkpoint(last)["step"] if last.is_file() else 0)
    final = progress[-1] + 6
    proc = start(run, *sets, f"train.max_steps={final}", resume=True, stderr=subprocess.PIPE)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err
    return {"final": final, "seconds": round(time.time() - t_start, 1), "progress": progress}


def _lines(run: Path) -> list:
    return (run / "log.jsonl").read_text().splitlines()


def _check_exact_end(run: Path, max_steps: int) -> None:
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == max_steps
    load_checkpoint(run / "checkpoints" / "best.pt")
    assert log_steps(run) == list(range(1, max_steps + 1))  # each step once: none lost, none twice
    evals = [*range(5, max_steps, 5), max_steps]
    assert log_steps(run, "eval") == evals  # each evaluation once, a killed one done again
    assert json.loads((run / "report.json").read_text())["train"]["steps"] == max_steps
    assert not list((run / "checkpoints").glob("*.tmp*"))  # what killed writes left was cleared on resume


def test_fault_injection_20_kills(tmp_path):
    """The issue's acceptance test: 20 random SIGKILLs, each followed by --resume (about 95 s on 2 busy
    CPU cores; it runs in CI, in one xdist worker while the other runs the rest)."""
    timing = _fault_injection(tmp_path / "run", kills=20, seed=20)
    print(f"20 kills: {timing}")
    _check_exact_end(tmp_path / "run", timing["final"])
