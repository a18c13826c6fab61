"""The SQLite gallery: adding (not replacing), idempotent re-enrolment, --replace, remove, list,
templates recomputed from rows, search vs brute force, FAISS kept in step with the generation,
bad files, legacy .npz conversion, concurrent writers and readers in separate processes, and a
real SIGKILL in the middle of a write. Embeddings are cheap deterministic vectors; no model."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import marginface
from marginface.cli import main
from marginface.deploy import gallery_store
from marginface.deploy.gallery import Gallery, open_gallery
from marginface.deploy.gallery_store import FORMAT_VERSION, GalleryStore, convert_npz
from marginface.errors import UserError

DIM = 32
ROOT = str(Path(marginface.__file__).resolve().parents[1])


def vec(*key: int, dim: int = DIM) -> np.ndarray:
    """The deterministic unit 'embedding' of image ``key``."""
    v = np.random.default_rng(list(key)).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def template(vectors) -> np.ndarray:
    c = np.asarray(vectors, np.float64).sum(0)
    return (c / np.linalg.norm(c)).astype(np.float32)


def brute_force_check(store: GalleryStore) -> None:
    """Within one read transaction: every identity's row count and template agree with its rows."""
    with store._read() as c:
        for ident, images, tmpl in c.execute("SELECT id, images, template FROM identities").fetchall():
            rows = c.execute("SELECT embedding, count FROM images WHERE identity_id = ?", (ident,)).fetchall()
            assert rows and images == sum(r[1] for r in rows)
            vecs = np.stack([np.frombuffer(r[0], np.float32) for r in rows])
            expect = template(vecs * np.array([r[1] for r in rows])[:, None])
            assert np.allclose(np.frombuffer(tmpl, np.float32), expect, atol=1e-6)


# ---------------------------------------------------------------------------------------------- basics
def test_add_accumulates_is_idempotent_and_replaces(tmp_path):
    db = tmp_path / "g.sqlite"
    with GalleryStore(db, create=True) as s:
        r = s.add(["ann", "ann"], [vec(1, 0), vec(1, 1)], sha256=["h0", "h1"], fingerprint="fp", probe=vec(99))
        assert (r["added"], r["already_enrolled"], r["generation"]) == (2, 0, 1)
        s.add(["bob"], [vec(2, 0)], sha256=["h0"], fingerprint="fp", probe=vec(99))  # same hash, other identity: a row
        assert s.list() == [{"identity": "ann", "images": 2}, {"identity": "bob", "images": 1}]
        # the same image again adds nothing; a new image of ann is added to her template
        r = s.add(["ann", "ann"], [vec(1, 1), vec(1, 2)], sha256=["h1", "h2"], fingerprint="fp", probe=vec(99))
        assert (r["added"], r["already_enrolled"]) == (1, 1)
        g = s.snapshot()
        assert list(g.names) == ["ann", "bob"] and list(g.counts) == [3, 1] and g.generation == 3
        assert np.allclose(g.embeddings[0], template([vec(1, 0), vec(1, 1), vec(1, 2)]), atol=1e-6)
        # --replace: ann's rows are exactly the new ones, bob untouched
        r = s.add(["ann"], [vec(1, 7)], sha256=["h7"], fingerprint="fp", probe=vec(99), replace=True)
        assert s.rows("ann")["sha256"] == ["h7"] and s.rows("bob")["sha256"] == ["h0"]
        assert np.allclose(s.snapshot().embeddings[0], vec(1, 7), atol=1e-6)
        # without hashes the embedding's bytes are the key: repeating it is a no-op too
        assert s.add(["cy"], [vec(3, 0)])["added"] == 1 and s.add(["cy"], [vec(3, 0)])["added"] == 0
        r = s.remove(["bob", "cy"])
        assert r["removed"] == ["bob", "cy"] and [e["identity"] for e in s.list()] == ["ann"]
        with pytest.raises(UserError, match="no enrolled identity 'zed'"):
            s.remove(["ann", "zed"])
        assert len(s) == 1  # nothing removed by the failed call
        assert s.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 1  # bob's rows are gone
        brute_force_check(s)
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000


