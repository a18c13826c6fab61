"""Distributed training helpers: process group from torchrun's environment, DDP with summed
gradients, collective gradient clipping, and the sharded checkpoint of a Partial FC classifier.
The collectives that cost nothing in a single process and the autograd-aware all-gather live in
`marginface.parallel` (the Partial FC head uses them too) and are re-exported here.

Launch with torchrun (no launcher of our own)::

    torchrun --nproc_per_node 8 -m marginface train --config C.yaml

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
`init_from_env` reads them (backend NCCL on CUDA, gloo on the CPU). Without them (or with
``WORLD_SIZE=1``) training is one plain process and none of the functions here communicate.

Gradient convention (see docs/distributed.md): every rank back-propagates *its part* of the
global loss, such that the sum of the ranks' gradients is the gradient of the global loss. The
backbone's DDP therefore sums gradients (`sum_allreduce_hook`) instead of averaging them, and
parameters replicated outside DDP (centre-loss centres) are all-reduced with SUM.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from marginface.errors import UserError
# the cheap collectives live in marginface.parallel (heads.partial_fc uses them too); re-exported here
from marginface.parallel import (  # noqa: F401
    _AllGather, _comm_device, _on, all_gather_nograd, all_gather_with_grad, all_reduce_max_, all_reduce_sum_,
    any_rank, barrier, broadcast_object, grad_scaled, mean_over_ranks, rank, world_size,
)
from marginface.train.checkpoint import save_atomic

# Rank 0 may evaluate for a long time while the others wait in a collective; NCCL's default
# watchdog (10 minutes) would kill them, so the group is created with a longer timeout.
DIST_TIMEOUT = timedelta(minutes=60)


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        """True when there are other ranks to talk to."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's environment variables (if any).

    Returns a single-process `DistInfo` when ``WORLD_SIZE`` is absent or 1. On CUDA the process
    uses GPU ``LOCAL_RANK`` (see `device_for`).
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                        dist.get_backend(), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise UserError(f"WORLD_SIZE={world} but {key} is not set; launch with torchrun "
                            "(torchrun --nproc_per_node N -m marginface train ...)")
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; cannot train with WORLD_SIZE > 1")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw: dict = {}
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        kw["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=DIST_TIMEOUT, **kw)
    return DistInfo(rank, world, local_rank, backend, True)


def device_for(device: torch.device, info: DistInfo) -> torch.device:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun; anything else unchanged."""
    if device.type == "cuda" and info.enabled and device.index is None:
        return torch.device("cuda", info.local_rank)
    return device


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- DDP
def sum_allreduce_hook(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
    """DDP communication hook: SUM the ranks' gradients (DDP's default averages them)."""
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel with summed gradients (see the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(module, device_ids=ids)  # BatchNorm buffers follow rank 0's at every forward
    ddp.register_comm_hook(None, sum_allreduce_hook)
    return ddp


def all_reduce_grads_(params: Iterable[torch.nn.Parameter]) -> None:
    """SUM the gradients of replicated parameters kept outside DDP (one flat all-reduce)."""
    if not _on():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(replicated: list, sharded: list, max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm when some parameters are sharded over ranks.

    ``replicated``: parameters identical on every rank (count once); ``sharded``: each rank
    holds a different part (a Partial FC shard) whose squared norms are summed over ranks.
    Every rank gets the same norm, so every rank clips alike. Returns the total norm.
    """
    def sq(params: list) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=_comm_device())
        for p in params:
            if p.grad is not None:
                total = total + p.grad.detach().float().pow(2).sum().to(total.device)
        return total

    total_sq = sq(replicated) + all_reduce_sum_(sq(sharded).reshape(1))[0]
    norm = total_sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in list(replicated) + list(sharded):
        if p.grad is not None:
            p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 owns log.jsonl, TensorBoard, console)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


# --------------------------------------------------------------------------- sharded checkpoints
SHARD_FORMAT = "marginface-head-shard-v1"


def _row_tensors(state: dict, rows: int) -> dict:
    """The optimizer-state entries shaped like the shard (one row per weight row)."""
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == rows}


def head_param_id(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> int:
    """The integer key of ``param`` in ``optimizer.state_dict()['state']``."""
    k = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p is param:
                return k
            k += 1
    raise ValueError("the classifier weight is not in the optimizer")


def save_sharded(state: dict, head: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path,
                 name: str, step: int) -> Path:
    """Collective save of a run whose classifier is a `PartialFC` shard.

    Every rank writes ``{name}-head-s{step}.rank{r}-of{W}.pt`` (its class range of the weight and
    the matching rows of the optimizer state), all wait, then rank 0 writes ``{name}.pt`` (the
    rest of ``state`` plus a ``head_shards`` manifest naming those files) atomically: that rename
    is the commit. Shard files no manifest names any more are removed afterwards.
    """
    ckpt_dir = Path(ckpt_dir)
    W, r = world_size(), rank()
    weight = head.weight
    opt_state = optimizer.state.get(weight, {})
    shard_file = f"{name}-head-s{step}.rank{r}-of{W}.pt"
    save_atomic({
        "format": SHARD_FORMAT, "rank": r, "world_size": W, "class_range": list(head.class_range),
        "num_subcenters": head.num_subcenters, "weight": weight.detach().cpu(),
        "optim": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in opt_state.items()},
    }, ckpt_dir / shard_file)
    ranges = [list(x) for x in head.all_class_ranges()]
    barrier()
    path = ckpt_dir / f"{name}.pt"
    if r == 0:
        pid = head_param_id(optimizer, weight)
        opt = state["optimizer"]
        opt = {"state": {k: v for k, v in opt["state"].items() if k != pid}, "param_groups": opt["param_groups"]}
        head_small = {k: v for k, v in state["head"].items() if k != "weight"}
        files = [f"{name}-head-s{step}.rank{k}-of{W}.pt" for k in range(W)]
        manifest = {"world_size": W, "num_classes": head.num_classes, "num_subcenters": head.num_subcenters,
                    "embedding_size": head.embedding_size, "files": files, "class_ranges": ranges,
                    "head_param_id": pid}
        save_atomic({**state, "head": head_small, "optimizer": opt, "head_shards": manifest}, path)
        keep = set(files)
        pattern = re.compile(rf"^{re.escape(name)}-head-s\d+\.rank\d+-of\d+\.pt$")
        for f in ckpt_dir.iterdir():
            if pattern.match(f.name) and f.name not in keep:
                f.unlink(missing_ok=True)
    barrier()
    return path


