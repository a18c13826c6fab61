"""IJB-B/C template protocol: meta-file reading, media pooling by hand, and the full pipeline on a
small IJB-layout fixture built from the shared lfw_mini crops."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marginface.data.align import ARCFACE_TEMPLATE_112
from marginface.data.transforms import hflip, to_tensor
from marginface.errors import UserError
from marginface.evaluate.ijb import (
    evaluate_ijb,
    ijb_image_features,
    ijb_metrics,
    is_ijb_dir,
    read_ijb,
    template_features,
    template_pair_scores,
)
from marginface.evaluate.metrics import roc_auc, tar_at_far
from shared_data import shared_data  # noqa: E402  (tests/shared_data.py)

torch.set_num_threads(1)

SHARED = shared_data()  # tests/shared_data.py: $MARGINFACE_SHARED_DATA or ../shared/data
LFW_MINI = SHARED / "verification" / "lfw_mini"
needs_lfw_mini = pytest.mark.skipif(not LFW_MINI.is_dir(), reason=f"shared data absent: {LFW_MINI}")


class PooledProjection(torch.nn.Module):
    """Deterministic test model: 4x4 average pooling, then a fixed random projection."""

    def __init__(self, dim: int = 8, input_size: int = 112, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(48, dim, generator=generator))
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.projection


def direct(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(to_tensor(images)).double().numpy()


# --------------------------------------------------------------------------------- fixture


def make_ijb(root: Path, prefix: str = "ijbc") -> dict:
    """An insightface-layout IJB directory from lfw_mini's aligned 112x112 crops.

    Each crop is pasted into a larger canvas at its own offset and saved losslessly; its
    landmarks are the ArcFace template plus that offset, so alignment must undo the shift exactly.
    Each person gets one or two templates; within a template the first two images share a media
    id (media pooling), the others have their own.
    """
    people = sorted(p for p in LFW_MINI.iterdir() if p.is_dir())
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    crops, names, templates, medias, scores, owner = [], [], [], [], [], {}
    tid_lines, lmk_lines = [], []
    next_template = 0
    for person in people:
        files = sorted(person.glob("*.jpg"))
        half = math.ceil(len(files) / 2)
        groups = [files[:half], files[half:]] if len(files) > 1 else [files]
        for group in groups:
            tid = 100 + 7 * next_template  # ids need not be contiguous
            next_template += 1
            owner[tid] = person.name
            for j, file in enumerate(group):
                k = len(crops)
                crop = cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2RGB)
                dx, dy = 3 + k % 5, 2 + k % 7
                canvas = np.full((140, 130, 3), 40, dtype=np.uint8)
                canvas[dy : dy + 112, dx : dx + 112] = crop
                name = f"{k + 1}.png"
                cv2.imwrite(str(root / "loose_crop" / name), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
                mid = tid * 10 + (0 if j < 2 else j)
                score = 0.5 + 0.03 * k
                lmk = ARCFACE_TEMPLATE_112 + [dx, dy]
                crops.append(crop)
                names.append(name)
                templates.append(tid)
                medias.append(mid)
                scores.append(score)
                tid_lines.append(f"{name} {tid} {mid}")
                lmk_lines.append(" ".join([name] + [f"{v:.4f}" for v in lmk.reshape(-1)] + [f"{score:.4f}"]))
    ids = sorted(owner)
    pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :]]
    labels = [owner[a] == owner[b] for a, b in pairs]
    (root / "meta" / f"{prefix}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    # the landmark file lists the faces in another order: rows are joined by image name
    (root / "meta" / f"{prefix}_name_5pts_score.txt").write_text("\n".join(reversed(lmk_lines)) + "\n")
    (root / "meta" / f"{prefix}_template_pair_label.txt").write_text(
        "\n".join(f"{a} {b} {int(l)}" for (a, b), l in zip(pairs, labels)) + "\n")
    return {"crops": np.stack(crops), "names": names, "templates": np.array(templates), "medias": np.array(medias),
            "scores": np.array(scores), "pairs": np.array(pairs), "labels": np.array(labels)}


def hand_template_scores(features: np.ndarray, info: dict) -> np.ndarray:
    """insightface's pooling written out plainly: per template, average per media, sum, normalise."""
    feats = {}
    for tid in np.unique(info["templates"]):
        rows = np.nonzero(info["templates"] == tid)[0]
        total = 0
        for mid in dict.fromkeys(info["medias"][rows]):
            total = total + features[rows[info["medias"][rows] == mid]].mean(axis=0)
        feats[tid] = total / np.linalg.norm(total)
    return np.array([feats[a] @ feats[b] for a, b in info["pairs"]])


