"""Distributed training end to end with torchrun on 2 gloo ranks (CPU): DDP + Partial FC equal a
single-process full-FC run, SIGTERM on one rank stops both and the run resumes exactly, a 2-rank
checkpoint resumes on 1 process (re-shard), and the sharded checkpoint layout."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from marginface.train.runconfig import load_config
from marginface.train import distributed as D
from marginface.train.checkpoint import load_backbone, load_checkpoint
from marginface.train.trainer import Trainer

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
CLASSES = 40
STEPS = 8
# The tiny synthetic run of tests/train/test_train.py, without flips (their draw depends on the global batch
# layout), in fp32 (no autocast), for few steps. Global batch 32 per step:
#   2 ranks x batch 8 x grad_accum 2   ==   1 process x batch 8 x grad_accum 4
# (same images in the same order, and BatchNorm sees the same 8 images in every forward).
# The two runs sum the same gradients in another order, so they agree to float rounding, and the
# comparison is only as strict as the training dynamics let rounding stay small. At ArcFace's s=64
# and lr 0.01 this 0.1M-parameter net with BatchNorm over 8 images is chaotic: the same single-process
# run under oneDNN's AVX2 and SSE4.1 kernels (ONEDNN_MAX_CPU_ISA) drifted by 1.2e-4 in the weights
# and 0.017 in the loss within 8 steps (1% of the update), and an AMX Xeon's kernels failed the old
# 2e-4 bound. At s=16 and lr 0.001 the same AVX2-vs-SSE4.1 pair stays within 1.2e-7 (weights) and
# 2.4e-6 (loss), 5e-5 of the update: the bounds below leave ~100x for other CPUs' kernels, while a
# wrong gradient scale or a lost shard moves the weights by a sizeable fraction of the update.
BASE = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=64",
        f"data.synthetic.identities={CLASSES}", "data.synthetic.images_per_identity=8", "data.val=[]",
        "data.flip=false", "train.batch_size=8", "train.amp=none", "train.deterministic=true",
        "train.log_every=1", "train.checkpoint_every=1000", f"train.max_steps={STEPS}", "optim.lr=0.001",
        "head.params={s: 16, m: 0.3}", "schedule.warmup_steps=2"]
ATOL, LOSS_ATOL, REL_L2 = 1e-5, 1e-4, 1e-3  # rounding-level agreement of two fp32 runs (see above)
DIST = BASE + ["train.grad_accum=2"]
SINGLE = BASE + ["train.grad_accum=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(out: Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    args = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "marginface", "train", "--out", str(out)]
    if resume:
        args.append("--resume")
    else:
        args += ["--set", *DIST, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def train_losses(run: Path) -> list:
    return [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines() if '"kind": "train"' in x]


def params_of(ckpt: dict) -> dict:
    """Backbone parameters (BatchNorm running statistics excluded: under DDP they are rank 0's)."""
    return {k: v for k, v in ckpt["model"].items() if "running_" not in k and "num_batches" not in k}


def head_weight(run: Path) -> tuple:
    """The full classifier (and its momentum) of a run's last checkpoint, sharded or not."""
    path = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path)
    pid = next(g for g in ckpt["optimizer"]["param_groups"] if g["name"] == "head")["params"][0]
    weight, state = D.read_head_rows(ckpt, path, 0, CLASSES, pid)
    return weight, state["momentum_buffer"]


def worker_pids(proc: subprocess.Popen) -> dict:
    """{rank: pid} of torchrun's worker processes (children of the agent)."""
    found = {}
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0])] = int(child)
    return found


