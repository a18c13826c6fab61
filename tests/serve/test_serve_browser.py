"""The web page of `marginface serve` in a real headless Chromium (Debian's ``chromium`` package driven
by Playwright): upload two photos, read the decision from the page, enroll and search in the gallery
tab, and take screenshots into the test's output folder. The server is a real uvicorn on loopback."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (pip install 'marginface[serve]') is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (pip install 'marginface[serve]') is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright (pip install playwright)")

from marginface.deploy.embedder import FaceEmbedder  # noqa: E402
from marginface.serve.app import create_app  # noqa: E402

from shared_data import need  # noqa: E402  (tests/shared_data.py)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    for candidate in (os.environ.get("MARGINFACE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("no Chromium installed (apt-get install chromium, or set MARGINFACE_CHROMIUM); .ci/run installs it "
                "when it runs as root")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    embedder = FaceEmbedder(need("weights/mobilefacenet_onnx/MobileFaceNet.onnx"), normalize="imagenet",
                            detector_weights=need("weights/mtcnn"), threads=1)
    app = create_app(embedder, gallery=tmp_path_factory.mktemp("gallery") / "g.sqlite")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page(server):
    executable = chromium_path()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1000, "height": 800})
            pg.set_default_timeout(60_000)
            pg.goto(server + "/")
            yield pg
        finally:
            browser.close()


def compare(page, a: Path, b: Path) -> str:
    page.click("#tab-verify")
    page.set_input_files("#image_a", str(a))
    page.set_input_files("#image_b", str(b))
    page.click("#verify-go")
    page.wait_for_function("document.body.dataset.state === 'done'")
    assert page.inner_text("#verify-error") == ""
    return page.inner_text("#decision")


def test_page_verifies_two_photos(page, tmp_path):
    photos = need("photos/deepface")
    page.wait_for_function("document.getElementById('model').textContent.includes('threshold')")
    assert compare(page, photos / "img20.jpg", photos / "img21.jpg") == "Same person"
    assert page.get_attribute("#decision", "data-same") == "true"
    # both aligned crops are shown, 112x112, and the bar and threshold mark are placed
    for crop in ("#crop_a", "#crop_b"):
        assert page.evaluate(f"document.querySelector('{crop}').naturalWidth") == 112
    fill = page.evaluate("parseFloat(document.getElementById('sim-fill').style.width)")
    mark = page.evaluate("parseFloat(document.getElementById('sim-mark').style.left)")
    assert fill > mark > 0
    page.screenshot(path=str(tmp_path / "verify_same.png"), full_page=True)

    assert compare(page, photos / "img1.jpg", photos / "img3.jpg") == "Different people"
    page.screenshot(path=str(tmp_path / "verify_different.png"), full_page=True)
    assert (tmp_path / "verify_same.png").stat().st_size > 10_000
    docs_shot = os.environ.get("MARGINFACE_SERVE_SCREENSHOT")  # docs/serve.png is made this way
    if docs_shot:
        compare(page, photos / "img20.jpg", photos / "img21.jpg")
        page.screenshot(path=docs_shot)


def test_page_shows_a_json_error(page, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_bytes(b"not a photo at all")
    page.click("#tab-verify")
    page.set_input_files("#image_a", str(notes))
    page.set_input_files("#image_b", str(need("photos/deepface") / "img1.jpg"))
    page.click("#verify-go")
    page.wait_for_function("document.body.dataset.state === 'done'")
    assert "image_a (notes.jpg): not an image" in page.inner_text("#verify-error")


def test_page_enrolls_and_searches(page, tmp_path):
    photos = need("photos/deepface")
    page.click("#tab-gallery")
    for name, photo in (("p20", "img20.jpg"), ("p3", "img3.jpg")):
        page.fill("#enroll-name", name)
        page.set_input_files("#enroll-files", str(photos / photo))
        page.click("#enroll-go")
        page.wait_for_function(f"document.getElementById('enroll-result').textContent.startsWith('{name}:')")
    page.wait_for_function("document.getElementById('gallery-list').textContent.includes('p3')")
    page.set_input_files("#search-file", str(photos / "img21.jpg"))
    page.click("#search-go")
    page.wait_for_selector("#search-decision")
    assert page.inner_text("#search-decision") == "Known: p20"
    assert page.evaluate("document.querySelectorAll('#search-result img').length") == 3  # query + 2 matches
    page.screenshot(path=str(tmp_path / "gallery_search.png"), full_page=True)
