"""The training loop: batches -> backbone -> classifier+margin -> loss -> step, with evaluation,
atomic checkpoints, exact resume, non-finite-step skipping and graceful SIGTERM/SIGINT.

A run directory holds config.yaml, checkpoints/{last,best}.pt, log.jsonl, tensorboard/ and
report.json; it is everything needed to reproduce or resume the run. Step-numbered snapshots
(``train.snapshot_every`` / ``train.keep_snapshots``) go to snapshots/step_NNNNNN.pt.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from marginface import hardware, malloc
from marginface.config import Config, dump_yaml, to_dict
from marginface.data.dataset import FaceDataset, normalize_batch
from marginface.errors import UserError
from marginface.evaluate.metrics import DEFAULT_FAR_TARGETS, far_key
from marginface.evaluate.report import load_report, write_report
from marginface.evaluate.runner import EvaluationStopped, evaluate_pair_set
from marginface.heads.partial_fc import classifier_memory, describe_memory
from marginface.io.atomic import atomic_write_json, atomic_write_text, ensure_dir
from marginface.io.progress import phase
from marginface.models import count_parameters
from marginface.models.layers import set_fast_layers
from marginface.train import distributed, rundir, setup
from marginface.train.batches import InMemoryBatches, LoaderBatches
from marginface.train.checkpoint import (SNAPSHOT_DIR, load_checkpoint, prune_snapshots, remove_stale_checkpoint_temps,
                                         remove_stale_snapshot_temps, save_atomic, snapshot_interval, snapshot_name)
from marginface.train.loggers import RunLogger, check_loggers, format_table
from marginface.train.schedule import lr_factor, warmup_steps

LOWER_IS_BETTER = {"eer", "accuracy_std"}
# the numbers evaluate_pair_set reports per set (besides tar_at_far), any of which can pick best.pt
SCALAR_METRICS = ("accuracy", "accuracy_std", "threshold", "threshold_distance", "accuracy_same", "accuracy_diff",
                  "auc", "eer", "pos_mean", "neg_mean", "xnorm")


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps, or non-finite weights; no non-finite state is ever saved."""


def all_finite(tensors) -> bool:
    """True when every floating-point tensor holds only finite numbers (one sync per device).

    The max-abs norm of each tensor is inf or NaN exactly when an entry is (it cannot overflow, unlike
    the 2-norm of huge finite weights); ``_foreach_norm`` computes them all in a few kernels, which
    clip_grad_norm_ uses too."""
    groups: dict = {}
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point() and t.numel():
            groups.setdefault(t.device, []).append(t.detach())
    for ts in groups.values():
        norms = torch._foreach_norm(ts, float("inf"))
        if not bool(torch.stack(norms).isfinite().all()):
            return False
    return True


def check_best_metric(spec: str, val_sets: list) -> str:
    """The ``eval.best_metric`` that picks best.pt, checked against the loaded validation sets before any
    step is trained (no evaluation needed); returns it with the default filled in ("" = first set's accuracy)."""
    for ps in val_sets:
        if ps.issame is None:
            raise UserError(f"config key 'data.val': pair set {ps.name!r} has no same/different labels, so it "
                            "cannot be evaluated during training")
    if not val_sets:
        return spec
    spec = spec or f"{val_sets[0].name}/accuracy"
    if "/" not in spec:
        raise UserError(f"config key 'eval.best_metric' must look like '<set>/<metric>', got {spec!r}")
    set_name, metric = spec.split("/", 1)
    names = [ps.name for ps in val_sets]
    if set_name not in names:
        raise UserError(f"config key 'eval.best_metric' names set {set_name!r}, which is not among the "
                        f"validation sets (data.val): {names}")
    if metric.startswith("tar@"):
        import numpy as np

        fars = {far_key(f): f for f in DEFAULT_FAR_TARGETS}
        if metric[4:] not in fars:
            raise UserError(f"config key 'eval.best_metric': {metric!r} is not a reported FAR; use one of "
                            f"{['tar@' + k for k in fars]}")
        negatives = int((~np.asarray(val_sets[names.index(set_name)].issame, bool)).sum())
        if negatives * fars[metric[4:]] < 1 - 1e-9:
            raise UserError(f"config key 'eval.best_metric': set {set_name!r} has {negatives} negative pairs, too "
                            f"few to measure {metric}")
    elif metric not in SCALAR_METRICS:
        raise UserError(f"config key 'eval.best_metric': {metric!r} is not a metric; use one of "
                        f"{list(SCALAR_METRICS)} or tar@<far> (e.g. tar@1e-3)")
    return spec


