"""Library features wired into the command line: registry choices, one device resolver, --backbone for
plain state dicts, export --format insightface-pth, verify --face-a/--face-b, thresholded gallery
search, identify-folder, faces, data convert/inspect text, and `serve`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from marginface.cli import build_parser, main
from tests.shared_data import need

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
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


def face_opts() -> list:
    return ["--model", need(FOREIGN), "--normalize", "imagenet", "--detector-weights", need("weights/mtcnn"),
            "--threads", "1"]


def photo(name: str) -> Path:
    return need(f"photos/deepface/{name}")


def option(path: str, flag: str):
    parser = build_parser()
    for name in path.split():
        parser = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
    return next(a for a in parser._actions if flag in a.option_strings)


@pytest.fixture(scope="module")
def state_dict(tmp_path_factory) -> Path:
    """A plain (insightface-style) state dict of a random mbf."""
    from marginface.models import build_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sd") / "backbone.pth"
    torch.save(build_backbone("mbf", embedding_size=512).state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------- registries
def test_choices_are_the_registries():
    from marginface.data.detect import DETECTORS
    from marginface.data.transforms import NORMALIZATIONS
    from marginface.deploy.compiled import PRECISIONS
    from marginface.deploy.export import FORMATS

    assert list(option("export", "--format").choices) == list(FORMATS) and "insightface-pth" in FORMATS
    from marginface.deploy.export import EXPORT_PRECISIONS

    assert list(option("export", "--precision").choices) == list(EXPORT_PRECISIONS) == list(PRECISIONS) + ["fp16", "auto"]
    assert list(option("eval", "--precision").choices) == list(PRECISIONS)
    for path in ("verify", "data align", "gallery search", "faces", "identify-folder", "serve"):
        assert list(option(path, "--detector").choices) == list(DETECTORS), path
    for path in ("eval", "verify", "bench", "serve"):
        assert list(option(path, "--normalize").choices) == list(NORMALIZATIONS), path


def test_building_the_parser_imports_no_torch():
    code = ("import sys; from marginface.cli import build_parser; p = build_parser(); "
            "p.parse_args(['gallery', 'list', '--db', 'g.sqlite']); print([m for m in sys.modules if m == 'torch'])")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_a_name_outside_the_registry_is_one_error_line(capsys, tmp_path):
    rc, _, err = run(capsys, "export", "--backbone", "mbf", "--format", "tflite2", "--out", tmp_path / "x")
    assert rc == 2 and "'insightface-pth'" in error_line(err) and "tflite2" in err


# ------------------------------------------------------------------------------ device, model info, --backbone
def test_device_goes_through_the_one_resolver(capsys, tmp_path, state_dict):
    (tmp_path / "imgs").mkdir()
    rc, _, err = run(capsys, "embed", "--model", state_dict, "--images", need("verification/lfw_mini"),
                     "--out", tmp_path / "f.npy", "--device", "nodevice")
    assert rc == 2 and error_line(err) == "error: --device is not a device: 'nodevice'"


def test_state_dict_reports_its_backbone(state_dict):
    from marginface.cli.options import eval_model_info
    from marginface.deploy.load import load_model

    info = eval_model_info(load_model(state_dict))
    assert info["backbone"] == "mbf" and info["embedding_size"] == 512 and info["params"] > 0


def test_backbone_override_on_embed_and_refused_for_onnx(capsys, tmp_path, state_dict):
    images = need("verification/lfw_mini")
    rc, out, err = run(capsys, "embed", "--model", state_dict, "--backbone", "mbf", "--images", images,
                       "--out", tmp_path / "f.npy", "--threads", "1", "--batch-size", "8", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["dim"] == 512 and np.load(tmp_path / "f.npy").shape == (result["images"], 512)
    rc, _, err = run(capsys, "embed", "--model", state_dict, "--backbone", "iresnet50", "--images", images,
                     "--out", tmp_path / "g.npy")
    assert rc == 2 and str(state_dict) in error_line(err)  # the tensors are not an iresnet50
    rc, _, err = run(capsys, "verify", photo("img1.jpg"), photo("img2.jpg"), *face_opts(), "--backbone", "mbf")
    assert rc == 2 and "--backbone applies to plain state dicts" in error_line(err)


def test_export_insightface_pth_from_a_state_dict_with_backbone(capsys, tmp_path, state_dict):
    out = tmp_path / "backbone_if.pth"
    rc, stdout, err = run(capsys, "export", state_dict, "--backbone", "mbf", "--format", "insightface-pth",
                          "--out", out, "--threads", "1", "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["format"] == "insightface-pth" and out.is_file()
    saved = torch.load(out, weights_only=True)
    ours = torch.load(state_dict, weights_only=True)
    assert len(saved) == len(ours)  # the trained weights, renamed; not a random network
    assert sorted(float(v.float().abs().sum()) for v in saved.values()) == \
        pytest.approx(sorted(float(v.float().abs().sum()) for v in ours.values()), rel=1e-6)


# ------------------------------------------------------------------------------------------------ photos
def test_verify_json_says_which_faces_and_takes_face_indices(capsys):
    rc, out, err = run(capsys, "verify", photo("couple.jpg"), photo("couple.jpg"), *face_opts(),
                       "--face-b", "1", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert {"similarity", "same", "threshold", "threshold_source", "face_a", "face_b"} <= set(result)
    assert result["face_a"]["face"] == 0 and result["face_b"]["face"] == 1 and result["similarity"] < 0.9
    rc, _, err = run(capsys, "verify", photo("img1.jpg"), photo("img2.jpg"), *face_opts(), "--face-a", "-1")
    assert rc == 2 and "--face-a must be >= 0" in error_line(err)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("identify")
    known = {"p1": ["img1.jpg", "img2.jpg"], "p2": ["img13.jpg", "img14.jpg"], "p3": ["img8.jpg"]}
    for name, files in known.items():
        (root / "known" / name).mkdir(parents=True)
        for f in files:
            shutil.copy(photo(f), root / "known" / name / f)
    (root / "unknown").mkdir()
    for f in ("img4.jpg", "img15.jpg", "img9.jpg"):
        shutil.copy(photo(f), root / "unknown" / f)
    return root


def test_identify_folder_command(capsys, folders, tmp_path):
    rc, out, err = run(capsys, "identify-folder", folders / "known", folders / "unknown", *face_opts())
    assert rc == 0, err
    rows = {line.split(",")[0]: line.split(",")[1] for line in out.splitlines()}
    assert rows == {"img15.jpg": "p2", "img4.jpg": "p1", "img9.jpg": "p3"}
    # against a gallery file, with a threshold above every similarity: all unknown
    db = tmp_path / "g.sqlite"
    assert run(capsys, "gallery", "enroll", folders / "known", "--db", db, *face_opts())[0] == 0
    rc, out, err = run(capsys, "identify-folder", db, folders / "unknown", *face_opts(), "--threshold", "0.999",
                       "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["threshold"] == 0.999 and [r["known"] for r in result["rows"]] == [False] * 3
    # gallery search: thresholded, text says unknown below the threshold
    rc, out, err = run(capsys, "gallery", "search", folders / "unknown" / "img4.jpg", "--db", db, *face_opts(),
                       "--json")
    assert rc == 0, err
    found = json.loads(out)
    assert found["identity"] == "p1" and found["known"] is True and found["matches"][0]["identity"] == "p1"
    rc, out, err = run(capsys, "gallery", "search", folders / "unknown" / "img4.jpg", "--db", db, *face_opts(),
                       "--threshold", "0.999")
    assert rc == 0 and out.splitlines()[0].split()[1] == "p1" and "-> unknown" in out.splitlines()[-1]


def test_faces_command(capsys):
    rc, out, err = run(capsys, "faces", photo("couple.jpg"), *face_opts(), "--json")
    assert rc == 0, err
    found = json.loads(out)["faces"]
    assert len(found) >= 2 and [f["face"] for f in found] == list(range(len(found)))
    assert all(len(f["landmarks"]) == 5 and len(f["box"]) == 4 and len(f["embedding"]) == 128 for f in found)
    rc, text, err = run(capsys, "faces", photo("couple.jpg"), *face_opts())
    assert rc == 0 and text.count("landmarks") == len(found) and "embedding" not in text
    assert text.splitlines()[-1].startswith(f"{len(found)} face(s)")


# -------------------------------------------------------------------------------------------------- data
def test_data_convert_and_inspect_text(capsys, tmp_path):
    assert run(capsys, "data", "synth", tmp_path / "one", "--identities", "1", "--images", "2", "--size", "32")[0] == 0
    rc, out, err = run(capsys, "data", "inspect", tmp_path / "one")
    assert rc == 0 and "warning:" in err and "warnings" not in out and "identities: 1" in out
    rc, out, err = run(capsys, "data", "convert", tmp_path / "one", tmp_path / "r")
    assert rc == 0, err
    assert out.strip().splitlines()[0].count("2 images") == 1 and "{" not in out  # the summary, not a dict


# -------------------------------------------------------------------------------------------------- serve
def test_serve_help_and_a_bad_model(tmp_path):
    text = subprocess.run([sys.executable, "-m", "marginface", "serve", "--help"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert text.returncode == 0 and "--max-megapixels" in text.stdout and "--gallery" in text.stdout
    bad = subprocess.run([sys.executable, "-m", "marginface", "serve", "--model", str(tmp_path / "nope.onnx"),
                          "--port", "0"], env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ") and "nope.onnx" in bad.stderr


def test_bench_text_names_the_weights_and_shows_the_parity_cosines(capsys):
    rc, out, _ = run(capsys, "bench", "--backbone", "mbf", "--input-size", "32", "--runtimes", "torch,onnxruntime",
                     "--runs", "3", "--threads", "1")
    assert rc == 0
    assert "trained-looking weights" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["runtime"] == ["runtime", "batch", "1", "ms", "p90", "ms", "batch", "32", "img/s", "min", "cosine"]
    assert rows["torch"][-1] == "1.0000"  # the first runtime against itself
    assert rows["onnxruntime"][-1].startswith("0.99") or rows["onnxruntime"][-1] == "1.0000"
    assert max(map(len, out.splitlines())) <= 100
    rc, out, _ = run(capsys, "bench", "--backbone", "mbf", "--input-size", "32", "--runtimes", "torch",
                     "--runs", "3", "--weights", "fresh", "--json")
    assert rc == 0 and json.loads(out)["weights"] == "fresh"
