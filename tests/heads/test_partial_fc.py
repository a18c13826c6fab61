"""Partial FC: class sharding, sampling, the distributed softmax cross-entropy, every margin against
the full classifier (1 and 2 gloo ranks), the sampled-rows-only update, bf16 storage, memory."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from marginface.heads import MARGINS, Classifier, build_margin
from marginface.heads.partial_fc import (PartialFC, class_range, classifier_memory, num_sampled, sample_classes,
                                         stochastic_round_bf16, target_log_softmax)

N, DIM, C = 24, 16, 50
# every margin with its defaults, plus sub-centres and focal loss (name, margin params, head options);
# plain_softmax (un-normalised logits, takes_cosines False) is full-classifier only (tests/heads/test_plain_softmax.py)
CASES = [(name, {}, {}) for name, cls in MARGINS.items() if cls.takes_cosines] + [
    ("arcface", {}, {"num_subcenters": 3}),
    ("cosface", {}, {"focal_gamma": 2.0}),
    ("sv_softmax", {"base": "arcface"}, {}),
]
CASE_IDS = [f"{n}{'-' + '-'.join(f'{k}={v}' for k, v in {**p, **o}.items()) if (p or o) else ''}" for n, p, o in CASES]


def _data(seed=0, n=N, c=C):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, DIM, generator=g) * 5
    labels = torch.randint(0, c, (n,), generator=g)
    labels[:4] = torch.tensor([0, c - 1, c // 2, c // 2 - 1])  # classes at both shard edges
    return emb, labels


def _pair(name, params, opts, world=1, rank=0, c=C, **pfc_kw):
    """A full Classifier and a PartialFC shard with the same initial weights."""
    torch.manual_seed(1)
    ref = Classifier(DIM, c, build_margin(name, **params), **opts)
    torch.manual_seed(1)
    pfc = PartialFC(DIM, c, build_margin(name, **params), rank=rank, world_size=world, **opts, **pfc_kw)
    s, e = pfc.class_range
    k = opts.get("num_subcenters", 1)
    assert torch.equal(pfc.weight, ref.weight[s * k:e * k].to(pfc.weight.dtype))  # Classifier's init, sliced
    return ref, pfc


def _check_against_full(name, params, opts, world, rank, steps=2):
    """Loss, gradients (embeddings and weights) and margin buffers of a shard equal the full head's."""
    ref, pfc = _pair(name, params, opts, world, rank)
    s, e = pfc.class_range
    k = opts.get("num_subcenters", 1)
    n_local = N // world
    for step in range(steps):  # two steps: buffer updates (t, EMA, iteration) must agree too
        emb, labels = _data(seed=step)
        e_ref = emb.clone().requires_grad_()
        out_ref = ref(e_ref, labels)
        out_ref.loss.backward()
        e_loc = emb[rank * n_local:(rank + 1) * n_local].clone().requires_grad_()
        pfc.begin_step(step)
        out = pfc(e_loc, labels[rank * n_local:(rank + 1) * n_local])
        out.loss.backward()
        msg = f"{name} {params} {opts} rank {rank}/{world} step {step}"
        torch.testing.assert_close(out.loss.detach(), out_ref.loss.detach(), rtol=1e-5, atol=1e-5, msg=msg)
        torch.testing.assert_close(e_loc.grad, e_ref.grad[rank * n_local:(rank + 1) * n_local],
                                   rtol=1e-4, atol=1e-6, msg=msg)
        torch.testing.assert_close(pfc.weight.grad, ref.weight.grad[s * k:e * k], rtol=1e-4, atol=1e-6, msg=msg)
        for key in ("mean_target_cosine", "accuracy"):
            assert math.isclose(out.stats[key], out_ref.stats[key], rel_tol=1e-5, abs_tol=1e-6), (msg, key)
        for (bn, b1), (_, b2) in zip(ref.margin.named_buffers(), pfc.margin.named_buffers()):
            torch.testing.assert_close(b2, b1, rtol=1e-6, atol=1e-7, msg=f"{msg} buffer {bn}")
        ref.weight.grad = None
        pfc.weight.grad = None


