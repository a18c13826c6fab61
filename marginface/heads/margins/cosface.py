"""CosFace / AM-Softmax (Wang et al. 2018, "CosFace: Large Margin Cosine Loss for Deep Face
Recognition"; Wang et al. 2018, "Additive Margin Softmax for Face Verification").

Target logit s * (cos(theta_y) - m); other columns s * cos(theta_j).
"""
from __future__ import annotations

from typing import Optional

import torch

from marginface.heads.margins.base import Margin, check_number, check_scale


class CosFace(Margin):
    """Additive cosine margin: f(theta) = cos(theta) - m.

    Params: ``s`` = 64.0, ``m`` = 0.35 (the CosFace paper's best value; it used s = 64).
    """

    name = "cosface"

    def __init__(self, s: float = 64.0, m: float = 0.35) -> None:
        super().__init__(check_scale(self.name, s))
        self.m = check_number(self.name, "m", m, low=0.0)

    def target(self, cos_y: torch.Tensor, norms: Optional[torch.Tensor],
               valid: torch.Tensor) -> torch.Tensor:
        return cos_y - self.m
