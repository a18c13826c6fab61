"""CurricularFace (Huang et al. 2020, "CurricularFace: Adaptive Curriculum Learning Loss for Deep
Face Recognition").

  target:    T(cos theta_y) = cos(theta_y + m)   (insightface fallback past theta_y + m > pi)
  negatives: N(t, cos theta_j) = cos theta_j                     if cos theta_j <= T(cos theta_y)
                                 cos theta_j (t + cos theta_j)    otherwise ("hard")
  t <- 0.01 * mean_i cos(theta_{y_i}) + 0.99 * t   (EMA, t_0 = 0, once per training forward)
"""
from __future__ import annotations

from typing import Optional

import torch

from marginface.heads.margins.base import Margin, arc_margin, check_number, check_scale


class CurricularFace(Margin):
    """ArcFace target plus adaptively up-weighted hard negatives (see module doc).

    ``t`` is a buffer (saved in state_dict), updated only in training mode, *before* it is used
    in the same forward (as in the official code); the mean is over rows whose class is in the
    columns (label != -1). A negative is "hard" when it beats the actual target logit T (which
    includes the fallback; identical to the paper wherever theta_y + m <= pi).

    Params: ``s`` = 64.0, ``m`` = 0.5, ``momentum`` = 0.01 (the EMA weight of the new batch).
    """

    name = "curricularface"

    def __init__(self, s: float = 64.0, m: float = 0.5, momentum: float = 0.01) -> None:
        super().__init__(check_scale(self.name, s))
        self.m = check_number(self.name, "m", m, low=0.0, high=3.141592653589793, high_open=True)
        self.momentum = check_number(self.name, "momentum", momentum, low=0.0, high=1.0)
        self.register_buffer("t", torch.zeros(()))

    def target(self, cos_y: torch.Tensor, norms: Optional[torch.Tensor],
               valid: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                n = valid.sum()
                mean = torch.where(valid, cos_y, torch.zeros_like(cos_y)).sum() / n.clamp(min=1)
                new_t = self.momentum * mean + (1.0 - self.momentum) * self.t
                self.t.copy_(torch.where(n > 0, new_t, self.t))
        return arc_margin(cos_y, self.m)

    def negatives(self, cos: torch.Tensor, f_y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hard = (cos > f_y.unsqueeze(1)) & valid.unsqueeze(1)
        t = self.t.detach().clone()
        return torch.where(hard, cos * (t + cos), cos)

    def stats(self) -> dict[str, float]:
        return {"curricular_t": float(self.t)}
