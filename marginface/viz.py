"""2-D feature visualisation: how plain softmax and softmax + center loss separate identities.

The classic picture of Wen et al. 2016 ("A Discriminative Feature Learning Approach for Deep Face
Recognition", their Fig. 3 on MNIST): a network whose embedding has only 2 dimensions is trained
on a few identities twice, from the same initial weights and the same batches, once with the plain
(un-normalised) softmax and once with softmax + center loss. Softmax alone separates the classes
into long radial wedges (only the angle matters to the decision); the center loss pulls each class
onto its centre, so the clusters become compact.

``run_viz(out_dir)`` (the ``marginface viz`` command) trains both on procedural synthetic
identities (``marginface.data.synthetic``) with a small ``mbf``, and writes

* ``softmax.png``, ``softmax_center.png``: the 2-D training features, one colour per identity;
* ``comparison.png``: both side by side;
* with ``gif=True``: ``softmax.gif`` / ``softmax_center.gif``, the features every
  ``snapshot_every`` steps (how the classes separate during training);
* ``viz.json``: the options and, per run, ``compactness`` = mean distance of a feature to its
  class centroid / mean distance between class centroids (lower = tighter clusters).

Rendering uses matplotlib's Agg backend (no display needed).

Training pieces: the optimizer comes from the trainer's `marginface.train.setup.build_optimizer`
(the same param groups and centre-loss learning rate) and the learning rate from its schedule
(`marginface.train.schedule.lr_factor`, cosine without warmup); the head from
`marginface.heads.build_head`. The loop itself is not `marginface.train.trainer.Trainer`, on
purpose: the figure needs two runs from identical initial weights and identical batches that
differ only in the loss, a feature snapshot every few steps for the GIF, a centre-loss weight
ramped in over the first half (centres start at 0 and would collapse the classes), and no run
directory, checkpoints or evaluation sets; the Trainer owns all of those the other way round.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from marginface.config import OptimConfig, ScheduleConfig
from marginface.data.dataset import normalize_batch
from marginface.data.synthetic import SyntheticSource
from marginface.errors import UserError
from marginface.heads import CenterLoss, build_head
from marginface.io.atomic import atomic_write, atomic_write_json, ensure_dir
from marginface.models import build_backbone
from marginface.train.schedule import lr_factor
from marginface.train.setup import build_optimizer


@dataclass
class VizOptions:
    identities: int = 10
    images_per_identity: int = 24
    steps: int = 240
    batch_size: int = 64
    input_size: int = 32
    width_mult: float = 0.25
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    center_weight: float = 0.3  # lambda of L = L_softmax + lambda * L_center
    center_lr: float = 0.5  # alpha, the centre update rate (Wen et al.)
    snapshot_every: int = 20  # steps between GIF frames
    seed: int = 0

    def check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"viz: {msg}")

        need(2 <= self.identities <= 40, f"identities must be in 2..40 (colours stay tellable apart), got {self.identities}")
        need(self.images_per_identity >= 2, f"images per identity must be >= 2, got {self.images_per_identity}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 2, f"batch size must be >= 2, got {self.batch_size}")
        need(self.input_size % 8 == 0 and self.input_size >= 16,
             f"input size must be a multiple of 8 (>= 16), got {self.input_size}")
        need(self.center_weight > 0, f"center weight must be > 0, got {self.center_weight}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")


def compactness(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean distance of each feature to its class centroid / mean distance between class centroids.

    Scale-free (multiplying every feature by a constant leaves it unchanged); lower means tighter,
    better separated clusters.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise UserError("compactness needs at least 2 classes")
    centroids = np.stack([features[labels == c].mean(axis=0) for c in classes])
    index = np.searchsorted(classes, labels)
    intra = np.linalg.norm(features - centroids[index], axis=1).mean()
    diff = centroids[:, None, :] - centroids[None, :, :]
    dist = np.linalg.norm(diff, axis=2)
    inter = dist[np.triu_indices(len(classes), k=1)].mean()
    return float(intra / max(inter, 1e-12))


def _embed(backbone: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    was_training = backbone.training
    backbone.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(backbone(normalize_batch(images[i:i + batch_size])).float())
    backbone.train(was_training)
    return torch.cat(out).numpy()


def train_2d(images: torch.Tensor, labels: torch.Tensor, options: VizOptions, *, center: bool,
             log: Optional[Callable[[str], None]] = None) -> tuple[list, np.ndarray]:
    """Train a 2-D ``mbf`` on uint8 ``N×3×H×W`` ``images``; returns (snapshots, final features).

    ``snapshots`` is ``[(step, N×2 features), ...]`` every ``options.snapshot_every`` steps (and at
    step 0 and the end). Weights and batches depend only on ``options.seed``, so the runs with and
    without ``center`` differ only in the loss.
    """
    num_classes = int(labels.max()) + 1
    torch.manual_seed(options.seed)
    backbone = build_backbone("mbf", embedding_size=2, input_size=options.input_size, width_mult=options.width_mult)
    head = build_head("softmax", 2, num_classes, normalize=False)  # plain softmax: logits = x . W^T
    center_loss = CenterLoss(num_classes, 2) if center else None
    # the trainer's optimizer (param groups; the centres' group at lr = alpha / lambda, no weight decay)
    optim = OptimConfig(name="sgd", lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    optimizer = build_optimizer(optim, backbone, head, center_loss, options.center_lr, options.center_weight)
    schedule = ScheduleConfig(name="cosine", warmup_steps=0, min_lr=0.0)  # and the trainer's schedule
    rng = np.random.default_rng(options.seed)
    snapshots = [(0, _embed(backbone, images))]
    backbone.train()
    for step in range(1, options.steps + 1):
        factor = lr_factor(step - 1, options.steps, schedule)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        idx = torch.from_numpy(rng.choice(len(images), size=min(options.batch_size, len(images)), replace=False))
        batch = images[idx]
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(3), batch)
        emb = backbone(normalize_batch(batch))
        out = head(emb, labels[idx])
        loss = out.loss
        if center_loss is not None:
            # ramped in over the first half: centres pull features together only once softmax has
            # spread the classes apart (at step 0 every centre is 0, which would collapse them)
            ramp = min(1.0, 2.0 * step / options.steps)
            loss = loss + ramp * options.center_weight * center_loss(emb, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
        optimizer.step()
        if step % options.snapshot_every == 0 or step == options.steps:
            snapshots.append((step, _embed(backbone, images)))
            if log:
                log(f"{'softmax + center' if center else 'softmax'}: step {step}/{options.steps} "
                    f"loss {float(loss):.3f} acc {out.stats['accuracy']:.2f}")
    return snapshots, snapshots[-1][1]


def _scatter(ax, features: np.ndarray, labels: np.ndarray, title: str) -> None:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
    for c in np.unique(labels):
        pts = features[labels == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.75, color=cmap(int(c) % cmap.N), label=f"id {c}")
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)


def _figure(panels: list, path: Path, legend: bool = True) -> None:
    """``panels``: [(features, labels, title), ...] in one row; saved as PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, (feats, labels, title) in zip(axes[0], panels):
        _scatter(ax, feats, labels, title)
    if legend:
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=1.5)
    fig.tight_layout()
    try:
        with atomic_write(path) as handle:
            fig.savefig(handle, format="png", dpi=90)
    finally:
        plt.close(fig)


