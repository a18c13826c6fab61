"""Triplet and contrastive losses on the P x K batches the pair BCE loss uses: their formulas by
hand, their registry entries and config checks, and a few training steps with a falling loss."""
import json
import math

import pytest
import torch

from marginface.errors import UserError
from marginface.heads import PAIR_LOSSES, ContrastiveLoss, TripletLoss, build_loss_head
from marginface.train.runconfig import load_config
from marginface.train.trainer import Trainer


def unit(*rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


# four unit vectors in the plane: identity 0 at 0° and 60°, identity 1 at 90° and 180°
ANGLES = torch.tensor([0.0, 60.0, 90.0, 180.0]) * math.pi / 180
EMB = torch.stack([ANGLES.cos(), ANGLES.sin()], dim=1)
LABELS = torch.tensor([0, 0, 1, 1])


def sqdist(a, b):
    return 2 - 2 * math.cos((a - b) * math.pi / 180)


def test_triplet_batch_hard_by_hand():
    loss = TripletLoss(margin=0.2)(EMB, LABELS)
    # per anchor: (farthest positive, nearest negative) squared distances
    by_anchor = [(sqdist(0, 60), sqdist(0, 90)), (sqdist(60, 0), sqdist(60, 90)),
                 (sqdist(90, 180), sqdist(90, 60)), (sqdist(180, 90), sqdist(180, 60))]
    expected = sum(max(0.0, p - n + 0.2) for p, n in by_anchor) / 4
    assert loss.loss.item() == pytest.approx(expected, abs=1e-5)
    assert loss.stats["mean_target_cosine"] == pytest.approx((math.cos(math.pi / 3) + math.cos(math.pi / 2)) / 2, abs=1e-6)


def test_triplet_all_mining_averages_the_active_triplets():
    out = TripletLoss(margin=0.2, mining="all")(EMB, LABELS)
    deg = [0, 60, 90, 180]
    hinges = []
    for a in range(4):
        for p in range(4):
            for n in range(4):
                if a != p and LABELS[a] == LABELS[p] and LABELS[a] != LABELS[n]:
                    hinges.append(max(0.0, sqdist(deg[a], deg[p]) - sqdist(deg[a], deg[n]) + 0.2))
    active = [h for h in hinges if h > 0]
    assert len(hinges) == 8 and out.logits.numel() == 8
    assert out.loss.item() == pytest.approx(sum(active) / len(active), abs=1e-5)
    assert out.stats["active"] == pytest.approx(len(active) / 8)


def test_contrastive_by_hand():
    out = ContrastiveLoss(margin=1.0)(EMB, LABELS)
    deg = [0, 60, 90, 180]
    pos = [math.sqrt(sqdist(0, 60)) ** 2, math.sqrt(sqdist(90, 180)) ** 2]
    neg = [max(0.0, 1.0 - math.sqrt(sqdist(deg[i], deg[j]))) ** 2 for i in (0, 1) for j in (2, 3)]
    expected = (sum(pos) / 2 + sum(neg) / 4) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)
    assert out.logits.numel() == 6
    # identical embeddings: distance 0, and still finite gradients
    x = torch.ones(4, 3, requires_grad=True)
    ContrastiveLoss()(x, LABELS).loss.backward()
    assert torch.isfinite(x.grad).all()


def test_no_usable_pairs_gives_a_zero_loss():
    for head in (TripletLoss(), ContrastiveLoss()):
        out = head(torch.randn(1, 4, requires_grad=True), torch.tensor([3]))
        assert out.loss.item() == 0.0
    out = TripletLoss()(torch.randn(3, 4), torch.tensor([0, 1, 2]))  # no positives
    assert out.loss.item() == 0.0


def test_registered_and_checked():
    assert isinstance(build_loss_head("triplet", 8, 5, {"margin": 0.3, "mining": "all"}), TripletLoss)
    assert isinstance(build_loss_head("contrastive", 8, 5), ContrastiveLoss)
    assert {"pair_bce", "triplet", "contrastive"} <= set(PAIR_LOSSES)
    with pytest.raises(UserError, match="mining must be one of batch_hard, all"):
        build_loss_head("triplet", 8, 5, {"mining": "semi"})
    with pytest.raises(UserError, match="margin must be a number > 0"):
        build_loss_head("contrastive", 8, 5, {"margin": 0})
    with pytest.raises(UserError, match="head.loss = triplet needs positive pairs"):
        load_config(None, ["head.loss=triplet", "head.params={}"])


TINY = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=64",
        "data.synthetic.identities=40", "data.synthetic.images_per_identity=8",
        "data.synthetic.val_identities=20", "data.synthetic.val_images_per_identity=2",
        "data.synthetic.val_pairs=40", "train.batch_size=32", "data.samples_per_identity=4",
        "train.max_steps=40", "train.log_every=1", "schedule.warmup_steps=0", "eval.every=0", "head.params={}"]


@pytest.mark.parametrize("loss", ["triplet", "contrastive"])
def test_trains_with_a_falling_loss(loss, tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    report = Trainer(load_config(None, [*TINY, f"head.loss={loss}"]), tmp_path, console=False).fit()
    assert report["train"]["bad_steps"] == 0
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
