"""Heads: margins (one formula per paper), the classifier, auxiliary and pair losses.

Every loss head is a `LossHead` (``forward -> HeadOutput``, ``begin_step``, ``attach_optimizer``)
built by `build_loss_head`. See docs/losses.md for every loss's formula, defaults and paper.
"""
from marginface.heads.base import HeadOutput, LossHead
from marginface.heads.center import CenterLoss
from marginface.heads.classifier import Classifier, focal_loss
from marginface.heads.margins import MARGINS, Margin, build_margin
from marginface.heads.pair import ContrastiveLoss, PairBCELoss, TripletLoss
from marginface.heads.factory import PAIR_LOSSES, build_head, build_loss_head, loss_head_names

__all__ = ["MARGINS", "PAIR_LOSSES", "Margin", "build_margin", "Classifier", "HeadOutput", "LossHead",
           "build_head", "focal_loss", "CenterLoss", "PairBCELoss", "TripletLoss",
           "ContrastiveLoss", "build_loss_head", "loss_head_names"]
