"""ArcFace (Deng et al. 2019, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition").

Target logit s * cos(theta_y + m); other columns s * cos(theta_j).
"""
from __future__ import annotations

from typing import Optional

import torch

from marginface.heads.margins.base import Margin, arc_margin, check_bool, check_number, check_scale, clamp_cos


class ArcFace(Margin):
    """Additive angular margin: f(theta) = cos(theta + m).

    Beyond theta + m > pi, cos(theta + m) is no longer monotonic in theta; we use insightface's
    standard fallback f = cos(theta) - m*sin(m) when cos(theta) <= cos(pi - m) (a CosFace-like
    penalty; note it is not continuous: at theta = pi - m it jumps from -1 to -cos m - m sin m).
    With ``easy_margin`` the margin is only applied where cos(theta) > 0 (f = cos(theta) else).

    Params: ``s`` = 64.0, ``m`` = 0.5 (radians), ``easy_margin`` = False.
    """

    name = "arcface"

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False) -> None:
        super().__init__(check_scale(self.name, s))
        self.m = check_number(self.name, "m", m, low=0.0, high=3.141592653589793, high_open=True)
        self.easy_margin = check_bool(self.name, "easy_margin", easy_margin)

    def target(self, cos_y: torch.Tensor, norms: Optional[torch.Tensor],
               valid: torch.Tensor) -> torch.Tensor:
        if self.easy_margin:
            c = clamp_cos(cos_y)
            phi = torch.cos(torch.acos(c) + self.m)
            return torch.where(cos_y > 0, phi, cos_y)
        return arc_margin(cos_y, self.m)