# --------------------------------------------------------------------------------- pure functions


def test_template_pooling_by_hand():
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 5.0], [4.0, 3.0]])
    templates = np.array([7, 7, 7, 9, 12])
    medias = np.array([1, 1, 2, 3, 4])
    ids, pooled = template_features(feats, templates, medias)
    assert ids.tolist() == [7, 9, 12]
    # template 7: media 1 mean (2, 0) + media 2 (0, 2) = (2, 2) -> (1, 1)/sqrt(2)
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(pooled, [[s, s], [0, 1], [0.8, 0.6]], atol=1e-12)
    scores = template_pair_scores(ids, pooled, np.array([[7, 9], [9, 12], [12, 7]]))
    np.testing.assert_allclose(scores, [s, 0.6, 0.8 * s + 0.6 * s], atol=1e-12)
    # detector-score weights change the media mean: (1*1 + 3*0.5)/2 = 1.25 -> (1.25, 2)
    ids, pooled = template_features(feats * np.array([1, 0.5, 1, 1, 1])[:, None], templates, medias)
    np.testing.assert_allclose(pooled[0], np.array([1.25, 2.0]) / math.hypot(1.25, 2.0), atol=1e-12)
    with pytest.raises(ValueError, match="template 5"):
        template_pair_scores(ids, pooled, np.array([[7, 5]]))


def test_ijb_metrics_report_only_supported_fars():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(50, bool), np.zeros(2000, bool)]
    scores = np.r_[rng.normal(0.6, 0.1, 50), rng.normal(0.1, 0.1, 2000)]
    m = ijb_metrics(scores, labels)
    assert set(m["tar_at_far"]) == {"1e-3", "1e-2", "1e-1"}  # 2000 negatives: 1e-4 is 0.2 false accepts
    assert m["tar_at_far"] == tar_at_far(scores, labels, (1e-3, 1e-2, 1e-1))
    assert m["auc"] == pytest.approx(roc_auc(scores, labels))
    assert (m["positives"], m["negatives"], m["pairs"]) == (50, 2000, 2050)


def test_meta_file_errors_name_file_and_line(tmp_path):
    root = tmp_path / "IJBB"
    (root / "meta").mkdir(parents=True)
    assert not is_ijb_dir(root)
    with pytest.raises(UserError, match="not an IJB directory"):
        read_ijb(root)
    lmk = "a.jpg " + " ".join(["1"] * 10) + " 0.9\n"
    (root / "meta" / "ijbb_template_pair_label.txt").write_text("1 2 1\n")
    (root / "meta" / "ijbb_name_5pts_score.txt").write_text(lmk)
    (root / "meta" / "ijbb_face_tid_mid.txt").write_text("a.jpg 1 5\nb.jpg 2\n")
    assert is_ijb_dir(root)
    with pytest.raises(UserError, match=r"ijbb_face_tid_mid.txt: line 2: expected .* got 2"):
        read_ijb(root)
    (root / "meta" / "ijbb_face_tid_mid.txt").write_text("a.jpg 1 5\nb.jpg 2 6\n")
    with pytest.raises(UserError, match=r"no landmarks for 1 image\(s\).*'b.jpg'"):
        read_ijb(root)
    (root / "meta" / "ijbb_name_5pts_score.txt").write_text(lmk + lmk.replace("a.jpg", "b.jpg"))
    (root / "meta" / "ijbb_template_pair_label.txt").write_text("1 2 1\n1 3 0\n")
    with pytest.raises(UserError, match="template 3 has no faces"):
        read_ijb(root)
    (root / "meta" / "ijbb_template_pair_label.txt").write_text("1 2 2\n")
    with pytest.raises(UserError, match="line 1: label must be 0 or 1"):
        read_ijb(root)
    (root / "meta" / "ijbb_template_pair_label.txt").write_text("1 2 1\n")
    protocol = read_ijb(root)
    assert protocol.name == "ijbb" and protocol.pairs.tolist() == [[1, 2]] and protocol.labels.tolist() == [True]
    np.testing.assert_array_equal(protocol.landmarks[0], np.ones((5, 2)))
    with pytest.raises(UserError, match="does not exist"):  # images are checked when read
        ijb_image_features(PooledProjection(), protocol)


