"""`marginface serve`'s JSON API through FastAPI's test client, on the real photos and the pretrained
MobileFaceNet: verdicts equal `marginface verify --json`; every endpoint with good and bad input
(not an image, no face, huge image, wrong model fingerprint) and its status code + JSON error."""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (pip install 'marginface[serve]') is not installed")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the serve extra)")

from fastapi.testclient import TestClient  # noqa: E402

from marginface.cli import main  # noqa: E402
from marginface.deploy.embedder import FaceEmbedder  # noqa: E402
from marginface.deploy.gallery_store import GalleryStore  # noqa: E402
from marginface.errors import UserError  # noqa: E402
from marginface.serve.app import FINGERPRINT_HEADER, create_app  # noqa: E402

from shared_data import need  # noqa: E402  (tests/shared_data.py)

FOREIGN = "weights/mobilefacenet_onnx/MobileFaceNet.onnx"
SAME = [("img20.jpg", "img21.jpg"), ("img3.jpg", "img12.jpg"), ("img16.jpg", "img17.jpg")]  # pairs.csv: Yes
DIFFERENT = [("img1.jpg", "img3.jpg"), ("img20.jpg", "img16.jpg")]


@pytest.fixture(scope="module")
def embedder():
    return FaceEmbedder(need(FOREIGN), normalize="imagenet", detector_weights=need("weights/mtcnn"), threads=1)


@pytest.fixture(scope="module")
def photos():
    return need("photos/deepface")


@pytest.fixture(scope="module")
def client(embedder):
    return TestClient(create_app(embedder, threads=1))


def upload(path, field="image"):
    return (field, (path.name, path.read_bytes(), "image/jpeg"))


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    return buf.tobytes()


