"""The trainer end to end on tiny synthetic runs: run directory, exact resume, SIGKILL, bad steps, CLI errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from marginface.train.runconfig import load_config
from marginface.errors import UserError
from shared_data import need  # tests/shared_data.py
from marginface.train.checkpoint import load_backbone, load_checkpoint
from marginface.train.trainer import Trainer, TrainingDiverged

# A run small enough for a test: 40 identities x 8 images at 32 px, a quarter-width mbf.
TINY = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=64",
        "data.synthetic.identities=40", "data.synthetic.images_per_identity=8",
        "data.synthetic.val_identities=20", "data.synthetic.val_images_per_identity=4",
        "data.synthetic.val_pairs=100", "train.batch_size=32", "train.log_every=2", "train.amp=none",
        "train.deterministic=true"]


def tiny(*extra):
    return load_config(None, TINY + list(extra))


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "marginface", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_run_directory_holds_everything(tmp_path):
    torch.set_num_threads(1)
    report = Trainer(tiny("train.max_steps=6", "eval.every=3"), tmp_path, console=False).fit()
    for name in ("config.yaml", "checkpoints/last.pt", "checkpoints/best.pt", "log.jsonl", "report.json"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["train"]["steps"] == 6 == report["train"]["steps"]
    m = on_disk["eval"]["synthetic"]
    for key in ("accuracy", "accuracy_std", "threshold", "auc", "eer", "tar_at_far", "pos_mean", "neg_mean",
                "xnorm", "pairs"):
        assert key in m, key
    assert on_disk["model"]["backbone"] == "mbf" and on_disk["model"]["embedding_size"] == 64
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [2, 4, 6]
    assert {"loss", "lr", "images_per_second", "mean_target_cosine"} <= set(records[0])
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    # the resolved config round-trips and the checkpoint rebuilds the model
    assert load_config(str(tmp_path / "config.yaml")).model.width_mult == 0.25
    model = load_backbone(str(tmp_path))
    assert model.input_size == 32 and model(torch.zeros(2, 3, 32, 32)).shape == (2, 64)


def test_resume_continues_exactly(tmp_path):
    torch.set_num_threads(1)
    # a constant schedule, so stopping at step 3 (instead of being killed there) changes no learning rate
    common = ("data.val=[]", "schedule.name=constant", "schedule.warmup_steps=0")
    straight = Trainer(tiny("train.max_steps=6", *common), tmp_path / "a", console=False)
    straight.fit()
    Trainer(tiny("train.max_steps=3", *common), tmp_path / "b", console=False).fit()
    resumed = Trainer(tiny("train.max_steps=6", *common), tmp_path / "b", resume=True, console=False)
    resumed.fit()
    assert resumed.step == 6
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(a["head"]["weight"], b["head"]["weight"], rtol=0, atol=1e-6)


def test_sigkill_then_resume(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--set", *TINY, "train.max_steps=400", "train.checkpoint_every=2",
            "data.val=[]"]
    proc = subprocess.Popen([sys.executable, "-m", "marginface", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    killed_after = None
    try:
        while time.time() < deadline:
            if last.is_file():
                step = load_checkpoint(last)["step"]
                if step >= 6:
                    proc.send_signal(signal.SIGKILL)
                    killed_after = step
                    break
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert killed_after is not None, "training never wrote a checkpoint"
    saved = load_checkpoint(last)["step"]  # no corrupt file after SIGKILL
    assert saved >= killed_after
    res = run_cli("train", "--out", str(out), "--resume", "--set", "train.max_steps=" + str(saved + 4))
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(last)["step"] == saved + 4
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps[-1] == saved + 4 and max(steps) == saved + 4


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny("train.max_steps=20", "optim.lr=1e30", "optim.clip_grad_norm=0", "train.max_bad_steps=3",
               "data.val=[]")
    trainer = Trainer(cfg, tmp_path, console=False)
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row") as info:
        trainer.fit()
    assert isinstance(info.value, UserError)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    bad = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"bad_step"' in x]
    assert [b["in_a_row"] for b in bad][-3:] == [1, 2, 3]
    assert ckpt["step"] == bad[-1]["step"] - 3  # the saved state is the last good step


@pytest.mark.parametrize("override, expect", [
    ("optim.lr=abc", "error: config key 'optim.lr' expects float, got 'abc'"),
    ("optim.lrr=0.1", "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
])
def test_cli_rejects_bad_config_with_one_line(override, expect, tmp_path):
    res = run_cli("train", "--out", str(tmp_path / "x"), "--set", override)
    assert res.returncode == 2
    assert res.stderr.strip() == expect
    assert res.stdout == ""
    assert not (tmp_path / "x").exists()


def test_cli_train_json_and_dry_run(tmp_path):
    res = run_cli("train", "--dry-run", "--json", "--set", *TINY)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["identities"] == 40 and info["first_batch"]["images"] == [32, 3, 32, 32]
    res = run_cli("train", "--json", "--out", str(tmp_path / "r"), "--set", *TINY, "train.max_steps=2")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)  # --json: exactly one JSON object on stdout
    assert report["train"]["steps"] == 2 and "synthetic" in report["eval"]


def test_eval_cli_on_a_run(tmp_path):
    Trainer(tiny("train.max_steps=2", "data.val=[]"), tmp_path / "r", console=False).fit()
    shared = need("verification/lfw_head20.bin")
    res = run_cli("eval", "--model", str(tmp_path / "r"), "--sets", str(shared), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["lfw_head20"]["pairs"] == 10


def test_a_corrupt_image_is_skipped_counted_and_reported(tmp_path):
    from marginface.data.synthetic import write_synthetic

    torch.set_num_threads(1)
    write_synthetic(str(tmp_path / "faces"), identities=8, images_per_identity=4, image_size=32)
    bad = sorted((tmp_path / "faces").rglob("*.jpg"))[5]
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = tiny(f"data.train={tmp_path / 'faces'}", "data.val=[]", "data.num_workers=0", "train.batch_size=8",
               "train.max_steps=8")  # 32 images / 8 = 4 steps per epoch: two epochs
    report = Trainer(cfg, tmp_path / "run", console=False).fit()
    assert report["train"]["steps"] == 8
    assert report["train"]["bad_images"] >= 1
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "bad_images"][:1] == [1]


def test_resume_removes_temp_files_of_a_killed_save_and_nothing_else(tmp_path):
    """A save killed mid-write leaves its temp file; the next run in that directory removes it (only
    names our saves use), and report.json / config.yaml are written without temp files."""
    torch.set_num_threads(1)
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    ours = [".last.pt.abcd1234.tmp", "last.pt.k2j4h5g6.tmp", ".best.pt.zz_99xy0.tmp"]
    others = ["notes.tmp", "last.pt.bak", ".last.pt.tmp"]
    for name in ours + others:
        (ckpt_dir / name).write_bytes(b"partial")
    Trainer(tiny("train.max_steps=2", "data.val=[]"), tmp_path, resume=True, console=False).fit()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(others + ["last.pt"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((tmp_path / "report.json").read_text())["train"]["steps"] == 2


def test_console_warns_when_the_run_ends_inside_the_warmup_and_says_where_it_resumes(tmp_path, capsys):
    Trainer(tiny("train.max_steps=3", "data.val=[]", "schedule.warmup_steps=10"), tmp_path / "a").fit()
    err = capsys.readouterr().err
    assert "not longer than the learning-rate warmup (10 steps)" in err and "resuming" not in err
    Trainer(tiny("train.max_steps=3", "data.val=[]", "schedule.warmup_steps=2"), tmp_path / "b").fit()
    assert "warmup" not in capsys.readouterr().err
    Trainer(tiny("train.max_steps=5", "data.val=[]", "schedule.warmup_steps=2"), tmp_path / "b", resume=True).fit()
    err = capsys.readouterr().err
    assert "resuming at step 3 of 5" in err and "holds no checkpoint" not in err
    # --resume on a directory with no run (a mistyped --out): it starts, and says so
    Trainer(tiny("train.max_steps=1", "data.val=[]"), tmp_path / "typo", resume=True).fit()
    assert "--resume: " + str(tmp_path / "typo") + " holds no checkpoint yet; starting a new run" in capsys.readouterr().err


def test_resume_of_a_finished_run_leaves_its_reports_alone(tmp_path, capsys):
    cfg = ("train.max_steps=2", "data.synthetic.val_pairs=40")
    Trainer(tiny(*cfg), tmp_path, console=False).fit()
    report = json.loads((tmp_path / "report.json").read_text())
    report["eval"]["added_later"] = dict(report["eval"]["synthetic"])  # as `marginface eval --model RUN` adds sets
    (tmp_path / "report.json").write_text(json.dumps(report))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "report.json", tmp_path / "report.md",
                                                 tmp_path / "checkpoints" / "last.pt")}
    again = Trainer(tiny(*cfg), tmp_path, resume=True).fit()
    assert "added_later" in again["eval"]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert "had already finished at step 2" in capsys.readouterr().err


def test_final_table_says_which_checkpoint_it_shows_and_where_the_report_is(tmp_path, capsys):
    Trainer(tiny("train.max_steps=4", "eval.every=2", "data.synthetic.val_pairs=40"), tmp_path).fit()
    out = capsys.readouterr().out
    assert "evaluation of the last step (4, checkpoints/last.pt) on synthetic" in out
    assert "best.pt (used by eval/export/verify) is step " in out and "synthetic/accuracy = " in out
    assert f"report: {tmp_path / 'report.json'}" in out