def assert_same_run(a: Path, b: Path, atol: float, loss_atol: float, init: dict | None = None) -> None:
    """Two runs' last checkpoints and losses agree: every weight within ``atol``, and (given the
    ``init``ial weights) the L2 distance of all weights below REL_L2 of how far training moved them."""
    ca, cb = load_checkpoint(a / "checkpoints" / "last.pt"), load_checkpoint(b / "checkpoints" / "last.pt")
    assert ca["step"] == cb["step"] == STEPS
    pa, pb = params_of(ca), params_of(cb)
    assert pa.keys() == pb.keys()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=0, atol=atol, msg=key)
    wa, ma = head_weight(a)
    wb, mb = head_weight(b)
    torch.testing.assert_close(wa, wb, rtol=0, atol=atol)
    torch.testing.assert_close(ma, mb, rtol=0, atol=atol * 10)
    if init is not None:
        init = params_of({"model": init})
        apart = sum(((pa[k] - pb[k]).double() ** 2).sum() for k in pa) ** 0.5
        moved = sum(((pa[k] - init[k]).double() ** 2).sum() for k in pa) ** 0.5
        assert moved > 1e-3 and apart / moved < REL_L2, (apart.item(), moved.item())
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == len(lb) == STEPS
    for step, (x, y) in enumerate(zip(la, lb), 1):
        assert abs(x - y) <= loss_atol, (step, x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs the tests compare, each made once: an uninterrupted 2-rank run, a 1-process full-FC
    run of the same global batches, and a 2-rank run stopped by SIGTERM on rank 1 (kept as is
    and resumed twice: on 2 ranks and on 1 process)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dist")
    straight = torchrun(root / "dist")
    code, out = finish(straight)
    assert code == 0, out[-3000:]

    stopped = torchrun(root / "stopped")
    log = root / "stopped" / "log.jsonl"
    deadline, sent = time.time() + 180, False
    while time.time() < deadline and stopped.poll() is None:
        if log.is_file() and len(train_losses(root / "stopped")) >= 2:
            os.kill(worker_pids(stopped)[1], signal.SIGTERM)  # one rank only: a preempted node
            sent = True
            break
        time.sleep(0.02)
    code, stop_out = finish(stopped)
    assert sent, "the run ended before it could be signalled:\n" + stop_out[-3000:]
    shutil.copytree(root / "stopped", root / "stopped_copy")

    single = Trainer(load_config(None, SINGLE), root / "single", console=False)
    init = {k: v.detach().clone() for k, v in single.backbone.state_dict().items()}
    single.fit()
    return {"root": root, "stop_code": code, "stop_out": stop_out, "init": init}


def test_two_ranks_equal_one_process_full_fc(runs):
    """DDP + Partial FC (sample_rate 1.0, grad_accum 2 with no_sync) on 2 ranks == full FC in one process."""
    root = runs["root"]
    assert_same_run(root / "dist", root / "single", atol=ATOL, loss_atol=LOSS_ATOL, init=runs["init"])


def test_sigterm_on_one_rank_stops_both_and_resumes_exactly(runs):
    root = runs["root"]
    ckpt_dir = root / "stopped_copy" / "checkpoints"
    ckpt = load_checkpoint(ckpt_dir / "last.pt")
    stopped_at = ckpt["step"]
    assert 2 <= stopped_at < STEPS, stopped_at
    assert runs["stop_code"] != 0 and "received signal" in runs["stop_out"]
    # layout: rank 0's last.pt (no classifier weight) + one shard file per rank, named in its manifest
    manifest = ckpt["head_shards"]
    assert manifest["world_size"] == 2 and manifest["class_ranges"] == [[0, 20], [20, 40]]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(["last.pt", *manifest["files"]])
    assert "weight" not in ckpt["head"]
    assert load_backbone(str(root / "stopped_copy")).input_size == 32  # evaluation needs only last.pt
    # resume on 2 ranks (the run's own config): the same weights as the uninterrupted run
    code, out = finish(torchrun(root / "stopped", resume=True))
    assert code == 0, out[-3000:]
    assert_same_run(root / "stopped", root / "dist", atol=1e-6, loss_atol=1e-6)
    steps = [json.loads(x)["step"] for x in (root / "stopped" / "log.jsonl").read_text().splitlines()
             if '"kind": "train"' in x]
    assert steps == list(range(1, STEPS + 1))  # at most the current step is lost: none here


def test_two_rank_checkpoint_resumes_on_one_process(runs):
    """World size 2 -> 1: the shards (and their momentum) are merged into the full classifier."""
    root = runs["root"]
    run = root / "stopped_copy"
    cfg = load_config(str(run / "config.yaml"), ["train.grad_accum=4"])  # same global batch on one process
    trainer = Trainer(cfg, run, resume=True, console=False)
    trainer.fit()
    assert trainer.step == STEPS and not trainer.sharded_head
    assert_same_run(run, root / "single", atol=ATOL, loss_atol=LOSS_ATOL, init=runs["init"])


def test_one_process_partial_fc_resumes_exactly(tmp_path):
    """Single-process Partial FC (sample_rate 0.5, bf16 shard): the sampled classes, the sampled-row
    update and the shard checkpoint survive a stop and resume bit for bit."""
    torch.set_num_threads(1)
    common = BASE + ["train.grad_accum=1", "head.sample_rate=0.5", "head.shard_dtype=bf16",
                     "schedule.name=constant", "schedule.warmup_steps=0"]
    straight = Trainer(load_config(None, common + ["train.max_steps=6"]), tmp_path / "a", console=False)
    assert straight.sharded_head and not straight.dist.enabled
    straight.fit()
    Trainer(load_config(None, common + ["train.max_steps=3"]), tmp_path / "b", console=False).fit()
    resumed = Trainer(load_config(None, common + ["train.max_steps=6"]), tmp_path / "b", resume=True, console=False)
    resumed.fit()
    a, b = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt"), load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6 and D.is_sharded(b)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    assert torch.equal(resumed.head.weight, straight.head.weight) and resumed.head.weight.dtype == torch.bfloat16
    ma = straight.optimizer.state[straight.head.weight]["momentum_buffer"]
    mb = resumed.optimizer.state[resumed.head.weight]["momentum_buffer"]
    assert torch.equal(ma, mb)
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert names == ["last-head-s6.rank0-of1.pt", "last.pt"]  # older shard files are cleaned up


def test_shards_of_any_world_size_read_back(tmp_path):
    """read_head_rows re-shards: 3 shard files (uneven ranges) read back as any class range."""
    c, k, d = 10, 2, 4
    full = torch.randn(c * k, d)
    mom = torch.randn(c * k, d)
    ranges = [(0, 4), (4, 7), (7, 10)]
    files = []
    for r, (s, e) in enumerate(ranges):
        name = f"last-head-s5.rank{r}-of3.pt"
        torch.save({"format": D.SHARD_FORMAT, "weight": full[s * k:e * k], "class_range": [s, e],
                    "optim": {"momentum_buffer": mom[s * k:e * k]}}, tmp_path / name)
        files.append(name)
    ckpt = {"head_shards": {"files": files, "class_ranges": [list(x) for x in ranges], "num_subcenters": k}}
    for s, e in [(0, 10), (0, 5), (5, 10), (3, 8)]:
        w, st = D.read_head_rows(ckpt, tmp_path / "last.pt", s, e)
        assert torch.equal(w, full[s * k:e * k]) and torch.equal(st["momentum_buffer"], mom[s * k:e * k])
    (tmp_path / files[1]).unlink()
    with pytest.raises(Exception, match="missing"):
        D.read_head_rows(ckpt, tmp_path / "last.pt", 0, 10)
