"""The curated public API (``import marginface``): lazy names, the one-call helpers on real photos
(the same verdicts as the CLI), every face of a photo, thresholded gallery search and
`identify_folder`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import marginface
from marginface.cli import main
from marginface.deploy import api
from marginface.deploy.embedder import FaceEmbedder
from marginface.deploy.gallery import decide, format_identify_rows, identify_folder
from marginface.errors import UserError
from tests.shared_data import need

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = "weights/mobilefacenet_onnx/MobileFaceNet.onnx"


def opts() -> dict:
    return {"normalize": "imagenet", "detector_weights": need("weights/mtcnn")}


def photo(name: str) -> Path:
    return need(f"photos/deepface/{name}")


def test_every_public_name_resolves():
    assert marginface.__all__ and "__version__" in marginface.__all__
    for name in marginface.__all__:
        assert getattr(marginface, name) is not None, name
    assert set(marginface.__all__) <= set(dir(marginface))
    from marginface.deploy.gallery_store import GalleryStore
    from marginface.train.trainer import Trainer
    assert marginface.Trainer is Trainer and marginface.Gallery is GalleryStore
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        marginface.nope  # noqa: B018


def test_import_is_cheap():
    """``import marginface`` loads none of the package's modules, torch or cv2."""
    code = ("import sys, marginface; heavy = [m for m in sys.modules if m.startswith(('marginface.', 'torch', 'cv2'))];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_design_md_imports_work():
    from marginface import Trainer, build_backbone, evaluate_pairs  # DESIGN.md: usable without the CLI
    from marginface.data.synthetic import synthetic_pair_set

    assert Trainer.__name__ == "Trainer"
    model = build_backbone("mbf", embedding_size=32, input_size=32).eval()
    pairs = synthetic_pair_set(num_identities=6, images_per_identity=3, num_pairs=20, image_size=32)
    result = evaluate_pairs(model, pairs, flip=False)
    assert result["name"] == "synthetic" and result["pairs"] == 20 and 0.0 <= result["accuracy"] <= 1.0


def test_evaluate_model_is_the_function_and_evaluate_stays_the_subpackage():
    import marginface.evaluate.metrics as metrics

    assert marginface.evaluate.metrics is metrics  # the subpackage is not shadowed
    assert callable(marginface.evaluate_model)
    assert "verification sets" in marginface.evaluate_model.__doc__


def test_verify_and_embed_match_the_cli(capsys):
    model = need(FOREIGN)
    pairs = [("img1.jpg", "img2.jpg"), ("img1.jpg", "img3.jpg")]  # same person, different people
    for a, b in pairs:
        assert main(["verify", str(photo(a)), str(photo(b)), "--model", str(model), "--normalize", "imagenet",
                     "--detector-weights", str(need("weights/mtcnn")), "--json"]) == 0
        cli = json.loads(capsys.readouterr().out)
        got = marginface.verify(photo(a), photo(b), model=model, **opts())
        for key in ("similarity", "same", "threshold", "threshold_source"):
            assert key in got
        assert got["same"] == cli["same"]
        assert got["similarity"] == pytest.approx(cli["similarity"], abs=1e-5)
        assert got["face_a"]["face"] == 0 and len(got["face_a"]["box"]) == 4 and got["face_a"]["faces"] >= 1
    assert [marginface.verify(photo(a), photo(b), model=model, **opts())["same"] for a, b in pairs] == [True, False]

    ea = marginface.embed(photo("img1.jpg"), model=model, **opts())
    eb, info = marginface.embed(photo("img2.jpg"), model=model, return_face=True, **opts())
    assert ea.shape == (128,) and ea.dtype == np.float32 and abs(float(np.linalg.norm(ea)) - 1) < 1e-4
    assert float(ea @ eb) == pytest.approx(marginface.verify(photo("img1.jpg"), photo("img2.jpg"), model=model,
                                                            **opts())["similarity"], abs=1e-5)
    assert info["face"] == 0


def test_the_model_is_loaded_once_per_path_and_options():
    api.clear_cache()
    model = need(FOREIGN)
    first = api.face_embedder(model, **opts())
    assert api.face_embedder(model, **opts()) is first
    assert api.face_embedder(model, threshold=0.5, **opts()) is not first
    api.clear_cache()
    assert api.face_embedder(model, **opts()) is not first


def test_every_face_of_a_group_photo():
    model = need(FOREIGN)
    found = marginface.faces(photo("couple.jpg"), model=model, **opts())
    assert len(found) >= 2
    assert [f["face"] for f in found] == list(range(len(found)))
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in found]
    assert areas == sorted(areas, reverse=True)
    assert all(len(f["landmarks"]) == 5 and len(f["embedding"]) == 128 for f in found)
    # choosing the second face: the result says so, and it is a different face from the first
    r0 = marginface.verify(photo("couple.jpg"), photo("couple.jpg"), model=model, face_b=1, **opts())
    assert r0["face_a"]["face"] == 0 and r0["face_b"]["face"] == 1
    assert r0["face_b"]["box"] == found[1]["box"] and r0["similarity"] < 0.9
    with pytest.raises(UserError, match=r"face 99 asked for, but the photo has \d+ face"):
        marginface.embed(photo("couple.jpg"), model=model, face=99, **opts())


