"""Collectives that cost nothing in a single process, and the autograd-aware all-gather.

Shared by the Partial FC classifier (`marginface.heads.partial_fc`) and distributed training
(`marginface.train.distributed`, which re-exports every name here). Without an initialised
process group of more than one rank, none of these functions communicate. Imports nothing from
the rest of marginface.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


# --------------------------------------------------------------------------- cheap collectives
def _on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if _on() else 1


def rank() -> int:
    return dist.get_rank() if _on() else 0


def barrier() -> None:
    if _on():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    """NCCL talks CUDA tensors only; gloo CPU tensors."""
    if _on() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (an all-reduce MAX)."""
    if not _on():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (no-op in a single process); returns ``tensor``."""
    if _on():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    if _on():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; small objects only)."""
    if not _on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of equally shaped tensors; no autograd."""
    if not _on():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _AllGather(torch.autograd.Function):
    """Forward: concatenate every rank's ``N×D`` block. Backward: every rank holds a gradient for
    the whole ``(W·N)×D`` concatenation (from its classifier shard); the gradient of this rank's
    block is the SUM of those over ranks: a reduce-scatter (NCCL) or all-reduce + slice (gloo,
    which has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        return all_gather_nograd(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, r = ctx.n, dist.get_rank()
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty((n,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        grad = grad.clone()  # all-reduced in place: never modify autograd's incoming buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[r * n:(r + 1) * n].clone()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Autograd-aware all-gather (identity in a single process); every rank's block must have the
    same shape."""
    if not _on():
        return x
    return _AllGather.apply(x)


def grad_scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value as ``x``; gradient multiplied by ``factor``. Used for loss terms that every rank
    computes in full from gathered tensors: each rank back-propagates ``1/W`` of them."""
    if factor == 1.0:
        return x
    return x * factor + (x - x * factor).detach()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """For a loss term each rank computes on its own part of the batch: value = the mean over
    ranks (the global-batch value when parts are equal), gradient = this rank's share (1/W)."""
    if not _on():
        return x
    w = dist.get_world_size()
    mean = all_reduce_sum_(x.detach().clone().reshape(1).to(_comm_device()))[0].to(x.device) / w
    return x / w + (mean - x / w).detach()
