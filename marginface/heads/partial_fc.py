"""Partial FC (An et al. 2022, "Killing Two Birds with One Stone: Efficient and Robust Training of
Face Recognition CNNs by Partial FC"): the class-centre matrix sharded by class over ranks, with
a sampled subset of negative classes per step.

One step on rank r of W (rank r holds the contiguous classes ``[start_r, end_r)``):

1. all-gather the embeddings (autograd-aware: the backward sums every rank's gradient for each
   block back to its owner) and the labels of the global batch;
2. sample columns: every positive class of the global batch that lives in this shard, plus random
   negatives up to ``ceil(sample_rate * C_r)``; the draw is a pure function of
   ``(seed, step, micro-batch, rank)`` so a resumed run samples exactly as the original did;
3. cosines between the normalised global batch and the normalised *sampled* rows only;
4. the margin, on the shard's columns (a row whose class lives on another rank has no target
   here; see `_needs_target_column` for the margins that still need to know its target cosine);
5. softmax cross-entropy over the classes of all ranks with a max and two sum all-reduces
   (`target_log_softmax`); every rank gets the same loss.

With ``sample_rate = 1`` and any world size the loss and every gradient equal the full-FC
`Classifier`'s. With world size 1 and ``sample_rate < 1`` it is Partial FC on one device.

Update of the shard (the paper's rule): only the sampled rows are updated. `attach_optimizer`
hooks the optimizer so that its step sees just the rows sampled in this step (weights, gradient
and optimizer state, e.g. SGD momentum, gathered in fp32); rows not sampled keep their weight and
their momentum untouched (no momentum drift, no weight decay) until they are sampled again.

Storage: ``shard_dtype`` bf16 halves the memory of weights, gradient and optimizer state; the
update of the sampled rows is computed in fp32 (the fp32 master copy exists only for those rows,
during the step) and stored back with stochastic rounding, so updates smaller than bf16's
resolution still move the weights on average. ``compute_dtype`` fp16/bf16 runs the cosine matmul
in half precision (the reference's ``fp16`` option); margin and cross-entropy stay fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marginface.errors import UserError
from marginface.heads.base import HeadOutput, LossHead
from marginface.heads.margins.base import Margin
from marginface import parallel as D

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # head.compute_dtype
# head.shard_dtype: fp16 storage would underflow small gradients (use head.compute_dtype=fp16)
SHARD_DTYPES = tuple(k for k in DTYPES if k != "fp16")
# Below this many weight elements the initial weights are drawn from the global torch RNG exactly as
# `Classifier` draws them (every rank draws the full matrix and keeps its rows), so a distributed
# run starts from the very weights of the single-process run. Above it (2^28 fp32 = 1 GiB) each
# block of classes is drawn from its own seeded generator: no rank ever holds the full matrix.
FULL_INIT_LIMIT = 1 << 28
INIT_BLOCK = 1 << 16


def class_range(num_classes: int, world_size: int, rank: int) -> tuple:
    """``[start, end)``: the contiguous classes of ``rank``; the first ``C mod W`` ranks hold one more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def step_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (seed, step, micro-batch, rank, purpose)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def num_sampled(num_local: int, sample_rate: float) -> int:
    """Columns a rank keeps per step (before adding positives beyond it): ceil(rate * C_r), >= 1."""
    return min(num_local, max(1, math.ceil(sample_rate * num_local - 1e-9)))


