"""The loss-head contract: one builder, every head a LossHead with forward -> HeadOutput and the
begin_step / attach_optimizer hooks the trainer always calls."""
import pytest
import torch

from marginface.errors import UserError
from marginface.heads import (PAIR_LOSSES, Classifier, HeadOutput, LossHead, build_head,
                              build_loss_head, loss_head_names)
from marginface.heads.partial_fc import PartialFC


@pytest.mark.parametrize("name", loss_head_names())
def test_every_loss_head_follows_the_contract(name):
    torch.manual_seed(0)
    head = build_loss_head(name, 8, 5)
    assert isinstance(head, LossHead)
    assert isinstance(head, PAIR_LOSSES[name] if name in PAIR_LOSSES else Classifier)
    head.begin_step(0)  # no-ops unless the head needs them
    params = list(head.parameters())
    opt = torch.optim.SGD(params or [torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    head.attach_optimizer(opt)
    out = head(torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert isinstance(out, HeadOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert "accuracy" in out.stats and "mean_target_cosine" in out.stats


@pytest.mark.parametrize("options", [{"sample_rate": 0.5}, {"shard_dtype": "bf16"}, {"compute_dtype": "bf16"},
                                     {"world_size": 2, "rank": 1}])
def test_the_one_builder_picks_partial_fc(options):
    head = build_loss_head("arcface", 8, 10, {"s": 30.0}, **options)
    assert isinstance(head, PartialFC) and head.sharded and head.margin.s == 30.0
    assert not build_loss_head("arcface", 8, 10).sharded


def test_partial_fc_hooks_do_their_work():
    head = build_loss_head("cosface", 4, 20, sample_rate=0.25, seed=3)
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    head.attach_optimizer(opt)  # the optimizer now updates only the sampled rows
    head.begin_step(7)
    before = head.weight.detach().clone()
    out = head(torch.randn(4, 4), torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    opt.step()
    changed = (head.weight.detach() != before).any(dim=1)
    sampled = head.rows_to_update()
    assert sampled is not None and 0 < len(sampled) < 20
    moved = set(changed.nonzero().flatten().tolist())
    assert moved and moved <= set(sampled.tolist())  # rows not sampled keep their weight


def test_pair_loss_is_not_distributed_and_names_are_checked():
    with pytest.raises(UserError, match="head.loss='pair_bce' is not a margin classifier"):
        build_loss_head("pair_bce", 8, 5, world_size=2)
    with pytest.raises(UserError, match=r"unknown loss 'arcfaec' \(head.loss\); valid: softmax, arcface"):
        build_loss_head("arcfaec", 8, 5)
    with pytest.raises(UserError, match="has no parameter 'q'"):
        build_head("cosface", 8, 5, q=1)


def test_trainer_asks_the_contract_not_hasattr():
    from pathlib import Path

    import marginface.train.trainer as trainer

    source = Path(trainer.__file__).read_text()
    for ability in ("class_range", "attach_optimizer", "begin_step"):
        assert f'hasattr(self.head, "{ability}")' not in source
        assert f'getattr(self.head, "{ability}"' not in source
