"""`marginface eval` options of issue 17: `--sample-pairs N` on an identity folder (the FaceID
`val/` layout), `--align detect|landmarks|none` with `--detector` / `--detector-weights` for raw
photos (the detect-and-align path `verify --pairs` takes), and `--pairs` / `--landmarks` for an
LFW directory whose files live elsewhere."""
from __future__ import annotations

import json

import numpy as np
import pytest

from marginface.cli import main
from marginface.data.verification import load_pair_set
from tests.shared_data import need, unaligned_lfw_mini

FOREIGN = "weights/mobilefacenet_onnx/MobileFaceNet.onnx"


def run(capsys, *argv) -> tuple:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def model_args() -> list:
    return ["--model", need(FOREIGN), "--normalize", "imagenet", "--threads", "1"]


# ------------------------------------------------------------------------------------- --sample-pairs


def test_sample_pairs_on_an_identity_folder(capsys):
    johns = need("identities/johns")
    rc, out, err = run(capsys, "eval", *model_args(), "--sets", johns, "--sample-pairs", "40", "--json")
    assert rc == 0, err
    result = json.loads(out)["johns"]
    assert result["pairs"] == 40 and result["auc"] > 0.9  # dlib chips resized as they are: 0.99 measured
    # the pairs are the library's (training's data.val_sample_pairs) sample: seeded, half same
    ps = load_pair_set(johns, 112, sample_pairs=40, seed=0)
    assert ps.issame.sum() == 20 and result["images"] == len(ps.images)
    rc, out2, _ = run(capsys, "eval", *model_args(), "--sets", johns, "--sample-pairs", "40", "--json")
    assert json.loads(out2)["johns"]["pos_mean"] == result["pos_mean"]  # same seed, same pairs
    other = load_pair_set(johns, 112, sample_pairs=40, seed=5)
    assert other.pairs.tolist() != ps.pairs.tolist() or not np.array_equal(other.images, ps.images)


def test_identity_folder_needs_sample_pairs_and_a_positive_count(capsys, tmp_path):
    (tmp_path / "alice").mkdir()
    rc, _, err = run(capsys, "eval", "--model", tmp_path / "m.onnx", "--sets", tmp_path)
    line = error_line(err)
    assert rc == 2 and "--sample-pairs N" in line and "--pairs FILE" in line
    rc, _, err = run(capsys, "eval", "--model", tmp_path / "m.onnx", "--sets", tmp_path, "--sample-pairs", "-3")
    assert rc == 2 and "--sample-pairs must be >= 0" in error_line(err)
    rc, _, err = run(capsys, "eval", "--model", tmp_path / "m.onnx", "--sets", tmp_path, "--sample-pairs", "4",
                     "--seed", "-1")
    assert rc == 2 and "--seed must be >= 0" in error_line(err)


# ------------------------------------------------------------------------------------- --align detect


def test_align_detect_on_real_photos(capsys, tmp_path):
    """The deepface photos (whole unaligned photos): refused without --align, detected and aligned
    with it, scoring like `verify --pairs` on the same CSV (AUC 1.0, accuracy 0.977 measured)."""
    csv_path = need("photos/deepface/pairs.csv")
    rc, _, err = run(capsys, "eval", *model_args(), "--sets", csv_path)
    assert rc == 2 and "--align detect" in error_line(err)
    rc, out, err = run(capsys, "eval", *model_args(), "--sets", csv_path, "--align", "detect",
                       "--detector-weights", need("weights/mtcnn"), "--out", tmp_path, "--no-plots", "--json")
    assert rc == 0, err
    result = json.loads(out)["pairs"]
    assert result["pairs"] == 300 and result["images"] == 25
    assert result["auc"] > 0.95 and result["accuracy"] > 0.9, result
    assert result["pos_mean"] > result["neg_mean"] + 0.4
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["eval_align"] == "detect (mtcnn)" and report["eval"]["pairs"]["auc"] == result["auc"]


def test_detect_crops_are_the_verify_crops(tmp_path):
    """eval --align detect and verify/FaceEmbedder cut the same crop from a photo."""
    from marginface.data.detect import MTCNNDetector
    from marginface.data.images import read_image
    from marginface.deploy.embedder import FaceEmbedder

    photos = need("photos/deepface")
    (tmp_path / "p.csv").write_text(f"file_x,file_y,Decision\n{photos}/img1.jpg,{photos}/img3.jpg,No\n")
    detector = MTCNNDetector(need("weights/mtcnn"))
    ps = load_pair_set(tmp_path / "p.csv", 112, detector=detector, align="detect")
    fe = FaceEmbedder(need(FOREIGN), normalize="imagenet", detector=detector, threads=1)
    for k, name in enumerate(("img1.jpg", "img3.jpg")):
        assert np.array_equal(ps.images[k], fe.detect(read_image(photos / name))[0].crop), name


def test_align_detect_with_retinaface(capsys, tmp_path):
    photos = need("photos/deepface")
    (tmp_path / "p.csv").write_text(f"file_x,file_y,Decision\n{photos}/img1.jpg,{photos}/img2.jpg,Yes\n"
                                    f"{photos}/img1.jpg,{photos}/img3.jpg,No\n")
    rc, out, err = run(capsys, "eval", *model_args(), "--sets", tmp_path / "p.csv", "--align", "detect",
                       "--detector", "retinaface", "--detector-weights", need("weights/retinaface"), "--json")
    assert rc == 0, err
    result = json.loads(out)["p"]
    assert result["pairs"] == 2 and result["pos_mean"] > result["neg_mean"] + 0.3


def test_align_none_and_landmarks_on_a_csv(capsys):
    csv_path = need("photos/deepface/pairs.csv")
    rc, _, err = run(capsys, "eval", *model_args(), "--sets", csv_path, "--align", "landmarks")
    assert rc == 2 and "no landmark file" in error_line(err)
    rc, _, err = run(capsys, "eval", *model_args(), "--sets", csv_path, "--landmarks", csv_path, "--align", "detect")
    assert rc == 2 and "--landmarks aligns by the landmark file" in error_line(err)


# ------------------------------------------------------------------------------------- --pairs / --landmarks


@pytest.fixture()
def lfw_apart(tmp_path):
    """lfw_mini's crops in 250x250 canvases; pairs.txt and the landmark file in another folder."""
    images, meta = tmp_path / "lfw", tmp_path / "meta"
    return unaligned_lfw_mini(images, meta), images, meta


def test_lfw_pairs_and_landmarks_options(capsys, lfw_apart):
    """openvino's evaluate_lfw.py --val_data_root lfw/ --val_list pairs.txt --val_landmarks lfw_landmark.txt."""
    mini, images, meta = lfw_apart
    rc, out, err = run(capsys, "eval", *model_args(), "--sets", images, "--pairs", meta / "pairs.txt",
                       "--landmarks", meta / "lfw_landmark.txt", "--align", "landmarks", "--json")
    assert rc == 0, err
    aligned = json.loads(out)["lfw"]
    rc, out, err = run(capsys, "eval", *model_args(), "--sets", mini, "--json")
    reference = json.loads(out)["lfw_mini"]
    assert aligned["pairs"] == reference["pairs"] == 20
    assert abs(aligned["pos_mean"] - reference["pos_mean"]) < 0.05  # the same crops up to resampling
    rc, _, err = run(capsys, "eval", *model_args(), "--sets", images, "--pairs", meta / "missing.txt")
    assert rc == 2 and error_line(err) == f"error: --pairs: {meta / 'missing.txt'} not found"
    rc, _, err = run(capsys, "eval", *model_args(), "--sets", images, "--pairs", meta / "pairs.txt",
                     "--align", "landmarks")
    assert rc == 2 and "no landmarks.txt to align by" in error_line(err)
