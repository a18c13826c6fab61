"""Combined margin (Deng et al. 2019, ArcFace paper, Sec. 3.3 / insightface "combined"):
f(theta) = cos(m1 theta + m2) - m3, which contains SphereFace-like (m1), ArcFace (m2) and CosFace
(m3) margins as special cases.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from marginface.heads.margins.base import Margin, check_number, check_scale, clamp_cos


class CombinedMargin(Margin):
    """f(theta) = cos(m1 theta + m2) - m3 for m1 theta + m2 <= pi.

    Fallback past theta_th = (pi - m2) / m1 (where cos would turn back up): a CosFace-like
    continuation that stays continuous and monotonic,
    f(theta) = cos(theta) - cos(theta_th) - 1 - m3  (equals -1 - m3 at theta_th).
    (ArcFace's insightface fallback is not continuous; this one is, so combined(1, m, 0) and
    arcface(m) differ for theta > pi - m, a region normal training never reaches.)

    Params: ``s`` = 64.0, ``m1`` = 1.0, ``m2`` = 0.3, ``m3`` = 0.2 (the ArcFace paper's CM1;
    CM2 is 0.9, 0.4, 0.15).
    """

    name = "combined"

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2) -> None:
        super().__init__(check_scale(self.name, s))
        self.m1 = check_number(self.name, "m1", m1, low=0.0, low_open=True)
        self.m2 = check_number(self.name, "m2", m2, low=0.0, high=math.pi, high_open=True)
        self.m3 = check_number(self.name, "m3", m3, low=0.0)
        self.theta_th = (math.pi - self.m2) / self.m1

    def target(self, cos_y: torch.Tensor, norms: Optional[torch.Tensor],
               valid: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(clamp_cos(cos_y))
        phi = torch.cos(self.m1 * theta + self.m2) - self.m3
        if self.theta_th >= math.pi:
            return phi
        fallback = cos_y - math.cos(self.theta_th) - 1.0 - self.m3
        return torch.where(theta <= self.theta_th, phi, fallback)
