"""The loss-head contract: what the trainer may call on any head, and what a head returns.

Every loss head (the margin `Classifier`, `PartialFC`, the pair loss `PairBCELoss`) is a
`LossHead`: ``forward(embeddings N×D, labels N) -> HeadOutput``, plus two hooks the trainer
always calls and a head overrides only when it needs them:

- ``begin_step(step)``: before each optimizer step (Partial FC seeds its class sampling from it);
- ``attach_optimizer(optimizer)``: once, after the optimizer is built (Partial FC hooks the
  optimizer so that it updates only the sampled rows).

``sharded`` (a class attribute) says that the head's weight holds only this rank's classes, so
checkpoints store it per rank (`marginface.train.distributed.save_sharded`). The trainer asks the
contract, never ``hasattr``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class HeadOutput:
    """What a head returns: the scalar ``loss``, the scaled ``logits`` (after the margin) and
    ``stats`` (python floats for logging: at least ``mean_target_cosine`` and ``accuracy``)."""

    loss: torch.Tensor
    logits: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


class LossHead(nn.Module):
    """Base class of every loss head (see the module doc)."""

    sharded: bool = False

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:  # pragma: no cover
        raise NotImplementedError

    def begin_step(self, step: int) -> None:
        """Called by the trainer before each optimizer step; nothing to do by default."""

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by the trainer once the optimizer exists; nothing to do by default."""
