"""Build the pieces of a run from a Config: device, AMP dtype, data, backbone, head, optimizer.

The loss head comes from the one head builder, `marginface.heads.build_loss_head` (`build_head`
passes it the ``head`` section); the optimizer from the `OPTIMIZERS` registry.

Each builder takes exactly the config sections it needs, so the library can be used piecewise.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch import nn

from marginface.config import Config, DataConfig, HeadConfig, ModelConfig, OptimConfig
from marginface.data.detect import build_detector
from marginface.data.sources import open_train_source
from marginface.data.synthetic import SyntheticSource, synthetic_pair_set
from marginface.data.verification import load_pair_set
from marginface.errors import UserError
from marginface import inference
from marginface.hardware import has_fast_bf16
from marginface.heads import LossHead, build_loss_head
from marginface.heads.center import CenterLoss
from marginface.models import build_backbone
from marginface.models.pretrained import load_pretrained
from marginface.train import optim
from marginface.train.batches import BatchOrder

OPTIMIZERS = optim.OPTIMIZERS  # name -> builder: the registry of optim.name (defined in train/optim.py, below config)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """``train.device`` -> the device (`marginface.inference.resolve_device`, the one resolver)."""
    return inference.resolve_device(name, "config key 'train.device'")


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``train.amp`` on ``device`` (None = plain fp32)."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("config key 'train.amp' = fp16 needs CUDA; use bf16 or none on CPU")
        return torch.float16
    # auto
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if has_fast_bf16() else None


def build_model(cfg: ModelConfig) -> nn.Module:
    """The backbone; only non-default options are passed so every family accepts the call."""
    kw = {}
    if cfg.width_mult != 1.0:
        kw["width_mult"] = cfg.width_mult
    if cfg.dropout:
        kw["dropout"] = cfg.dropout
    if cfg.gradient_checkpointing:
        kw["gradient_checkpointing"] = True
    model = build_backbone(cfg.backbone, embedding_size=cfg.embedding_size, input_size=cfg.input_size, **kw)
    if cfg.pretrained:  # any weights file of this backbone, strictly (marginface.models.pretrained)
        load_pretrained(model, cfg.pretrained, cfg.backbone)
    return model


def build_head(cfg: HeadConfig, embedding_size: int, num_classes: int, *, rank: int = 0, world_size: int = 1,
               seed: int = 0) -> LossHead:
    """`marginface.heads.build_loss_head` with the ``head`` section's options (it picks Partial FC)."""
    return build_loss_head(cfg.loss, embedding_size, num_classes, cfg.params, **head_options(cfg),
                           rank=rank, world_size=world_size, seed=seed)


def head_options(cfg: HeadConfig) -> dict:
    """The keyword options of `build_loss_head` the ``head`` section sets."""
    return {"num_subcenters": cfg.num_subcenters, "focal_gamma": cfg.focal_gamma, "sample_rate": cfg.sample_rate,
            "shard_dtype": cfg.shard_dtype, "compute_dtype": cfg.compute_dtype}


def build_center_loss(cfg: HeadConfig, embedding_size: int, num_classes: int) -> Optional[nn.Module]:
    if cfg.center_weight <= 0:
        return None
    return CenterLoss(num_classes, embedding_size)


def head_lr(cfg: OptimConfig) -> float:
    """The classifier's base learning rate: ``optim.lr_head``, or ``optim.lr`` when it is not set."""
    lr_head = getattr(cfg, "lr_head", None)  # a hand-made optim section may predate the key
    return cfg.lr if lr_head is None else lr_head


def build_optimizer(cfg: OptimConfig, backbone: nn.Module, head: nn.Module, center: Optional[nn.Module],
                    center_lr: float = 0.5, center_weight: float = 0.0) -> torch.optim.Optimizer:
    """Param groups: backbone (lr x backbone_lr_scale), classifier (``optim.lr_head``, default lr; a
    Partial FC shard is the classifier too), center-loss centres.

    The centres' gradient arrives scaled by ``center_weight``; their group uses
    ``center_lr / center_weight`` so the centre update rate is ``center_lr`` as in Wen et al.

    Each group remembers its base lr in ``initial_lr`` so the schedule can rescale it every step.
    """
    groups = [
        {"params": [p for p in backbone.parameters()], "lr": cfg.lr * cfg.backbone_lr_scale, "name": "backbone"},
        {"params": [p for p in head.parameters()], "lr": head_lr(cfg), "name": "head"},
    ]
    if center is not None:
        groups.append({"params": list(center.parameters()), "lr": center_lr / max(center_weight, 1e-12),
                       "weight_decay": 0.0, "name": "center"})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return optim.build(groups, cfg)  # OPTIMIZERS[optim.name]; an unknown name is one line naming the key


def build_train_source(cfg: DataConfig, image_size: int):
    """The training source named by ``data.train``: "synthetic" or a path (RecordIO, folder, list)."""
    if cfg.train == "synthetic":
        s = cfg.synthetic
        return SyntheticSource(s.identities, s.images_per_identity, image_size=image_size, seed=s.seed)
    return open_train_source(cfg)  # data.train + data.train_list / train_landmarks / train_boxes


def build_batch_order(cfg: Config, source, *, rank: int = 0, world_size: int = 1):
    """The `BatchOrder` of a run; a batch larger than the training data is one line naming the keys."""
    t = cfg.train
    n = len(source)
    if n < t.batch_size * world_size:
        ranks = f" x {world_size} processes" if world_size > 1 else ""
        raise UserError(f"config key 'train.batch_size' = {t.batch_size}{ranks} is larger than the training data "
                        f"({n} images in data.train={cfg.data.train}); lower train.batch_size")
    try:
        return BatchOrder(n, t.batch_size, t.seed, rank=rank, world_size=world_size, flip=cfg.data.flip,
                          labels=source.labels, samples_per_identity=cfg.data.samples_per_identity)
    except ValueError as exc:  # P x K batches the data or the batch size cannot make
        raise UserError(f"config keys 'train.batch_size' / 'data.samples_per_identity': {exc}") from None


def build_val_sets(cfg: DataConfig, image_size: int) -> list:
    """The verification pair sets named by ``data.val`` (``synthetic`` = held-out identities)."""
    detector = None
    if cfg.val_align == "detect" and any(spec != "synthetic" for spec in cfg.val):  # no sets, no detector
        detector = build_detector("mtcnn")
    sets = []
    for spec in cfg.val:
        if spec == "synthetic":
            s = cfg.synthetic
            sets.append(synthetic_pair_set(s.val_identities, s.val_images_per_identity, s.val_pairs,
                                           image_size=image_size, seed=s.seed))
        else:
            sets.append(load_pair_set(spec, image_size=image_size, detector=detector,
                                      sample_pairs=cfg.val_sample_pairs, seed=cfg.synthetic.seed,
                                      pairs_file=cfg.val_pairs, landmarks=cfg.val_landmarks,
                                      file_labels=("config key 'data.val_pairs'", "config key 'data.val_landmarks'")))
    names = [p.name for p in sets]
    if len(set(names)) != len(names):
        raise UserError(f"config key 'data.val' names two sets the same: {names}")
    return sets


def describe_run(cfg: Config) -> str:
    return (f"{cfg.model.backbone} (emb {cfg.model.embedding_size}, {cfg.model.input_size}px) + "
            f"{cfg.head.loss} on {cfg.data.train}")
