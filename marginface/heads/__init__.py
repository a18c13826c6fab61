"""Heads: margins (one formula per paper), the classifier, auxiliary and pair losses.

See docs/losses.md for every loss's formula, defaults and paper.
"""
from marginface.heads.center import CenterLoss
from marginface.heads.classifier import Classifier, HeadOutput, build_head, focal_loss
from marginface.heads.margins import MARGINS, Margin, build_margin
from marginface.heads.pair import PairBCELoss
from marginface.heads.factory import build_loss_head, loss_head_names

__all__ = ["MARGINS", "Margin", "build_margin", "Classifier", "HeadOutput", "build_head",
           "focal_loss", "CenterLoss", "PairBCELoss", "build_loss_head", "loss_head_names"]