# ------------------------------------------------------------------ single process
def test_class_ranges_are_contiguous_and_cover_every_class():
    for c, w in [(10, 3), (7, 7), (100, 8), (1_000_000, 8)]:
        ranges = [class_range(c, w, r) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == c
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_sampling_keeps_every_positive_and_the_rate():
    positives = torch.tensor([3, 17, 500, 999])
    for rate in (0.1, 0.3, 0.05, 1.0):
        n = num_sampled(1000, rate)
        assert n == min(1000, math.ceil(rate * 1000))
        idx = sample_classes(positives, 1000, n, torch.Generator().manual_seed(0))
        assert len(idx) == max(n, 4)
        assert torch.equal(idx, torch.unique(idx))  # sorted, no repeats
        assert set(positives.tolist()) <= set(idx.tolist())
    many = torch.arange(0, 1000, 5)  # 200 positives > 100 sampled: all kept, nothing else
    idx = sample_classes(many, 1000, 100, torch.Generator().manual_seed(0))
    assert torch.equal(idx, many)
    a = sample_classes(positives, 1000, 100, torch.Generator().manual_seed(7))
    b = sample_classes(positives, 1000, 100, torch.Generator().manual_seed(7))
    c = sample_classes(positives, 1000, 100, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_target_log_softmax_is_cross_entropy_in_one_process():
    logits = torch.randn(9, 13, requires_grad=True)
    labels = torch.randint(0, 13, (9,))
    logp, correct = target_log_softmax(logits, labels)
    (-logp.mean()).backward()
    ref = logits.detach().clone().requires_grad_()
    F.cross_entropy(ref, labels).backward()
    torch.testing.assert_close(-logp.mean(), F.cross_entropy(ref, labels))
    torch.testing.assert_close(logits.grad, ref.grad)
    assert torch.equal(correct, ref.argmax(1) == labels)


@pytest.mark.parametrize("name, params, opts", CASES, ids=CASE_IDS)
def test_one_rank_equals_the_full_classifier(name, params, opts):
    _check_against_full(name, params, opts, world=1, rank=0)


def test_sampled_forward_uses_only_sampled_columns():
    c = 200
    _, pfc = _pair("arcface", {}, {}, c=c, sample_rate=0.25)
    emb, labels = _data(n=N, c=c)
    pfc.begin_step(3)
    out = pfc(emb, labels)
    rows = pfc.rows_to_update()
    assert out.logits.shape == (N, max(50, len(rows))) and len(rows) == 50 == out.stats["sampled_classes"]
    assert set(labels.tolist()) <= set(rows.tolist())
    # the loss is plain ArcFace cross-entropy over the sampled columns
    remap = {int(r): i for i, r in enumerate(rows)}
    w = pfc.weight.detach()[rows]
    cos = F.normalize(emb) @ F.normalize(w).t()
    target = torch.tensor([remap[int(y)] for y in labels])
    expect = F.cross_entropy(build_margin("arcface")(cos, target), target)
    torch.testing.assert_close(out.loss.detach(), expect, rtol=1e-5, atol=1e-5)
    # deterministic from (seed, step, micro-batch, rank): the same step draws the same classes
    pfc.begin_step(3)
    pfc(emb, labels)
    assert torch.equal(pfc.rows_to_update(), rows)
    pfc.begin_step(4)
    pfc(emb, labels)
    assert not torch.equal(pfc.rows_to_update(), rows)


def test_only_sampled_rows_are_updated():
    """The paper's rule: a row not sampled in a step keeps its weight and its momentum (no weight
    decay, no momentum drift); sampled rows take an ordinary SGD step."""
    c, lr, mom, wd = 120, 0.5, 0.9, 5e-4
    _, pfc = _pair("cosface", {}, {}, c=c, sample_rate=0.2)
    opt = torch.optim.SGD(pfc.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    pfc.attach_optimizer(opt)
    w_prev = pfc.weight.detach().clone()
    buf_prev = torch.zeros_like(w_prev)
    touched_ever = torch.zeros(c, dtype=torch.bool)
    for step in range(3):
        emb, labels = _data(seed=step, c=c)
        opt.zero_grad(set_to_none=True)
        pfc.begin_step(step)
        pfc(emb, labels).loss.backward()
        grad = pfc.weight.grad.detach().clone()
        rows = pfc.rows_to_update()
        opt.step()
        assert pfc.weight.grad is None and pfc.weight.shape == (c, DIM)
        buf = opt.state[pfc.weight]["momentum_buffer"]
        assert buf.shape == (c, DIM)
        mask = torch.zeros(c, dtype=torch.bool)
        mask[rows] = True
        touched_ever |= mask
        assert torch.equal(pfc.weight.detach()[~mask], w_prev[~mask])  # untouched, bit for bit
        assert torch.equal(buf[~mask], buf_prev[~mask])
        expect_buf = mom * buf_prev[mask] + grad[mask] + wd * w_prev[mask]
        torch.testing.assert_close(buf[mask], expect_buf, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(pfc.weight.detach()[mask], w_prev[mask] - lr * expect_buf, rtol=1e-6, atol=1e-8)
        w_prev, buf_prev = pfc.weight.detach().clone(), buf.clone()
    assert not touched_ever.all()  # some rows were never sampled: still at their initial weights
    assert torch.equal(buf_prev[~touched_ever], torch.zeros_like(buf_prev[~touched_ever]))


def test_bf16_shard_storage_with_stochastic_rounding():
    x = torch.full((20000,), 1.0 + 2 ** -10)  # between two bf16 neighbours (1 and 1 + 2^-7), 1/8 of the way
    r = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) <= {1.0, 1.0 + 2 ** -7}
    assert abs(float(r.mean()) - float(x[0])) < 2e-4  # unbiased: round-to-nearest would give exactly 1.0
    c = 80
    _, pfc = _pair("arcface", {}, {}, c=c, sample_rate=0.5, shard_dtype="bf16")
    assert pfc.weight.dtype == torch.bfloat16
    opt = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    pfc.attach_optimizer(opt)
    w0 = pfc.weight.detach().clone()
    emb, labels = _data(c=c)
    losses = []
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        pfc.begin_step(step)
        out = pfc(emb, labels)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert pfc.weight.dtype == torch.bfloat16
    assert opt.state[pfc.weight]["momentum_buffer"].dtype == torch.bfloat16
    assert not torch.equal(pfc.weight.detach(), w0) and losses[-1] < losses[0]


def test_half_precision_cosine_matmul_is_close():
    ref, pfc = _pair("arcface", {}, {}, compute_dtype="bf16")
    emb, labels = _data()
    torch.testing.assert_close(pfc(emb, labels).loss, ref(emb, labels).loss, rtol=0.05, atol=0.5)


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for the backward of fn() (activation memory)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_sampling_cuts_logit_compute_and_activation_memory():
    # the bar at one million classes: PFC 0.1 < 20% of the full classifier's logits
    full = classifier_memory(1_000_000, 512, 2, 256, 1.0)
    part = classifier_memory(1_000_000, 512, 2, 256, 0.1)
    assert part["logits_bytes"] / full["logits_bytes"] < 0.2 and part["weights_bytes"] == full["weights_bytes"]
    # measured on a smaller problem: what autograd saves for the backward of the head
    c, n = 20_000, 64
    emb, labels = _data(n=n, c=c)
    sizes = {}
    for rate in (1.0, 0.1):
        torch.manual_seed(0)
        pfc = PartialFC(DIM, c, build_margin("arcface"), sample_rate=rate)
        x = emb.clone().requires_grad_()
        sizes[rate], _ = _saved_bytes(lambda: pfc(x, labels).loss)
    assert sizes[0.1] < 0.2 * sizes[1.0], sizes


# ------------------------------------------------------------------ two gloo ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # the distributed softmax cross-entropy equals F.cross_entropy on the concatenated logits
        g = torch.Generator().manual_seed(0)
        full = torch.randn(10, 29, generator=g) * 8
        labels = torch.randint(0, 29, (10,), generator=g)
        labels[:2] = torch.tensor([0, 28])
        s, e = class_range(29, 2, rank)
        shard = full[:, s:e].clone().requires_grad_()
        target = torch.where((labels >= s) & (labels < e), labels - s, torch.full_like(labels, -1))
        logp, correct = target_log_softmax(shard, target)
        loss = -logp.mean()
        loss.backward()
        ref = full.clone().requires_grad_()
        ref_loss = F.cross_entropy(ref, labels)
        ref_loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(shard.grad, ref.grad[:, s:e], rtol=1e-5, atol=1e-7)
        assert torch.equal(correct, ref.argmax(1) == labels)
        # every margin: loss, gradients and margin buffers equal the single-process full classifier's
        for name, params, opts in CASES:
            _check_against_full(name, params, opts, world=2, rank=rank)
        # sampling on two ranks keeps every positive of the *global* batch
        c = 300
        _, pfc = _pair("arcface", {}, {}, world=2, rank=rank, c=c, sample_rate=0.1)
        emb, labels = _data(c=c)
        n = N // 2
        pfc.begin_step(5)
        out = pfc(emb[rank * n:(rank + 1) * n], labels[rank * n:(rank + 1) * n])
        s, e = pfc.class_range
        rows = pfc.rows_to_update() + s
        mine = {int(y) for y in labels if s <= y < e}
        assert mine <= set(rows.tolist()) and len(rows) == max(15, len(mine))
        assert torch.isfinite(out.loss)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_the_full_classifier():
    mp.spawn(_two_rank_worker, args=(_free_port(),), nprocs=2, join=True)
