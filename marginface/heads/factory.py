"""The one builder of loss heads from names: a margin classifier (full FC or Partial FC) or a pair loss.

`build_loss_head` is what config validation, the trainer and library users call; it picks Partial
FC (`marginface.heads.partial_fc.PartialFC`) when the run is distributed, samples classes, or
stores/computes the classifier in a reduced precision, and the single-process `Classifier`
otherwise. Every head it returns is a `LossHead`: ``forward(embeddings, labels) -> HeadOutput``,
``begin_step``, ``attach_optimizer`` (see `marginface.heads.base`), so the trainer does not care
which it got. `build_head` is the older, margin-only spelling (kept: tests, docs and benchmarks use
it).

The names are the registries `MARGINS` (`marginface.heads.margins`) and `PAIR_LOSSES` (here);
`loss_head_names()` lists both, in that order.
"""
from __future__ import annotations

import inspect
from types import MappingProxyType

from marginface.errors import UserError
from marginface.heads.base import LossHead
from marginface.heads.classifier import Classifier
from marginface.heads.margins import MARGINS, build_margin
from marginface.heads.pair import ContrastiveLoss, PairBCELoss, TripletLoss
from marginface.heads.partial_fc import PartialFC

PAIR_LOSSES = MappingProxyType({"pair_bce": PairBCELoss, "triplet": TripletLoss, "contrastive": ContrastiveLoss})


def loss_head_names() -> list:
    """Every value ``head.loss`` takes: the margins, then the pair losses."""
    return [*MARGINS, *PAIR_LOSSES]


def build_loss_head(loss: str, embedding_size: int, num_classes: int, params: dict | None = None, *,
                    num_subcenters: int = 1, focal_gamma: float = 0.0, normalize: bool = True,
                    sample_rate: float = 1.0, shard_dtype: str = "fp32", compute_dtype: str = "fp32",
                    rank: int = 0, world_size: int = 1, seed: int = 0) -> LossHead:
    """``head.loss`` + ``head.params`` (+ the other ``head.*`` options) -> the loss head.

    A margin name gives a classifier with that margin: `PartialFC` (rank ``rank``'s shard of
    ``world_size``, seeded by ``seed``) when ``world_size`` > 1, ``sample_rate`` < 1 or a non-fp32
    ``shard_dtype`` / ``compute_dtype``, else the full-FC `Classifier`. A pair-loss name gives that
    loss (single process only). Unknown names or parameters are one-line `UserError`s.
    """
    params = dict(params or {})
    if loss in PAIR_LOSSES:
        if world_size > 1:
            raise UserError(f"head.loss={loss!r} is not a margin classifier; distributed training (torchrun) "
                            "shards a margin classifier (Partial FC) and supports only those")
        cls = PAIR_LOSSES[loss]
        valid = [p for p in inspect.signature(cls).parameters]
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise UserError(f"loss {loss!r} has no parameter {unknown[0]!r}; valid parameters: {', '.join(valid)}")
        return cls(**params)
    if loss not in MARGINS:
        raise UserError(f"unknown loss {loss!r} (head.loss); valid: {', '.join(loss_head_names())}")
    margin = build_margin(loss, **params)
    partial = world_size > 1 or sample_rate < 1.0 or shard_dtype != "fp32" or compute_dtype != "fp32"
    if partial:
        if not margin.takes_cosines:
            raise UserError(f"head.loss={loss!r} (un-normalised) works only with the full classifier: one process, "
                            "head.sample_rate 1.0 and fp32 head dtypes (Partial FC shards cosine classifiers)")
        if not normalize:
            raise UserError("partial fc: normalize=False (un-normalised softmax) works only with the full classifier")
        return PartialFC(embedding_size, num_classes, margin, sample_rate=sample_rate,
                         num_subcenters=num_subcenters, focal_gamma=focal_gamma, rank=rank,
                         world_size=world_size, seed=seed, shard_dtype=shard_dtype, compute_dtype=compute_dtype)
    return Classifier(embedding_size, num_classes, margin, num_subcenters=num_subcenters, focal_gamma=focal_gamma,
                      normalize=normalize)


def build_head(margin: str, embedding_size: int, num_classes: int, *, num_subcenters: int = 1,
               focal_gamma: float = 0.0, normalize: bool = True, **margin_params: object) -> LossHead:
    """`build_loss_head` with the margin's parameters as keywords (the older spelling)."""
    return build_loss_head(margin, embedding_size, num_classes, margin_params, num_subcenters=num_subcenters,
                           focal_gamma=focal_gamma, normalize=normalize)