def read_head_rows(ckpt: dict, ckpt_path: Path, start: int, end: int, optimizer_pid: Optional[int] = None) -> tuple:
    """Classes ``[start, end)`` of a checkpoint's classifier: ``(weight rows, optimizer state)``.

    Reads either a sharded checkpoint (``head_shards`` manifest: only the files whose class range
    overlaps are opened) or a single-process one (``head.weight`` and the optimizer state of the
    classifier weight, id ``optimizer_pid``). Row tensors of the optimizer state (momentum, Adam
    moments) are sliced like the weight; scalars (Adam's step) are taken as they are. This is the
    re-shard: any world size reads any other's checkpoint.
    """
    manifest = ckpt.get("head_shards")
    if manifest is None:
        full = ckpt["head"]["weight"]
        k = full.shape[0] // _num_classes_of(ckpt, full)
        st = ckpt.get("optimizer", {}).get("state", {}).get(optimizer_pid, {}) if optimizer_pid is not None else {}
        rowst = _row_tensors(st, full.shape[0])
        out = {key: v for key, v in st.items() if key not in rowst}
        out.update({key: v[start * k:end * k].clone() for key, v in rowst.items()})
        return full[start * k:end * k].clone(), out
    k = int(manifest["num_subcenters"])
    parts, states, scalars = [], {}, {}
    for fname, (s, e) in zip(manifest["files"], manifest["class_ranges"]):
        lo, hi = max(s, start), min(e, end)
        if lo >= hi:
            continue
        f = Path(ckpt_path).parent / fname
        try:
            shard = torch.load(f, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"{ckpt_path}: classifier shard {f.name} is missing") from None
        if shard.get("format") != SHARD_FORMAT:
            raise UserError(f"{f}: not a marginface classifier shard")
        w = shard["weight"]
        parts.append(w[(lo - s) * k:(hi - s) * k])
        rowst = _row_tensors(shard["optim"], w.shape[0])
        for key, v in rowst.items():
            states.setdefault(key, []).append(v[(lo - s) * k:(hi - s) * k])
        scalars.update({key: v for key, v in shard["optim"].items() if key not in rowst})
    if not parts:
        raise UserError(f"{ckpt_path}: no classifier shard covers classes [{start}, {end})")
    weight = torch.cat(parts)
    if weight.shape[0] != (end - start) * k:
        raise UserError(f"{ckpt_path}: classifier shards cover {weight.shape[0] // k} of classes [{start}, {end})")
    out = dict(scalars)
    for key, vs in states.items():
        if len(vs) != len(parts):
            raise UserError(f"{ckpt_path}: classifier shards disagree on optimizer state {key!r}")
        out[key] = torch.cat(vs)
    return weight, out


def _num_classes_of(ckpt: dict, full_weight: torch.Tensor) -> int:
    info = ckpt.get("model_info") or {}
    c = info.get("num_classes")
    if isinstance(c, int) and c > 0:
        return c
    return full_weight.shape[0]


def is_sharded(ckpt: dict) -> bool:
    return ckpt.get("head_shards") is not None


def load_head(head: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict, ckpt_path: Path) -> None:
    """Load the classifier (this rank's classes) and the whole optimizer state from ``ckpt``.

    ``head`` is a `PartialFC` shard (classes ``head.class_range``) or a full `Classifier`; the
    checkpoint may come from any world size, sharded or not.
    """
    start, end = getattr(head, "class_range", (0, head.num_classes))
    pid = head_param_id(optimizer, head.weight)
    weight, row_state = read_head_rows(ckpt, ckpt_path, start, end, pid)
    if weight.shape != head.weight.shape:
        raise UserError(f"{ckpt_path}: classifier rows {tuple(weight.shape)} do not fit "
                        f"{tuple(head.weight.shape)} (num_classes / num_subcenters / embedding_size changed?)")
    small = {k: v for k, v in (ckpt.get("head") or {}).items() if k != "weight"}
    head.load_state_dict({**small, "weight": weight.to(head.weight.dtype)})
    opt = ckpt["optimizer"]
    state = {k: v for k, v in opt["state"].items() if k != pid}
    if row_state:
        state[pid] = row_state
    optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
