"""The CUDA paths of training: fp16 autocast with a GradScaler, TF32, cuDNN benchmark and NCCL. They run
where a GPU is (reported as skipped, with the reason, where none is); the CPU checks always run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marginface.errors import UserError
from marginface.train.runconfig import load_config
from marginface.train.setup import resolve_amp
from marginface.train.trainer import Trainer

TINY = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=64",
        "data.synthetic.identities=40", "data.synthetic.images_per_identity=8",
        "data.synthetic.val_identities=20", "data.synthetic.val_images_per_identity=4",
        "data.synthetic.val_pairs=60", "train.batch_size=32", "train.log_every=1"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_flags():
    """Leave the process's global cuDNN / TF32 switches as they were."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_on_the_cpu_fp16_is_refused_and_cuda_switches_are_left_alone(tmp_path, cuda_flags):
    with pytest.raises(UserError, match="'train.amp' = fp16 needs CUDA"):
        resolve_amp("fp16", torch.device("cpu"))
    torch.backends.cudnn.benchmark = False
    trainer = Trainer(load_config(None, TINY + ["train.device=cpu", "train.amp=none", "train.max_steps=1",
                                               "data.val=[]", "train.cudnn_benchmark=true"]), tmp_path, console=False)
    assert torch.backends.cudnn.benchmark is False and not trainer.scaler.is_enabled()


@needs_cuda
def test_fp16_with_grad_scaler_trains_on_cuda(tmp_path, cuda_flags):
    cfg = load_config(None, TINY + ["train.device=cuda", "train.amp=fp16", "train.max_steps=6", "eval.every=0"])
    trainer = Trainer(cfg, tmp_path, console=False)
    assert trainer.amp_dtype == torch.float16 and trainer.scaler.is_enabled()
    assert torch.backends.cudnn.benchmark is True  # train.cudnn_benchmark defaults on: the input size is fixed
    report = trainer.fit()
    assert report["train"]["amp"] == "float16" and report["train"]["steps"] == 6
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0  # the scaler's state is checkpointed for resume
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert len(losses) == 6 and all(x == x for x in losses)
    assert report["eval"]["synthetic"]["accuracy"] > 0


@needs_cuda
@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_and_cudnn_benchmark_follow_the_config(tmp_path, cuda_flags, tf32):
    Trainer(load_config(None, TINY + ["train.device=cuda", f"train.tf32={tf32}", "train.cudnn_benchmark=false",
                                      "train.max_steps=1", "data.val=[]"]), tmp_path, console=False)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cudnn.benchmark is False


@needs_cuda
def test_deterministic_keeps_cudnn_benchmark_off(tmp_path, cuda_flags):
    Trainer(load_config(None, TINY + ["train.device=cuda", "train.deterministic=true", "train.max_steps=1",
                                      "data.val=[]"]), tmp_path, console=False)
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (one NCCL rank per GPU)")
def test_two_ranks_train_over_nccl(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "run"
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "marginface", "train", "--out",
                          str(out), "--set", *TINY, "train.device=cuda", "train.batch_size=16", "train.max_steps=4",
                          "data.val=[]", "head.sample_rate=0.5"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "distributed: 2 ranks (nccl)" in res.stdout + res.stderr
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["head_shards"]["world_size"] == 2