def test_search_matches_brute_force_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"id{i:04d}" for i in range(700) for _ in range(2)]
    emb = rng.standard_normal((len(names), DIM)).astype(np.float32)
    with GalleryStore(tmp_path / "g.db", create=True) as s:
        s.add(names, emb)
        g = s.snapshot()
        q = np.concatenate([rng.standard_normal((3, DIM)), g.embeddings[[5, 699]]]).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        got_names, got_sims, got_images = s.search(q, 7, chunk_size=128, index="exact")  # 6 chunks, uneven last
        brute = q @ g.embeddings.T
        order = np.argsort(-brute, axis=1, kind="stable")[:, :7]
        assert got_names == [[g.names[j] for j in row] for row in order]
        assert np.allclose(got_sims, np.take_along_axis(brute, order, axis=1), atol=1e-6)
        assert got_images == [[2] * 7] * len(q)
        assert got_names[3][0] == "id0005" and got_names[4][0] == "id0699"
        assert s.matches(q[4], 1) == [{"identity": "id0699", "similarity": pytest.approx(1.0, abs=1e-5), "images": 2}]
        with pytest.raises(UserError, match="32-d"):
            s.search(np.ones(5, np.float32))
        with pytest.raises(UserError, match="not finite"):
            s.search(np.full(DIM, np.nan, np.float32))
    with GalleryStore(tmp_path / "empty.sqlite", create=True) as s, pytest.raises(UserError, match="empty"):
        s.search(vec(1))


class FakeFaiss:
    """Stands in for faiss (not installed here): an exact numpy IndexFlatIP that counts builds."""

    builds = 0

    class IndexFlatIP:
        def __init__(self, dim):
            FakeFaiss.builds += 1
            self.x = np.zeros((0, dim), np.float32)

        def add(self, x):
            self.x = np.concatenate([self.x, x])

        def search(self, q, k):
            sims = q @ self.x.T
            idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(sims, idx, axis=1), idx


def test_faiss_index_is_rebuilt_when_the_table_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(gallery_store, "_faiss", lambda: FakeFaiss)
    FakeFaiss.builds = 0
    db = tmp_path / "g.sqlite"
    with GalleryStore(db, create=True) as s, GalleryStore(db) as writer:
        writer.add(["a", "b"], [vec(1), vec(2)])
        assert s.matches(vec(2), 1, index="faiss")[0]["identity"] == "b" and FakeFaiss.builds == 1
        s.matches(vec(1), 1, index="faiss")
        assert FakeFaiss.builds == 1  # unchanged table: the index is reused
        writer.add(["c"], [vec(3)])  # another connection writes: generation moves
        assert s.matches(vec(3), 1, index="faiss")[0]["identity"] == "c" and FakeFaiss.builds == 2
        writer.remove(["c"])
        assert s.matches(vec(3), 1, index="faiss")[0]["identity"] != "c" and FakeFaiss.builds == 3
        names, _, _ = s.search(vec(1), 2, index="faiss")
        assert names == s.search(vec(1), 2, index="exact")[0]


