"""``marginface train --dry-run``: build what the real run builds, in the order the trainer builds it,
and summarise it, without training a step or writing a file.

Each check is the trainer's own function (`marginface.train.setup`, `trainer.check_best_metric`), so a
config the dry run accepts starts training, and a config it refuses fails the real run with the same
one-line error: the device and AMP, the loggers, the training data, the validation sets and ``eval.best_metric``,
the backbone, the loss head (+ center loss) and optimizer, the batch order (a ``train.batch_size``
larger than the data), and one real batch through the data pipeline and the backbone.
"""
from __future__ import annotations

from pathlib import Path

import torch

from marginface.config import Config, to_dict
from marginface.data.dataset import FaceDataset, normalize_batch
from marginface.models import count_parameters
from marginface.train import setup
from marginface.train.loggers import check_loggers
from marginface.train.trainer import check_best_metric


def dry_run(cfg: Config, run_dir: Path) -> dict:
    """The summary ``train --dry-run`` prints: ``run_dir``, the resolved ``config``, ``data``, ``images``,
    ``identities``, ``backbone_params``, ``classifier_mb``, ``first_batch`` shapes, ``val`` sets and
    ``best_metric``. Raises the `UserError` the real run would raise."""
    setup.resolve_amp(cfg.train.amp, setup.resolve_device(cfg.train.device))
    check_loggers(cfg.train.loggers)  # train.loggers: [wandb] without the package fails here as in training
    size = cfg.model.input_size
    source = setup.build_train_source(cfg.data, size)
    val_sets = setup.build_val_sets(cfg.data, size)  # missing or unreadable sets fail now
    best_metric = check_best_metric(cfg.eval.best_metric, val_sets)
    backbone = setup.build_model(cfg.model)
    head = setup.build_head(cfg.head, cfg.model.embedding_size, source.num_classes, seed=cfg.train.seed)
    center = setup.build_center_loss(cfg.head, cfg.model.embedding_size, source.num_classes)
    setup.build_optimizer(cfg.optim, backbone, head, center, cfg.head.center_lr, cfg.head.center_weight)
    del head, center
    setup.build_batch_order(cfg, source)  # a batch larger than the data fails here as it does in training
    n = min(cfg.train.batch_size, len(source))
    # the training pipeline: decode + resize to the input size
    dataset = FaceDataset(source, image_size=size, flip=False, skip_bad=cfg.data.skip_bad_images)
    first = torch.stack([dataset[i][0] for i in range(n)])
    with torch.inference_mode():
        emb = backbone.eval()(normalize_batch(first[:2], cfg.data.input_norm))
    return {
        "run_dir": str(run_dir), "config": to_dict(cfg), "data": source.describe(),
        "images": len(source), "identities": source.num_classes,
        "backbone_params": count_parameters(backbone),
        "classifier_mb": source.num_classes * cfg.model.embedding_size * 4 / 2**20,
        "first_batch": {"images": list(first.shape), "embeddings": [n, emb.shape[1]]},
        "val": [{"name": ps.name, "pairs": len(ps)} for ps in val_sets], "best_metric": best_metric,
    }