def sample_classes(positives: torch.Tensor, num_local: int, num_sample: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Sorted local class ids: all ``positives`` plus random others, ``max(num_sample, |positives|)``
    in total (all classes when ``num_sample >= num_local``)."""
    device = positives.device
    if num_sample >= num_local:
        return torch.arange(num_local, device=device)
    score = torch.rand(num_local, generator=generator, device=generator.device).to(device)
    score[positives] = 2.0  # above every uniform draw: positives are always kept
    k = max(num_sample, int(positives.numel()))
    return torch.topk(score, k, sorted=False).indices.sort().values


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16 rounding up or down with probability proportional to the distance (unbiased):
    add uniform random bits below bf16's last mantissa bit, then truncate."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, device=generator.device,
                          dtype=torch.int32).to(bits.device)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    finite = torch.isfinite(x)
    return torch.where(finite, rounded, x).to(torch.bfloat16)


class _TargetLogSoftmax(torch.autograd.Function):
    """log softmax of the target column over the columns of every rank: ``(logp_t N, correct N)``.

    Forward: m = all-reduce-MAX of the row maxima; s = all-reduce-SUM of sum_j exp(z_j - m); the
    target logit z_t lives on one rank (others hold target -1) and is all-reduce-SUMmed; then
    logp_t = z_t - m - log s. Backward needs no communication: d logp_t / d z_j = [j = t] - p_j
    with p this rank's softmax columns (kept from the forward, overwritten in place).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, collective: bool):
        n = logits.shape[0]
        valid = target >= 0
        idx = target.clamp(min=0).unsqueeze(1)
        if logits.shape[1] > 0:
            m = logits.detach().amax(dim=1)
        else:
            m = torch.full((n,), -torch.inf, device=logits.device, dtype=logits.dtype)
        if collective:
            D.all_reduce_max_(m)
        e = torch.exp(logits.detach() - m.unsqueeze(1))
        s = e.sum(dim=1)
        z_t = torch.where(valid, logits.detach().gather(1, idx).squeeze(1), torch.zeros_like(m))
        if collective:
            both = torch.stack([s, z_t])
            D.all_reduce_sum_(both)
            s, z_t = both[0], both[1]
        logp = z_t - m - torch.log(s)
        correct = z_t >= m
        e.div_(s.unsqueeze(1))
        ctx.save_for_backward(e, target)
        ctx.mark_non_differentiable(correct)
        return logp, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: torch.Tensor, _grad_correct):
        p, target = ctx.saved_tensors
        grad = p.mul_(-grad_logp.unsqueeze(1))  # in place: the probabilities are not needed again
        rows = (target >= 0).nonzero().squeeze(1)
        grad[rows, target[rows]] += grad_logp[rows]
        return grad, None, None


def target_log_softmax(logits: torch.Tensor, target: torch.Tensor, collective: bool = True) -> tuple:
    """``(log p_target N, target-is-argmax N)`` with the softmax over the columns of every rank.

    ``logits`` are this rank's ``N×C_r`` columns, ``target`` the column of each row's class here
    or -1 when it lives on another rank. In a single process: log_softmax(logits)[target].
    """
    return _TargetLogSoftmax.apply(logits.float(), target.long(), bool(collective and D.world_size() > 1))


def _needs_target_column(margin: nn.Module) -> bool:
    """Margins whose non-target logits depend on the row's target logit (SV-Softmax and
    CurricularFace mark negatives harder than f(theta_y) as "hard"; CurricularFace also averages
    cos(theta_y) over labelled rows for t). With the plain ``-1`` convention a shard that does not
    hold a row's class would see neither, so such margins get the row's global target cosine as
    one extra column (labelled), which is dropped after the margin."""
    return isinstance(margin, Margin) and type(margin).negatives is not Margin.negatives