def test_memory_index_follows_the_generation(tmp_path):
    db = tmp_path / "g.sqlite"
    with GalleryStore(db, create=True) as s, GalleryStore(db) as writer:
        writer.add(["a", "b"], [vec(1), vec(2)])
        assert s.matches(vec(2), 1, index="memory")[0]["identity"] == "b"
        cached = s._memory
        assert s.matches(vec(1), 2, index="memory") == s.matches(vec(1), 2, index="exact")
        assert s._memory is cached  # unchanged table: reused
        writer.add(["c", "c"], [vec(3), vec(4)])
        best = s.matches(vec(3), 1, index="memory")[0]
        assert (best["identity"], best["images"]) == ("c", 2) and s._memory is not cached
        writer.remove(["c"])
        assert sorted(m["identity"] for m in s.matches(vec(3), 5, index="memory")) == ["a", "b"]
        with pytest.raises(UserError, match="index must be"):
            s.search(vec(1), index="annoy")


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_files_and_values(tmp_path):
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database at all, just some bytes")
    with pytest.raises(UserError, match="junk.sqlite: not an SQLite database"):
        GalleryStore(tmp_path / "junk.sqlite")
    with pytest.raises(UserError, match="not found"):
        GalleryStore(tmp_path / "missing.sqlite")
    with pytest.raises(UserError, match=r"\.sqlite or \.db"):
        GalleryStore(tmp_path / "g.txt", create=True)
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    with pytest.raises(UserError, match="not a marginface gallery"):
        GalleryStore(tmp_path / "other.db")
    with pytest.raises(UserError, match="not a marginface gallery"):
        GalleryStore(tmp_path / "other.db", create=True)  # enrolling into it: refused, and it is left alone
    with sqlite3.connect(tmp_path / "other.db") as other:
        assert [r[0] for r in other.execute("SELECT name FROM sqlite_master")] == ["t"]
    with GalleryStore(tmp_path / "v.sqlite", create=True) as s:
        s.add(["a"], [vec(1)])
        s.conn.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (FORMAT_VERSION + 1,))
    with pytest.raises(UserError, match=f"format version {FORMAT_VERSION + 1}"):
        GalleryStore(tmp_path / "v.sqlite")
    with GalleryStore(tmp_path / "g.sqlite", create=True) as s:
        s.add(["a"], [vec(1)], fingerprint="fp1", probe=vec(99))
        for names, emb, match in ((["b"], [np.full(DIM, np.nan)], "non-finite.*b"),
                                  (["b"], [np.r_[np.inf, np.zeros(DIM - 1)]], "non-finite"),
                                  (["b"], [np.zeros(DIM)], "all-zero"),
                                  (["b"], [vec(1, dim=16)], "32-d embeddings, these are 16-d"),
                                  (["b", "c"], [vec(1)], "2 identity names"),
                                  (["a/b"], [vec(1)], "bad identity name")):
            with pytest.raises(UserError, match=match):
                s.add(names, emb, fingerprint="fp1", probe=vec(99))
        with pytest.raises(UserError, match="different model"):
            s.add(["b"], [vec(2)], fingerprint="fp2", probe=vec(98))
        s.add(["b"], [vec(2)], fingerprint="fp-export", probe=vec(99) + 1e-4)  # same behaviour: accepted
        assert [e["identity"] for e in s.list()] == ["a", "b"] and s.generation == 2  # refused calls wrote nothing


