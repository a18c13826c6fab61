"""SphereFace / A-Softmax (Liu et al. 2017, "SphereFace: Deep Hypersphere Embedding for Face
Recognition"), with the paper's lambda annealing.

psi(theta) = (-1)^k cos(m theta) - 2k  for theta in [k pi/m, (k+1) pi/m], k in {0..m-1}
f(theta)   = (lambda cos(theta) + psi(theta)) / (1 + lambda)
lambda     = max(lambda_min, base * (1 + gamma * iter)^(-power))
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from marginface.errors import UserError
from marginface.heads.margins.base import Margin, check_number, check_scale, clamp_cos


def chebyshev(cos: torch.Tensor, m: int) -> torch.Tensor:
    """cos(m theta) = T_m(cos theta) by the recurrence T_{n+1} = 2c T_n - T_{n-1} (no acos)."""
    t_prev, t = torch.ones_like(cos), cos
    if m == 0:
        return t_prev
    for _ in range(m - 1):
        t_prev, t = t, 2.0 * cos * t - t_prev
    return t


class SphereFace(Margin):
    """Multiplicative angular margin with annealing: target logit s * f(theta) (see module doc).

    The original A-Softmax multiplies by the feature norm ||x||; our Classifier normalises the
    features, so the target logit is s * f and the other columns s * cos (as in later
    re-implementations). cos(m theta) is the Chebyshev polynomial T_m(cos theta), as in the
    official Caffe layer, so the gradient is finite everywhere; k is piecewise constant.

    ``iteration`` is a buffer (saved in state_dict) incremented by every training-mode forward
    *before* lambda is computed, as in the official Caffe layer: the first training step uses
    lambda(1) = base / (1 + gamma). Eval-mode forwards use lambda(iteration) without counting.

    Params: ``s`` = 64.0 (not in the paper, which has no scale), ``m`` = 4 (integer >= 1),
    ``base`` = 1000.0, ``gamma`` = 0.12, ``power`` = 1.0, ``lambda_min`` = 5.0 (the published
    prototxt values for m = 4).
    """

    name = "sphereface"

    def __init__(self, s: float = 64.0, m: int = 4, base: float = 1000.0, gamma: float = 0.12,
                 power: float = 1.0, lambda_min: float = 5.0) -> None:
        super().__init__(check_scale(self.name, s))
        integral = isinstance(m, int) or (isinstance(m, float) and m.is_integer())
        if isinstance(m, bool) or not integral or m < 1:
            raise UserError(f"margin {self.name!r}: m must be an integer >= 1, got {m!r}")
        self.m = int(m)
        self.base = check_number(self.name, "base", base, low=0.0)
        self.gamma = check_number(self.name, "gamma", gamma, low=0.0)
        self.power = check_number(self.name, "power", power, low=0.0)
        self.lambda_min = check_number(self.name, "lambda_min", lambda_min, low=0.0)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def lambda_at(self, iteration: int | torch.Tensor) -> torch.Tensor:
        """lambda = max(lambda_min, base * (1 + gamma * iteration)^(-power))."""
        it = torch.as_tensor(iteration, dtype=torch.float64)
        lam = self.base * (1.0 + self.gamma * it) ** (-self.power)
        return lam.clamp(min=self.lambda_min)

    def psi(self, cos_y: torch.Tensor) -> torch.Tensor:
        """(-1)^k cos(m theta) - 2k with k = floor(m theta / pi), clamped to m - 1 at theta = pi."""
        with torch.no_grad():
            theta = torch.acos(clamp_cos(cos_y))
            k = torch.floor(self.m * theta / math.pi).clamp(0, self.m - 1)
            sign = 1.0 - 2.0 * torch.remainder(k, 2)  # (-1)^k
        return sign * chebyshev(cos_y, self.m) - 2.0 * k

    def target(self, cos_y: torch.Tensor, norms: Optional[torch.Tensor],
               valid: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.iteration += 1
        lam = self.lambda_at(self.iteration).to(cos_y.dtype)
        return (lam * cos_y + self.psi(cos_y)) / (1.0 + lam)

    def stats(self) -> dict[str, float]:
        return {"sphereface_lambda": float(self.lambda_at(self.iteration.cpu()))}
