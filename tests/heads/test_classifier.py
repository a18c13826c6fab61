"""Classifier, focal loss, sub-centres, centre loss, pair loss and a tiny learnability check."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marginface.errors import UserError
from marginface.heads import (MARGINS, CenterLoss, Classifier, PairBCELoss, build_head,
                              build_margin, focal_loss)


def data(n=6, d=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


def test_cosines_stats_and_loss():
    emb, y = data()
    head = build_head("cosface", 8, 5)
    assert head.weight.shape == (5, 8)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.5)
    out = head(emb, y)
    x = emb.numpy() / np.linalg.norm(emb.numpy(), axis=1, keepdims=True)
    w = head.weight.detach().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = x @ w.T
    cos_y = cos[np.arange(6), y.numpy()]
    assert out.stats["mean_target_cosine"] == pytest.approx(cos_y.mean(), abs=1e-6)
    ref = 64 * cos
    ref[np.arange(6), y.numpy()] -= 64 * 0.35
    np.testing.assert_allclose(out.logits.detach().numpy(), ref, atol=1e-4)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y))
    plain_acc = (cos.argmax(1) == y.numpy()).mean()  # top-1 of the cosines: what the embedding learnt
    assert out.stats["accuracy"] == pytest.approx(plain_acc)
    assert out.stats["margin_accuracy"] == pytest.approx((out.logits.argmax(1) == y).float().mean().item())
    assert out.stats["mean_norm"] == pytest.approx(emb.norm(dim=1).mean().item(), rel=1e-6)
    out.loss.backward()
    assert torch.isfinite(head.weight.grad).all()


def test_subcenter_max():
    d, c, k = 4, 3, 3
    head = build_head("arcface", d, c, num_subcenters=k)
    assert head.weight.shape == (c * k, d)
    emb, y = data(n=5, d=d, c=c)
    out = head(emb, y)
    x = F.normalize(emb, dim=1)
    w = F.normalize(head.weight.detach(), dim=1)
    full = (x @ w.T).view(5, c, k)  # row c*K + k is sub-centre k of class c
    torch.testing.assert_close(head.cosine(emb).detach(), full.amax(2))
    cos_y = full.amax(2)[torch.arange(5), y]
    assert out.stats["mean_target_cosine"] == pytest.approx(cos_y.mean().item(), abs=1e-6)
    torch.testing.assert_close(out.logits, build_margin("arcface")(full.amax(2), y))
    # the gradient only reaches the winning sub-centre of each class
    out.loss.backward()
    winners = full.argmax(2)  # N × C
    used = torch.zeros(c * k, dtype=torch.bool)
    for i in range(5):
        for j in range(c):
            used[j * k + winners[i, j]] = True
    assert (head.weight.grad[~used] == 0).all()


def test_subcenters_work_with_every_margin():
    emb, y = data()
    for name in MARGINS:
        out = build_head(name, 8, 5, num_subcenters=2)(emb, y)
        assert torch.isfinite(out.loss) and out.logits.shape == (6, 5)


def test_unnormalised_softmax():
    emb, y = data()
    head = build_head("softmax", 8, 5, normalize=False)
    out = head(emb, y)
    torch.testing.assert_close(out.logits, emb @ head.weight.T)
    torch.testing.assert_close(out.loss, F.cross_entropy(emb @ head.weight.T, y))
    cos_y = F.cosine_similarity(emb, head.weight[y], dim=1)
    assert out.stats["mean_target_cosine"] == pytest.approx(cos_y.mean().item(), abs=1e-6)
    with pytest.raises(UserError, match="normalize=False.*softmax"):
        build_head("arcface", 8, 5, normalize=False)


def test_focal():
    emb, y = data()
    logits = torch.randn(6, 5) * 3
    torch.testing.assert_close(focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))
    p = F.softmax(logits, 1)[torch.arange(6), y]
    ref = (-(1 - p) ** 2 * torch.log(p)).mean()
    torch.testing.assert_close(focal_loss(logits, y, 2.0), ref)
    plain = build_head("arcface", 8, 5)
    focal0 = build_head("arcface", 8, 5, focal_gamma=0.0)
    focal0.load_state_dict(plain.state_dict())
    torch.testing.assert_close(focal0(emb, y).loss, plain(emb, y).loss)
    focal2 = build_head("arcface", 8, 5, focal_gamma=2.0)
    focal2.load_state_dict(plain.state_dict())
    out = focal2(emb, y)
    torch.testing.assert_close(out.loss, focal_loss(out.logits, y, 2.0))
    assert out.loss <= plain(emb, y).loss * (1 + 1e-6)  # (1-p)^gamma <= 1: focal never exceeds CE


def test_magface_extra_loss_added():
    emb, y = data()
    head = build_head("magface", 8, 5)
    out = head(emb, y)
    norms = emb.norm(dim=1)
    extra = head.margin.extra_loss(norms)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y) + extra)
    assert out.stats["extra_loss"] == pytest.approx(extra.item(), rel=1e-6)


def test_autocast_keeps_fp32():
    emb, y = data()
    head = build_head("arcface", 8, 5)
    ref = head(emb, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(emb.bfloat16(), y)
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.logits, head(emb.bfloat16().float(), y).logits)
    torch.testing.assert_close(out.loss, ref.loss, atol=0.5, rtol=0.05)


def test_margin_stats_merged():
    emb, y = data()
    out = build_head("curricularface", 8, 5)(emb, y)
    assert "curricular_t" in out.stats
    assert all(isinstance(v, float) for v in out.stats.values())


def test_build_head_errors():
    with pytest.raises(UserError, match="'q'.*valid parameters: s, m"):
        build_head("cosface", 8, 5, q=1)
    with pytest.raises(UserError, match="num_subcenters"):
        build_head("cosface", 8, 5, num_subcenters=0)
    with pytest.raises(UserError, match="focal_gamma"):
        build_head("cosface", 8, 5, focal_gamma=-1)
    assert build_head("arcface", 8, 5, m=0.3, s=30.0).margin.m == 0.3


def test_center_loss_by_hand():
    loss = CenterLoss(3, 2)
    with torch.no_grad():
        loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]]))
    x = torch.tensor([[1.0, 0.0], [1.0, 3.0], [2.0, -1.0], [0.0, 2.0]])
    y = torch.tensor([0, 1, 2, 0])
    # squared distances 1, 4, 0, 4 -> 1/2 * mean = 1/2 * 9/4
    assert loss(x, y).item() == pytest.approx(9 / 8)
    loss(x, y).backward()
    # d/dc_0 = -(1/N) sum_{i: y_i = 0} (x_i - c_0) = -([1,0] + [0,2]) / 4
    torch.testing.assert_close(loss.centers.grad[0], torch.tensor([-0.25, -0.5]))


def test_pair_bce_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 2])
    loss = PairBCELoss(scale=10.0, bias=-3.0, hard_negatives=True)
    out = loss(emb, y)
    # one positive pair (0,1) cos 0.8; hardest negative: (1,2) cos 0.6
    logits = torch.tensor([10 * 0.8 - 3, 10 * 0.6 - 3])
    torch.testing.assert_close(out.logits.detach(), logits)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0])))
    assert out.stats["mean_target_cosine"] == pytest.approx(0.8)
    assert out.stats["accuracy"] == pytest.approx(0.5)
    out.loss.backward()
    assert loss.bias.grad is not None
    rand = PairBCELoss(neg_per_pos=2.0)(emb, y)
    assert rand.stats["pairs"] == 3.0 and torch.isfinite(rand.loss)
    single = PairBCELoss()(emb[:1], y[:1])
    assert single.loss.item() == 0.0


# -- learnability: separable Gaussian clusters, a linear "backbone", 150 SGD steps ---------------
@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def clusters(classes=20, dim=32, per_class=20):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(classes, dim, generator=g)
    means = 4 * means / means.norm(dim=1, keepdim=True)
    y = torch.arange(classes).repeat_interleave(per_class)
    return means[y] + torch.randn(len(y), dim, generator=g), y


def train(head, x, y, steps=150, lr=0.1, center=None, center_weight=0.003, center_lr=0.5):
    torch.manual_seed(0)
    backbone = torch.nn.Linear(x.shape[1], x.shape[1])
    groups = [{"params": list(backbone.parameters()) + list(head.parameters())}]
    if center is not None:  # the documented recipe: own group, lr = center_lr / center_weight
        groups.append({"params": center.parameters(), "lr": center_lr / center_weight, "momentum": 0.0})
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,))
        emb = backbone(x[idx])
        loss = head(emb, y[idx]).loss
        if center is not None:
            loss = loss + center_weight * center(emb, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return backbone


CASES = [(name, {}) for name in MARGINS] + [
    ("sv_softmax", {"base": "arcface"}), ("sv_softmax", {"base": "cosface"}),
    ("arcface", {"num_subcenters": 3}), ("arcface", {"focal_gamma": 2.0}),
    ("softmax", {"normalize": False}),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in CASES])
def test_learns_separable_clusters(one_thread, name, kw):
    torch.manual_seed(0)
    x, y = clusters()
    head = build_head(name, x.shape[1], 20, **kw)
    backbone = train(head, x, y)
    head.eval()
    with torch.no_grad():
        acc = (head.cosine(backbone(x)).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc


def test_learns_with_center_loss_and_pairs(one_thread):
    torch.manual_seed(0)
    x, y = clusters()
    center = CenterLoss(20, x.shape[1])
    backbone = train(build_head("softmax", x.shape[1], 20), x, y, center=center)
    with torch.no_grad():
        emb = backbone(x)
        class_means = torch.stack([emb[y == c].mean(0) for c in range(20)])
        rel = ((class_means - center.centers).norm(dim=1) / class_means.norm(dim=1)).mean().item()
        acc = ((emb[:, None] - center.centers[None]).norm(dim=2).argmin(1) == y).float().mean().item()
    assert rel < 0.15 and acc > 0.85, (rel, acc)  # the centres track the moving class means
    pair = PairBCELoss()
    backbone = train(pair, x, y, steps=200)
    with torch.no_grad():
        emb = F.normalize(backbone(x), dim=1)
        means = F.normalize(torch.stack([emb[y == c].mean(0) for c in range(20)]), dim=1)
        acc = ((emb @ means.T).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc
