"""LFW directories aligned from a landmark file, and pairs sampled from an identity folder."""
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from marginface.data.align import ARCFACE_TEMPLATE_112
from marginface.data.verification import load_lfw_dir, load_pair_set
from marginface.errors import UserError
from shared_data import shared_data  # noqa: E402  (tests/shared_data.py)

SHARED = shared_data()  # tests/shared_data.py: $MARGINFACE_SHARED_DATA or ../shared/data
LFW_MINI = SHARED / "verification" / "lfw_mini"
JOHNS = SHARED / "identities" / "johns"


def _unaligned_copy(dst: Path) -> None:
    """lfw_mini's aligned crops pasted, scaled by 1.5, into 250x250 canvases + a landmark file."""
    lines = []
    for src in sorted(LFW_MINI.rglob("*.jpg")):
        rel = src.relative_to(LFW_MINI)
        canvas = np.full((250, 250, 3), 90, np.uint8)
        big = cv2.resize(cv2.imread(str(src)), (168, 168), interpolation=cv2.INTER_CUBIC)
        canvas[40:208, 50:218] = big
        (dst / rel.parent).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(dst / rel), canvas, [cv2.IMWRITE_JPEG_QUALITY, 98])
        pts = np.asarray(ARCFACE_TEMPLATE_112) * 1.5 + np.array([50, 40])
        lines.append(str(rel) + " " + " ".join(f"{v:.3f}" for v in pts.ravel()))
    (dst / "landmarks.txt").write_text("\n".join(lines) + "\n")
    shutil.copy(LFW_MINI / "pairs.txt", dst / "pairs.txt")


@pytest.fixture()
def unaligned(tmp_path):
    if not LFW_MINI.is_dir():
        pytest.skip(f"shared data absent: {LFW_MINI}")
    _unaligned_copy(tmp_path)
    return tmp_path


def test_landmarks_file_aligns_back_to_the_crops(unaligned):
    ref = load_lfw_dir(LFW_MINI)
    aligned = load_lfw_dir(unaligned)  # picks up landmarks.txt by itself
    assert aligned.images.shape == ref.images.shape == (17, 112, 112, 3)
    diff = np.abs(aligned.images.astype(int) - ref.images.astype(int)).mean()
    assert diff < 6, diff  # resampling and JPEG only


def test_bad_landmark_files_name_the_line(unaligned):
    lm = unaligned / "landmarks.txt"
    lines = lm.read_text().splitlines()
    lm.write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 1)[0]] + lines[4:]) + "\n")
    with pytest.raises(UserError, match=r"landmarks.txt: line 4: expected an image path and 10 numbers"):
        load_lfw_dir(unaligned)
    lm.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(UserError, match=r"no landmarks for"):
        load_lfw_dir(unaligned)


def test_pairs_sampled_from_an_identity_folder():
    if not JOHNS.is_dir():
        pytest.skip(f"shared data absent: {JOHNS}")
    ps = load_pair_set(JOHNS, image_size=112, sample_pairs=100, seed=3)
    assert len(ps) == 100 and ps.issame.sum() == 50
    assert ps.images.shape[1:] == (112, 112, 3)
    again = load_pair_set(JOHNS, image_size=112, sample_pairs=100, seed=3)
    assert np.array_equal(ps.pairs, again.pairs)  # seeded
    with pytest.raises(UserError, match="val_sample_pairs"):
        load_pair_set(JOHNS, image_size=112)


def test_without_landmarks_the_canvas_is_only_resized(unaligned):
    (unaligned / "landmarks.txt").rename(unaligned / "points.txt")
    ref = load_lfw_dir(LFW_MINI)
    naive = load_lfw_dir(unaligned, image_size=112)
    assert np.abs(naive.images.astype(int) - ref.images.astype(int)).mean() > 20  # not aligned
    aligned = load_lfw_dir(unaligned, landmarks=unaligned / "points.txt")
    assert np.abs(aligned.images.astype(int) - ref.images.astype(int)).mean() < 6
