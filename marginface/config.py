"""Typed configuration: dataclasses, YAML/.py loading, dotted overrides, one-line errors.

The defaults ARE the built-in synthetic recipe (``configs/synthetic_mbf.yaml`` spells them out),
so ``marginface train`` with no arguments runs it. Every key is checked: an unknown key fails
naming the nearest valid one, a value of the wrong type fails naming the key and the type.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import runpy
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import math

import yaml

from marginface.errors import UserError
from marginface.io.textfiles import read_text

AMP_MODES = ("auto", "none", "bf16", "fp16")  # train.amp (auto: bf16 on CPUs that have it, fp16 on CUDA)
VAL_ALIGN = ("auto", "detect")  # data.val_align


@dataclass
class ModelConfig:
    backbone: str = "mbf"
    embedding_size: int = 512
    input_size: int = 64
    width_mult: float = 0.5
    dropout: float = 0.0
    pretrained: Optional[str] = None  # local torchvision-format state_dict (resnet50)
    gradient_checkpointing: bool = False


@dataclass
class HeadConfig:
    loss: str = "arcface"  # a margin (arcface, cosface, ...) or a pair loss (pair_bce); was head.margin
    params: dict = field(default_factory=dict)  # the margin's own parameters (s, m, ...): see docs/losses.md
    sample_rate: float = 1.0  # Partial FC: fraction of negative classes per step (1.0 = every class)
    shard_dtype: str = "fp32"  # Partial FC: storage of the classifier shard + its optimizer state (fp32 | bf16)
    compute_dtype: str = "fp32"  # Partial FC: dtype of the cosine matmul (fp32 | fp16 | bf16)
    num_subcenters: int = 1
    focal_gamma: float = 0.0
    center_weight: float = 0.0  # > 0 adds center loss (Wen et al. 2016)
    center_lr: float = 0.5

    @property
    def margin(self) -> str:
        """The old name of `loss` (``head.margin`` in files, ``--set`` and old checkpoints still works)."""
        return self.loss

    @margin.setter
    def margin(self, value: str) -> None:
        self.loss = value


@dataclass
class SyntheticConfig:
    identities: int = 1000
    images_per_identity: int = 20
    val_identities: int = 300
    val_images_per_identity: int = 6
    val_pairs: int = 3000
    seed: int = 0


@dataclass
class DataConfig:
    train: str = "synthetic"  # a path (RecordIO dir/.rec, image folder, list .txt) or "synthetic"
    val: list = field(default_factory=lambda: ["synthetic"])  # pair sets: .bin, LFW dir, pairs .csv, "synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    num_workers: int = 2
    flip: bool = True
    input_norm: str = "arcface"  # pixel normalisation: arcface ((x-127.5)/127.5) | imagenet; was data.normalize
    skip_bad_images: bool = True
    samples_per_identity: int = 0  # K > 0: batches of P identities x K images (pair losses); 0 = random
    val_sample_pairs: int = 2000  # an identity folder in data.val: sample this many balanced pairs from it
    val_align: str = "auto"  # LFW dirs: auto = landmarks.txt if present, else as is; detect = MTCNN + align
    # files of a dataset kept outside its folder conventions (None = the convention; docs/datasets.md)
    train_list: Optional[str] = None  # VGGFace2 list (default data.train/train_list.txt or meta/train_list.txt)
    train_landmarks: Optional[str] = None  # VGGFace2 loose_landmark_train.csv, or its folder (bb_landmark/)
    train_boxes: Optional[str] = None  # VGGFace2 loose_bb_train.csv, or its folder
    val_pairs: Optional[str] = None  # pairs.txt of the LFW image directory in data.val (default: DIR/pairs.txt)
    val_landmarks: Optional[str] = None  # its landmark file (default: DIR/landmarks.txt when present)

    @property
    def normalize(self) -> str:
        """The old name of `input_norm` (``data.normalize`` in files, ``--set`` and old checkpoints still works)."""
        return self.input_norm

    @normalize.setter
    def normalize(self, value: str) -> None:
        self.input_norm = value


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lr_head: Optional[float] = None  # the classifier's (Partial FC shards too) base lr; None = lr
    backbone_lr_scale: float = 1.0  # fine-tuning: the backbone learns at lr * scale
    clip_grad_norm: float = 5.0  # 0 disables clipping


@dataclass
class ScheduleConfig:
    name: str = "poly"  # poly | cosine | step | constant
    warmup_steps: int = 50
    warmup_epochs: float = 0.0  # used when warmup_steps is 0
    power: float = 2.0  # poly
    milestones: list = field(default_factory=list)  # step: fractions of training (0..1) or step numbers
    gamma: float = 0.1  # step
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: float = 4.0
    max_steps: Optional[int] = None  # stop after N steps; overrides epochs
    batch_size: int = 128
    grad_accum: int = 1
    amp: str = "auto"  # auto | none | bf16 | fp16 (auto: bf16 on CPUs that have it, fp16 on CUDA)
    channels_last: bool = True
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions (Ampere and newer)
    cudnn_benchmark: bool = True  # CUDA: cuDNN times its convolution algorithms once (fixed input size)
    compile: bool = False  # torch.compile the backbone (inductor; compile time: docs/performance.md)
    fast_layers: bool = True  # CPU: PReLU with a fast backward, grouped convs fp32 under bf16 (models/layers.py)
    cpu_keep_memory: bool = True  # CPU: glibc keeps freed memory during fit (no page faults per step)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    deterministic: bool = False
    freeze_backbone_epochs: float = 0.0
    log_every: int = 20
    checkpoint_every: int = 200  # steps; last.pt is also written at every eval and at the end
    snapshot_every: int = 0  # steps between RUN/snapshots/step_NNNNNN.pt; 0 = none (see keep_snapshots)
    keep_snapshots: int = 0  # keep the newest N snapshots (0 = all); alone: a snapshot every checkpoint_every
    loggers: list = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb (log.jsonl always)
    wandb_project: str = ""  # "" = $WANDB_PROJECT, else "marginface"
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops


@dataclass
class EvalConfig:
    every: int = 200  # steps between evaluations; 0 = only at the end
    flip: bool = True
    batch_size: int = 256
    best_metric: str = ""  # "<set>/<metric>", e.g. "lfw/accuracy" or "cfp_fp/tar@1e-3"; "" = first set's accuracy
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0 = never


@dataclass
class Config:
    name: str = "synthetic_mbf"
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with checking


def to_dict(cfg: Any) -> dict:
    """A plain nested dict (YAML/JSON-ready) of a config dataclass."""
    return dataclasses.asdict(cfg)


def _all_keys(cls: type, prefix: str = "") -> list:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, prefix + f.name + ".")
    return keys


def _unknown_key(key: str, where: str) -> UserError:
    near = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return UserError(f"{where}unknown config key '{key}'{hint}")


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``hint``; a clear error names the key."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], key, where)
    expect = origin or hint
    bad = UserError(f"{where}config key '{key}' expects {getattr(expect, '__name__', expect)}, got {value!r}")
    if expect is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise bad
    if expect is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if expect is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if expect is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if expect is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):  # a single path given on the command line
            return [value]
        raise bad
    if expect is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    return value


# Renamed keys: old dotted key -> new one. Config files, ``--set`` overrides and the configs saved in
# older checkpoints and run directories may use the old name; it is read as the new one, with a
# one-line notice on stderr (once per key and process). Giving both with different values is an error.
RENAMED_KEYS = {"head.margin": "head.loss", "data.normalize": "data.input_norm"}
_NOTIFIED: set = set()


def _rename_notice(old: str, new: str, where: str) -> None:
    if old not in _NOTIFIED:
        _NOTIFIED.add(old)
        print(f"warning: {where}config key '{old}' is deprecated; it is read as '{new}' (rename it)",
              file=sys.stderr, flush=True)


def renamed_key(key: str, where: str = "") -> str:
    """The current name of dotted ``key`` (``head.margin`` -> ``head.loss``, with the notice)."""
    new = RENAMED_KEYS.get(key)
    if new is None:
        return key
    _rename_notice(key, new, where)
    return new


def migrate_renamed(data: Any, where: str = "") -> Any:
    """A copy of a top-level config mapping with renamed keys under their current names."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for old, new in RENAMED_KEYS.items():
        section, old_name = old.split(".")
        new_name = new.split(".")[1]
        body = out.get(section)
        if not isinstance(body, dict) or old_name not in body:
            continue
        body = dict(body)
        value = body.pop(old_name)
        if new_name in body and body[new_name] != value:
            raise UserError(f"{where}config keys '{old}' (the old name) and '{new}' are both given, with different "
                            f"values ({value!r}, {body[new_name]!r}); keep only '{new}'")
        _rename_notice(old, new, where)
        body.setdefault(new_name, value)
        out[section] = body
    return out