def test_decide_applies_the_threshold():
    matches = [{"identity": "ann", "similarity": 0.42}, {"identity": "bob", "similarity": 0.1}]
    assert decide(matches, 0.3)["identity"] == "ann" and decide(matches, 0.3)["known"]
    below = decide(matches, 0.5)
    assert below["identity"] is None and below["known"] is False and below["similarity"] == pytest.approx(0.42)
    assert [m["known"] for m in decide(matches, 0.3)["matches"]] == [True, False]


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
    (root / "unknown" / "blank.png").write_bytes(
        __import__("cv2").imencode(".png", np.full((200, 200, 3), 128, np.uint8))[1].tobytes())
    return root


def test_identify_folder_names_each_photo(folders):
    fe = FaceEmbedder(need(FOREIGN), **opts())
    result = identify_folder(folders / "known", folders / "unknown", model=fe)
    rows = {r["file"]: r for r in result["rows"]}
    assert sorted(rows) == ["blank.png", "img15.jpg", "img4.jpg", "img9.jpg"]
    assert {f: rows[f]["identity"] for f in ("img4.jpg", "img15.jpg", "img9.jpg")} == \
        {"img4.jpg": "p1", "img15.jpg": "p2", "img9.jpg": "p3"}
    assert rows["blank.png"]["known"] is False and rows["blank.png"]["error"] == "no face found"
    assert rows["img4.jpg"]["face"]["face"] == 0
    text = format_identify_rows(result)
    assert "img4.jpg,p1," in text and "blank.png,no_face," in text
    # above every similarity: nobody is known, and the text says unknown
    strict = identify_folder(folders / "known", folders / "unknown", model=fe, threshold=0.999)
    assert all(r["identity"] is None and not r["known"] for r in strict["rows"])
    assert "img4.jpg,unknown," in format_identify_rows(strict)


def test_identify_folder_against_a_gallery_file(folders, tmp_path):
    from marginface.deploy.gallery import enroll_store

    fe = FaceEmbedder(need(FOREIGN), **opts())
    db = tmp_path / "g.sqlite"
    enroll_store(fe, folders / "known", db)
    result = identify_folder(db, folders / "unknown", model=fe)
    assert {r["file"]: r["identity"] for r in result["rows"] if r["known"]} == \
        {"img4.jpg": "p1", "img15.jpg": "p2", "img9.jpg": "p3"}


def test_evaluate_honours_declared_folds_and_explains_single_class_sets():
    model = need(FOREIGN)
    mini = need("verification/lfw_mini")
    results = marginface.evaluate_model(model, [mini, need("verification/lfw_head20.bin")], normalize="imagenet")
    lfw = results["lfw_mini"]
    assert lfw["nfolds"] == 2 and lfw["pairs"] == 20 and lfw["auc"] > 0.9 and "note" not in lfw
    head = results["lfw_head20"]
    assert head["nfolds"] == 10 and np.isnan(head["auc"]) and "same-person" in head["note"]
    assert marginface.evaluate_model(model, mini, normalize="imagenet", nfolds=5)["lfw_mini"]["nfolds"] == 5


def test_pyproject_uses_the_spdx_license_form():
    """The ``license = {text = ...}`` table is deprecated (setuptools refuses it from 2027-02)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] and all((ROOT / f).is_file() for f in project["license-files"])


def test_quickstart_runs_do_not_reuse_the_readme_run():
    """The README's `marginface train` writes runs/synthetic_mbf; the quickstart's commands must
    name their own runs (a fresh start refuses a directory holding a run)."""
    from tests.test_docs import shell_commands

    commands = [argv for _, argv in shell_commands(ROOT / "docs" / "quickstart.md")]
    used = [a for argv in commands for a in argv if a.startswith("runs/")]
    assert used and not [a for a in used if a.startswith("runs/synthetic_mbf")], used
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "runs/synthetic_mbf/report.md" in readme and "(docs/performance.md)" in readme


def test_the_example_names_the_people(folders, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import who_is_who
    finally:
        sys.path.pop(0)
    argv = [str(folders / "known"), str(folders / "unknown"), "--model", str(need(FOREIGN)),
            "--normalize", "imagenet", "--detector-weights", str(need("weights/mtcnn"))]
    assert who_is_who.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "blank.png,no_face," and any(line.startswith("img4.jpg,p1,") for line in out)
