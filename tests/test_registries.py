"""Registries are the single source of names: config validation, the command line's choices and
these tests all read the same mappings, so a new entry is accepted everywhere at once and a wrong
name is one line naming the config key."""
import math

import pytest
import torch

from marginface.train.runconfig import load_config
from marginface.data.transforms import NORMALIZATIONS
from marginface.errors import UserError
from marginface.heads.factory import PAIR_LOSSES
from marginface.heads.margins import MARGINS
from marginface.heads.partial_fc import DTYPES, SHARD_DTYPES
from marginface.models.registry import BACKBONES
from marginface.train.schedule import SCHEDULES, lr_factor
from marginface.train.setup import OPTIMIZERS, build_optimizer

# config key -> (registry, extra overrides every name needs)
KEYS = {
    "model.backbone": (BACKBONES, []),
    "head.loss": ({**MARGINS, **PAIR_LOSSES}, ["data.samples_per_identity=4"]),
    "data.input_norm": (NORMALIZATIONS, []),
    "optim.name": (OPTIMIZERS, []),
    "schedule.name": (SCHEDULES, []),
    "head.compute_dtype": (DTYPES, []),
    "head.shard_dtype": (SHARD_DTYPES, []),
}
CASES = [(key, name) for key, (registry, _) in KEYS.items() for name in registry]


def _get(cfg, key):
    section, field = key.split(".")
    return getattr(getattr(cfg, section), field)


@pytest.mark.parametrize("key, name", CASES, ids=[f"{k}={n}" for k, n in CASES])
def test_config_accepts_every_registered_name(key, name):
    cfg = load_config(None, [f"{key}={name}", *KEYS[key][1]])
    assert _get(cfg, key) == name


@pytest.mark.parametrize("key", list(KEYS))
def test_config_rejects_an_unregistered_name_naming_the_key(key):
    with pytest.raises(UserError) as info:
        load_config(None, [f"{key}=no_such_thing", *KEYS[key][1]])
    message = str(info.value)
    assert f"'{key}'" in message and "no_such_thing" in message and "\n" not in message
    registry = KEYS[key][0]
    assert all(name in message for name in registry)  # the message lists the valid names


def test_every_registry_is_non_empty_and_names_are_strings():
    for registry, _ in KEYS.values():
        assert len(registry) and all(isinstance(n, str) and n for n in registry)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_is_a_factor_in_0_1(name):
    cfg = load_config(None, [f"schedule.name={name}", "schedule.milestones=[0.8]"]).schedule
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert all(math.isfinite(f) and 0.0 <= f <= 1.0 + 1e-12 for f in factors)
    assert factors[cfg.warmup_steps] == pytest.approx(1.0)  # warmup ends at the base lr


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds(name):
    cfg = load_config(None, [f"optim.name={name}"])
    net, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)
    opt = build_optimizer(cfg.optim, net, head, None)
    assert isinstance(opt, torch.optim.Optimizer) and len(opt.param_groups) == 2


def test_unknown_optimizer_is_an_error_not_adamw():
    cfg = load_config(None)
    cfg.optim.name = "adam"  # e.g. a library user's Config built by hand, never validated
    with pytest.raises(UserError, match=r"config key 'optim.name' must be one of sgd, adamw, got 'adam'"):
        build_optimizer(cfg.optim, torch.nn.Linear(2, 2), torch.nn.Linear(2, 3), None)


def test_unknown_schedule_is_an_error():
    cfg = load_config(None).schedule
    cfg.name = "linear"
    with pytest.raises(UserError, match=r"config key 'schedule.name' must be one of"):
        lr_factor(60, 100, cfg)


def test_compiled_precisions_are_a_subset_of_inference_precisions():
    from marginface.deploy.compiled import PRECISIONS as COMPILED
    from marginface.inference import PRECISIONS

    assert COMPILED and set(COMPILED) <= set(PRECISIONS)


def test_one_device_resolver():
    from marginface.inference import resolve_device
    from marginface.train.setup import resolve_device as train_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"^--device is not a device: 'gpu0'$"):
        resolve_device("gpu0", "--device")
    with pytest.raises(UserError, match=r"^config key 'train.device' is not a device: 'gpu0'$"):
        train_device("gpu0")


def test_one_top_k_search_serves_the_gallery():
    import numpy as np

    from marginface.deploy import gallery_store
    from marginface.evaluate import identification

    assert gallery_store.top_k_cosine is identification.top_k_cosine
    rng = np.random.default_rng(0)
    g = rng.standard_normal((50, 8)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g[7] = g[3]  # a tie: the lower index comes first
    idx, sims = identification.top_k_cosine(g, g[[3]], 3, chunk_size=16)
    assert idx[0, :2].tolist() == [3, 7] and sims[0, 0] == pytest.approx(1.0, abs=1e-6)
    full = np.argsort(-(g[[3]] @ g.T), kind="stable")[0, :3]
    assert idx[0].tolist() == full.tolist()
    empty_idx, _ = identification.top_k_cosine(g[:0], g[:2], 5)
    assert empty_idx.shape == (2, 0)


def test_every_logger_name_is_accepted_and_a_wrong_one_names_the_key():
    from marginface.train.loggers import LOGGERS

    for name in LOGGERS:  # names only: whether wandb is installed is checked when a run starts
        assert load_config(None, [f"train.loggers=[{name}]"]).train.loggers == [name]
    with pytest.raises(UserError, match=r"config key 'train.loggers' must name loggers among tensorboard, wandb"):
        load_config(None, ["train.loggers=[no_such_thing]"])
