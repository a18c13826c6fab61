"""SV-Softmax / SV-X-Softmax (Wang et al. 2019, "Support Vector Guided Softmax Loss for Face
Recognition", arXiv:1812.11317).

Mis-classified non-target classes ("support vectors") get their logit raised:
  I_k = 1 if cos(theta_k) > f(theta_y) else 0
  h(t, theta_k, I_k) = cos(theta_k) + (t - 1)(cos(theta_k) + 1) I_k  (= t cos + t - 1 when I_k = 1)
  logits: target s * f(theta_y), others s * h.
f = cos (SV-Softmax), or the CosFace / ArcFace target (SV-AM-Softmax / SV-Arc-Softmax).
"""
from __future__ import annotations

from typing import Optional

import torch

from marginface.errors import UserError
from marginface.heads.margins.base import Margin, arc_margin, check_number, check_scale

_BASE_M = {"softmax": 0.0, "cosface": 0.35, "arcface": 0.5}


class SVSoftmax(Margin):
    """Support-vector guided softmax (see module doc); t = 1 reduces it to its base margin.

    Params: ``s`` = 32.0 (as MV-/SV-Softmax implementations use; the paper fixes no value), ``t`` = 1.2 (>= 1), ``base`` = "softmax" | "cosface" | "arcface",
    ``m`` = the base's margin (default 0.35 for cosface, 0.5 for arcface; not allowed with
    softmax). The ArcFace base uses insightface's fallback past theta + m > pi.
    """

    name = "sv_softmax"

    def __init__(self, s: float = 32.0, t: float = 1.2, base: str = "softmax",
                 m: Optional[float] = None) -> None:
        super().__init__(check_scale(self.name, s))
        self.t = check_number(self.name, "t", t, low=1.0)
        if base not in _BASE_M:
            raise UserError(f"margin {self.name!r}: base must be one of "
                            f"{', '.join(_BASE_M)}, got {base!r}")
        self.base = base
        if base == "softmax" and m is not None:
            raise UserError(f"margin {self.name!r}: m has no meaning with base 'softmax' "
                            "(use base: cosface or arcface)")
        self.m = _BASE_M[base] if m is None else check_number(self.name, "m", m, low=0.0, high=3.14159)

    def target(self, cos_y: torch.Tensor, norms: Optional[torch.Tensor],
               valid: torch.Tensor) -> torch.Tensor:
        if self.base == "cosface":
            return cos_y - self.m
        if self.base == "arcface":
            return arc_margin(cos_y, self.m)
        return cos_y

    def negatives(self, cos: torch.Tensor, f_y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hard = (cos > f_y.unsqueeze(1)) & valid.unsqueeze(1)
        return torch.where(hard, self.t * cos + self.t - 1.0, cos)
