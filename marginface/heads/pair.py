"""Pair-mode losses ("FaceID"-style verification training) on the in-batch pairs of a P x K batch.

- ``pair_bce`` (`PairBCELoss`): for all pairs i < j in the batch, p_ij = sigmoid(scale * cos(x_i,
  x_j) + bias), target 1 when y_i == y_j. Every positive pair is used, plus a balanced set of
  negatives (round(neg_per_pos * #positives), at least 1, random or hardest); the loss is the mean
  BCE over the chosen pairs. The decision threshold on the cosine is -bias / scale.
- ``triplet`` (`TripletLoss`, FaceNet, Schroff et al. 2015): on L2-normalised embeddings,
  ``max(0, d(a, p) - d(a, n) + margin)`` with d the squared euclidean distance (= 2 - 2 cos).
  ``mining="batch_hard"`` (Hermans et al. 2017): per anchor its farthest positive and nearest
  negative; ``"all"``: the mean over the triplets that still violate the margin.
- ``contrastive`` (`ContrastiveLoss`, Hadsell et al. 2006; DeepID2): with d the euclidean
  distance of the normalised embeddings, ``d²`` for a positive pair and ``max(0, margin - d)²``
  for a negative one; the loss is the mean over the positive pairs plus the mean over the
  negative pairs, halved (so the many negatives of a batch do not drown the few positives).

All three need positives in every batch: train them with ``data.samples_per_identity`` K >= 2.
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


def _pair_tables(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cosine N×N, same identity N×N without the diagonal, different identity N×N)`` in fp32."""
    x = F.normalize(embeddings.float(), dim=1)
    cos = x @ x.T
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    same = (labels[:, None] == labels[None, :]) & ~eye
    return cos, same, labels[:, None] != labels[None, :]


def _pair_stats(cos: torch.Tensor, same: torch.Tensor, diff: torch.Tensor) -> dict:
    """Mean positive / negative cosine and the pair accuracy at the midpoint of the two means."""
    upper = torch.ones_like(same).triu(diagonal=1)
    pos, neg = cos[same & upper], cos[diff & upper]
    stats = {"mean_target_cosine": float(pos.mean()) if pos.numel() else float("nan"),
             "mean_negative_cosine": float(neg.mean()) if neg.numel() else float("nan"),
             "pairs": float(pos.numel() + neg.numel())}
    if pos.numel() and neg.numel():
        mid = (pos.mean() + neg.mean()) / 2
        stats["accuracy"] = float(((pos > mid).sum() + (neg <= mid).sum()) / (pos.numel() + neg.numel()))
    else:
        stats["accuracy"] = float("nan")
    return stats


def _check_margin(name: str, margin) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0:
        raise UserError(f"{name} loss: margin must be a number > 0, got {margin!r}")
    return float(margin)


class TripletLoss(LossHead):
    """FaceNet's triplet loss on in-batch triplets (see the module doc).

    Params: ``margin`` = 0.2 (on the squared distance of unit vectors, which lies in [0, 4]),
    ``mining`` = "batch_hard" | "all". No weights. forward -> HeadOutput with ``logits`` = the
    per-anchor (batch_hard) or per-triplet (all) hinge values and stats mean_target_cosine,
    mean_negative_cosine, accuracy (pairs split at the midpoint of the two mean cosines),
    active (fraction of hinge terms > 0), pairs.
    """

    MINING = ("batch_hard", "all")

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard") -> None:
        super().__init__()
        self.margin = _check_margin("triplet", margin)
        if mining not in self.MINING:
            raise UserError(f"triplet loss: mining must be one of {', '.join(self.MINING)}, got {mining!r}")
        self.mining = mining

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos, same, diff = _pair_tables(embeddings, labels)
            dist = 2.0 - 2.0 * cos
            anchors = same.any(dim=1) & diff.any(dim=1)
            if not bool(anchors.any()):  # no anchor with both a positive and a negative
                zero = embeddings.float().sum() * 0.0
                return HeadOutput(loss=zero, logits=cos.new_zeros(0), stats={**_pair_stats(cos, same, diff),
                                                                              "active": 0.0})
            if self.mining == "batch_hard":
                hardest_pos = dist.masked_fill(~same, -1.0).max(dim=1).values
                hardest_neg = dist.masked_fill(~diff, 5.0).min(dim=1).values
                hinge = F.relu(hardest_pos - hardest_neg + self.margin)[anchors]
                loss = hinge.mean()
            else:  # every (a, p, n): d(a,p) - d(a,n) + margin, over the valid triplets
                valid = same[:, :, None] & diff[:, None, :]
                hinge = F.relu(dist[:, :, None] - dist[:, None, :] + self.margin)[valid]
                active = hinge > 0
                loss = hinge[active].mean() if bool(active.any()) else hinge.sum() * 0.0
        with torch.no_grad():
            stats = {**_pair_stats(cos, same, diff), "active": float((hinge > 0).float().mean())}
        return HeadOutput(loss=loss, logits=hinge, stats=stats)


class ContrastiveLoss(LossHead):
    """The contrastive (siamese) loss on every in-batch pair (see the module doc).

    Params: ``margin`` = 1.0 (a euclidean distance between unit vectors, in [0, 2]; 1.0 pushes
    negatives below cosine 0.5). No weights. forward -> HeadOutput with ``logits`` = the cosines
    of the pairs i < j and the stats of `TripletLoss` (``active``: the negatives still inside the margin).
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = _check_margin("contrastive", margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos, same, diff = _pair_tables(embeddings, labels)
            upper = torch.ones_like(same).triu(diagonal=1)
            pos, neg = same & upper, diff & upper
            # sqrt has an infinite slope at 0: identical embeddings (d = 0) must not give NaN gradients
            dist = (2.0 - 2.0 * cos).clamp_min(1e-12).sqrt()
            terms = []
            if bool(pos.any()):
                terms.append(dist[pos].square().mean())
            if bool(neg.any()):
                terms.append(F.relu(self.margin - dist[neg]).square().mean())
            loss = sum(terms) / 2 if terms else embeddings.float().sum() * 0.0
        with torch.no_grad():
            active = float((dist[neg] < self.margin).float().mean()) if bool(neg.any()) else 0.0
            stats = {**_pair_stats(cos, same, diff), "active": active}
        return HeadOutput(loss=loss, logits=cos[upper], stats=stats)
