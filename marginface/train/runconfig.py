"""Loading a run's config: `marginface.config` resolves and checks what the config alone can tell;
this module then checks every component name against the registry that owns it (the CLI's
``choices`` and tests/test_registries.py read the same registries) and lets the loss head check
its own parameters. It sits here, above data/models/heads and the training registries, so that
`marginface.config` stays the lowest package (it imports nothing of ours but errors and io)."""
from __future__ import annotations

import typing
from typing import Optional

from marginface.config import Config, resolve_config, resolve_dict
from marginface.data.transforms import NORMALIZATIONS
from marginface.errors import UserError
from marginface.heads import build_loss_head, loss_head_names
from marginface.heads.partial_fc import DTYPES, SHARD_DTYPES
from marginface.models.registry import BACKBONES
from marginface.train.loggers import check_loggers
from marginface.train.optim import OPTIMIZERS
from marginface.train.schedule import SCHEDULES


def load_config(path: Optional[str] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The resolved config: defaults <- file <- ``key=value`` overrides, validated in full."""
    return check_components(resolve_config(path, overrides))


def config_from_dict(data: dict, overrides: typing.Sequence[str] = (), where: str = "") -> Config:
    """`load_config` of an already-read mapping (e.g. the config a checkpoint holds)."""
    return check_components(resolve_dict(data, overrides, where))


def check_components(cfg: Config) -> Config:
    """``cfg`` when every component it names exists (else one `UserError` naming the key and the
    valid names) and the loss head accepts its parameters."""
    for key, value, names in (("model.backbone", cfg.model.backbone, list(BACKBONES)),
                              ("head.loss", cfg.head.loss, loss_head_names()),
                              ("optim.name", cfg.optim.name, list(OPTIMIZERS)),
                              ("schedule.name", cfg.schedule.name, list(SCHEDULES)),
                              ("head.shard_dtype", cfg.head.shard_dtype, list(SHARD_DTYPES)),
                              ("head.compute_dtype", cfg.head.compute_dtype, list(DTYPES)),
                              ("data.input_norm", cfg.data.input_norm, list(NORMALIZATIONS))):
        if value not in names:
            raise UserError(f"config key '{key}' must be one of {', '.join(names)}, got {value!r}")
    check_loggers(cfg.train.loggers, imports=False)  # names only: the trainer checks that wandb is installed
    h = cfg.head  # the loss head checks its own parameters (names and values) and says which are valid
    build_loss_head(h.loss, 8, 2, h.params, num_subcenters=h.num_subcenters, focal_gamma=h.focal_gamma,
                    sample_rate=h.sample_rate, shard_dtype=h.shard_dtype, compute_dtype=h.compute_dtype)
    return cfg
