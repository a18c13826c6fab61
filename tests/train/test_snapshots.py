"""Step-numbered snapshots (train.snapshot_every / train.keep_snapshots): RUN/snapshots/step_NNNNNN.pt,
written atomically, evaluable and resumable by path, the newest N kept, nothing else ever removed."""
import json
import os
import subprocess
import sys

import torch

from marginface.errors import UserError
from marginface.train import rundir
from marginface.train.checkpoint import list_snapshots, load_checkpoint, prune_snapshots
from marginface.train.runconfig import load_config
from marginface.train.trainer import Trainer
from shared_data import need  # tests/shared_data.py

TINY = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=64",
        "data.synthetic.identities=40", "data.synthetic.images_per_identity=8", "data.val=[]",
        "train.batch_size=32", "train.log_every=2", "train.amp=none", "train.deterministic=true"]


def tiny(*extra):
    return load_config(None, TINY + list(extra))


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_snapshots_every_n_steps_keep_the_newest_and_nothing_else_is_removed(tmp_path):
    torch.set_num_threads(1)
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    # not ours (other names): kept. A temp file of a killed snapshot save: removed at start
    others = ["notes.txt", "step_5.pt", "step_000001.pt.bak", "mine.pt"]
    for name in others + [".step_000002.pt.abcd1234.tmp"]:
        (snaps / name).write_bytes(b"x")
    Trainer(tiny("train.max_steps=7", "train.snapshot_every=2", "train.keep_snapshots=2"), tmp_path,
            console=False).fit()
    assert names(snaps) == sorted(others + ["step_000004.pt", "step_000006.pt"])
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for step in (4, 6):
        ckpt = load_checkpoint(snaps / f"step_{step:06d}.pt")
        assert ckpt["step"] == step and ckpt["config"] == last["config"]
    w6 = load_checkpoint(snaps / "step_000006.pt")["model"]
    assert any(not torch.equal(w6[k], v) for k, v in last["model"].items() if v.is_floating_point())
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "snapshot"] == [2, 4, 6]
    assert [r["removed"] for r in records if r["kind"] == "snapshot"] == [[], [], ["step_000002.pt"]]


def test_keep_snapshots_alone_snapshots_every_checkpoint_and_keeps_all_by_default(tmp_path):
    torch.set_num_threads(1)
    Trainer(tiny("train.max_steps=6", "train.checkpoint_every=3", "train.keep_snapshots=1"), tmp_path / "a",
            console=False).fit()
    assert names(tmp_path / "a" / "snapshots") == ["step_000006.pt"]  # the last step, after its save
    Trainer(tiny("train.max_steps=4", "train.snapshot_every=2"), tmp_path / "b", console=False).fit()
    assert names(tmp_path / "b" / "snapshots") == ["step_000002.pt", "step_000004.pt"]
    Trainer(tiny("train.max_steps=2"), tmp_path / "c", console=False).fit()
    assert not (tmp_path / "c" / "snapshots").exists()  # off by default


def test_a_snapshot_is_evaluable_and_resumable_by_path(tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    Trainer(tiny("train.max_steps=6", "train.snapshot_every=2", "train.keep_snapshots=2", "schedule.name=constant",
                 "schedule.warmup_steps=0"), run, console=False).fit()
    snap = run / "snapshots" / "step_000004.pt"
    bin_set = need("verification/lfw_head20.bin")
    res = subprocess.run([sys.executable, "-m", "marginface", "eval", "--model", str(snap), "--sets", str(bin_set),
                          "--json"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["lfw_head20"]["pairs"] == 10
    # --resume-from a snapshot continues that run (its directory is the snapshot's run)
    plan = rundir.resolve_run(None, ["train.max_steps=6"], None, resume_from=str(snap))
    assert plan.run_dir == run and plan.resume_from == snap
    resumed = Trainer(plan.cfg, plan.run_dir, resume_from=plan.resume_from, console=False)
    resumed.fit()
    assert resumed.step == 6 and names(run / "snapshots") == ["step_000004.pt", "step_000006.pt"]
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "snapshot"] == [2, 4, 6]  # 6 again, once


def test_snapshots_count_as_a_run_and_overwrite_clears_them(tmp_path):
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    torch.save({"model": {}, "step": 3}, snaps / "step_000003.pt")
    assert rundir.holds_run(tmp_path)
    assert "1 snapshot(s) up to snapshots/step_000003.pt" in rundir.describe(tmp_path)
    try:
        rundir.resume_checkpoint(tmp_path)
        raise AssertionError("--resume without last.pt must refuse")
    except UserError as exc:
        assert "--resume-from " + str(snaps / "step_000003.pt") in str(exc)
    rundir.require_fresh(tmp_path, overwrite=True)
    assert not snaps.exists()


def test_prune_keeps_snapshots_past_the_step_and_takes_shard_files_along(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"step_{step:06d}.pt").write_bytes(b"x")
        (tmp_path / f"step_{step:06d}-head-s{step}.rank0-of2.pt").write_bytes(b"x")
    (tmp_path / "step_000002-notes.pt").write_bytes(b"x")  # not a shard name
    removed = prune_snapshots(tmp_path, keep=1, upto_step=4)  # resumed at step 4: 6 and 8 are not counted
    assert sorted(p.name for p in removed) == ["step_000002-head-s2.rank0-of2.pt", "step_000002.pt"]
    assert [s for s, _ in list_snapshots(tmp_path)] == [4, 6, 8]
    assert (tmp_path / "step_000002-notes.pt").exists()
    assert prune_snapshots(tmp_path, keep=0) == []  # 0 = keep all


def test_partial_fc_snapshots_hold_their_classifier_shards(tmp_path):
    torch.set_num_threads(1)
    Trainer(tiny("train.max_steps=4", "head.sample_rate=0.5", "train.snapshot_every=2", "train.keep_snapshots=1"),
            tmp_path, console=False).fit()
    assert names(tmp_path / "snapshots") == ["step_000004-head-s4.rank0-of1.pt", "step_000004.pt"]
    ckpt = load_checkpoint(tmp_path / "snapshots" / "step_000004.pt")
    assert ckpt["head_shards"]["files"] == ["step_000004-head-s4.rank0-of1.pt"]
    resumed = Trainer(tiny("train.max_steps=5", "head.sample_rate=0.5"), tmp_path,
                      resume_from=tmp_path / "snapshots" / "step_000004.pt", console=False)
    resumed.fit()
    assert resumed.step == 5
