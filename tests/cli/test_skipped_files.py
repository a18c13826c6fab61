"""Commands that walk a folder collect every file they cannot use and report them once at the end
(count + the first few in text, all of them in --json), fail only when nothing was usable, and show
their progress on stderr, never on stdout (issue 21)."""
import json
from pathlib import Path

import numpy as np
import pytest

from marginface import cli
from marginface.data.detect.faces import Face
from marginface.data.images import imwrite_rgb
from marginface.errors import UserError
from marginface.io import progress

LANDMARKS = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]], np.float32)


class BrightFaceDetector:
    """A face (the ArcFace template's landmarks) in every bright image; none in a dark one."""

    def detect(self, image):
        return [Face((0.0, 0.0, 112.0, 112.0), 0.99, LANDMARKS)] if image.mean() > 100 else []


def photo(path: Path, bright: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    imwrite_rgb(path, np.full((112, 112, 3), 200 if bright else 10, np.uint8))


@pytest.fixture
def every_update(monkeypatch):
    """Progress lines at every update (off a terminal they come every N seconds otherwise)."""
    monkeypatch.setattr(progress, "EVERY_S", 0.0)


def test_data_align_reports_all_problems_at_the_end(tmp_path, capsys, monkeypatch, every_update):
    monkeypatch.setattr("marginface.data.detect.build_detector", lambda name, weights=None: BrightFaceDetector())
    src = tmp_path / "photos"
    for i in range(3):
        photo(src / "ann" / f"{i}.jpg", bright=True)
    for i in range(7):
        photo(src / "bob" / f"dark{i}.jpg", bright=False)
    (src / "bob" / "broken.jpg").write_bytes(b"not an image")
    assert cli.main(["data", "align", str(src), str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"aligned 3 of 11 images into {tmp_path / 'out'}"
    assert lines[1] == "no face found (not written): 7"
    assert lines[2:7] == [f"  bob/dark{i}.jpg" for i in range(5)]
    assert lines[7] == "  ... and 2 more (--json lists them all)"
    assert lines[8] == "unreadable (not written): 1" and "broken.jpg" in lines[9]
    assert "aligning: 11/11 images (100%)" in err  # progress on stderr
    assert len(list((tmp_path / "out").rglob("*.jpg"))) == 3

    assert cli.main(["data", "align", str(src), str(tmp_path / "out2"), "--json"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert len(info["no_face"]) == 7 and len(info["unreadable"]) == 1 and info["aligned"] == 3
    assert err == ""  # --json: nothing else anywhere

    dark = tmp_path / "dark"
    photo(dark / "a.jpg", bright=False)
    (dark / "b.jpg").write_bytes(b"junk")
    assert cli.main(["data", "align", str(dark), str(tmp_path / "out3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if not line.startswith("aligning: ")] == err[-1:]
    assert err[-1].startswith(f"error: {dark}: no face aligned in 2 image(s) (1 no face, 1 unreadable")


class FakeEmbedder:
    """The face embedder interface enrolment uses: bytes 'noface' have no face, 'broken' cannot be
    decoded (the messages FaceEmbedder gives), anything else embeds as a vector seeded by its bytes."""

    threshold, threshold_source, normalize = 0.3, "model", "arcface"
    model = type("M", (), {"model_path": "fake.onnx"})()

    def largest_face(self, path):
        data = Path(path).read_bytes()
        if data.startswith(b"noface"):
            raise UserError(f"{path}: no face found")
        if data.startswith(b"broken"):
            raise UserError(f"{path}: not an image (cannot be decoded)")
        return type("F", (), {"crop": unit(int.from_bytes(data[:4], "little"))})()

    def embed_crops(self, crops):
        return np.asarray(crops, np.float32)

    def fingerprint(self, normalize=None):
        return "fake", unit(99)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(16)
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_gallery_enroll_skip_no_face_goes_on_past_unreadable_files(tmp_path, capsys, monkeypatch, every_update):
    monkeypatch.setattr("marginface.cli.options.face_embedder", lambda args: FakeEmbedder())
    people = tmp_path / "people"
    files = {"ann/1.jpg": (1).to_bytes(4, "little"), "ann/2.jpg": b"broken", "ann/3.jpg": b"noface",
             "bob/4.jpg": (4).to_bytes(4, "little"), "bob/5.jpg": b"broken", "cy/6.jpg": b"broken",
             "cy/7.jpg": b"noface", "cy/8.jpg": b"broken", "cy/9.jpg": b"noface"}
    for rel, data in files.items():
        (people / rel).parent.mkdir(parents=True, exist_ok=True)
        (people / rel).write_bytes(data)
    db = tmp_path / "g.sqlite"
    # without --skip-no-face: the first unusable file is the error, nothing is written
    assert cli.main(["gallery", "enroll", str(people), "--db", str(db), "--model", "m.onnx"]) == 2
    assert "ann/2.jpg: not an image" in capsys.readouterr().err and not db.exists()
    argv = ["gallery", "enroll", str(people), "--db", str(db), "--model", "m.onnx", "--skip-no-face"]
    assert cli.main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert err == "" and (report["identities"], report["added"]) == (2, 2)
    assert [(Path(s["file"]).relative_to(people).as_posix(), s["reason"]) for s in report["skipped"]] == [
        ("ann/2.jpg", "not an image (cannot be decoded)"), ("ann/3.jpg", "no face found"),
        ("bob/5.jpg", "not an image (cannot be decoded)"), ("cy/6.jpg", "not an image (cannot be decoded)"),
        ("cy/7.jpg", "no face found"), ("cy/8.jpg", "not an image (cannot be decoded)"),
        ("cy/9.jpg", "no face found")]
    assert report["empty_identities"] == ["cy"]
    assert cli.main([*argv, "--replace"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[1] == "skipped (no face or unreadable; the other images were enrolled): 7"
    assert len(lines) == 8 and lines[-1] == "  ... and 2 more (--json lists them all)"
    assert "enrolling: 3/3 identities (100%)" in err
    # nothing usable at all: exit 2, the error line says why
    bad = tmp_path / "bad"
    (bad / "dan").mkdir(parents=True)
    (bad / "dan" / "1.jpg").write_bytes(b"broken")
    (bad / "dan" / "2.jpg").write_bytes(b"noface")
    assert cli.main(["gallery", "enroll", str(bad), "--db", str(tmp_path / "b.sqlite"), "--model", "m.onnx",
                     "--skip-no-face"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines (at every update here), then the error
    assert [line for line in err if not line.startswith("enrolling: ")] == err[-1:]
    assert err[-1].startswith("error: ") and "no identity with a usable face image (2 image(s) skipped: " in err[-1]
    assert "1.jpg: not an image (cannot be decoded); " in err[-1] and "2.jpg: no face found)" in err[-1]


class PairsEmbedder(FakeEmbedder):
    """verify --pairs: embed_many reports each distinct photo (FaceEmbedder's progress callback)."""

    def embed_many(self, images, progress=None):
        seen = {}
        for image in images:
            key = str(Path(image).resolve())
            if key not in seen:
                seen[key] = self.largest_face(image).crop
                if progress is not None:
                    progress(len(seen))
        return np.stack([seen[str(Path(image).resolve())] for image in images])


def test_verify_pairs_shows_progress_on_stderr_only(tmp_path, capsys, monkeypatch, every_update):
    monkeypatch.setattr("marginface.cli.options.face_embedder", lambda args: PairsEmbedder())
    for k in range(3):
        (tmp_path / f"{k}.jpg").write_bytes(k.to_bytes(4, "little"))
    (tmp_path / "pairs.csv").write_text("file_x,file_y\n0.jpg,1.jpg\n1.jpg,2.jpg\n0.jpg,2.jpg\n")
    argv = ["verify", "--pairs", str(tmp_path / "pairs.csv"), "--model", "m.onnx"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and "finding faces: 3/3 photos (100%)" in err
    assert cli.main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["pairs"]) == 3 and err == ""
