"""train.checkpoint: one way from a checkpoint file to a backbone, shared by training-side readers
(load_backbone) and deployment (deploy.load.load_model)."""
import pytest
import torch

from marginface.config import Config, to_dict
from marginface.deploy.load import load_model
from marginface.errors import UserError
from marginface.train.checkpoint import load_backbone
from marginface.train.setup import build_model


def _checkpoint(tmp_path, poison: bool = False):
    cfg = Config()
    cfg.model.backbone, cfg.model.embedding_size, cfg.model.input_size = "mbf", 32, 32
    cfg.data.input_norm = "imagenet"
    model = build_model(cfg.model)
    state = model.state_dict()
    if poison:
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = state[name].clone().fill_(float("nan"))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "config": to_dict(cfg),
                "last_eval": {"lfw": {"threshold": 0.25}}}, path)
    return path, model


def test_both_readers_give_the_same_backbone_and_info(tmp_path):
    path, model = _checkpoint(tmp_path)
    a, b = load_backbone(str(path)), load_model(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(a(x), model.eval()(x))
    assert a.info == b.info
    assert (a.info.normalize, a.info.threshold, a.info.threshold_source, a.info.kind) == (
        "imagenet", 0.25, "lfw", "checkpoint")


def test_non_finite_weights_are_refused_by_both_readers(tmp_path):
    path, _ = _checkpoint(tmp_path, poison=True)
    for read in (lambda: load_backbone(str(path)), lambda: load_model(path)):
        with pytest.raises(UserError, match="holds NaN or inf values"):
            read()
