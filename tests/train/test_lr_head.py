"""optim.lr_head: the classifier's own learning rate (param groups), as Partial FC recipes set it; the
schedule scales every group alike, and a Partial FC shard's sampled rows move at lr_head."""
import json

import pytest
import torch

from marginface.errors import UserError
from marginface.heads import build_loss_head
from marginface.heads.partial_fc import PartialFC
from marginface.train.runconfig import load_config
from marginface.train.setup import build_optimizer
from marginface.train.trainer import Trainer

PLAIN_SGD = ["optim.momentum=0", "optim.weight_decay=0", "optim.clip_grad_norm=0"]


def groups(opt):
    return {g["name"]: g["lr"] for g in opt.param_groups}


def test_default_is_optim_lr_and_lr_head_sets_the_classifier_group():
    net, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
    assert groups(build_optimizer(load_config(None, ["optim.lr=0.1"]).optim, net, head, None)) == \
        {"backbone": 0.1, "head": 0.1}
    cfg = load_config(None, ["optim.lr=0.1", "optim.lr_head=0.5", "optim.backbone_lr_scale=0.1"]).optim
    assert groups(build_optimizer(cfg, net, head, None)) == pytest.approx({"backbone": 0.01, "head": 0.5})
    with pytest.raises(UserError, match=r"config key 'optim.lr_head' must be > 0"):
        load_config(None, ["optim.lr_head=0"])


def test_partial_fc_sampled_rows_move_at_lr_head_and_the_backbone_at_lr():
    torch.manual_seed(0)
    cfg = load_config(None, ["optim.lr=0.1", "optim.lr_head=0.7", *PLAIN_SGD]).optim
    backbone = torch.nn.Linear(8, 8)
    head = build_loss_head("arcface", 8, 20, sample_rate=0.3, seed=3)
    assert isinstance(head, PartialFC)
    opt = build_optimizer(cfg, backbone, head, None)
    head.attach_optimizer(opt)
    head.begin_step(0)
    w0, b0 = head.weight.detach().clone(), backbone.weight.detach().clone()
    out = head(backbone(torch.randn(6, 8)), torch.tensor([0, 3, 5, 7, 9, 11]))
    out.loss.backward()
    gw, gb = head.weight.grad.clone(), backbone.weight.grad.clone()
    rows = head.rows_to_update()
    assert rows is not None and 0 < len(rows) < 20
    opt.step()
    torch.testing.assert_close(head.weight.detach()[rows], w0[rows] - 0.7 * gw[rows])
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[rows] = False
    torch.testing.assert_close(head.weight.detach()[untouched], w0[untouched], rtol=0, atol=0)
    torch.testing.assert_close(backbone.weight.detach(), b0 - 0.1 * gb)


def test_the_schedule_scales_both_rates_and_the_log_shows_lr_head(tmp_path):
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=32",
                             "data.synthetic.identities=20", "data.synthetic.images_per_identity=4", "data.val=[]",
                             "train.batch_size=16", "train.amp=none", "train.log_every=1", "train.max_steps=5",
                             "schedule.warmup_steps=2", "optim.lr=0.02", "optim.lr_head=0.2"])
    trainer = Trainer(cfg, tmp_path, console=False)
    trainer.fit()
    train = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert len(train) == 5 and len({round(r["lr"], 9) for r in train}) > 2  # warmup then poly decay
    for r in train:
        assert r["lr_head"] == pytest.approx(10 * r["lr"])
    assert {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups} == {"backbone": 0.02, "head": 0.2}
