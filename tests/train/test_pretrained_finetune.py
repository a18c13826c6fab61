"""``model.pretrained`` from a converted (plain state dict) or marginface checkpoint: strict, the head new for
the new identities, the source model's accuracy at step 0, and the backbone freeze / lr scale working with it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from marginface.train.runconfig import load_config
from marginface.deploy.load import load_model
from marginface.errors import UserError
from marginface.evaluate.runner import evaluate_pair_set
from marginface.data.synthetic import synthetic_pair_set
from marginface.models import build_backbone
from marginface.models.insightface import to_insightface
from marginface.train.checkpoint import load_checkpoint
from marginface.train.setup import build_model
from marginface.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
# a quarter-width mbf at 32 px that learns 40 synthetic identities in ~80 CPU steps
SMALL = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=64",
         "data.synthetic.images_per_identity=8", "data.synthetic.val_identities=20",
         "data.synthetic.val_images_per_identity=4", "data.synthetic.val_pairs=200", "train.batch_size=32",
         "train.log_every=2", "train.amp=none", "train.deterministic=true", "train.channels_last=false"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained source model (seed-0 identities), converted to a plain state dict like a downloaded one."""
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend
    root = tmp_path_factory.mktemp("source")
    cfg = load_config(None, SMALL + ["data.synthetic.identities=40", "train.max_steps=80", "eval.every=0",
                                     "optim.lr=0.05"])
    Trainer(cfg, root / "run", console=False).fit()
    plain = root / "backbone.pth"
    torch.save(load_checkpoint(root / "run" / "checkpoints" / "last.pt")["model"], plain)
    return root


def finetune_config(pretrained, *extra):
    # new identities (another seed), more of them: the head is created for 60 classes
    return load_config(None, SMALL + ["data.synthetic.seed=1", "data.synthetic.identities=60",
                                      f"model.pretrained={pretrained}", *extra])


def test_finetune_starts_at_the_source_models_accuracy(source, tmp_path):
    held_out = synthetic_pair_set(20, 4, 200, image_size=32, seed=1)  # the fine-tune's validation set
    source_model = load_model(source / "backbone.pth")  # the plain state dict, recognised
    assert source_model.info.backbone == "mbf" and source_model.info.input_size == (32, 32)
    before = evaluate_pair_set(source_model, held_out, flip=True, batch_size=256)
    assert before["accuracy"] >= 0.65  # well above chance (0.5) on identities it never saw

    for pretrained in (source / "backbone.pth", source / "run" / "checkpoints" / "last.pt"):
        cfg = finetune_config(pretrained, "train.max_steps=4", "train.freeze_backbone_epochs=0.25",
                              "optim.backbone_lr_scale=0.1", "eval.every=0")
        trainer = Trainer(cfg, tmp_path / pretrained.stem, console=False)
        assert trainer.head.weight.shape == (60, 64)  # a new head for the 60 new identities
        at_step_0 = trainer.evaluate()["synthetic"]
        assert at_step_0["accuracy"] == before["accuracy"] and at_step_0["auc"] == before["auc"]

    # frozen for 0.25 epoch (480 images / 32 = 15 steps per epoch -> 4 steps), then lr x 0.1
    initial = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    trainer.fit()
    after = trainer.backbone.state_dict()
    assert all(torch.equal(after[k], initial[k]) for k in initial)  # frozen: weights and BN statistics
    records = [json.loads(line) for line in (tmp_path / "last" / "log.jsonl").read_text().splitlines()]
    assert [r["lr_backbone"] for r in records if r.get("kind") == "train"] == [0.0, 0.0]
    cfg = finetune_config(source / "backbone.pth", "train.max_steps=6", "train.freeze_backbone_epochs=0.2",
                          "optim.backbone_lr_scale=0.1", "eval.every=0")
    trainer = Trainer(cfg, tmp_path / "unfrozen", console=False)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "unfrozen" / "log.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r.get("kind") == "train"}
    assert train[2]["lr_backbone"] == 0.0 and train[6]["lr_backbone"] == pytest.approx(0.1 * train[6]["lr"])
    assert not torch.equal(trainer.backbone.state_dict()["head.linear.weight"], initial["head.linear.weight"])


def test_pretrained_is_strict_and_names_what_does_not_fit(source, tmp_path):
    cfg = finetune_config(source / "backbone.pth")
    cfg.model.embedding_size = 128
    with pytest.raises(UserError, match=r"head\.linear\.weight \(64, 128\) in the file vs \(128, 128\)"):
        build_model(cfg.model)
    cfg = finetune_config(source / "backbone.pth")
    cfg.model.backbone, cfg.model.width_mult = "iresnet18", 1.0
    with pytest.raises(UserError, match="holds mbf weights .* set model.backbone=mbf"):
        build_model(cfg.model)
    with pytest.raises(UserError, match="not a readable"):
        bad = tmp_path / "bad.pth"
        bad.write_bytes(b"PK\x03\x04 torn")
        build_model(finetune_config(bad).model)


def test_pretrained_takes_an_insightface_mbf(tmp_path):
    torch.manual_seed(0)
    reference = build_backbone("mbf").eval()
    path = tmp_path / "backbone.pth"
    torch.save(to_insightface(reference.state_dict(), "mbf"), path)  # insightface's names
    cfg = load_config(None, ["model.backbone=mbf", "model.width_mult=1.0", "model.input_size=112",
                             "model.embedding_size=512", f"model.pretrained={path}"])
    model = build_model(cfg.model).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_the_recipe_loads_and_points_at_an_r50():
    cfg = load_config(str(ROOT / "configs" / "finetune_insightface_r50.yaml"))
    assert cfg.model.backbone == "iresnet50" and cfg.model.input_size == 112 and cfg.model.embedding_size == 512
    assert cfg.model.pretrained.endswith(".pth") and cfg.data.normalize == "arcface"
    assert cfg.train.freeze_backbone_epochs > 0 and 0 < cfg.optim.backbone_lr_scale < 1
