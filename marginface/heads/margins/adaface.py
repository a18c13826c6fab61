"""AdaFace (Kim et al. 2022, "AdaFace: Quality Adaptive Margin for Face Recognition").

The feature norm acts as an image-quality proxy and moves the margin between ArcFace-like
(angular, high quality) and CosFace-like (additive, low quality):
  z_hat   = clip(h * (||z|| - mu_z) / (sigma_z + eps), -1, 1)     (norms detached)
  g_angle = -m z_hat,  g_add = m z_hat + m
  f       = cos(clip(theta_y + g_angle, eps, pi - eps)) - g_add
mu_z, sigma_z: EMA of the batch mean / std of the norms with momentum t_alpha.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from marginface.heads.margins.base import Margin, check_number, check_scale, clamp_cos

_EPS = 1e-3  # the paper's eps (theta clip and std guard)


class AdaFace(Margin):
    """Feature-norm adaptive margin (see module doc).

    Needs ``norms`` (the Classifier passes ``||emb||``); they are detached and clipped to
    [0.001, 100] as in the official code. Buffers ``batch_mean`` (init 20) and ``batch_std``
    (init 100) are updated only in training mode, over every row (label -1 rows included),
    before use in the same forward: mu <- t_alpha * mean + (1 - t_alpha) * mu (std: unbiased,
    skipped for a batch of one).

    Params: ``s`` = 64.0, ``m`` = 0.4, ``h`` = 0.333, ``t_alpha`` = 0.01.
    """

    name = "adaface"

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01) -> None:
        super().__init__(check_scale(self.name, s))
        self.m = check_number(self.name, "m", m, low=0.0, high=math.pi / 2)
        self.h = check_number(self.name, "h", h, low=0.0)
        self.t_alpha = check_number(self.name, "t_alpha", t_alpha, low=0.0, high=1.0)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def target(self, cos_y: torch.Tensor, norms: Optional[torch.Tensor],
               valid: torch.Tensor) -> torch.Tensor:
        if norms is None:
            raise ValueError("adaface needs the feature norms (forward(cosine, labels, norms))")
        safe = norms.detach().float().clamp(0.001, 100.0)
        if self.training:
            with torch.no_grad():
                a = self.t_alpha
                self.batch_mean.mul_(1.0 - a).add_(a * safe.mean())
                if safe.numel() > 1:
                    self.batch_std.mul_(1.0 - a).add_(a * safe.std())
        z = ((safe - self.batch_mean) / (self.batch_std + _EPS) * self.h).clamp(-1.0, 1.0)
        g_angle = -self.m * z
        g_add = self.m * z + self.m
        theta = torch.acos(clamp_cos(cos_y))
        return torch.cos((theta + g_angle).clamp(_EPS, math.pi - _EPS)) - g_add

    def stats(self) -> dict[str, float]:
        return {"adaface_norm_mean": float(self.batch_mean), "adaface_norm_std": float(self.batch_std)}
