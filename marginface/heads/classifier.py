"""The classifier head: class centres, cosines, the margin, the loss and training statistics.

cosine = normalize(x) @ normalize(W)^T, computed in fp32 with autocast disabled (a deliberate
choice: bf16 cosines carry ~3 significant digits, i.e. ~0.25 logit noise at s = 64, as large as
the margins themselves). With K sub-centres per class (Sub-center ArcFace, Deng et al. 2020,
"Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web Faces") the class cosine
is the max over its K sub-centres; W row c*K + k is sub-centre k of class c.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from marginface.errors import UserError
from marginface.heads.base import HeadOutput, LossHead
from marginface.heads.margins import Softmax

__all__ = ["Classifier", "HeadOutput", "focal_loss"]  # HeadOutput lives in heads/base.py; re-exported here


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection"), batch mean of
    FL = -(1 - p_t)^gamma log p_t; gamma = 0 is cross-entropy."""
    if gamma == 0.0:
        return F.cross_entropy(logits, labels)
    logp_t = F.log_softmax(logits.float(), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    weight = (1.0 - logp_t.exp()).clamp(min=1e-12) ** gamma
    return -(weight * logp_t).mean()


class Classifier(LossHead):
    """Full-FC classifier: ``weight`` (num_classes*K × D, init N(0, 0.01)) + a margin module.

    forward(embeddings N×D, labels N) -> HeadOutput. The feature norms ``||emb||`` go to the margin
    (AdaFace, MagFace use them); a margin's ``extra_loss(norms)`` (MagFace's regulariser) is added
    to the loss and its ``stats()`` merged into the statistics.

    Options: ``num_subcenters`` K (1; the paper uses 3), ``focal_gamma`` (0 = cross-entropy; ~2
    typical), ``normalize`` (True; False gives the plain un-normalised softmax logits = x . W^T,
    allowed only with the ``softmax`` margin, whose ``s`` is then unused).

    A margin with ``takes_cosines = False`` (``plain_softmax``) gets the un-normalised logits
    x . W^T + b instead of cosines; ``bias`` (one per weight row, zero at the start) exists when
    that margin asks for it (its ``bias`` parameter), else it is None.
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: nn.Module, *,
                 num_subcenters: int = 1, focal_gamma: float = 0.0, normalize: bool = True) -> None:
        super().__init__()
        for key, v in (("embedding_size", embedding_size), ("num_classes", num_classes),
                       ("num_subcenters", num_subcenters)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"classifier: {key} must be an integer >= 1, got {v!r}")
        if isinstance(focal_gamma, bool) or not isinstance(focal_gamma, (int, float)) or focal_gamma < 0:
            raise UserError(f"classifier: focal_gamma must be a number >= 0, got {focal_gamma!r}")
        self.plain = not getattr(margin, "takes_cosines", True)  # plain_softmax: x . W^T + b
        if not normalize and not (isinstance(margin, Softmax) or self.plain):
            raise UserError("classifier: normalize=False (un-normalised softmax) works only with "
                            f"margin 'softmax', got {type(margin).__name__}")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.num_subcenters = num_subcenters
        self.focal_gamma = float(focal_gamma)
        self.normalize = normalize
        self.margin = margin
        self.weight = nn.Parameter(torch.empty(num_classes * num_subcenters, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        if self.plain and getattr(margin, "bias", False):
            self.bias = nn.Parameter(torch.zeros(num_classes * num_subcenters))
        else:
            self.register_parameter("bias", None)

    def _max_subcenter(self, x: torch.Tensor) -> torch.Tensor:
        """``N × C*K`` -> ``N × C`` (max over each class's K sub-centres)."""
        if self.num_subcenters == 1:
            return x
        return x.view(x.shape[0], self.num_classes, self.num_subcenters).amax(dim=2)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """fp32 cosines ``N×C`` between the embeddings and their nearest sub-centre per class."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = F.normalize(embeddings.float(), dim=1)
            w = F.normalize(self.weight.float(), dim=1)
            return self._max_subcenter(x @ w.t())

    def target_cosine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """cos between each embedding and its own class (best sub-centre), ``N`` (cheap: O(N D K))."""
        x = F.normalize(embeddings.float(), dim=1)
        w = F.normalize(self.weight.float(), dim=1).view(self.num_classes, self.num_subcenters, -1)
        return torch.einsum("nd,nkd->nk", x, w[labels]).amax(dim=1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        labels = labels.long()
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.float()
            norms = emb.norm(dim=1)
            raw = self.plain or not self.normalize  # un-normalised logits x . W^T (+ b)
            if not raw:
                cos = self.cosine(emb)
                logits = self.margin(cos, labels, norms)
                with torch.no_grad():
                    cos_y = cos.gather(1, labels.unsqueeze(1)).squeeze(1)
            else:
                logits = emb @ self.weight.float().t()
                if self.bias is not None:
                    logits = logits + self.bias.float()
                logits = self._max_subcenter(logits)
                if self.plain:
                    logits = self.margin(logits, labels, norms)
                with torch.no_grad():
                    cos_y = self.target_cosine(emb, labels)
            loss = focal_loss(logits, labels, self.focal_gamma)
            extra = getattr(self.margin, "extra_loss", None)
            extra_loss = extra(norms) if (extra is not None and not raw) else None
            if extra_loss is not None:
                loss = loss + extra_loss
        with torch.no_grad():
            stats = {
                "mean_target_cosine": float(cos_y.mean()),
                # top-1 on the plain scores (what the embedding has learnt); the margin-penalised
                # logits' top-1 stays near 0 through a good run by design (the margin makes it hard)
                "accuracy": float(((logits if raw else cos).argmax(dim=1) == labels).float().mean()),
                "margin_accuracy": float((logits.argmax(dim=1) == labels).float().mean()),
                "mean_norm": float(norms.mean()),
            }
            if extra_loss is not None:
                stats["extra_loss"] = float(extra_loss)
            margin_stats = getattr(self.margin, "stats", None)
            if margin_stats is not None:
                stats.update(margin_stats())
        return HeadOutput(loss=loss, logits=logits, stats=stats)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"num_subcenters={self.num_subcenters}, focal_gamma={self.focal_gamma}, "
                f"normalize={self.normalize}")