# --------------------------------------------------------------------------------- full pipeline


@needs_lfw_mini
def test_alignment_recovers_the_crops(tmp_path):
    info = make_ijb(tmp_path / "IJBC")
    protocol = read_ijb(tmp_path / "IJBC")
    assert protocol.faces == info["names"] and protocol.name == "ijbc"
    np.testing.assert_allclose(protocol.det_scores, info["scores"], atol=1e-4)
    model = PooledProjection()
    feats = ijb_image_features(model, protocol, batch_size=5, workers=2)
    expected = direct(model, info["crops"]) + direct(model, hflip(info["crops"]))
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)
    plain = ijb_image_features(model, protocol, flip=False, batch_size=64)
    np.testing.assert_allclose(plain, direct(model, info["crops"]), rtol=1e-4, atol=1e-4)


@needs_lfw_mini
def test_template_scores_match_hand_computation(tmp_path):
    info = make_ijb(tmp_path / "IJBC")
    model = PooledProjection(seed=3)
    flip_sum = direct(model, info["crops"]) + direct(model, hflip(info["crops"]))

    metrics, (scores, labels) = evaluate_ijb(model, tmp_path / "IJBC", batch_size=4, return_scores=True)
    expected = hand_template_scores(flip_sum * info["scores"][:, None], info)  # detector-score weighted
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    np.testing.assert_array_equal(labels, info["labels"])
    assert metrics["templates"] == 12 and metrics["images"] == 17
    assert (metrics["pairs"], metrics["positives"], metrics["negatives"]) == (66, 6, 60)
    assert set(metrics["tar_at_far"]) == {"1e-1"}  # 60 negatives support only FAR 1e-1
    assert metrics["tar_at_far"]["1e-1"] == pytest.approx(tar_at_far(expected, info["labels"], (0.1,))["1e-1"])
    assert metrics["auc"] == pytest.approx(roc_auc(expected, info["labels"]), abs=1e-9)

    unweighted = evaluate_ijb(model, tmp_path / "IJBC", detector_score=False, return_scores=True)[1][0]
    np.testing.assert_allclose(unweighted, hand_template_scores(flip_sum, info), atol=1e-5)
    assert not np.allclose(unweighted, scores, atol=1e-4)  # the weights matter


@needs_lfw_mini
def test_noflip_block_comes_from_the_plain_view(tmp_path):
    """Like the pair sets: flip-sum at the top level, the plain features' metrics in ``noflip``."""
    info = make_ijb(tmp_path / "IJBC")
    model = PooledProjection(seed=3)
    plain = direct(model, info["crops"])
    with_flip = hand_template_scores((plain + direct(model, hflip(info["crops"]))) * info["scores"][:, None], info)
    without = hand_template_scores(plain * info["scores"][:, None], info)
    assert not np.allclose(with_flip, without, atol=1e-3)  # this model is not mirror-symmetric

    metrics = evaluate_ijb(model, tmp_path / "IJBC", batch_size=4)
    assert metrics["flip"] is True
    assert set(metrics["noflip"]) == {"tar_at_far", "auc", "eer", "pos_mean", "neg_mean"}
    noflip = metrics["noflip"]
    assert noflip["auc"] == pytest.approx(roc_auc(without, info["labels"]), abs=1e-9)
    assert noflip["pos_mean"] == pytest.approx(without[info["labels"]].mean(), abs=1e-5)
    assert metrics["pos_mean"] == pytest.approx(with_flip[info["labels"]].mean(), abs=1e-5)
    assert noflip["pos_mean"] != pytest.approx(metrics["pos_mean"], abs=1e-4)
    assert noflip["neg_mean"] != pytest.approx(metrics["neg_mean"], abs=1e-4)

    # --no-flip: the plain result at the top level, no noflip block, the same numbers as above
    plain_only = evaluate_ijb(model, tmp_path / "IJBC", flip=False, batch_size=4)
    assert plain_only["flip"] is False and "noflip" not in plain_only
    for key in ("auc", "eer", "pos_mean", "neg_mean"):
        assert plain_only[key] == pytest.approx(noflip[key], abs=1e-12)
    assert plain_only["tar_at_far"] == pytest.approx(noflip["tar_at_far"])
