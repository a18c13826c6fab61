"""One entry point from config names to a loss head: a margin classifier, or the pair loss.

Both return ``HeadOutput(loss, logits, stats)`` from ``forward(embeddings, labels)``, so the
trainer does not care which it got.
"""
from __future__ import annotations

import inspect

from torch import nn

from marginface.errors import UserError
from marginface.heads.classifier import Classifier
from marginface.heads.margins import MARGINS, build_margin
from marginface.heads.pair import PairBCELoss

PAIR_LOSSES = {"pair_bce": PairBCELoss}


def loss_head_names() -> list:
    return [*MARGINS, *PAIR_LOSSES]


def build_loss_head(margin: str, embedding_size: int, num_classes: int, params: dict | None = None, *,
                    num_subcenters: int = 1, focal_gamma: float = 0.0) -> nn.Module:
    """``head.margin`` + ``head.params`` -> a ``Classifier`` with that margin, or a pair loss."""
    params = dict(params or {})
    if margin in PAIR_LOSSES:
        cls = PAIR_LOSSES[margin]
        valid = [p for p in inspect.signature(cls).parameters]
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise UserError(f"loss {margin!r} has no parameter {unknown[0]!r}; valid parameters: {', '.join(valid)}")
        return cls(**params)
    if margin not in MARGINS:
        raise UserError(f"unknown margin {margin!r}; valid: {', '.join(loss_head_names())}")
    return Classifier(embedding_size, num_classes, build_margin(margin, **params),
                      num_subcenters=num_subcenters, focal_gamma=focal_gamma)