def from_dict(cls: type, data: dict, prefix: str = "", where: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) nested dict; every key and type is checked.
    Renamed keys (`RENAMED_KEYS`) are read under their new names."""
    if not isinstance(data, dict):
        raise UserError(f"{where}config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    if cls is Config and not prefix:
        data = migrate_renamed(data, where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise _unknown_key(full, where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, full + ".", where)
        else:
            kwargs[key] = _coerce(value, hint, full, where)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# YAML: plain data only

MAX_YAML_DEPTH = 32  # sections are 2 deep; params/lists add a few. 50k nested lists overflowed the stack
MAX_YAML_NODES = 100_000


class _PlainYAMLError(yaml.YAMLError):
    def __init__(self, message: str, mark=None):
        super().__init__(message)
        self.problem, self.problem_mark = message, mark


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for configs: no aliases (``*name``: a "billion laughs" file expands to
    billions of strings once walked), no explicit tags (``!!binary``, ``!!python/...``), at most
    `MAX_YAML_DEPTH` levels of nesting and `MAX_YAML_NODES` nodes."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _PlainYAMLError(f"aliases (*{event.anchor}) are not allowed in a config", event.start_mark)
        tag = getattr(event, "tag", None)  # None unless the text wrote one
        if tag is not None:
            raise _PlainYAMLError(f"YAML tags ({tag}) are not allowed; write plain values",
                                  event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        self._nodes = getattr(self, "_nodes", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _PlainYAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
            if self._nodes > MAX_YAML_NODES:
                raise _PlainYAMLError(f"more than {MAX_YAML_NODES} values", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _safe_yaml(text: str, where: str, refused_only: bool = False):
    """Plain YAML data from ``text`` (see `_ConfigLoader`); errors name ``where`` and the line.
    With ``refused_only``, YAML syntax errors propagate (as ``yaml.YAMLError``) and only what
    `_ConfigLoader` refuses becomes a `UserError`."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        if refused_only and not isinstance(exc, _PlainYAMLError):
            raise
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark and not refused_only else ""
        raise UserError(f"{where}:{line} invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise UserError(f"{where}: invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple:
    """``"optim.lr=0.05"`` -> ``("optim.lr", 0.05)``; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like key=value (e.g. optim.lr=0.05)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{text}' has an empty key")
    try:
        value = _safe_yaml(raw, f"--set {key}", refused_only=True) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: the string itself (a path with odd characters, say)
    return key, value


def _check_override_key(key: str) -> None:
    """Dotted keys must exist, except below free-form dict fields such as ``head.params``."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise _unknown_key(key, "")
        hint = hints[part]
        if dataclasses.is_dataclass(hint):
            cls = hint
            continue
        if hint is dict or typing.get_origin(hint) is dict:
            return  # free-form below here; validated by its consumer (e.g. build_margin)
        if i != len(parts) - 1:
            raise _unknown_key(key, "")


def read_config_file(path: str) -> dict:
    """Load a YAML file, or a Python file defining ``config`` (a dict or a ``Config``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    if p.suffix == ".py":
        try:
            ns = runpy.run_path(str(p))
        except Exception as exc:  # a user's Python file: report its failure on one line
            raise UserError(f"{path}: failed to run config file: {exc}") from None
        if "config" not in ns:
            raise UserError(f"{path}: a Python config must define a variable named 'config'")
        data = ns["config"]
        return to_dict(data) if dataclasses.is_dataclass(data) else data
    data = _safe_yaml(read_text(p, "config file"), str(path)) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of config sections")
    return data


def resolve_config(path: Optional[str] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- file <- ``key=value`` overrides, checked for everything the config alone can tell
    (types, ranges, cross-field rules). Names of components (backbone, loss, optimizer, ...) are
    checked against their registries one layer up: `marginface.train.runconfig.load_config`."""
    data = read_config_file(path) if path else {}
    return resolve_dict(data, overrides, where=f"{path}: " if path else "")


def resolve_dict(data: dict, overrides: typing.Sequence[str] = (), where: str = "") -> Config:
    """`resolve_config` of an already-read mapping (e.g. the config a checkpoint holds)."""
    data = migrate_renamed(copy.deepcopy(data), where)  # old key names -> new, so an override of either wins
    # check the file alone first so its errors name the file
    _check_values(from_dict(Config, data, where=where), where)
    for text in overrides:
        key, value = parse_override(text)
        key = renamed_key(key, "--set: ")
        _check_override_key(key)
        _set_dotted(data, key, value)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


# Every int key must lie in [lo, hi]: a batch of 1e18 or an embedding of 2e9 otherwise reaches the
# allocator. Keys not listed: 0 .. INT_MAX. Every float key must be finite.
INT_MAX = 2**31 - 1
INT_RANGES = {
    "model.embedding_size": (1, 65536),
    "model.input_size": (16, 1024),
    "head.num_subcenters": (1, 64),
    "data.num_workers": (0, 256),
    "train.batch_size": (1, 1 << 20),
    "train.grad_accum": (1, 4096),
    "eval.batch_size": (1, 1 << 20),
    "data.synthetic.identities": (1, 10_000_000),
    "data.synthetic.images_per_identity": (1, 100_000),
    "data.synthetic.val_identities": (0, 10_000_000),
    "data.synthetic.val_images_per_identity": (0, 100_000),
}
FLOAT_RANGES = {
    "model.width_mult": (1e-3, 16.0),
    "train.epochs": (0.0, 1e6),
}


def _check_values(cfg: "Config", where: str = "") -> None:
    """Range checks for every numeric key and the run name; messages start with ``where``."""
    try:
        _check_numbers(cfg)
        name = str(cfg.name)
        if not name.strip() or Path(name).is_absolute() or ".." in Path(name).parts or "\0" in name:
            raise UserError(f"config key 'name' must be a plain run name (the run goes to runs/<name>; pass --out "
                            f"for another place), got {name!r}")
    except UserError as exc:
        raise UserError(f"{where}{exc}") from None


def _check_numbers(obj: Any, prefix: str = "") -> None:
    """Range checks for every numeric key (see `INT_RANGES`, `FLOAT_RANGES`)."""
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_numbers(value, key + ".")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            lo, hi = INT_RANGES.get(key, (0, INT_MAX))
            if not lo <= value <= hi:
                raise UserError(f"config key '{key}' must be an integer in {lo}..{hi}, got {value}")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise UserError(f"config key '{key}' must be a finite number, got {value}")
            lo, hi = FLOAT_RANGES.get(key, (-math.inf, math.inf))
            if not lo <= value <= hi:
                raise UserError(f"config key '{key}' must be in [{lo:g}, {hi:g}], got {value:g}")


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express (component names: see `resolve_config`)."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)


    def one_of(key: str, value: str, names) -> None:
        need(value in names, f"config key '{key}' must be one of {', '.join(names)}, got {value!r}")

    need(cfg.train.batch_size >= 1, f"config key 'train.batch_size' must be >= 1, got {cfg.train.batch_size}")
    need(cfg.train.grad_accum >= 1, f"config key 'train.grad_accum' must be >= 1, got {cfg.train.grad_accum}")
    need(cfg.train.log_every >= 1, f"config key 'train.log_every' must be >= 1, got {cfg.train.log_every}")
    need(cfg.train.checkpoint_every >= 1,
         f"config key 'train.checkpoint_every' must be >= 1, got {cfg.train.checkpoint_every}")
    need(cfg.optim.lr > 0, f"config key 'optim.lr' must be > 0, got {cfg.optim.lr}")
    need(cfg.optim.lr_head is None or cfg.optim.lr_head > 0,
         f"config key 'optim.lr_head' must be > 0 (or null: optim.lr), got {cfg.optim.lr_head}")
    need(all(isinstance(n, str) for n in cfg.train.loggers),
         f"config key 'train.loggers' must be a list of names, got {cfg.train.loggers!r}")
    need(len(set(cfg.train.loggers)) == len(cfg.train.loggers),
         f"config key 'train.loggers' names a logger twice: {cfg.train.loggers}")
    _check_values(cfg)
    one_of("data.val_align", cfg.data.val_align, VAL_ALIGN)
    one_of("train.amp", cfg.train.amp, AMP_MODES)
    need(0.0 < cfg.head.sample_rate <= 1.0, f"config key 'head.sample_rate' must be in (0, 1], got {cfg.head.sample_rate}")
    need(cfg.model.input_size % 8 == 0 and cfg.model.input_size >= 16,
         f"config key 'model.input_size' must be a multiple of 8 (>= 16), got {cfg.model.input_size}")
    need(cfg.train.max_steps is None or cfg.train.max_steps >= 1,
         f"config key 'train.max_steps' must be >= 1, got {cfg.train.max_steps}")
    need(cfg.train.epochs > 0 or cfg.train.max_steps, "config key 'train.epochs' must be > 0 (or set train.max_steps)")
    need(cfg.head.loss not in ("pair_bce", "triplet", "contrastive") or cfg.data.samples_per_identity >= 2,
         f"head.loss = {cfg.head.loss} needs positive pairs in each batch: set data.samples_per_identity >= 2 (e.g. 4)")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
