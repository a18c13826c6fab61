"""The training loop: batches -> backbone -> classifier+margin -> loss -> step, with evaluation,
atomic checkpoints, exact resume, non-finite-step skipping and graceful SIGTERM/SIGINT.

A run directory holds config.yaml, checkpoints/{last,best}.pt, log.jsonl, tensorboard/ and
report.json; it is everything needed to reproduce or resume the run.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Optional

import torch

from marginface import malloc
from marginface.config import Config, dump_yaml, to_dict
from marginface.errors import UserError
from marginface.train import distributed, setup
from marginface.train.batches import BatchOrder, InMemoryBatches, LoaderBatches
from marginface.io.atomic import atomic_write_json, atomic_write_text, ensure_dir
from marginface.train.checkpoint import load_checkpoint, remove_stale_checkpoint_temps, save_atomic
from marginface.train.loggers import RunLogger, format_table
from marginface.train.schedule import lr_factor

LOWER_IS_BETTER = {"eer", "accuracy_std"}


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps; the last good state was saved."""


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


class Trainer:
    """Trains ``cfg`` into ``run_dir``; ``fit()`` returns the report (also written to report.json)."""

    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool = False, console: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.console = console
        self.device = setup.resolve_device(cfg.train.device)
        # under torchrun: join the process group (NCCL on CUDA, gloo on CPU); else a single process
        self.dist = distributed.init_from_env(self.device)
        self.device = distributed.device_for(self.device, self.dist)
        self.amp_dtype = setup.resolve_amp(cfg.train.amp, self.device)
        if self.device.type == "cuda":  # train.tf32: TF32 matmuls/convolutions (Ampere and newer)
            torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
            torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        self._stop_signal: Optional[int] = None

        setup.seed_everything(cfg.train.seed, cfg.train.deterministic)
        size = cfg.model.input_size
        self.source = setup.build_train_source(cfg.data, size)
        self.val_sets = setup.build_val_sets(cfg.data, size)
        self.backbone = setup.build_model(cfg.model).to(self.device)
        if not cfg.train.fast_layers:  # back to the stock nn.PReLU / nn.Conv2d (see marginface.models.layers)
            from marginface.models.layers import set_fast_layers

            set_fast_layers(self.backbone, False)
        self.head = setup.build_classifier(cfg.head, cfg.model.embedding_size, self.source.num_classes,
                                           rank=self.dist.rank, world_size=self.dist.world_size,
                                           seed=cfg.train.seed).to(self.device)
        self.sharded_head = hasattr(self.head, "class_range")  # Partial FC: checkpoints hold per-rank shards
        self.center = setup.build_center_loss(cfg.head, cfg.model.embedding_size, self.source.num_classes)
        if self.center is not None:
            self.center.to(self.device)
        if cfg.train.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.optimizer = setup.build_optimizer(cfg.optim, self.backbone, self.head, self.center,
                                               cfg.head.center_lr, cfg.head.center_weight)
        use_scaler = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        attach = getattr(self.head, "attach_optimizer", None)
        if attach is not None:  # Partial FC with sampling: the optimizer updates only the sampled rows
            attach(self.optimizer)
        # DDP sums (not averages) the backbone gradients: each rank back-propagates its part of the global loss
        self.ddp = distributed.wrap_ddp(self.backbone, self.device) if self.dist.enabled else self.backbone
        self.forward_backbone = torch.compile(self.ddp) if cfg.train.compile else self.ddp
        self._frozen = False

        micro = cfg.train.batch_size
        self.order = BatchOrder(len(self.source), micro, cfg.train.seed, rank=self.dist.rank,
                                world_size=self.dist.world_size, flip=cfg.data.flip, labels=self.source.labels,
                                samples_per_identity=cfg.data.samples_per_identity)
        self.steps_per_epoch = max(self.order.steps_per_epoch // cfg.train.grad_accum, 1)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.steps_per_epoch))
        self.freeze_steps = int(round(cfg.train.freeze_backbone_epochs * self.steps_per_epoch))
        self.batches = self._make_batches()

        self.step = 0
        self.best = {"metric": "", "value": None, "step": None}
        self.bad_steps_total = 0
        self.wall_before = 0.0  # wall seconds of earlier sessions of this run (resume)
        self.images_seen = 0
        self.last_eval: dict = {}
        self.last_eval_step: Optional[int] = None
        self.evals_without_improvement = 0
        self.train_seconds = 0.0  # time inside training steps only (no evaluation, no start-up)

    # ------------------------------------------------------------------ set-up helpers
    def _make_batches(self):
        images = getattr(self.source, "images", None)
        if images is not None:
            return InMemoryBatches(images, self.source.labels, self.order)
        from marginface.data.dataset import FaceDataset

        dataset = FaceDataset(self.source, image_size=self.cfg.model.input_size, flip=False,
                              skip_bad=self.cfg.data.skip_bad_images)
        return LoaderBatches(dataset, self.order, self.cfg.data.num_workers)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def model_info(self) -> dict:
        from marginface.models import count_parameters

        m = self.cfg.model
        return {"backbone": m.backbone, "params": count_parameters(self.backbone), "embedding_size": m.embedding_size,
                "input_size": m.input_size, "width_mult": m.width_mult, "num_classes": self.source.num_classes}

    def _classifier_memory_line(self) -> str:
        """The start-up line: the classifier's memory on this rank (weights + grad + optimizer state + logits)."""
        from marginface.heads.partial_fc import classifier_memory, describe_memory

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
            "last_eval": self.last_eval,
            "last_eval_step": self.last_eval_step,
            "train_seconds": self.train_seconds,
            "torch_rng": torch.get_rng_state(),
            "config": to_dict(self.cfg),
            "model_info": self.model_info(),
        }

    def save(self, name: str = "last") -> Path:
        """Write checkpoints/{name}.pt; collective under torchrun (each rank writes its classifier shard)."""
        path = self.ckpt_dir / f"{name}.pt"
        if self.sharded_head:
            return distributed.save_sharded(self.state() if self.dist.is_main else {}, self.head, self.optimizer,
                                            self.ckpt_dir, name, self.step)
        save_atomic(self.state(), path)
        return path

    def load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
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
        self.step = int(ckpt["step"])
        self.images_seen = int(ckpt.get("images_seen", 0))
        self.wall_before = float(ckpt.get("wall_seconds", 0.0))
        self.best = dict(ckpt.get("best") or self.best)
        self.bad_steps_total = int(ckpt.get("bad_steps_total", 0))
        self.evals_without_improvement = int(ckpt.get("evals_without_improvement", 0))
        self.last_eval = ckpt.get("last_eval") or {}
        self.last_eval_step = ckpt.get("last_eval_step")
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        torch.set_rng_state(ckpt["torch_rng"])

    # ------------------------------------------------------------------ one step
    def _set_lr(self) -> float:
        f = lr_factor(self.step, self.total_steps, self.cfg.schedule, self.steps_per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return self.cfg.optim.lr * f

    def _set_frozen(self, frozen: bool) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.backbone.train(not frozen)  # frozen: BatchNorm statistics stay as loaded
        self._frozen = frozen  # a frozen backbone bypasses DDP (no gradients to reduce)

    def _forward_loss(self, images_u8: torch.Tensor, labels: torch.Tensor) -> tuple:
        from marginface.data.dataset import normalize_batch

        x = normalize_batch(images_u8.to(self.device, non_blocking=True), self.cfg.data.normalize)
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
        """Forward/backward over the micro-batches of one optimizer step; returns (loss, stats, ok)."""
        self.optimizer.zero_grad(set_to_none=True)
        begin = getattr(self.head, "begin_step", None)
        if begin is not None:
            begin(self.step)  # Partial FC draws its classes from (seed, step, micro-batch, rank)
        total, stats = 0.0, {}
        accum = len(micro_batches)
        for i, (images, labels) in enumerate(micro_batches):
            # DDP: reduce gradients only after the last micro-batch
            skip_sync = self.dist.enabled and not self._frozen and i < accum - 1
            with self.ddp.no_sync() if skip_sync else contextlib.nullcontext():
                loss, stats = self._forward_loss(images, labels)
                bad = not bool(torch.isfinite(loss))
                if distributed.any_rank(bad) if self.dist.enabled else bad:  # every rank skips together
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
            return total, stats, False  # skip: an fp16 scaler handles its own overflow steps
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, stats, True

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        from marginface.evaluate.runner import evaluate_pair_set

        was_training = self.backbone.training
        results = {}
        for ps in self.val_sets:
            results[ps.name] = evaluate_pair_set(self.backbone, ps, flip=self.cfg.eval.flip,
                                                 batch_size=self.cfg.eval.batch_size, device=self.device,
                                                 normalize=self.cfg.data.normalize)
        self.backbone.train(was_training)
        return results

    def _evaluate_on_main(self) -> dict:
        """Rank 0 evaluates (the plain backbone: no collectives inside) while the others wait in the
        broadcast of its results; every rank then takes the same best/early-stop decisions."""
        results = self.evaluate() if self.dist.is_main else None
        return distributed.broadcast_object(results)

    def _after_eval(self, results: dict) -> bool:
        """Log, keep the best checkpoint; returns True when early stopping says stop."""
        self.last_eval = results
        self.last_eval_step = self.step
        self.logger.record("eval", self.step, {"eval": results})
        for name, m in results.items():
            flat = {k: v for k, v in m.items() if isinstance(v, (int, float))}
            flat.update({f"tar@{k}": v for k, v in m.get("tar_at_far", {}).items()})
            self.logger.scalars(self.step, flat, prefix=f"eval/{name}/")
        spec = self.cfg.eval.best_metric or f"{self.val_sets[0].name}/accuracy"
        value = metric_value(results, spec)
        lower = spec.split("/", 1)[1] in LOWER_IS_BETTER
        prev = self.best.get("value")
        improved = prev is None or (value < prev if lower else value > prev)
        self.save("last")
        if improved:
            self.best = {"metric": spec, "value": value, "step": self.step}
            self.evals_without_improvement = 0
            self.save("best")
        else:
            self.evals_without_improvement += 1
        summary = "  ".join(f"{n}: acc {m['accuracy']:.4f} auc {m['auc']:.4f}" for n, m in results.items())
        self.logger.message(f"eval @ step {self.step}: {summary}  (best {spec} = {self.best['value']:.4f} "
                            f"@ step {self.best['step']})")
        patience = self.cfg.eval.early_stop_patience
        return patience > 0 and self.evals_without_improvement >= patience

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self) -> dict:
        ensure_dir(self.run_dir)
        self._t_start = time.time()
        last = self.ckpt_dir / "last.pt"
        if self.dist.is_main:  # temp files of a save a kill interrupted (ours only; nothing is saving now)
            remove_stale_checkpoint_temps(self.ckpt_dir)
        if self.resume and last.is_file():
            self.load(last)
        if self.dist.is_main:  # rank 0 owns the run directory's files; the others log nowhere
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
            self.logger = RunLogger(self.run_dir, self.total_steps, self.step, console=self.console)
        else:
            self.logger = distributed.NullLogger()
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._on_signal)
        # CPU: glibc keeps freed memory for the run, so each step stops re-faulting gigabytes of fresh pages
        keep_memory = self.device.type == "cpu" and self.cfg.train.cpu_keep_memory and malloc.keep_freed_memory(True)
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
        if self.step >= self.total_steps:
            log.message(f"already at step {self.step} of {self.total_steps}: nothing to train")
            return
        self.backbone.train()
        self.head.train()
        stream = self.batches.iterate(self.step * cfg.train.grad_accum)
        if self.step == 0:
            images, _ = next(self.batches.iterate(0))
            log.image_grid("input/first_batch", images[:16], 0)
        bad_in_a_row = 0
        t_log, step_log = time.time(), self.step
        every_eval = cfg.eval.every
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
                values = {"loss": loss, "lr": lr, "images_per_second": ips, **stats}
                if self.freeze_steps or cfg.optim.backbone_lr_scale != 1.0:  # fine-tuning: the backbone's own lr
                    values["lr_backbone"] = 0.0 if self._frozen else lr * cfg.optim.backbone_lr_scale
                log.record("train", self.step, values)
                log.scalars(self.step, values, prefix="train/")
                log.progress(self.step, loss, lr, ips, eta)
                t_log, step_log = now, self.step
            if self.step % self.steps_per_epoch == 0:
                self._report_bad_images(self.step // self.steps_per_epoch)
            stop = False
            if every_eval and self.step % every_eval == 0 and self.step < self.total_steps:
                stop = self._after_eval(self._evaluate_on_main())
                if stop:
                    log.message(f"early stopping: no improvement in {cfg.eval.early_stop_patience} evaluations")
            elif self.step % cfg.train.checkpoint_every == 0:
                self.save("last")
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
        if self.val_sets and self.last_eval_step != self.step:
            self._after_eval(self._evaluate_on_main())
        else:
            self.save("last")
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
        from marginface.evaluate.report import write_report

        write_report(self.run_dir, report)  # report.md and the ROC plot beside report.json
        if self.console:
            print("\n" + format_table(self.last_eval), flush=True)
        return report
