"""Learning-rate schedules as pure functions of the step: warmup, then poly / cosine / step / constant.

Being a pure function of ``step`` makes resume exact: nothing but the step is needed to restore it.

`SCHEDULES` (name -> factor function) is the one list of schedule names: ``schedule.name`` is
checked against it by `marginface.train.runconfig`, the command line offers its keys, and the
tests run every entry. This module imports nothing of ours but `marginface.errors` (the package
order places it beside the building blocks, below `config`, which reads `SCHEDULES`); ``cfg`` is
any object with the `ScheduleConfig` fields.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Callable

from marginface.errors import UserError


def warmup_steps(cfg: Any, steps_per_epoch: int) -> int:
    return cfg.warmup_steps or int(round(cfg.warmup_epochs * steps_per_epoch))


def _constant(step: int, total_steps: int, progress: float, cfg: Any) -> float:
    return 1.0


def _poly(step: int, total_steps: int, progress: float, cfg: Any) -> float:
    return cfg.min_lr + (1.0 - cfg.min_lr) * (1.0 - progress) ** cfg.power


def _cosine(step: int, total_steps: int, progress: float, cfg: Any) -> float:
    return cfg.min_lr + (1.0 - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _step(step: int, total_steps: int, progress: float, cfg: Any) -> float:
    # milestones <= 1 are fractions of training, larger ones are step numbers
    passed = sum(1 for m in cfg.milestones if step >= (m * total_steps if m <= 1 else m))
    return cfg.gamma ** passed


# name -> f(step, total_steps, progress after warmup in [0, 1], cfg) -> factor of the base lr
SCHEDULES: "MappingProxyType[str, Callable[[int, int, float, Any], float]]" = MappingProxyType({
    "poly": _poly,
    "cosine": _cosine,
    "step": _step,
    "constant": _constant,
})


def lr_factor(step: int, total_steps: int, cfg: Any, steps_per_epoch: int = 1) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    schedule = SCHEDULES.get(cfg.name)
    if schedule is None:
        raise UserError(f"config key 'schedule.name' must be one of {', '.join(SCHEDULES)}, got {cfg.name!r}")
    warm = min(warmup_steps(cfg, steps_per_epoch), max(total_steps - 1, 0))
    if step < warm:
        return (step + 1) / warm  # linear ramp ending at 1.0
    span = max(total_steps - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    return schedule(step, total_steps, progress, cfg)