def test_convert_npz_and_read_both(tmp_path):
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((3, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    old = Gallery(np.array(["ann", "bob", "cy"]), emb, np.array([4, 1, 2]), "fp", vec(99), "m.onnx").save(tmp_path / "g.npz")
    report = convert_npz(old, tmp_path / "g.sqlite")
    assert (report["identities"], report["images"]) == (3, 7)
    with pytest.raises(UserError, match="already exists"):
        convert_npz(old, tmp_path / "g.sqlite")
    new = open_gallery(tmp_path / "g.sqlite")
    assert isinstance(new, GalleryStore) and isinstance(open_gallery(old), Gallery)
    assert new.list() == open_gallery(old).list() == [{"identity": "ann", "images": 4}, {"identity": "bob", "images": 1},
                                                     {"identity": "cy", "images": 2}]
    got, want = new.matches(emb[1], 3), open_gallery(old).matches(emb[1], 3)
    assert [m["identity"] for m in got] == [m["identity"] for m in want] == ["bob", "cy", "ann"]
    assert [m["similarity"] for m in got] == pytest.approx([m["similarity"] for m in want], abs=1e-6)
    new.check_model("fp", vec(99))
    with pytest.raises(UserError, match="different model"):
        new.check_model("other", vec(98))
    # a converted identity is one row standing for its count; a new image is weighted against it
    new.add(["cy"], [emb[0]], fingerprint="fp", probe=vec(99))
    assert np.allclose(new.snapshot().embeddings[2], template([2 * emb[2], emb[0]]), atol=1e-6)
    loaded = Gallery.load(tmp_path / "g.sqlite")  # the in-memory search API reads SQLite too
    assert list(loaded.names) == ["ann", "bob", "cy"] and list(loaded.counts) == [4, 1, 3]
    with pytest.raises(UserError, match=r"\.sqlite or \.db"):
        open_gallery(tmp_path / "g.pkl")


# ---------------------------------------------------------------------------------------------- processes
WRITER = r"""
import sys, numpy as np
from marginface.deploy.gallery_store import GalleryStore
db, worker, n, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def vec(*key):
    v = np.random.default_rng(list(key)).standard_normal(32)
    return (v / np.linalg.norm(v)).astype(np.float32)
with GalleryStore(db, create=True) as s:
    for j in range(n):
        s.add([f"w{worker}-{j}"] * rows, [vec(worker, j, r) for r in range(rows)], fingerprint="fp", probe=vec(99))
"""


@pytest.fixture
def spawned():
    """Children started by `_run`; any still alive when the test ends (e.g. it failed) are killed."""
    procs: list = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _run(code: str, *args, into: list) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    into.append(p)
    return p


def test_concurrent_writers_and_readers_lose_nothing(tmp_path, spawned):
    db, workers, enrolls, rows = tmp_path / "g.sqlite", 4, 25, 3
    procs = [_run(WRITER, db, w, enrolls, rows, into=spawned) for w in range(workers)]
    seen_sizes = []
    while any(p.poll() is None for p in procs):  # search while they write
        if not db.exists():
            time.sleep(0.01)
            continue
        try:
            store = GalleryStore(db)
        except UserError:  # the first writer is still creating the tables
            time.sleep(0.01)
            continue
        with store:
            g = store.snapshot()  # one read transaction
            for name, tmpl, count in zip(g.names, g.embeddings, g.counts):
                w, j = map(int, name[1:].split("-"))
                assert count == rows, f"{name} seen with {count} of its {rows} rows"
                assert np.allclose(tmpl, template([vec(w, j, r) for r in range(rows)]), atol=1e-5), name
            if len(g):
                w, j = map(int, g.names[-1][1:].split("-"))
                best = store.matches(template([vec(w, j, r) for r in range(rows)]), 1)[0]
                assert best["images"] == rows and best["similarity"] == pytest.approx(1.0, abs=1e-5)
            seen_sizes.append(len(g))
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err
    with GalleryStore(db) as s:
        assert len(s) == workers * enrolls == 100
        assert s.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == workers * enrolls * rows
        assert s.generation == workers * enrolls
        assert s.integrity_check() == "ok"
        brute_force_check(s)
    assert seen_sizes == sorted(seen_sizes)  # readers saw it grow, never shrink
    assert any(0 < n < 100 for n in seen_sizes), seen_sizes  # ...including while it was being written


CRASHER = r"""
import sys, time, numpy as np
from pathlib import Path
from marginface.deploy import gallery_store
db, rows, stop_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def vec(*key):
    v = np.random.default_rng(list(key)).standard_normal(32)
    return (v / np.linalg.norm(v)).astype(np.float32)
with gallery_store.GalleryStore(db, create=True) as s:
    start = len(s)
    for j in range(start, start + 100000):
        if j == stop_at:  # park inside the transaction, after the image rows, before the template
            def park():
                Path(db + ".inside").write_text(str(j))
                time.sleep(600)
            gallery_store._after_rows_hook = park
        s.add([f"id{j}"] * rows, [vec(j, r) for r in range(rows)])
        if j == start:
            print("running", flush=True)
"""


def _check_after_kill(db: Path, rows: int) -> int:
    with GalleryStore(db) as s:
        assert s.integrity_check() == "ok"
        names = [e["identity"] for e in s.list()]
        assert all(e["images"] == rows for e in s.list())
        assert s.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == rows * len(names)
        assert sorted(int(n[2:]) for n in names) == list(range(len(names)))  # complete enrolls, none missing
        brute_force_check(s)
        return len(names)


def test_sigkill_mid_enroll_leaves_the_last_commit(tmp_path, spawned):
    db, rows = tmp_path / "g.sqlite", 40
    # 1) killed while parked inside the write transaction (rows written, template not yet)
    p = _run(CRASHER, db, rows, 5, into=spawned)
    deadline = time.monotonic() + 60
    while not Path(f"{db}.inside").exists():
        assert p.poll() is None, p.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert Path(f"{db}-wal").exists()  # a hot WAL with the unfinished transaction's pages
    assert _check_after_kill(db, rows) == 5  # id0..id4 committed, id5 rolled back
    # 2) killed at arbitrary moments of a write loop
    before = 5
    for delay in (0.15, 0.4, 0.7):
        p = _run(CRASHER, db, rows, -1, into=spawned)
        assert p.stdout.readline().strip() == "running", p.communicate()[1]
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        after = _check_after_kill(db, rows)
        assert after > before
        before = after
    with GalleryStore(db) as s:  # still writable
        assert s.add(["late"], [vec(7)])["added"] == 1


# ---------------------------------------------------------------------------------------------- CLI
class FakeFace:
    box = (0.0, 0.0, 10.0, 10.0)
    score = 1.0

    def __init__(self, crop):
        self.crop = crop


class FakeEmbedder:
    """The embedder interface enrolment uses; an 'image' embeds as a vector seeded by its bytes."""

    threshold = 0.3
    threshold_source = "model"

    def __init__(self, probe_key=99):
        self.probe_key = probe_key
        self.model = type("M", (), {"model_path": f"fake{probe_key}.onnx"})()

    def largest_face(self, path):
        data = Path(path).read_bytes()
        if data.startswith(b"noface"):
            raise UserError(f"{path}: no face found")
        return FakeFace(vec(int.from_bytes(data[:4], "little")))

    def pick_face(self, path, which="largest"):  # `gallery search` (search_face): the one face of the image
        return 0, self.largest_face(path), 1

    def embed_crops(self, crops):
        return np.asarray(crops, np.float32)

    def embed(self, path):
        return self.largest_face(path).crop

    def fingerprint(self):
        return f"fake{self.probe_key}", vec(self.probe_key)


def people(root: Path, spec: dict) -> Path:
    for name, keys in spec.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in keys:
            (root / name / f"{k}.jpg").write_bytes(int(k).to_bytes(4, "little") + b"jpeg")
    return root


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_enroll_adds_lists_removes(tmp_path, capsys, monkeypatch):
    embedder = {"fe": FakeEmbedder()}
    monkeypatch.setattr("marginface.cli.options.face_embedder", lambda args: embedder["fe"])
    db = tmp_path / "g.sqlite"
    a = people(tmp_path / "a", {"ann": [1, 2]})
    b = people(tmp_path / "b", {"bob": [3], "cy": [4, 5, 6]})
    model = ["--model", "fake.onnx", "--json"]
    code, out, err = cli(capsys, "gallery", "enroll", a, "--db", db, *model)
    assert code == 0 and json.loads(out)["added"] == 2
    code, out, _ = cli(capsys, "gallery", "enroll", b, "--db", db, *model)  # adds, does not replace
    report = json.loads(out)
    assert code == 0 and (report["identities"], report["added"], report["gallery_identities"]) == (2, 4, 3)
    code, out, _ = cli(capsys, "gallery", "enroll", b, "--db", db, *model)  # again: nothing new, nothing embedded
    report = json.loads(out)
    assert (report["added"], report["already_enrolled"], report["gallery_identities"]) == (0, 4, 3)
    code, out, _ = cli(capsys, "gallery", "list", "--db", db, "--json")
    assert json.loads(out) == {"db": str(db), "identities": 3, "images": 6, "entries": [
        {"identity": "ann", "images": 2}, {"identity": "bob", "images": 1}, {"identity": "cy", "images": 3}]}
    people(tmp_path / "c", {"cy": [7]})
    code, out, _ = cli(capsys, "gallery", "enroll", tmp_path / "c", "--db", db, "--replace", *model)
    assert code == 0 and json.loads(out)["gallery_identities"] == 3
    code, out, _ = cli(capsys, "gallery", "search", tmp_path / "c" / "cy" / "7.jpg", "--db", db, "--top", "2", *model)
    result = json.loads(out)
    assert result["matches"][0] == {"identity": "cy", "similarity": pytest.approx(1.0, abs=1e-5), "images": 1,
                                  "known": True}  # search_face: thresholded
    assert len(result["matches"]) == 2 and out.count("\n") == 1
    code, out, _ = cli(capsys, "gallery", "remove", "bob", "--db", db, "--json")
    assert code == 0 and json.loads(out)["gallery_identities"] == 2
    code, out, _ = cli(capsys, "gallery", "list", "--db", db)
    assert code == 0 and "ann" in out and "bob" not in out and "2 identities, 3 images" in out

    # one error line each, exit 2
    embedder["fe"] = FakeEmbedder(probe_key=98)
    for argv, match in (
        (("gallery", "enroll", a, "--db", db, *model), "enrolled with a different model"),
        (("gallery", "search", a / "ann" / "1.jpg", "--db", db, *model), "enrolled with a different model"),
        (("gallery", "enroll", a, "--db", tmp_path / "g.npz", *model), "g.npz: .npz galleries are read-only"),
        (("gallery", "enroll", tmp_path / "none", "--db", db, *model), "none: not a directory"),
        (("gallery", "remove", "zed", "--db", db), "no enrolled identity 'zed'"),
        (("gallery", "list", "--db", tmp_path / "nope.sqlite"), "not found"),
    ):
        code, out, err = cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error:"), (argv, err)
        assert match in lines[0], (match, lines[0])
    people(tmp_path / "faceless", {"dan": []})
    (tmp_path / "faceless" / "dan" / "1.jpg").write_bytes(b"noface")
    code, _, err = cli(capsys, "gallery", "enroll", tmp_path / "faceless", "--db", tmp_path / "new.sqlite", *model)
    assert code == 2 and "1.jpg: no face found" in err and not (tmp_path / "new.sqlite").exists()
    (tmp_path / "junk.db").write_text("hello, not sqlite")
    code, _, err = cli(capsys, "gallery", "enroll", a, "--db", tmp_path / "junk.db", *model)
    assert code == 2 and "junk.db: not an SQLite database" in err
    assert (tmp_path / "junk.db").read_text() == "hello, not sqlite"


def test_cli_convert_then_enroll(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("marginface.cli.options.face_embedder", lambda args: FakeEmbedder())
    Gallery(np.array(["old"]), vec(50)[None], np.array([3]), "fake99", vec(99), "fake.onnx").save(tmp_path / "g.npz")
    code, out, _ = cli(capsys, "gallery", "convert", tmp_path / "g.npz", tmp_path / "g.sqlite", "--json")
    assert code == 0 and json.loads(out)["identities"] == 1
    a = people(tmp_path / "a", {"ann": [1]})
    code, out, _ = cli(capsys, "gallery", "enroll", a, "--db", tmp_path / "g.sqlite", "--model", "m", "--json")
    assert code == 0 and json.loads(out)["gallery_identities"] == 2
    code, out, _ = cli(capsys, "gallery", "search", a / "ann" / "1.jpg", "--db", tmp_path / "g.npz", "--model", "m",
                       "--json")  # the legacy file is still searchable
    assert code == 0 and json.loads(out)["matches"][0]["identity"] == "old"
