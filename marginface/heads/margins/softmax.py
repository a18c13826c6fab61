"""Normalised softmax (NormFace, Wang et al. 2017, "NormFace: L2 Hypersphere Embedding for Face
Verification"): logits = s * cos(theta_j) for every class, no margin.

A truly un-normalised softmax (logits = x . W^T) is the Classifier option ``normalize=False``;
this margin is the only one that option accepts (its ``s`` is then unused).
"""
from __future__ import annotations

from marginface.heads.margins.base import Margin, check_scale


class Softmax(Margin):
    """logits_j = s * cos(theta_j) (no margin).

    Params: ``s`` = 64.0 (scale; NormFace used smaller values, ~30, with a learnable option;
    64 matches the other margins here).
    """

    name = "softmax"

    def __init__(self, s: float = 64.0) -> None:
        super().__init__(check_scale(self.name, s))
