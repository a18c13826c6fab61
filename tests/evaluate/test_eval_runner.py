"""Embed-and-evaluate runner with a tiny deterministic test model."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marginface.data.transforms import hflip, to_tensor
from marginface.data.verification import PairSet, load_bin, load_lfw_dir
from marginface.errors import UserError
from marginface.evaluate.runner import (
    embed_images,
    evaluate_pair_set,
    evaluate_sets,
    score_pair_set,
)
from shared_data import shared_data  # tests/shared_data.py

VERIFICATION = shared_data() / "verification"  # tests/shared_data.py: $MARGINFACE_SHARED_DATA or ../shared/data
needs_verification_data = pytest.mark.skipif(
    not ((VERIFICATION / "lfw_head20.bin").is_file() and (VERIFICATION / "lfw_mini").is_dir()),
    reason=f"shared verification samples not found under {VERIFICATION}",
)


class PooledProjection(torch.nn.Module):
    """Test model: 4x4 average pooling then a fixed random projection (not mirror-symmetric).

    The dropout makes train mode visibly non-deterministic, so eval mode is checked too.
    """

    def __init__(self, dim: int = 8, input_size: int = 112, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(48, dim, generator=generator))
        self.dropout = torch.nn.Dropout(0.5)
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.adaptive_avg_pool2d(x, 4).flatten(1)) @ self.projection


def random_images(n: int, size: int = 112, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish images: a random low-res pattern upscaled, so pooling sees structure
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in small])


def direct(model: PooledProjection, images: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(to_tensor(images)).numpy()


def test_flip_sum_and_plain_embeddings():
    model, images = PooledProjection(), random_images(5)
    expected = direct(model, images) + direct(model, hflip(images))
    np.testing.assert_allclose(embed_images(model, images, flip=True), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embed_images(model, images, flip=False), direct(model, images), rtol=1e-5, atol=1e-5)
    assert not np.allclose(direct(model, images), direct(model, hflip(images)))  # the flip matters


def test_eval_mode_is_used_and_restored():
    model, images = PooledProjection(), random_images(4)
    model.train()
    first = embed_images(model, images, batch_size=3)
    second = embed_images(model, images, batch_size=64)
    assert model.training  # restored for the training loop
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)  # no dropout: deterministic
    assert first.dtype == np.float32 and first.shape == (4, 8)


def test_resizes_to_model_input_size():
    model, images = PooledProjection(input_size=56), random_images(3)
    resized = np.stack([cv2.resize(im, (56, 56), interpolation=cv2.INTER_AREA) for im in images])
    np.testing.assert_allclose(
        embed_images(model, images, flip=False), direct(model, resized), rtol=1e-5, atol=1e-5
    )


def test_autocast_runs_and_stays_close():
    model, images = PooledProjection(), random_images(3)
    low = embed_images(model, images, amp_dtype=torch.bfloat16)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, embed_images(model, images), rtol=0.05, atol=0.05)


def test_accepts_plain_callables():
    images = random_images(2)
    channel_means = embed_images(lambda x: x.mean(dim=(2, 3)), images, flip=False)
    expected = (images.reshape(2, -1, 3).mean(axis=1) - 127.5) / 127.5
    np.testing.assert_allclose(channel_means, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected N×D"):
        embed_images(lambda x: x, images)


def test_scores_and_xnorm_by_hand():
    model, images = PooledProjection(), random_images(5, seed=1)
    pair_set = PairSet("toy", images, [[0, 1], [2, 3], [4, 0], [1, 3]], [True, False, True, False])
    scores, xnorm = score_pair_set(model, pair_set)
    plain, mirrored = direct(model, images), direct(model, hflip(images))
    # insightface's xnorm: mean norm over both views, each before the flip-sum
    expected_xnorm = np.mean(np.r_[np.linalg.norm(plain, axis=1), np.linalg.norm(mirrored, axis=1)])
    assert xnorm == pytest.approx(expected_xnorm, rel=1e-5)
    summed = plain.astype(np.float64) + mirrored
    for (i, j), score in zip(pair_set.pairs, scores):
        cosine = summed[i] @ summed[j] / (np.linalg.norm(summed[i]) * np.linalg.norm(summed[j]))
        assert score == pytest.approx(cosine, abs=1e-5)

    metrics = evaluate_pair_set(model, pair_set)
    assert metrics["nfolds"] == 4  # lowered from 10: only 4 pairs
    assert metrics["pairs"] == 4 and metrics["name"] == "toy"
    assert metrics["xnorm"] == pytest.approx(xnorm)
    assert metrics["pos_mean"] == pytest.approx(np.mean(scores[pair_set.issame]))


def test_unlabelled_sets_cannot_be_evaluated():
    pair_set = PairSet("free", random_images(2), [[0, 1]], None)
    with pytest.raises(UserError, match="no same/different labels"):
        evaluate_pair_set(PooledProjection(), pair_set)


def test_evaluate_sets_keys_by_name():
    model, images = PooledProjection(), random_images(4)
    a = PairSet("a", images, [[0, 1], [2, 3]], [True, False])
    b = PairSet("b", images, [[0, 2], [1, 3], [0, 3]], [False, True, False])
    results = evaluate_sets(model, [a, b], flip=False)
    assert list(results) == ["a", "b"] and results["b"]["pairs"] == 3
    with pytest.raises(ValueError, match="two pair sets are named"):
        evaluate_sets(model, [a, a])


@needs_verification_data
def test_bin_and_lfw_directory_give_the_same_scores():
    model = PooledProjection(dim=16)
    from_bin = load_bin(VERIFICATION / "lfw_head20.bin")
    from_dir = load_lfw_dir(VERIFICATION / "lfw_mini")
    bin_scores, bin_xnorm = score_pair_set(model, from_bin)
    dir_scores, dir_xnorm = score_pair_set(model, from_dir)
    # The bin holds LFW pairs 1-10 (all "same"); lfw_mini has them as the same-lines of its two
    # folds (pairs 0-4 and 10-14), matched here by line text.
    lfw_lines = (VERIFICATION / "lfw_pairs.txt").read_text().splitlines()[1:11]
    mini_lines = (VERIFICATION / "lfw_mini" / "pairs.txt").read_text().splitlines()[1:]
    for k, line in enumerate(lfw_lines):
        m = mini_lines.index(line)
        assert from_dir.issame[m]
        assert bin_scores[k] == pytest.approx(dir_scores[m], abs=1e-4)  # same JPEG bytes
    assert bin_xnorm == pytest.approx(dir_xnorm, rel=1e-4)  # same 17 images on both sides

    metrics = evaluate_pair_set(model, from_bin)
    assert math.isnan(metrics["auc"]) and metrics["pairs"] == 10 and metrics["nfolds"] == 10
