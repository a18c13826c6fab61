"""Gallery: exact chunked search vs brute force, the legacy .npz file (atomic, no pickle, bad files),
model fingerprints, and enrol/search on real photos (johns: rank-1 on held-out images; two CLI
enrolments into one .sqlite gallery add up). The SQLite store itself: tests/deploy/test_gallery_store.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from marginface.cli import main
from marginface.deploy.gallery import Gallery, enroll, file_sha256, top_k_cosine
from marginface.errors import UserError

FOREIGN = "weights/mobilefacenet_onnx/MobileFaceNet.onnx"
ENROLLED_PER_IDENTITY = 5


from shared_data import need  # noqa: E402  (tests/shared_data.py)




def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------- search
def test_chunked_search_matches_brute_force_on_200k():
    rng = np.random.default_rng(0)
    gallery = unit_rows(rng, 200_000, 64)
    queries = np.concatenate([unit_rows(rng, 4, 64), gallery[[123, 199_999]]])  # two exact members
    idx, sims = top_k_cosine(gallery, queries, 10, chunk_size=30_000)  # uneven last chunk
    brute = queries @ gallery.T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    assert np.array_equal(idx, expected)
    assert np.allclose(sims, np.take_along_axis(brute, expected, axis=1), atol=1e-6)
    assert idx[4, 0] == 123 and idx[5, 0] == 199_999 and sims[4, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 0)


def test_search_edge_cases():
    rng = np.random.default_rng(1)
    g = Gallery(np.array(["a", "b", "c"]), unit_rows(rng, 3, 8), np.array([1, 2, 3]))
    idx, sims = g.search(g.embeddings[1], top_k=10)  # k larger than the gallery: all of it
    assert idx.shape == (1, 3) and idx[0, 0] == 1
    assert g.matches(g.embeddings[2], 1)[0]["identity"] == "c"
    with pytest.raises(UserError, match="8-d"):
        g.search(np.ones(5, np.float32))
    with pytest.raises(UserError, match="faiss"):
        try:
            import faiss  # noqa: F401
        except ImportError:
            g.search(g.embeddings[0], index="faiss")
        else:
            raise UserError("faiss installed: covered by test_faiss_matches_exact")


def test_faiss_matches_exact():
    pytest.importorskip("faiss", reason="faiss is optional and not installed")
    rng = np.random.default_rng(2)
    g = Gallery(np.array([str(i) for i in range(5000)]), unit_rows(rng, 5000, 32), np.ones(5000, int))
    q = unit_rows(rng, 3, 32)
    assert np.array_equal(g.search(q, 5, index="faiss")[0], g.search(q, 5, index="exact")[0])


# ---------------------------------------------------------------------------------------------- file
def test_save_load_roundtrip_atomic_no_pickle(tmp_path):
    rng = np.random.default_rng(3)
    g = Gallery(np.array(["Ann", "Bob"]), unit_rows(rng, 2, 16), np.array([3, 4]), "abc123",
                unit_rows(rng, 1, 16)[0], "model.onnx")
    path = g.save(tmp_path / "g.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npz"]  # no temp file left behind
    back = Gallery.load(path)
    assert list(back.names) == ["Ann", "Bob"] and np.array_equal(back.embeddings, g.embeddings)
    assert list(back.counts) == [3, 4] and back.model_fingerprint == "abc123" and back.model_name == "model.onnx"
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert {"names", "embeddings", "counts", "model_fingerprint", "model_probe", "format"} <= set(z.files)


def test_bad_gallery_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip")
    with pytest.raises(UserError, match="not a readable gallery"):
        Gallery.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", names=np.array(["x"]))
    with pytest.raises(UserError, match="not a marginface gallery"):
        Gallery.load(tmp_path / "other.npz")
    with pytest.raises(UserError, match="not found"):
        Gallery.load(tmp_path / "missing.npz")
    with pytest.raises(UserError, match=".npz"):
        Gallery(np.array(["a"]), np.ones((1, 2), np.float32), np.array([1])).save(tmp_path / "g.pkl")


def test_model_fingerprint_check():
    rng = np.random.default_rng(4)
    probe = unit_rows(rng, 1, 16)[0]
    g = Gallery(np.array(["a"]), unit_rows(rng, 1, 16), np.array([1]), "fp1", probe, "m1")
    g.check_model("fp1", probe)
    g.check_model("fp-export", probe + 1e-4)  # same behaviour (e.g. the fp32 export): accepted
    with pytest.raises(UserError, match="different model"):
        g.check_model("fp2", unit_rows(rng, 1, 16)[0])
    with pytest.raises(UserError, match="16-d"):
        g.check_model("fp3", unit_rows(rng, 1, 8)[0])


# ---------------------------------------------------------------------------------------------- real photos
@pytest.fixture(scope="module")
def johns_split(tmp_path_factory):
    """johns/<id>/: the first 5 images (sorted) of each identity enrolled, the other 6 probes."""
    root = need("identities/johns")
    enrol_dir = tmp_path_factory.mktemp("johns_enrol")
    probes = []
    for ident in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(ident.glob("*.jpg"))
        (enrol_dir / ident.name).mkdir()
        for f in files[:ENROLLED_PER_IDENTITY]:
            (enrol_dir / ident.name / f.name).symlink_to(f)
        probes += [(ident.name, f) for f in files[ENROLLED_PER_IDENTITY:]]
    return enrol_dir, probes


def test_johns_rank1(johns_split, capsys):
    from marginface.deploy.embedder import FaceEmbedder

    enrol_dir, probes = johns_split
    fe = FaceEmbedder(need(FOREIGN), normalize="imagenet", detector_weights=need("weights/mtcnn"), threads=1)
    gallery, report = enroll(fe, enrol_dir)
    assert report["identities"] == 5 and report["images"] == 25 and not report["skipped"]
    assert np.allclose(np.linalg.norm(gallery.embeddings, axis=1), 1, atol=1e-5)
    gallery.check_model(*fe.fingerprint())
    emb = fe.embed_many([f for _, f in probes])
    idx, _ = gallery.search(emb, 1)
    correct = sum(gallery.names[i] == name for i, (name, _) in zip(idx[:, 0], probes))
    rate = correct / len(probes)
    with capsys.disabled():
        print(f"\n[johns] rank-1 {correct}/{len(probes)} = {rate:.1%}")
    assert len(probes) == 30 and rate >= 0.90


def test_gallery_cli_enroll_and_search(johns_split, tmp_path, capsys):
    enrol_dir, probes = johns_split
    args = ["--model", str(need(FOREIGN)), "--normalize", "imagenet", "--detector-weights",
            str(need("weights/mtcnn")), "--threads", "1"]
    # two enrolments into one SQLite gallery: the second adds to the first
    halves = [tmp_path / "first", tmp_path / "second"]
    for i, ident in enumerate(sorted(enrol_dir.iterdir())):
        (halves[i >= 2] / ident.name).mkdir(parents=True)
        for f in ident.iterdir():
            (halves[i >= 2] / ident.name / f.name).symlink_to(f.resolve())
    # johns has byte-identical copies (John_Shimkus): an image is its content, enrolled once
    distinct = [len({(d.name, file_sha256(f)) for d in sorted(h.iterdir()) for f in d.iterdir()}) for h in halves]
    db = tmp_path / "g.sqlite"
    for half, expected, rows in zip(halves, (2, 5), distinct):
        assert main(["gallery", "enroll", str(half), "--db", str(db), *args, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["gallery_identities"] == expected and report["added"] == rows
        assert report["added"] + report["already_enrolled"] == report["images"]
    assert main(["gallery", "enroll", str(halves[0]), "--db", str(db), *args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # the same images again: nothing embedded, nothing added
    assert (report["images"], report["added"], report["already_enrolled"], report["gallery_identities"]) == (0, 0, 10, 5)
    assert main(["gallery", "list", "--db", str(db), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["identities"] == 5 and listing["images"] == sum(distinct) >= 24
    name, probe = probes[-1]
    assert main(["gallery", "search", str(probe), "--db", str(db), "--top", "3", *args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["matches"]) == 3 and result["matches"][0]["identity"] == name
    assert set(result["matches"][0]) >= {"identity", "similarity", "images"}
    # the same gallery searched with another preprocessing: refused, exit 2, naming the normalisation
    wrong = [a if a != "imagenet" else "arcface" for a in args]
    assert main(["gallery", "search", str(probe), "--db", str(db), *wrong, "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "input normalisation 'imagenet'" in err[0]
    assert "pass --normalize imagenet" in err[0]
    assert main(["gallery", "search", str(probe), "--db", str(tmp_path / "none.sqlite"), *args]) == 2
    assert "not found" in capsys.readouterr().err
    # a legacy .npz gallery (the in-memory enrolment saved) is still searchable
    from marginface.deploy.embedder import FaceEmbedder

    fe = FaceEmbedder(need(FOREIGN), normalize="imagenet", detector_weights=need("weights/mtcnn"), threads=1)
    snapshot = Gallery.load(db)
    snapshot.save(tmp_path / "g.npz")
    assert main(["gallery", "search", str(probe), "--db", str(tmp_path / "g.npz"), "--top", "1", *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["matches"][0]["identity"] == name
    snapshot.check_model(*fe.fingerprint())


# ---------------------------------------------------------------------------------------------- normalisation
def test_a_gallery_says_when_only_the_normalisation_differs(tmp_path):
    """Enrolled with --normalize imagenet, searched with the same model read without it (arcface): the
    refusal names the normalisation, recorded in the gallery or not; another model is still 'a different
    model', and the line says whether its normalisation differs too."""
    from marginface.deploy.embedder import FaceEmbedder
    from marginface.deploy.gallery_store import GalleryStore
    from marginface.deploy.load import random_backbone

    model = need(FOREIGN)
    enrolled = FaceEmbedder(model, normalize="imagenet", threads=1)
    searching = FaceEmbedder(model, threads=1)  # a foreign ONNX without --normalize: arcface
    assert searching.normalize == "arcface"
    fingerprint, probe = enrolled.fingerprint()
    row = probe[None]
    for recorded in ("imagenet", ""):  # "": a gallery written before the normalisation was recorded
        db = tmp_path / f"g{recorded}.sqlite"
        with GalleryStore(db, create=True) as store:
            store.add(["a"], row, fingerprint=fingerprint, probe=probe, normalize=recorded)
            store.check_model(fingerprint, probe, embedder=enrolled)  # the same model and normalisation: fine
            with pytest.raises(UserError) as info:
                store.check_model(*searching.fingerprint(), embedder=searching)
        message = str(info.value)
        assert message.startswith(f"{db}: enrolled with this model but with input normalisation 'imagenet'")
        assert "read with 'arcface'" in message and "pass --normalize imagenet" in message
    other = FaceEmbedder(random_backbone("mbf", embedding_size=128, width_mult=0.5), threads=1)  # arcface
    with GalleryStore(tmp_path / "gimagenet.sqlite") as store:
        with pytest.raises(UserError, match=r"a different model \(fingerprint .*\) and a different input "
                                            r"normalisation \('imagenet'; this model uses 'arcface'\)"):
            store.check_model(*other.fingerprint(), embedder=other)
    gallery = Gallery.load(tmp_path / "gimagenet.sqlite")  # a snapshot keeps it, and so does an .npz
    assert gallery.model_normalize == "imagenet"
    gallery.save(tmp_path / "g.npz")
    assert Gallery.load(tmp_path / "g.npz").model_normalize == "imagenet"
    with pytest.raises(UserError, match="pass --normalize imagenet"):
        Gallery.load(tmp_path / "g.npz").check_model(*searching.fingerprint(), embedder=searching)