def metric_value(results: dict, spec: str) -> float:
    """``"lfw/accuracy"`` or ``"cfp_fp/tar@1e-3"`` -> the number in an eval result dict."""
    if "/" not in spec:
        raise UserError(f"config key 'eval.best_metric' must look like '<set>/<metric>', got {spec!r}")
    set_name, metric = spec.split("/", 1)
    if set_name not in results:
        raise UserError(f"config key 'eval.best_metric' names set {set_name!r}; the sets are {sorted(results)}")
    m = results[set_name]
    if metric.startswith("tar@"):
        value = m.get("tar_at_far", {}).get(metric[4:])
    else:
        value = m.get(metric)
    if not isinstance(value, (int, float)):
        raise UserError(f"config key 'eval.best_metric': set {set_name!r} has no numeric metric {metric!r}")
    return float(value)


def describe_data(data, size: int) -> str:
    """What building ``data.train`` is about to do (the start-up line before it)."""
    if data.train == "synthetic":
        s = data.synthetic
        return (f"rendering {s.identities * s.images_per_identity} synthetic images of {s.identities} identities "
                f"at {size}px")
    return f"opening {data.train}"


def describe_val(data) -> str:
    """The validation sets about to be built or read (the start-up line before them)."""
    s = data.synthetic
    return ", ".join(f"synthetic ({s.val_pairs} pairs over {s.val_identities} held-out identities)"
                     if spec == "synthetic" else str(spec) for spec in data.val)


