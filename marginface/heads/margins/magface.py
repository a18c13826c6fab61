"""MagFace (Meng et al. 2021, "MagFace: A Universal Representation for Face Recognition and
Quality Assessment").

  a    = clamp(||x||, l_a, u_a)
  m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m        (linear, increasing)
  f    = cos(theta_y + m(a))   (insightface fallback past theta_y + m(a) > pi)
  loss = CE + lambda_g * mean_i g(a_i),  g(a) = a / u_a^2 + 1 / a
After training, ||x|| is a face-quality score (higher = better quality).
"""
from __future__ import annotations

from typing import Optional

import torch

from marginface.errors import UserError
from marginface.heads.margins.base import Margin, arc_margin, check_number, check_scale


class MagFace(Margin):
    """Magnitude-aware angular margin plus the norm regulariser g (see module doc).

    The norms are *not* detached: MagFace relies on the gradient through m(a) and g(a) to order
    the norms by quality. The regulariser is returned by `extra_loss(norms)`, which the
    Classifier adds to the loss.

    Params: ``s`` = 64.0, ``l_a`` = 10.0, ``u_a`` = 110.0, ``l_m`` = 0.45, ``u_m`` = 0.8,
    ``lambda_g`` = 35.0 (the official ms1mv2 recipe).
    """

    name = "magface"

    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45,
                 u_m: float = 0.8, lambda_g: float = 35.0) -> None:
        super().__init__(check_scale(self.name, s))
        self.l_a = check_number(self.name, "l_a", l_a, low=0.0, low_open=True)
        self.u_a = check_number(self.name, "u_a", u_a, low=0.0, low_open=True)
        self.l_m = check_number(self.name, "l_m", l_m, low=0.0, high=3.14159)
        self.u_m = check_number(self.name, "u_m", u_m, low=0.0, high=3.14159)
        self.lambda_g = check_number(self.name, "lambda_g", lambda_g, low=0.0)
        if self.u_a <= self.l_a:
            raise UserError(f"margin {self.name!r}: u_a must be > l_a, got u_a={u_a!r} l_a={l_a!r}")

    def magnitude(self, norms: torch.Tensor) -> torch.Tensor:
        return norms.float().clamp(self.l_a, self.u_a)

    def margin_of(self, norms: torch.Tensor) -> torch.Tensor:
        """m(a) per row."""
        a = self.magnitude(norms)
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def target(self, cos_y: torch.Tensor, norms: Optional[torch.Tensor],
               valid: torch.Tensor) -> torch.Tensor:
        if norms is None:
            raise ValueError("magface needs the feature norms (forward(cosine, labels, norms))")
        return arc_margin(cos_y, self.margin_of(norms))

    def extra_loss(self, norms: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if norms is None:
            raise ValueError("magface needs the feature norms for its regulariser")
        a = self.magnitude(norms)
        return self.lambda_g * (a / self.u_a ** 2 + 1.0 / a).mean()
