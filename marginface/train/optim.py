"""Optimizers by name: `OPTIMIZERS` (name -> builder) is the one list of ``optim.name`` values.

A builder takes the parameter groups and the ``optim`` section (any object with the `OptimConfig`
fields) and returns the torch optimizer. `marginface.train.runconfig.check_components` checks ``optim.name``
against `OPTIMIZERS`, `marginface.train.setup.build_optimizer` builds from it (and re-exports it),
and the command line offers its keys. This module imports nothing of ours but `marginface.errors`
(the package order places it below `config`).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable

import torch

from marginface.errors import UserError


def _sgd(groups: list, cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0, foreach=True)


def _adamw(groups: list, cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


OPTIMIZERS: "MappingProxyType[str, Callable[[list, Any], torch.optim.Optimizer]]" = MappingProxyType({
    "sgd": _sgd,
    "adamw": _adamw,
})


def build(groups: list, cfg: Any) -> torch.optim.Optimizer:
    """``OPTIMIZERS[cfg.name](groups, cfg)``; an unknown name is one line naming ``optim.name``."""
    builder = OPTIMIZERS.get(cfg.name)
    if builder is None:
        raise UserError(f"config key 'optim.name' must be one of {', '.join(OPTIMIZERS)}, got {cfg.name!r}")
    return builder(groups, cfg)
