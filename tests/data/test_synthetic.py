"""Synthetic identities: deterministic, varied, hard for an untrained network, learnable."""
import numpy as np
import pytest
import torch

from marginface.train.runconfig import load_config
from marginface.data.synthetic import (HELD_OUT_OFFSET, SyntheticSource, make_identity, render_image,
                                       synthetic_pair_set)
from marginface.evaluate.runner import evaluate_pair_set
from marginface.train.setup import build_model
from marginface.train.trainer import Trainer


def test_rendering_is_deterministic_and_varies():
    a = render_image(0, 5, 3)
    assert a.shape == (112, 112, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_image(0, 5, 3))
    assert not np.array_equal(a, render_image(0, 5, 4))  # another image of the same person
    assert not np.array_equal(a, render_image(1, 5, 3))  # another seed
    assert render_image(0, 5, 3, size=64).shape == (64, 64, 3)


def test_identities_differ_in_geometry():
    a, b = make_identity(0, 1), make_identity(0, 2)
    assert (a.eye_dx, a.nose_len, a.mouth_w) != (b.eye_dx, b.nose_len, b.mouth_w)


def test_source_protocol_and_held_out_ids_are_disjoint():
    src = SyntheticSource(3, 4, image_size=32, seed=0)
    assert len(src) == 12 and src.num_classes == 3
    assert src.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert src.read(5).shape == (32, 32, 3)
    held = SyntheticSource(3, 4, image_size=32, seed=0, identity_offset=HELD_OUT_OFFSET)
    assert not np.array_equal(src.images, held.images)
    ps = synthetic_pair_set(10, 4, 40, image_size=32, seed=0)
    assert len(ps) == 40 and ps.issame.sum() == 20


def test_untrained_network_is_near_chance():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_config()
    ps = synthetic_pair_set(60, 4, 600, image_size=cfg.model.input_size, seed=0)
    acc = evaluate_pair_set(build_model(cfg.model), ps)["accuracy"]
    assert 0.4 < acc < 0.72, acc


def test_a_short_run_learns_identities(tmp_path):
    """Trains for a few hundred images per identity: held-out accuracy rises clearly above chance."""
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=128",
                             "data.synthetic.identities=60", "data.synthetic.images_per_identity=10",
                             "data.synthetic.val_identities=60", "data.synthetic.val_images_per_identity=4",
                             "data.synthetic.val_pairs=600", "train.batch_size=64", "train.max_steps=120",
                             "schedule.warmup_steps=10", "head.params={s: 32, m: 0.3}", "eval.every=0"])
    report = Trainer(cfg, tmp_path, console=False).fit()
    assert report["eval"]["synthetic"]["accuracy"] > 0.8, report["eval"]["synthetic"]
