"""The shared skeleton of every margin: fp32, the target column, `-1` rows, the scale s.

A margin turns the cosine matrix ``N×C`` into scaled logits. Almost every margin only rewrites
the target column ``cos(theta_y) -> f(theta_y)``; a few (SV-Softmax, CurricularFace) also
re-weight hard negatives. Subclasses implement `target` (and optionally `negatives`); this base
does the bookkeeping once:

* casts the cosines up to fp32 (fp16/bf16 inputs give the same result as their fp32 values);
* rows with ``labels[i] == -1`` (true class outside this Partial FC shard) get no margin at all;
* writes the new target column out of place (`Tensor.scatter`), so autograd is never broken;
* multiplies everything by the scale ``s``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from marginface.errors import UserError

# Cosines are clamped to [-1 + EPS, 1 - EPS] before acos/sqrt so that values *and* gradients stay
# finite at cos = ±1 exactly. 1e-7 rounds to the second fp32 number below 1 (1 - 1.19e-7), so the
# clamp moves theta by < 5e-4 rad and d acos / d cos stays below ~2e3.
EPS = 1e-7


def clamp_cos(cos: torch.Tensor) -> torch.Tensor:
    """cos clamped to [-1 + EPS, 1 - EPS] (safe for acos and sqrt(1 - cos^2))."""
    return cos.clamp(-1.0 + EPS, 1.0 - EPS)


def sin_from_cos(cos: torch.Tensor) -> torch.Tensor:
    """sin(theta) = sqrt(1 - cos^2) for theta in [0, pi], finite gradient at cos = ±1."""
    c = clamp_cos(cos)
    return torch.sqrt(1.0 - c * c)


def arc_margin(cos: torch.Tensor, m: torch.Tensor | float) -> torch.Tensor:
    """insightface's ArcFace target: cos(theta + m) where theta + m <= pi, else cos(theta) - m*sin(m).

    cos(theta + m) = cos*cos(m) - sin(theta)*sin(m). Past theta = pi - m the curve would turn back
    up (no longer monotonic), so insightface switches to a CosFace-like penalty with
    th = cos(pi - m) and mm = sin(pi - m) * m. `m` may be a float or a per-row tensor (MagFace).
    """
    m_t = torch.as_tensor(m, dtype=cos.dtype, device=cos.device)
    c = clamp_cos(cos)
    phi = c * torch.cos(m_t) - torch.sqrt(1.0 - c * c) * torch.sin(m_t)
    th = torch.cos(math.pi - m_t)
    mm = torch.sin(math.pi - m_t) * m_t
    return torch.where(cos > th, phi, cos - mm)


class Margin(nn.Module):
    """Base class: ``forward(cosine N×C, labels N, norms N | None) -> s * logits`` in fp32.

    Subclasses override `target` (the unscaled target logit f(theta_y) for every row; rows with
    label -1 are discarded afterwards) and optionally `negatives`, `extra_loss` and `stats`.
    """

    name: str = ""
    # False: the classifier passes un-normalised logits x . W^T (+ b) instead of cosines (plain_softmax)
    takes_cosines: bool = True

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = float(s)

    # -- hooks -----------------------------------------------------------------------------
    def target(self, cos_y: torch.Tensor, norms: Optional[torch.Tensor],
               valid: torch.Tensor) -> torch.Tensor:
        """Unscaled target logit f(theta_y) (``N``) from the fp32 target cosines ``N``."""
        return cos_y

    def negatives(self, cos: torch.Tensor, f_y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Unscaled logits of the non-target columns (``N×C``; the target column is overwritten)."""
        return cos

    def extra_loss(self, norms: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """An additive loss term (e.g. MagFace's norm regulariser); None when the margin has none."""
        return None

    def stats(self) -> dict[str, float]:
        """Scalars worth logging (EMA statistics, annealing values)."""
        return {}

    # -- the shared forward -----------------------------------------------------------------
    def forward(self, cosine: torch.Tensor, labels: torch.Tensor,
                norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        cos = cosine.float()
        labels = labels.long()
        valid = labels >= 0  # -1: the true class is not among these columns -> no margin
        index = labels.clamp(min=0).unsqueeze(1)
        cos_y = cos.gather(1, index).squeeze(1)
        norms32 = None if norms is None else norms.float()
        f_y = torch.where(valid, self.target(cos_y, norms32, valid), cos_y)
        out = self.negatives(cos, f_y, valid)
        out = out.scatter(1, index, f_y.unsqueeze(1))  # out of place: autograd-safe
        return out * self.s

    def extra_repr(self) -> str:
        keys = [k for k in self.param_names() if hasattr(self, k)]
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in keys)

    @classmethod
    def param_names(cls) -> list[str]:
        """The keyword parameters `build_margin` accepts for this margin."""
        import inspect

        params = inspect.signature(cls.__init__).parameters
        return [p for p in params if p != "self"]


# -- parameter checks (UserError naming the key) --------------------------------------------
def check_number(margin: str, key: str, value: object, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float within [low, high] (or open ends), else a one-line UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"margin {margin!r}: {key} must be a finite number, got {value!r}")
    v = float(value)
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        rng = ("(" if low_open else "[") + f"{lo}, {hi}" + (")" if high_open else "]")
        raise UserError(f"margin {margin!r}: {key} must be in {rng}, got {value!r}")
    return v


def check_bool(margin: str, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"margin {margin!r}: {key} must be true or false, got {value!r}")
    return value


def check_scale(margin: str, s: object) -> float:
    return check_number(margin, "s", s, low=0.0, low_open=True)