class PartialFC(LossHead):
    """Sharded, sampled class centres + a margin; forward(local embeddings, local labels) -> HeadOutput.

    ``weight`` holds this rank's classes ``class_range`` (``(end-start)*K × D``; row ``c*K + k``
    is sub-centre k of local class c). ``state_dict`` keys are those of `Classifier` (``weight``,
    ``margin.*``); checkpoints store the shard through `marginface.train.distributed.save_sharded`.

    The returned ``loss`` is the global loss (identical on every rank); its gradient is this
    rank's part (see marginface.train.distributed). ``logits`` are this rank's sampled columns.
    """

    sharded = True  # the weight holds this rank's classes; checkpoints hold per-rank shards

    def __init__(self, embedding_size: int, num_classes: int, margin: nn.Module, *, sample_rate: float = 1.0,
                 num_subcenters: int = 1, focal_gamma: float = 0.0, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shard_dtype: str = "fp32", compute_dtype: str = "fp32") -> None:
        super().__init__()
        for key, v in (("embedding_size", embedding_size), ("num_classes", num_classes),
                       ("num_subcenters", num_subcenters), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"partial fc: {key} must be an integer >= 1, got {v!r}")
        if not 0.0 < float(sample_rate) <= 1.0:
            raise UserError(f"partial fc: sample_rate must be in (0, 1], got {sample_rate!r}")
        if not getattr(margin, "takes_cosines", True):
            raise UserError(f"partial fc: margin {getattr(margin, 'name', type(margin).__name__)!r} takes "
                            "un-normalised logits; Partial FC computes cosines (use the full classifier)")
        if num_classes < world_size:
            raise UserError(f"partial fc: {num_classes} classes cannot be sharded over {world_size} ranks")
        if shard_dtype not in SHARD_DTYPES:
            raise UserError(f"config key 'head.shard_dtype' must be one of {', '.join(SHARD_DTYPES)}, got {shard_dtype!r} "
                            "(fp16 storage would underflow small gradients; use head.compute_dtype=fp16)")
        if compute_dtype not in DTYPES:
            raise UserError(f"config key 'head.compute_dtype' must be one of {', '.join(DTYPES)}, "
                            f"got {compute_dtype!r}")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.num_subcenters = num_subcenters
        self.focal_gamma = float(focal_gamma)
        self.sample_rate = float(sample_rate)
        self.rank, self.world_size = rank, world_size
        self.seed = int(seed)
        self.shard_dtype = DTYPES[shard_dtype]
        self.compute_dtype = DTYPES[compute_dtype]
        self.class_range = class_range(num_classes, world_size, rank)
        self.num_local = self.class_range[1] - self.class_range[0]
        self.num_sample = num_sampled(self.num_local, self.sample_rate)
        self.margin = margin
        self.weight = nn.Parameter(self._init_rows().to(self.shard_dtype))
        self._step, self._micro = 0, 0
        self._touched: list = []
        self._saved: Optional[tuple] = None

    # ------------------------------------------------------------------ set-up
    def _init_rows(self) -> torch.Tensor:
        k, d = self.num_subcenters, self.embedding_size
        start, end = self.class_range
        if self.num_classes * k * d <= FULL_INIT_LIMIT:
            full = torch.empty(self.num_classes * k, d)
            nn.init.normal_(full, std=0.01)  # the draw Classifier makes
            return full[start * k:end * k].clone()
        rows = []
        for block in range(start // INIT_BLOCK, (end - 1) // INIT_BLOCK + 1):
            b0, b1 = block * INIT_BLOCK, min((block + 1) * INIT_BLOCK, self.num_classes)
            g = torch.Generator().manual_seed(step_seed(self.seed, block, 17))
            w = torch.randn((b1 - b0) * k, d, generator=g) * 0.01
            lo, hi = max(start, b0), min(end, b1)
            rows.append(w[(lo - b0) * k:(hi - b0) * k])
        return torch.cat(rows)

    def all_class_ranges(self) -> list:
        return [class_range(self.num_classes, self.world_size, r) for r in range(self.world_size)]

    @property
    def sampling(self) -> bool:
        return self.sample_rate < 1.0 and self.num_sample < self.num_local

    def begin_step(self, step: int) -> None:
        """Called by the trainer before each optimizer step: seeds the sampling of its micro-batches."""
        self._step, self._micro = int(step), 0
        self._touched = []

    def _generator(self, purpose: int) -> torch.Generator:
        g = torch.Generator(device=self.weight.device)
        g.manual_seed(step_seed(self.seed, self._step, self._micro, self.rank, purpose))
        return g

    # ------------------------------------------------------------------ forward
    def _cosine(self, emb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = F.normalize(emb, dim=1)
        wn = F.normalize(w.float(), dim=1)
        if self.compute_dtype != torch.float32:
            cos = (x.to(self.compute_dtype) @ wn.to(self.compute_dtype).t()).float()
        else:
            cos = x @ wn.t()
        if self.num_subcenters > 1:
            cos = cos.view(cos.shape[0], -1, self.num_subcenters).amax(dim=2)
        return cos

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        W = self.world_size
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = D.all_gather_with_grad(embeddings.float()) if W > 1 else embeddings.float()
            labels = D.all_gather_nograd(labels.long()) if W > 1 else labels.long()
            norms = emb.norm(dim=1)
            start, end = self.class_range
            in_shard = (labels >= start) & (labels < end)
            local = torch.where(in_shard, labels - start, torch.full_like(labels, -1))
            k = self.num_subcenters
            if self.training and self.sampling:
                positives = torch.unique(local[in_shard])
                cols = sample_classes(positives, self.num_local, self.num_sample, self._generator(1))
                remap = torch.full((self.num_local,), -1, dtype=torch.long, device=cols.device)
                remap[cols] = torch.arange(cols.numel(), device=cols.device)
                target = torch.where(in_shard, remap[local.clamp(min=0)], local)
                rows = (cols.unsqueeze(1) * k + torch.arange(k, device=cols.device)).reshape(-1)
                self._touched.append(rows)
                w = self.weight.index_select(0, rows)
            else:
                target = local
                w = self.weight
            self._micro += 1
            cos = self._cosine(emb, w)
            with torch.no_grad():
                own = cos.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
                cos_y = torch.where(in_shard, own, torch.zeros_like(own))
                if W > 1:
                    D.all_reduce_sum_(cos_y)  # each row's class lives on exactly one rank
            ncols = cos.shape[1]
            if W > 1 and _needs_target_column(self.margin):
                cos_in = torch.cat([cos, cos_y.unsqueeze(1)], dim=1)
                lab_in = torch.where(in_shard, target, torch.full_like(target, ncols))
                logits = self.margin(cos_in, lab_in, norms)[:, :ncols]
            else:
                logits = self.margin(cos, target, norms)
            logp_t, correct = target_log_softmax(logits, target, collective=W > 1)
            if self.focal_gamma == 0.0:
                loss = -logp_t.mean()
            else:
                weight = (1.0 - logp_t.exp()).clamp(min=1e-12) ** self.focal_gamma
                loss = -(weight * logp_t).mean()
            extra = getattr(self.margin, "extra_loss", None)
            extra_loss = extra(norms) if extra is not None else None
            if extra_loss is not None:
                # every rank computes it in full from the gathered norms: each back-propagates 1/W
                loss = loss + D.grad_scaled(extra_loss, 1.0 / W)
        with torch.no_grad():
            # plain top-1 (own cosine is the largest of the classes scored this step); see classifier.py
            row_max = cos.max(dim=1).values
            if W > 1:
                D.all_reduce_max_(row_max)
            plain_correct = cos_y >= row_max
            stats = {"mean_target_cosine": float(cos_y.mean()), "accuracy": float(plain_correct.float().mean()),
                     "margin_accuracy": float(correct.float().mean()),
                     "mean_norm": float(norms.mean())}
            if self.training and self.sampling:
                stats["sampled_classes"] = float(ncols)
            if extra_loss is not None:
                stats["extra_loss"] = float(extra_loss)
            margin_stats = getattr(self.margin, "stats", None)
            if margin_stats is not None:
                stats.update(margin_stats())
        return HeadOutput(loss=loss, logits=logits, stats=stats)

    # ------------------------------------------------------------------ the update of sampled rows
    @property
    def needs_row_update(self) -> bool:
        return self.sampling or self.shard_dtype != torch.float32

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer`` update only the rows sampled in the step (and in fp32 for bf16 storage).

        A pre-step hook swaps the weight, its gradient and its row-shaped optimizer state for the
        fp32 rows sampled in this step; a post-step hook writes them back (rounded to the storage
        dtype) and restores the full shard. Outside the step everything has the shard's shape, so
        checkpoints, clipping and the scaler see an ordinary parameter.
        """
        if self.needs_row_update:
            optimizer.register_step_pre_hook(self._pre_step)
            optimizer.register_step_post_hook(self._post_step)

    def rows_to_update(self) -> Optional[torch.Tensor]:
        """Weight rows sampled in this step (union over its micro-batches); None = every row."""
        if not (self.sampling and self._touched):
            return None
        return torch.unique(torch.cat(self._touched))

    def _pre_step(self, optimizer, args, kwargs) -> None:
        p = self.weight
        if p.grad is None:
            self._saved = None
            return
        rows = self.rows_to_update()
        state = optimizer.state[p]
        n = p.shape[0]
        full_state = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n}

        def take(t: torch.Tensor) -> torch.Tensor:
            return (t if rows is None else t.index_select(0, rows)).float()

        full = p.data
        grad = take(p.grad)
        p.data = take(full) if rows is not None or full.dtype != torch.float32 else full
        p.grad = grad
        for k, v in full_state.items():
            state[k] = take(v)
        self._saved = (full, full_state, rows)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._saved is None:
            return
        full, full_state, rows = self._saved
        self._saved = None
        p = self.weight
        state = optimizer.state[p]
        g = self._generator(2) if full.dtype == torch.bfloat16 else None
        active = p.data.shape[0]

        def store(dst: torch.Tensor, src: torch.Tensor) -> None:
            if dst is src:
                return
            val = stochastic_round_bf16(src, g) if dst.dtype == torch.bfloat16 else src.to(dst.dtype)
            if rows is None:
                dst.copy_(val)
            else:
                dst.index_copy_(0, rows, val)

        store(full, p.data)
        for k, v in list(state.items()):
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == active:
                dst = full_state.get(k)
                if dst is None:  # state created by this (first) step: rows never sampled start at zero
                    dst = torch.zeros_like(full)
                store(dst, v)
                state[k] = dst
        p.data = full
        p.grad = None

    # ------------------------------------------------------------------ reporting
    def memory_report(self, batch_size: int, optimizer_states: int = 1) -> dict:
        """Bytes this rank's classifier takes; see `classifier_memory`."""
        return classifier_memory(self.num_classes, self.embedding_size, self.world_size, batch_size,
                                 self.sample_rate, self.num_subcenters, self.weight.element_size(),
                                 optimizer_states, rank=self.rank)

    def extra_repr(self) -> str:
        s, e = self.class_range
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, classes=[{s}, {e}), "
                f"rank={self.rank}/{self.world_size}, sample_rate={self.sample_rate}, "
                f"num_subcenters={self.num_subcenters}, shard_dtype={self.shard_dtype}, "
                f"compute_dtype={self.compute_dtype}")


def classifier_memory(num_classes: int, embedding_size: int, world_size: int, batch_size: int,
                      sample_rate: float = 1.0, num_subcenters: int = 1, weight_bytes: int = 4,
                      optimizer_states: int = 1, rank: int = 0) -> dict:
    """Memory of one rank's classifier: weights, their gradient and optimizer state (stored in the
    shard dtype; ``optimizer_states`` = 1 for SGD with momentum, 2 for AdamW, 0 for plain SGD)
    and one fp32 logit matrix of the global ``batch_size`` × sampled columns (the head keeps a
    few such matrices alive at its peak: cosines, margin logits, softmax)."""
    s, e = class_range(num_classes, world_size, rank)
    local = e - s
    cols = num_sampled(local, sample_rate)
    rows = local * num_subcenters
    w = rows * embedding_size * weight_bytes
    out = {"classes_local": local, "columns_sampled": cols, "weights_bytes": w, "grad_bytes": w,
           "optimizer_bytes": w * optimizer_states,
           "logits_bytes": batch_size * cols * num_subcenters * 4}
    out["total_bytes"] = sum(v for k, v in out.items() if k.endswith("_bytes"))
    return out


def _size(n: int) -> str:
    for unit, f in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n} B"


def describe_memory(report: dict, batch_size: int) -> str:
    """One start-up line from `classifier_memory`."""
    return (f"classifier per rank: {report['classes_local']:,} classes ({report['columns_sampled']:,} sampled per "
            f"step): weights {_size(report['weights_bytes'])} + grad {_size(report['grad_bytes'])} + optimizer "
            f"state {_size(report['optimizer_bytes'])}; logits at global batch {batch_size}: "
            f"{_size(report['logits_bytes'])} per fp32 matrix")
