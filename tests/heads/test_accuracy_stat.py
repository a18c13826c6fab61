"""The training accuracy the heads log is the plain top-1 of the cosines; the margin-penalised
logits' top-1 (near 0 through a good run, by design) is logged as margin_accuracy."""
import torch
import torch.nn.functional as F

from marginface.heads import build_loss_head


def _head(**kw):
    head = build_loss_head("cosface", 2, 2, {"s": 30.0, "m": 0.35}, **kw)
    with torch.no_grad():  # class 0 at 0 degrees, class 1 at 40 degrees
        angle = torch.deg2rad(torch.tensor(40.0))
        head.weight.copy_(torch.stack([torch.tensor([1.0, 0.0]), torch.stack([angle.cos(), angle.sin()])]))
    return head


def test_plain_top1_is_the_accuracy_and_the_penalised_one_is_named_as_such():
    # embeddings at 15 degrees: nearest to class 0 (cos 0.966 vs 0.906); with the 0.35 CosFace
    # margin the target logit (0.616) falls below the other class's (0.906)
    emb = F.normalize(torch.tensor([[1.0, 0.268], [1.0, 0.268]]), dim=1)
    labels = torch.tensor([0, 0])
    for head in (_head(), _head(sample_rate=0.99)):  # full FC and Partial FC (same formula)
        stats = head(emb, labels).stats
        assert stats["accuracy"] == 1.0, type(head).__name__
        assert stats["margin_accuracy"] == 0.0, type(head).__name__
    wrong = _head()(emb, torch.tensor([1, 1])).stats  # the label is the farther class: plain top-1 fails
    assert wrong["accuracy"] == 0.0