class Trainer:
    """Trains ``cfg`` into ``run_dir``; ``fit()`` returns the report (also written to report.json)."""

    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool = False, console: bool = True,
                 resume_from: Optional[Path] = None, overwrite: bool = False):
        """``resume``: continue from checkpoints/last.pt (see marginface.train.rundir for the policy);
        ``resume_from``: continue from that checkpoint instead; ``overwrite``: a fresh start may delete
        the run already in ``run_dir`` (otherwise it is refused)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume or resume_from is not None
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.overwrite = overwrite
        self.console = console
        self.device = setup.resolve_device(cfg.train.device)
        hardware.flush_denormals()  # subnormal activations: 10-100x slower on x86 (docs/performance.md)
        # under torchrun: join the process group (NCCL on CUDA, gloo on CPU); else a single process
        self.dist = distributed.init_from_env(self.device)
        self.device = distributed.device_for(self.device, self.dist)
        self.amp_dtype = setup.resolve_amp(cfg.train.amp, self.device)
        if self.device.type == "cuda":  # train.tf32: TF32 matmuls/convolutions (Ampere and newer)
            torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
            torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        self._stop_signal: Optional[int] = None
        if self.dist.is_main:  # a logger whose package is missing: one line now, not after the data is built
            check_loggers(cfg.train.loggers)

        setup.seed_everything(cfg.train.seed, cfg.train.deterministic)
        if self.device.type == "cuda":
            # train.cudnn_benchmark: the input size is fixed (model.input_size), so timing cuDNN's convolution
            # algorithms once pays off; a deterministic run keeps cuDNN's deterministic choice
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        size = cfg.model.input_size
        say = lambda text: phase(text, enabled=console and self.dist.is_main)  # noqa: E731  (start-up lines)
        say(f"building data: {describe_data(cfg.data, size)}...")
        self.source = setup.build_train_source(cfg.data, size)
        if cfg.data.val:
            say(f"building validation sets: {describe_val(cfg.data)}...")
        self.val_sets = setup.build_val_sets(cfg.data, size)
        self.best_metric = check_best_metric(cfg.eval.best_metric, self.val_sets)  # now, not at the first eval
        say(f"building the model: {cfg.model.backbone}...")
        self.backbone = setup.build_model(cfg.model).to(self.device)
        if not cfg.train.fast_layers:  # back to the stock nn.PReLU / nn.Conv2d (see marginface.models.layers)
            set_fast_layers(self.backbone, False)
        self.head = setup.build_head(cfg.head, cfg.model.embedding_size, self.source.num_classes,
                                           rank=self.dist.rank, world_size=self.dist.world_size,
                                           seed=cfg.train.seed).to(self.device)
        self.sharded_head = self.head.sharded  # Partial FC: checkpoints hold per-rank shards
        self.center = setup.build_center_loss(cfg.head, cfg.model.embedding_size, self.source.num_classes)
        if self.center is not None:
            self.center.to(self.device)
        if cfg.train.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.optimizer = setup.build_optimizer(cfg.optim, self.backbone, self.head, self.center,
                                               cfg.head.center_lr, cfg.head.center_weight)
        use_scaler = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.head.attach_optimizer(self.optimizer)  # Partial FC with sampling: the optimizer updates only sampled rows
        # DDP sums (not averages) the backbone gradients: each rank back-propagates its part of the global loss
        self.ddp = distributed.wrap_ddp(self.backbone, self.device) if self.dist.enabled else self.backbone
        self.forward_backbone = torch.compile(self.ddp) if cfg.train.compile else self.ddp
        self._frozen = False

        self.order = setup.build_batch_order(cfg, self.source, rank=self.dist.rank, world_size=self.dist.world_size)
        self.steps_per_epoch = max(self.order.steps_per_epoch // cfg.train.grad_accum, 1)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.steps_per_epoch))
        self.freeze_steps = int(round(cfg.train.freeze_backbone_epochs * self.steps_per_epoch))
        t = cfg.train
        self.snapshot_every = snapshot_interval(t.snapshot_every, t.keep_snapshots, t.checkpoint_every)
        self._snapshot_step: Optional[int] = None  # the step of the last snapshot this session wrote
        self.batches = self._make_batches()

        self.step = 0
        self.best = {"metric": "", "value": None, "step": None}
        self.bad_steps_total = 0
        self.wall_before = 0.0  # wall seconds of earlier sessions of this run (resume)
        self.images_seen = 0
        self.last_eval: dict = {}
        self.last_eval_step: Optional[int] = None
        self.evals_without_improvement = 0
        self.highest_accuracy: dict = {}  # set name -> the highest accuracy of any evaluation so far
        self.train_seconds = 0.0  # time inside training steps only (no evaluation, no start-up)
        # the state the guard checks after every update, and the BatchNorm statistics a skipped step restores
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._buffers = [*self.backbone.buffers(), *self.head.buffers(),
                         *(self.center.buffers() if self.center is not None else ())]
        self._buffer_backup = [b.detach().clone() for b in self._buffers]
        self._weights_broken = False

    # ------------------------------------------------------------------ set-up helpers
    def _make_batches(self):
        images = getattr(self.source, "images", None)
        if images is not None:
            return InMemoryBatches(images, self.source.labels, self.order)
        dataset = FaceDataset(self.source, image_size=self.cfg.model.input_size, flip=False,
                              skip_bad=self.cfg.data.skip_bad_images)
        return LoaderBatches(dataset, self.order, self.cfg.data.num_workers)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def model_info(self) -> dict:
        m = self.cfg.model
        return {"backbone": m.backbone, "params": count_parameters(self.backbone), "embedding_size": m.embedding_size,
                "input_size": m.input_size, "width_mult": m.width_mult, "num_classes": self.source.num_classes}

    def _classifier_memory_line(self) -> str:
        """The start-up line: the classifier's memory on this rank (weights + grad + optimizer state + logits)."""
        o = self.cfg.optim
        states = 2 if o.name == "adamw" else (1 if o.momentum > 0 else 0)
        batch = self.cfg.train.batch_size * self.dist.world_size
        weight = getattr(self.head, "weight", None)
        report = classifier_memory(self.source.num_classes, self.cfg.model.embedding_size, self.dist.world_size,
                                   batch, self.cfg.head.sample_rate, self.cfg.head.num_subcenters,
                                   weight.element_size() if weight is not None else 4, states, rank=self.dist.rank)
        return describe_memory(report, batch)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {
            "format": "marginface-checkpoint-v1",
            "model": self.backbone.state_dict(),
            "head": self.head.state_dict(),
            "center": self.center.state_dict() if self.center is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "images_seen": self.images_seen,
            "wall_seconds": self.wall_before + (time.time() - self._t_start),
            "best": dict(self.best),
            "bad_steps_total": self.bad_steps_total,
            "evals_without_improvement": self.evals_without_improvement,
            "highest_accuracy": dict(self.highest_accuracy),
            "last_eval": self.last_eval,
            "last_eval_step": self.last_eval_step,
            "train_seconds": self.train_seconds,
            "torch_rng": torch.get_rng_state(),
            "config": to_dict(self.cfg),
            "model_info": self.model_info(),
        }

    def _state_finite(self) -> bool:
        """Weights, buffers and optimizer state all finite (on every rank)."""
        tensors = [*self._params, *self._buffers]
        for st in self.optimizer.state.values():
            tensors += [v for v in st.values() if torch.is_tensor(v)]
        bad = not all_finite(tensors)
        return not (distributed.any_rank(bad) if self.dist.enabled else bad)

    def _last_saved(self) -> str:
        info = rundir.peek(self.ckpt_dir / "last.pt") if (self.ckpt_dir / "last.pt").is_file() else None
        return (f"{self.ckpt_dir / 'last.pt'} keeps step {info['step']}" if info else
                f"no checkpoint was written ({self.ckpt_dir / 'last.pt'} does not exist)")

    def save(self, name: str = "last", folder: Optional[Path] = None) -> Path:
        """Write checkpoints/{name}.pt (or ``folder``/{name}.pt); collective under torchrun (each rank
        writes its classifier shard).

        A state with a non-finite number anywhere is never written (TrainingDiverged instead)."""
        folder = self.ckpt_dir if folder is None else Path(folder)
        path = folder / f"{name}.pt"
        if not self._state_finite():
            raise TrainingDiverged(f"training diverged at step {self.step}: the weights or optimizer state are "
                                   f"not finite, so they were not saved as {path.name}; {self._last_saved()}; "
                                   "lower optim.lr")
        if self.sharded_head:
            return distributed.save_sharded(self.state() if self.dist.is_main else {}, self.head, self.optimizer,
                                            folder, name, self.step)
        save_atomic(self.state(), path)
        return path

    @property
    def snapshot_dir(self) -> Path:
        return self.run_dir / SNAPSHOT_DIR

    def snapshot(self) -> Path:
        """Write snapshots/step_NNNNNN.pt (a whole checkpoint, atomically), then drop our own snapshots
        beyond the newest ``train.keep_snapshots``; collective under torchrun like `save`."""
        if self.dist.is_main:
            ensure_dir(self.snapshot_dir)
        distributed.barrier()
        path = self.save(snapshot_name(self.step), self.snapshot_dir)
        self._snapshot_step = self.step
        if self.dist.is_main:
            removed = prune_snapshots(self.snapshot_dir, self.cfg.train.keep_snapshots, upto_step=self.step)
            self.logger.record("snapshot", self.step, {"path": str(path),
                                                       "removed": [p.name for p in removed if p.suffix == ".pt"
                                                                   and "-head-s" not in p.name]})
        return path

    def load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        try:
            self.backbone.load_state_dict(ckpt["model"])
            if self.sharded_head or distributed.is_sharded(ckpt):
                # this rank's classes from any world size's checkpoint (re-shard), with their optimizer state
                distributed.load_head(self.head, self.optimizer, ckpt, path)
            else:
                self.head.load_state_dict(ckpt["head"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.center is not None and ckpt.get("center") is not None:
                self.center.load_state_dict(ckpt["center"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{path}: does not fit this run's config ({first}); resume with the config the run "
                            "was trained with (its config.yaml)") from None
        self.step = int(ckpt["step"])
        self.images_seen = int(ckpt.get("images_seen", 0))
        self.wall_before = float(ckpt.get("wall_seconds", 0.0))
        self.best = dict(ckpt.get("best") or self.best)
        self.bad_steps_total = int(ckpt.get("bad_steps_total", 0))
        self.evals_without_improvement = int(ckpt.get("evals_without_improvement", 0))
        self.highest_accuracy = dict(ckpt.get("highest_accuracy") or {})
        self.last_eval = ckpt.get("last_eval") or {}
        self.last_eval_step = ckpt.get("last_eval_step")
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        torch.set_rng_state(ckpt["torch_rng"])
        for b, saved in zip(self._buffers, self._buffer_backup):
            saved.copy_(b)

    # ------------------------------------------------------------------ one step
    def _set_lr(self) -> float:
        """Every param group (backbone, classifier, centres) at its base lr x the schedule's factor;
        returns ``optim.lr`` x the factor."""
        f = lr_factor(self.step, self.total_steps, self.cfg.schedule, self.steps_per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return self.cfg.optim.lr * f

    def _group_lr(self, name: str) -> Optional[float]:
        return next((g["lr"] for g in self.optimizer.param_groups if g.get("name") == name), None)

    def _set_frozen(self, frozen: bool) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.backbone.train(not frozen)  # frozen: BatchNorm statistics stay as loaded
        self._frozen = frozen  # a frozen backbone bypasses DDP (no gradients to reduce)

    def _forward_loss(self, images_u8: torch.Tensor, labels: torch.Tensor) -> tuple:
        x = normalize_batch(images_u8.to(self.device, non_blocking=True), self.cfg.data.input_norm)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            emb = (self.backbone if self._frozen and self.dist.enabled else self.forward_backbone)(x)
        emb = emb.float()
        out = self.head(emb, labels)
        loss = out.loss
        if self.center is not None:
            center = self.center(emb, labels)  # on this rank's images: its value is averaged over ranks
            loss = loss + self.cfg.head.center_weight * distributed.mean_over_ranks(center)
        return loss, out.stats

    def _train_step(self, micro_batches: list) -> tuple:
        """Forward/backward over the micro-batches of one optimizer step; returns (loss, stats, ok).

        A skipped step (ok False) leaves the state as it was, BatchNorm running statistics included
        (the forward pass of a diverging batch would otherwise leave them non-finite). After an update,
        ``self._weights_broken`` says whether it left a non-finite weight."""
        self.optimizer.zero_grad(set_to_none=True)
        if self._buffers:
            torch._foreach_copy_(self._buffer_backup, self._buffers)
        self.head.begin_step(self.step)  # Partial FC draws its classes from (seed, step, micro-batch, rank)
        total, stats = 0.0, {}
        accum = len(micro_batches)
        for i, (images, labels) in enumerate(micro_batches):
            # DDP: reduce gradients only after the last micro-batch
            skip_sync = self.dist.enabled and not self._frozen and i < accum - 1
            with self.ddp.no_sync() if skip_sync else contextlib.nullcontext():
                loss, stats = self._forward_loss(images, labels)
                bad = not bool(torch.isfinite(loss))
                if distributed.any_rank(bad) if self.dist.enabled else bad:  # every rank skips together
                    self._restore_buffers()
                    return float("nan"), stats, False
                self.scaler.scale(loss / accum).backward()
            total += float(loss.detach()) / accum
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.clip_grad_norm
        max_norm = clip if clip > 0 else float("inf")
        if self.dist.enabled:
            if self.center is not None:
                distributed.all_reduce_grads_(self.center.parameters())
            sharded = [p for p in self.head.parameters() if p.grad is not None]
            replicated = [p for p in params if not any(p is q for q in sharded)]
            norm = distributed.clip_grad_norm(replicated, sharded, max_norm)  # the global norm, on every rank
            if not torch.isfinite(norm) and self.scaler.is_enabled():
                # an overflow on any rank: all skip and back off alike (ranks' scalers must not diverge)
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
                return total, stats, True
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if not torch.isfinite(norm) and not self.scaler.is_enabled():
            self._restore_buffers()
            return total, stats, False  # skip: an fp16 scaler handles its own overflow steps
        self.scaler.step(self.optimizer)
        self.scaler.update()
        broken = not all_finite(self._params)  # finite loss and gradients can still step into inf (lr 1e30, inf)
        self._weights_broken = distributed.any_rank(broken) if self.dist.enabled else broken
        return total, stats, True

    def _restore_buffers(self) -> None:
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._buffer_backup)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        was_training = self.backbone.training
        results = {}
        try:
            for ps in self.val_sets:  # a stop signal ends the evaluation between two batches (EvaluationStopped)
                results[ps.name] = evaluate_pair_set(self.backbone, ps, flip=self.cfg.eval.flip,
                                                     batch_size=self.cfg.eval.batch_size, device=self.device,
                                                     normalize=self.cfg.data.input_norm,
                                                     stop=lambda: self._stop_signal is not None)
        finally:
            self.backbone.train(was_training)
        return results

    def _evaluate_on_main(self) -> dict:
        """Rank 0 evaluates (the plain backbone: no collectives inside) while the others wait in the
        broadcast of its results; every rank then takes the same best/early-stop decisions.

        A signal during the evaluation stops it within one batch: the run exits (KeyboardInterrupt) with
        checkpoints/last.pt as saved just before the evaluation, which the resumed run evaluates first."""
        results = None
        if self.dist.is_main:
            try:
                results = self.evaluate()
            except EvaluationStopped:
                results = None
        results = distributed.broadcast_object(results)
        if results is None:
            self.logger.message(f"received signal {self._stop_signal or 'on another rank'} during the evaluation at "
                                f"step {self.step}: stopped it; {self._last_saved()}; re-run with --resume to "
                                "continue (the evaluation comes first)")
            raise KeyboardInterrupt
        return results

    def _evaluate_and_keep_best(self) -> bool:
        """Save last.pt, then evaluate (so no trained step waits on the evaluation), keep the best."""
        self.save("last")
        return self._after_eval(self._evaluate_on_main())

    def epoch(self, step: Optional[int] = None) -> int:
        """The (1-based) epoch that step number ``step`` (default: the current one) belongs to."""
        step = self.step if step is None else step
        return max(1, math.ceil(step / self.steps_per_epoch))

    @property
    def total_epochs(self) -> int:
        return self.epoch(self.total_steps)

    def _eval_lines(self, results: dict) -> list:
        """One console line per set, as Arcface-Paddle / insightface print them: XNorm (mean L2 norm of
        the un-normalised embeddings), accuracy +- std over the folds (Flip: the mirrored image's
        embedding added), the highest accuracy of this run so far, the step and the epoch."""
        lines = []
        for name, m in results.items():
            kind = "Accuracy-Flip" if m.get("flip") else "Accuracy"
            lines.append(f"[{name}][step {self.step}, epoch {self.epoch()}] XNorm: {m.get('xnorm', float('nan')):.5f}  "
                         f"{kind}: {m['accuracy']:.5f}+-{m.get('accuracy_std', float('nan')):.5f}  "
                         f"Accuracy-Highest: {self.highest_accuracy.get(name, m['accuracy']):.5f}  "
                         f"AUC: {m.get('auc', float('nan')):.5f}")
        return lines

    def _after_eval(self, results: dict) -> bool:
        """Log, keep the best checkpoint, then last.pt with the evaluation's outcome; returns True when
        early stopping says stop."""
        self.last_eval = results
        self.last_eval_step = self.step
        for name, m in results.items():
            acc = m.get("accuracy")
            if isinstance(acc, (int, float)) and acc == acc and acc > self.highest_accuracy.get(name, -1.0):
                self.highest_accuracy[name] = float(acc)
        self.logger.record("eval", self.step, {"eval": results, "epoch": self.epoch(),
                                               "highest_accuracy": dict(self.highest_accuracy)})
        for name, m in results.items():
            flat = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            flat.update({f"tar@{k}": v for k, v in m.get("tar_at_far", {}).items()})
            self.logger.scalars(self.step, flat, prefix=f"eval/{name}/")
        spec = self.best_metric
        value = metric_value(results, spec)
        prev = self.best.get("value")
        improved = prev is None or self._better(value, prev, spec)
        if improved:
            self.best = {"metric": spec, "value": value, "step": self.step}
            self.evals_without_improvement = 0
            self.save("best")
        else:
            self.evals_without_improvement += 1
        self.save("last")  # with the new best and the evaluation, so a resumed run decides as this one would
        for line in self._eval_lines(results):
            self.logger.message(line)
        self.logger.message(f"eval @ step {self.step} (epoch {self.epoch()}): best {spec} = {self.best['value']:.4f} "
                            f"@ step {self.best['step']}")
        patience = self.cfg.eval.early_stop_patience
        return patience > 0 and self.evals_without_improvement >= patience

    # ------------------------------------------------------------------ the loop
    @staticmethod
    def _better(value: float, than: float, spec: str) -> bool:
        return value < than if spec.split("/", 1)[1] in LOWER_IS_BETTER else value > than

    @property
    def interrupted(self) -> bool:
        """A stop signal (Ctrl-C, SIGTERM) arrived during this `fit`, also one too late to stop anything."""
        return self._stop_signal is not None

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:
            # a second signal (a second Ctrl-C): leave at once. A checkpoint being written is abandoned
            # (its temp file removed), so the one on disk stays the last complete one.
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _open_run_dir(self) -> None:
        """Apply the run-directory policy (marginface.train.rundir): load the checkpoint to resume, or
        refuse (or with ``overwrite`` clear) a directory that already holds a run."""
        if not self.resume:
            rundir.require_fresh(self.run_dir, self.overwrite, dry_run=not self.dist.is_main)  # rank 0 deletes
            distributed.barrier()
            return
        path = self.resume_from or rundir.resume_checkpoint(self.run_dir)
        if path is None and self.dist.is_main and self.console:  # a job script may always pass --resume: say it
            print(f"note: --resume: {self.run_dir} holds no checkpoint yet; starting a new run there "
                  f"(check --out if you meant to continue another run)", file=sys.stderr, flush=True)
        if path is not None:
            try:
                self.load(path)
            except UserError as exc:
                raise UserError(f"{exc}{rundir.alternatives_hint(self.run_dir, path)}") from None
        if self.dist.is_main:
            rundir.remove_stale_temp_files(self.run_dir)  # a kill mid-write leaves one behind
            # those steps are trained (and evaluated) again
            rundir.truncate_log(self.run_dir / "log.jsonl", self.step, evaluated=self.last_eval_step == self.step)
            self._adopt_best_on_disk(path)

    def _adopt_best_on_disk(self, loaded: Optional[Path]) -> None:
        """best.pt may record a better value than the checkpoint resumed from (resuming from an older
        checkpoint): keep comparing against it, so it is never replaced by a worse one."""
        best = self.ckpt_dir / "best.pt"
        if not best.is_file() or (loaded is not None and best.resolve() == Path(loaded).resolve()):
            return
        info = rundir.peek(best)
        record = (info or {}).get("best") or {}
        if record.get("value") is None or record.get("metric") != self.best_metric:
            return
        mine = self.best.get("value")
        if mine is None or self.best.get("metric") != self.best_metric or self._better(record["value"], mine,
                                                                                      self.best_metric):
            self.best = dict(record)

    def fit(self) -> dict:
        ensure_dir(self.run_dir)
        self._t_start = time.time()
        if self.dist.is_main:  # temp files of a save a kill interrupted (ours only; nothing is saving now)
            remove_stale_checkpoint_temps(self.ckpt_dir)
            remove_stale_snapshot_temps(self.snapshot_dir)
        self._open_run_dir()
        if self.dist.is_main:  # rank 0 owns the run directory's files; the others log nowhere
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
            loggers = self.cfg.train.loggers
            wandb = ({"project": self.cfg.train.wandb_project, "name": self.run_dir.name, "config": to_dict(self.cfg)}
                     if "wandb" in loggers else None)
            self.logger = RunLogger(self.run_dir, self.total_steps, self.step, console=self.console,
                                    tensorboard="tensorboard" in loggers, wandb=wandb)
        else:
            self.logger = distributed.NullLogger()
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._on_signal)
        # CPU: glibc keeps freed memory for the run, so each step stops re-faulting gigabytes of fresh pages
        keep_memory = self.device.type == "cpu" and self.cfg.train.cpu_keep_memory and malloc.keep_freed_memory(True)
        self._session_start_step = self.step
        try:
            self._loop()
            return self._finish()
        finally:
            if keep_memory:
                malloc.restore_default()
            for s, h in previous.items():
                signal.signal(s, h)
            self.logger.close()
            distributed.shutdown(self.dist)

    def _loop(self) -> None:
        cfg = self.cfg
        log = self.logger
        info = self.model_info()
        log.message(f"run {self.run_dir}: {setup.describe_run(cfg)}; {self.source.describe()}; "
                    f"{info['params'] / 1e6:.2f}M params; {self.total_steps} steps of {cfg.train.batch_size * cfg.train.grad_accum}"
                    f" ({self.steps_per_epoch} per epoch); device {self.device}, amp {self.amp_dtype or 'off'}")
        world = self.dist.world_size
        if world > 1:
            log.message(f"distributed: {world} ranks ({self.dist.backend}), global batch "
                        f"{cfg.train.batch_size * world * cfg.train.grad_accum}")
        log.message(self._classifier_memory_line())
        warm = warmup_steps(cfg.schedule, self.steps_per_epoch)
        if warm >= self.total_steps and cfg.schedule.name != "constant":
            log.message(f"warning: the run ({self.total_steps} steps) is not longer than the learning-rate warmup "
                        f"({warm} steps): the rate never decays; lower schedule.warmup_steps or train longer")
        if self.step >= self.total_steps:
            log.message(f"already at step {self.step} of {self.total_steps}: nothing to train")
            return
        if self.step:
            log.message(f"resuming at step {self.step} of {self.total_steps}")
        self.backbone.train()
        self.head.train()
        stream = self.batches.iterate(self.step * cfg.train.grad_accum)
        if self.step == 0:
            images, _ = next(self.batches.iterate(0))
            log.image_grid("input/first_batch", images[:16], 0)
        bad_in_a_row = 0
        t_log, step_log = time.time(), self.step
        every_eval = cfg.eval.every
        if (self.val_sets and every_eval and 0 < self.step < self.total_steps and self.step % every_eval == 0
                and self.last_eval_step != self.step):  # resumed from a stop during this step's evaluation
            if self._after_eval(self._evaluate_on_main()):
                log.message(f"early stopping: no improvement in {cfg.eval.early_stop_patience} evaluations")
                self.total_steps = self.step
                return
        frozen = None
        while self.step < self.total_steps:
            want_frozen = self.step < self.freeze_steps
            if want_frozen != frozen:
                self._set_frozen(want_frozen)
                frozen = want_frozen
            lr = self._set_lr()
            t0 = time.time()
            micro = [next(stream) for _ in range(cfg.train.grad_accum)]
            loss, stats, ok = self._train_step(micro)
            self.train_seconds += time.time() - t0
            self.step += 1
            if self._weights_broken:
                log.record("diverged", self.step, {"lr": lr})
                raise TrainingDiverged(
                    f"training diverged at step {self.step}: the update made weights non-finite (lr {lr:g}); "
                    f"nothing from this step on is saved, {self._last_saved()}; lower optim.lr")
            self.images_seen += sum(len(m[1]) for m in micro) * self.dist.world_size
            if ok:
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                self.bad_steps_total += 1
                self.optimizer.zero_grad(set_to_none=True)
                log.message(f"warning: non-finite loss or gradient at step {self.step}; step skipped "
                            f"({bad_in_a_row} in a row)")
                log.record("bad_step", self.step, {"in_a_row": bad_in_a_row})
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    self.step -= bad_in_a_row  # the weights are those of the last good step
                    path = self.save("last")
                    raise TrainingDiverged(
                        f"training diverged: {bad_in_a_row} non-finite steps in a row; the last good state "
                        f"(step {self.step}) is saved in {path}; lower optim.lr or set train.amp=none")
            if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                now = time.time()
                ips = ((self.step - step_log) * cfg.train.batch_size * cfg.train.grad_accum * self.dist.world_size
                       / max(now - t_log, 1e-9))
                eta = (self.total_steps - self.step) * (now - t_log) / max(self.step - step_log, 1)
                epoch = self.epoch()
                values = {"loss": loss, "lr": lr, "images_per_second": ips, **stats}
                if self.freeze_steps or cfg.optim.backbone_lr_scale != 1.0:  # fine-tuning: the backbone's own lr
                    values["lr_backbone"] = 0.0 if self._frozen else lr * cfg.optim.backbone_lr_scale
                if cfg.optim.lr_head is not None:  # the classifier's own rate (optim.lr_head)
                    values["lr_head"] = self._group_lr("head")
                log.record("train", self.step, {"epoch": epoch, **values})
                log.scalars(self.step, values, prefix="train/")
                log.progress(self.step, loss, lr, ips, eta, extra=f"  epoch {epoch}/{self.total_epochs}")
                t_log, step_log = now, self.step
            log.tick(self.step)  # the terminal bar moves every step (its ETA from the third on)
            if self.step % self.steps_per_epoch == 0:
                self._report_bad_images(self.step // self.steps_per_epoch)
            stop = False
            if every_eval and self.step % every_eval == 0 and self.step < self.total_steps:
                stop = self._evaluate_and_keep_best()
                if stop:
                    log.message(f"early stopping: no improvement in {cfg.eval.early_stop_patience} evaluations")
            elif self.step % cfg.train.checkpoint_every == 0:
                self.save("last")
            if self.snapshot_every and self.step % self.snapshot_every == 0 and self.step < self.total_steps:
                self.snapshot()  # the last step's snapshot is written after its evaluation (_finish)
            # under torchrun a signal on any rank stops every rank after this same step (all-reduced flag)
            if distributed.any_rank(self._stop_signal is not None):
                path = self.save("last")  # collective: every rank's shard, then rank 0 commits last.pt
                log.message(f"received signal {self._stop_signal or 'on another rank'}: saved {path} at step "
                            f"{self.step}; re-run with --resume to continue")
                raise KeyboardInterrupt
            if stop:
                self.total_steps = self.step
                break
        log.flush()

    def _bad_images(self) -> int:
        """Unreadable images skipped so far (a DataLoader source with ``data.skip_bad_images``)."""
        dataset = getattr(self.batches, "dataset", None)
        return dataset.bad_images() if dataset is not None and hasattr(dataset, "bad_images") else 0

    def _report_bad_images(self, epoch: int) -> None:
        count = self._bad_images()
        if count:
            self.logger.message(f"epoch {epoch}: {count} unreadable image(s) skipped so far (named in the warnings "
                                f"above); training goes on")
            self.logger.record("bad_images", self.step, {"epoch": epoch, "count": count})

    def _finish(self) -> dict:
        self.logger.end_progress()  # the bar is finished before the final evaluation and table, drawn once
        if self._already_finished():
            # `--resume` on a finished run: the reports stay as they are (a later `marginface eval
            # --model RUN` may have added sets to them)
            self.logger.message(f"the run had already finished at step {self.step}; "
                                f"{self.run_dir / 'report.json'} is left as it is")
            return load_report(self.run_dir)
        if self.val_sets and self.last_eval_step != self.step:
            self._evaluate_and_keep_best()
        else:
            self.save("last")
        if self.snapshot_every and self.step % self.snapshot_every == 0 and self._snapshot_step != self.step:
            self.snapshot()
        wall = self.wall_before + (time.time() - self._t_start)
        report = {
            "eval": self.last_eval,
            "best": self.best,
            "train": {"steps": self.step, "images_seen": self.images_seen,
                      "images_per_second": self.images_seen / max(self.train_seconds, 1e-9),
                      "train_seconds": self.train_seconds, "wall_seconds": wall,
                      "bad_steps": self.bad_steps_total, "bad_images": self._bad_images(),
                      "device": str(self.device),
                      "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none"},
            "model": self.model_info(),
        }
        if not self.dist.is_main:
            return report
        atomic_write_json(self.run_dir / "report.json", report)
        write_report(self.run_dir, report)  # report.md and the ROC plot beside report.json
        if self.console:
            print("\n" + self._final_caption() + "\n" + format_table(self.last_eval), flush=True)
        return report

    def _final_caption(self) -> str:
        """What the final table is: which step and checkpoint it evaluates, and which one best.pt
        holds (what `eval` / `export` / `verify` use by default)."""
        sets = ", ".join(self.last_eval) or "no sets"
        line = f"evaluation of the last step ({self.step}, checkpoints/last.pt) on {sets}"
        if self.best.get("step") is not None and self.best.get("value") is not None:
            line += (f"; best.pt (used by eval/export/verify) is step {self.best['step']}, "
                     f"{self.best['metric']} = {self.best['value']:.4f}")
        return line + f"; report: {self.run_dir / 'report.json'}"

    def _already_finished(self) -> bool:
        """Nothing was trained in this session, the run's end was evaluated (or it has no sets) and
        its report is on disk."""
        return (self.step == self._session_start_step and self.step >= self.total_steps
                and (not self.val_sets or self.last_eval_step == self.step)
                and (self.run_dir / "report.json").is_file())