def huge_png_header(width: int, height: int) -> bytes:
    """A small PNG file whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + b"\0" * 64)


def assert_error(response, status: int, needle: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "status"} and body["status"] == status, body
    assert needle in body["error"], body
    assert "Traceback" not in body["error"] and "\n" not in body["error"]
    return body


def cli_verify(a, b, capsys) -> dict:
    capsys.readouterr()
    code = main(["verify", str(a), str(b), "--model", str(need(FOREIGN)), "--normalize", "imagenet",
                 "--detector-weights", str(need("weights/mtcnn")), "--threads", "1", "--json"])
    assert code == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------- /health, /
def test_health_reports_model_fingerprint_and_limits(client, embedder):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["fingerprint"] == embedder.fingerprint()[0]
    assert h["embedding_size"] == 128 and h["normalize"] == "imagenet" and h["kind"] == "onnx"
    assert h["threshold"] == embedder.threshold and h["gallery"] is None and h["gallery_size"] is None
    assert h["limits"]["max_pixels"] > 0


def test_page_script_and_openapi_schema(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and 'id="decision"' in page.text
    script = client.get("/app.js")
    assert script.status_code == 200 and "/verify?crops=true" in script.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/verify", "/embed", "/gallery", "/gallery/enroll", "/gallery/search", "/gallery/{name}",
            "/health"} <= set(paths)
    assert "image_a" in json.dumps(client.get("/openapi.json").json()["components"])
    assert_error(client.get("/no/such/page"), 404, "Not Found")


# ---------------------------------------------------------------------------------------------- /verify
@pytest.mark.parametrize("pair", SAME[:2] + DIFFERENT)
def test_verify_equals_cli_verdict(client, photos, pair, capsys):
    a, b = photos / pair[0], photos / pair[1]
    r = client.post("/verify", files=[upload(a, "image_a"), upload(b, "image_b")])
    assert r.status_code == 200, r.text
    got = r.json()
    want = cli_verify(a, b, capsys)
    assert got["same"] == want["same"] and got["threshold"] == want["threshold"]
    assert got["threshold_source"] == want["threshold_source"]
    assert got["similarity"] == pytest.approx(want["similarity"], abs=1e-5)
    assert got["same"] == (pair in SAME)  # and the model gets these real pairs right
    for side in ("face_a", "face_b"):
        face = got[side]
        assert len(face["box"]) == 4 and np.array(face["landmarks"]).shape == (5, 2) and face["faces"] >= 1
        assert "crop" not in face


def test_verify_crops_are_aligned_112_pngs(client, photos):
    r = client.post("/verify?crops=true", files=[upload(photos / "img1.jpg", "image_a"),
                                                 upload(photos / "img2.jpg", "image_b")])
    crop = r.json()["face_a"]["crop"]
    assert crop.startswith("data:image/png;base64,")
    img = cv2.imdecode(np.frombuffer(base64.b64decode(crop.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (112, 112, 3)


def test_verify_bad_inputs(client, photos):
    good = upload(photos / "img1.jpg", "image_b")
    assert_error(client.post("/verify", files=[("image_a", ("notes.txt", b"just some text", "text/plain")), good]),
                 422, "image_a (notes.txt): not an image")
    assert_error(client.post("/verify", files=[("image_a", ("empty.jpg", b"", "image/jpeg")), good]), 422, "empty")
    blank = png_bytes(np.full((200, 200, 3), 128, np.uint8))
    assert_error(client.post("/verify", files=[("image_a", ("blank.png", blank, "image/png")), good]),
                 422, "image_a (blank.png): no face found")
    bomb = huge_png_header(20000, 20000)
    assert_error(client.post("/verify", files=[("image_a", ("bomb.png", bomb, "image/png")), good]),
                 413, "20000x20000")
    truncated = (photos / "img1.jpg").read_bytes()[:3000]
    assert_error(client.post("/verify", files=[("image_a", ("cut.jpg", truncated, "image/jpeg")), good]),
                 422, "image_a")
    assert_error(client.post("/verify", files=[good]), 422, "image_a: Field required")
    assert_error(client.post("/verify", files=[upload(photos / "img1.jpg", "image_a"), good],
                             headers={FINGERPRINT_HEADER: "0123456789abcdef"}), 409, "fingerprint")


def test_size_limits_answer_413_before_decoding(embedder, photos):
    big = photos / "img1.jpg"
    assert big.stat().st_size > 50_000
    per_image = TestClient(create_app(embedder, max_image_bytes=50_000))
    assert_error(per_image.post("/verify", files=[upload(big, "image_a"), upload(big, "image_b")]), 413,
                 "image_a (img1.jpg): ")
    small = TestClient(create_app(embedder, max_image_bytes=50_000, max_request_bytes=400_000, max_pixels=100_000))
    assert_error(small.post("/verify", files=[upload(big, "image_a"), upload(big, "image_b")]), 413,
                 "max_request_bytes")
    assert_error(small.post("/verify", content=b"x" * 500_000,
                            headers={"content-type": "multipart/form-data; boundary=zz"}), 413, "max_request_bytes")
    # a 600x400 PNG is small in bytes but above this server's 100,000-pixel limit
    wide = png_bytes(np.zeros((400, 600, 3), np.uint8))
    assert len(wide) < 50_000
    assert_error(small.post("/embed", files=[("image", ("wide.png", wide, "image/png"))]), 413, "600x400")

    def chunks():  # no Content-Length: the streamed bytes are counted
        for _ in range(10):
            yield b"y" * 100_000

    assert_error(small.post("/embed", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"}),
                 413, "max_request_bytes")


# ---------------------------------------------------------------------------------------------- /embed
def test_embed_every_face_equals_library(client, embedder, photos):
    r = client.post("/embed", files=[upload(photos / "couple.jpg")])
    assert r.status_code == 200, r.text
    faces = r.json()["faces"]
    want = embedder.faces(photos / "couple.jpg")
    assert len(faces) == len(want) >= 2
    for got, ref in zip(faces, want):
        v = np.array(got["embedding"], np.float32)
        assert v.shape == (128,) and abs(np.linalg.norm(v) - 1) < 1e-4
        assert float(v @ ref.embedding) > 0.9999 and got["box"] == [round(float(x), 2) for x in ref.box]
    assert_error(client.post("/embed", files=[("image", ("x.gif", b"GIF89a" + b"\0" * 3, "image/gif"))]), 422,
                 "image (x.gif)")
    assert_error(client.post("/embed", files=[("image", ("g.png", png_bytes(np.zeros((90, 90, 3), np.uint8)),
                                                         "image/png"))]), 422, "no face found")
    assert_error(client.post("/embed", files=[upload(photos / "img1.jpg")], headers={FINGERPRINT_HEADER: "nope"}),
                 409, "nope")


# ---------------------------------------------------------------------------------------------- /gallery
def test_gallery_enroll_search_list_delete(embedder, photos, tmp_path):
    db = tmp_path / "g.sqlite"
    c = TestClient(create_app(embedder, gallery=db, max_images=3))
    assert c.get("/gallery").json() == {"identities": [], "count": 0, "images": 0}
    assert_error(c.post("/gallery/search", files=[upload(photos / "img21.jpg")]), 404, "empty")
    for name, files in (("p20", ["img20.jpg"]), ("p3", ["img3.jpg"]), ("p16", ["img16.jpg"])):
        r = c.post("/gallery/enroll", data={"name": name}, files=[upload(photos / f, "images") for f in files])
        assert r.status_code == 200 and r.json()["added"] == 1, r.text
    again = c.post("/gallery/enroll", data={"name": "p20"}, files=[upload(photos / "img20.jpg", "images")]).json()
    assert again["added"] == 0 and again["already_enrolled"] == 1
    listing = c.get("/gallery").json()
    assert [x["identity"] for x in listing["identities"]] == ["p16", "p20", "p3"] and listing["images"] == 3
    assert c.get("/health").json()["gallery_size"] == 3
    with GalleryStore(db) as store:  # what the server wrote is an ordinary gallery
        assert len(store) == 3 and store.model_fingerprint == embedder.fingerprint()[0]

    for probe, who in (("img21.jpg", "p20"), ("img12.jpg", "p3"), ("img17.jpg", "p16")):
        r = c.post("/gallery/search?crops=true", data={"top_k": "2"}, files=[upload(photos / probe)])
        assert r.status_code == 200, r.text
        found = r.json()
        assert found["identity"] == who and found["known"] and len(found["matches"]) == 2
        assert found["matches"][0]["crop"].startswith("data:image/png") and found["face"]["crop"]
        assert found["similarity"] == found["matches"][0]["similarity"] > found["threshold"]

    assert_error(c.post("/gallery/search", data={"top_k": "0"}, files=[upload(photos / "img21.jpg")]), 422, "top_k")
    assert_error(c.post("/gallery/search", files=[("image", ("b.png", png_bytes(np.zeros((80, 80, 3), np.uint8)),
                                                             "image/png"))]), 422, "no face")
    blank = ("images", ("blank.png", png_bytes(np.full((100, 100, 3), 200, np.uint8)), "image/png"))
    assert_error(c.post("/gallery/enroll", data={"name": "x"}, files=[blank]), 422, "images[0] (blank.png): no face")
    r = c.post("/gallery/enroll", data={"name": "p1", "skip_no_face": "true"},
               files=[blank, upload(photos / "img1.jpg", "images")])
    assert r.status_code == 200 and r.json()["skipped"] == [{"file": "blank.png", "reason": "no face found"}]
    assert_error(c.post("/gallery/enroll", data={"name": "x"}, files=[upload(photos / "img1.jpg", "images")] * 4),
                 413, "max_images")
    assert_error(c.post("/gallery/enroll", data={"name": "a/b"}, files=[upload(photos / "img1.jpg", "images")]),
                 422, "bad identity name")
    assert_error(c.post("/gallery/enroll", files=[upload(photos / "img1.jpg", "images")]), 422, "name: Field required")
    assert_error(c.post("/gallery/enroll", data={"name": "p9"}, files=[upload(photos / "img1.jpg", "images")],
                        headers={FINGERPRINT_HEADER: "ffffffffffffffff"}), 409, "fingerprint")

    assert c.delete("/gallery/p3").json()["removed"] == "p3"
    assert "p3" not in [x["identity"] for x in c.get("/gallery").json()["identities"]]
    assert_error(c.delete("/gallery/p3"), 404, "no enrolled identity 'p3'")


def test_gallery_of_another_model(embedder, photos, tmp_path):
    db = tmp_path / "other.sqlite"
    rng = np.random.default_rng(0)
    other = rng.normal(size=128).astype(np.float32)
    with GalleryStore(db, create=True) as store:
        store.add(["someone"], other / np.linalg.norm(other), fingerprint="00000000deadbeef", probe=other,
                  model_name="another.onnx")
    with pytest.raises(UserError, match="different model"):  # refused when the server starts
        create_app(embedder, gallery=db)

    # a gallery that gets another model's rows while the server runs: 409 on search and enroll
    live = tmp_path / "live.sqlite"
    c = TestClient(create_app(embedder, gallery=live))
    with GalleryStore(live) as store:
        store.add(["someone"], other / np.linalg.norm(other), fingerprint="00000000deadbeef", probe=other,
                  model_name="another.onnx")
    assert_error(c.post("/gallery/search", files=[upload(photos / "img1.jpg")]), 409, "different model")
    assert_error(c.post("/gallery/enroll", data={"name": "p1"}, files=[upload(photos / "img1.jpg", "images")]),
                 409, "different model")


def test_no_gallery_and_bad_options(client, embedder, photos, tmp_path):
    assert_error(client.get("/gallery"), 404, "--gallery")
    assert_error(client.post("/gallery/search", files=[upload(photos / "img1.jpg")]), 404, "no gallery")
    with pytest.raises(UserError, match="SQLite gallery"):
        create_app(embedder, gallery=tmp_path / "g.npz")
    with pytest.raises(UserError, match="max_pixels"):
        create_app(embedder, max_pixels=0)


def test_a_bug_is_a_json_500_without_traceback(embedder, photos):
    app = create_app(embedder)
    svc = app.state.service

    def broken(crops):
        raise RuntimeError("secret internals")

    svc.embed = broken
    c = TestClient(app, raise_server_exceptions=False)
    body = assert_error(c.post("/verify", files=[upload(photos / "img1.jpg", "image_a"),
                                                 upload(photos / "img2.jpg", "image_b")]), 500, "RuntimeError")
    assert "secret" not in body["error"]


def test_image_io_is_bytes_not_paths(client):
    """An upload's file name is only a label: a name like /etc/passwd is never opened."""
    data = io.BytesIO(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    assert_error(client.post("/embed", files=[("image", ("/etc/passwd", data, "image/jpeg"))]), 422,
                 "image (/etc/passwd)")


# ---------------------------------------------------------------------------------------------- run()
def test_run_checks_options_and_hands_workers_the_model(monkeypatch, embedder, tmp_path):
    import uvicorn

    from marginface import serve
    from marginface.serve.app import app_from_environment

    with pytest.raises(UserError, match="--workers"):
        serve.run(embedder, workers=0)
    with pytest.raises(UserError, match="--port"):
        serve.run(embedder, port=70000)
    with pytest.raises(UserError, match="as a path"):
        serve.run(embedder, workers=2)
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setenv("MARGINFACE_SERVE", "{}")  # run() sets it; restored (removed) after the test
    serve.run(str(need(FOREIGN)), gallery=tmp_path / "w.sqlite", port=8123, workers=2, threads=1,
              normalize="imagenet", detector_weights=str(need("weights/mtcnn")))
    target, kw = calls[0]
    assert target == "marginface.serve.app:app_from_environment" and kw["factory"] and kw["workers"] == 2
    assert kw["port"] == 8123 and kw["host"] == "127.0.0.1"
    worker = TestClient(app_from_environment())  # what each worker process builds
    h = worker.get("/health").json()
    assert h["fingerprint"] == embedder.fingerprint()[0] and h["gallery"] == str(tmp_path / "w.sqlite")
    assert h["concurrency"] >= 1 and h["threads"] == 1
