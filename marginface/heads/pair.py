"""Pair-mode loss ("FaceID"-style verification training): binary cross-entropy on in-batch pairs.

For all pairs i < j in the batch: p_ij = sigmoid(scale * cos(x_i, x_j) + bias), target 1 when
y_i == y_j. Every positive pair is used, plus a balanced set of negatives
(round(neg_per_pos * #positives), at least 1, random or hardest); the loss is the mean BCE over
the chosen pairs. The decision threshold on the cosine is -bias / scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from marginface.errors import UserError
from marginface.heads.base import HeadOutput, LossHead


class PairBCELoss(LossHead):
    """BCE(sigmoid(scale * cos + bias), same identity) over in-batch pairs (see module doc).

    Params: ``scale`` = 10.0 (fixed), ``bias`` = 0.0 (initial value; a learnable parameter when
    ``learn_bias``, so add this module's parameters to the optimizer), ``neg_per_pos`` = 1.0,
    ``hard_negatives`` = False (True: the most similar negative pairs instead of random ones).
    forward(embeddings N×D, labels N) -> HeadOutput with ``logits`` = the chosen pair logits
    (positives first) and stats mean_target_cosine (= mean positive-pair cosine),
    mean_negative_cosine, accuracy (pair accuracy at p = 0.5), pairs.
    """

    def __init__(self, scale: float = 10.0, bias: float = 0.0, *, learn_bias: bool = True,
                 neg_per_pos: float = 1.0, hard_negatives: bool = False) -> None:
        super().__init__()
        for key, v in (("scale", scale), ("neg_per_pos", neg_per_pos)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise UserError(f"pair loss: {key} must be a number > 0, got {v!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise UserError(f"pair loss: bias must be a number, got {bias!r}")
        self.scale = float(scale)
        self.neg_per_pos = float(neg_per_pos)
        self.hard_negatives = bool(hard_negatives)
        b = torch.tensor(float(bias))
        if learn_bias:
            self.bias = nn.Parameter(b)
        else:
            self.register_buffer("bias", b)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = F.normalize(embeddings.float(), dim=1)
            n = x.shape[0]
            i, j = torch.triu_indices(n, n, offset=1, device=x.device)
            cos = (x[i] * x[j]).sum(dim=1)
            same = labels[i] == labels[j]
            pos = same.nonzero().squeeze(1)
            neg = (~same).nonzero().squeeze(1)
            k = min(neg.numel(), max(1, round(self.neg_per_pos * pos.numel())))
            if self.hard_negatives:
                neg = neg[cos[neg].detach().topk(k).indices]
            else:
                neg = neg[torch.randperm(neg.numel(), device=x.device)[:k]]
            chosen = torch.cat([pos, neg])
            if chosen.numel() == 0:  # fewer than two embeddings: nothing to compare
                zero = embeddings.float().sum() * 0.0 + self.bias * 0.0
                return HeadOutput(loss=zero, logits=cos[:0], stats={"pairs": 0.0})
            logits = self.scale * cos[chosen] + self.bias
            target = same[chosen].float()
            loss = F.binary_cross_entropy_with_logits(logits, target)
        with torch.no_grad():
            stats = {
                "mean_target_cosine": float(cos[pos].mean()) if pos.numel() else float("nan"),
                "mean_negative_cosine": float(cos[neg].mean()) if neg.numel() else float("nan"),
                "accuracy": float(((logits > 0).float() == target).float().mean()),
                "pairs": float(chosen.numel()),
            }
        return HeadOutput(loss=loss, logits=logits, stats=stats)