def _gif(snapshots: list, labels: np.ndarray, title: str, path: Path) -> None:
    """One frame per snapshot, fixed axes (the final features' range) so motion is visible."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    frames = []
    for step, feats in snapshots:
        fig, ax = plt.subplots(figsize=(4.4, 4.4))
        _scatter(ax, feats, labels, f"{title}, step {step}")
        ax.set_aspect("equal", adjustable="box")
        lo, hi = np.percentile(feats, 1, axis=0), np.percentile(feats, 99, axis=0)
        pad = 0.15 * (hi - lo) + 1e-6
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=70)
        plt.close(fig)
        buf.seek(0)
        frames.append(Image.open(buf).convert("P", palette=Image.ADAPTIVE))
    with atomic_write(path) as handle:
        frames[0].save(handle, format="GIF", save_all=True, append_images=frames[1:], duration=300, loop=0)


def run_viz(out_dir: str | Path, options: Optional[VizOptions] = None, *, gif: bool = False,
            log: Optional[Callable[[str], None]] = None) -> dict:
    """Train both runs and write the PNGs (and GIFs); returns the summary also saved as viz.json."""
    options = options or VizOptions()
    options.check()
    try:
        import matplotlib  # noqa: F401  (an optional dependency: the plots extra)
    except ImportError:
        raise UserError("viz needs matplotlib: pip install 'marginface[plots]'") from None
    out = ensure_dir(out_dir)
    source = SyntheticSource(options.identities, options.images_per_identity, image_size=options.input_size,
                             seed=options.seed)
    images = torch.from_numpy(np.ascontiguousarray(source.images.transpose(0, 3, 1, 2)))
    labels_t = torch.from_numpy(source.labels)
    labels = source.labels
    runs = {}
    finals = {}
    for key, center, title in (("softmax", False, "softmax"), ("softmax_center", True, "softmax + center loss")):
        snapshots, feats = train_2d(images, labels_t, options, center=center, log=log)
        score = compactness(feats, labels)
        finals[key] = (feats, title)
        _figure([(feats, labels, f"{title} (compactness {score:.3f})")], out / f"{key}.png")
        files = [str(out / f"{key}.png")]
        if gif:
            _gif(snapshots, labels, title, out / f"{key}.gif")
            files.append(str(out / f"{key}.gif"))
        runs[key] = {"compactness": score, "files": files}
    _figure([(f, labels, t) for f, t in finals.values()], out / "comparison.png")
    summary = {"out": str(out), "options": asdict(options), "runs": runs,
               "comparison": str(out / "comparison.png")}
    atomic_write_json(out / "viz.json", summary)
    return summary
