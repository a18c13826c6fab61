"""Learning-rate schedules as pure functions of the step: warmup, then poly / cosine / step / constant.

Being a pure function of ``step`` makes resume exact: nothing but the step is needed to restore it.
"""
from __future__ import annotations

import math

from marginface.config import ScheduleConfig


def warmup_steps(cfg: ScheduleConfig, steps_per_epoch: int) -> int:
    return cfg.warmup_steps or int(round(cfg.warmup_epochs * steps_per_epoch))


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig, steps_per_epoch: int = 1) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    warm = min(warmup_steps(cfg, steps_per_epoch), max(total_steps - 1, 0))
    if step < warm:
        return (step + 1) / warm  # linear ramp ending at 1.0
    span = max(total_steps - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    floor = cfg.min_lr
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "poly":
        return floor + (1.0 - floor) * (1.0 - progress) ** cfg.power
    if cfg.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.name == "step":
        # milestones <= 1 are fractions of training, larger ones are step numbers
        passed = sum(1 for m in cfg.milestones if step >= (m * total_steps if m <= 1 else m))
        return cfg.gamma ** passed
    raise ValueError(f"unknown schedule {cfg.name!r}")
