"""The HTTP API and web page of ``marginface serve`` (FastAPI), built on `FaceEmbedder` and the
SQLite gallery.

    from marginface.serve.app import create_app
    app = create_app("model.onnx", gallery="faces.sqlite", normalize="imagenet")   # an ASGI app

The model is loaded once, when the app is built (with the detector, so a missing detector or a
gallery enrolled with another model fails at start, not on the first request). Endpoints (the
OpenAPI schema is at ``/openapi.json``, browsable at ``/docs``):

- ``POST /verify`` (``image_a``, ``image_b``): the fields of ``marginface verify --json`` plus
  ``face_a`` / ``face_b`` (box, landmarks, score, faces found);
- ``POST /embed`` (``image``): every face, largest first, with its unit embedding;
- ``POST /gallery/enroll`` (``name``, ``images``), ``DELETE /gallery/{name}``, ``GET /gallery``,
  ``POST /gallery/search`` (``image``, ``top_k``): the thresholded search of `search_face`;
- ``GET /health``: model, fingerprint, threshold, gallery size, limits;
- ``GET /``: the single-page UI (``static/``).

Limits are checked before anything is decoded: the request's ``Content-Length`` (and the bytes
actually received) against ``max_request_bytes``, each image's size against ``max_image_bytes``
(413), its header's format (422) and claimed pixels against ``max_pixels`` (413). Every error is a
JSON object ``{"error": "<one line>", "status": <code>}``; a bug is a 500 with the exception's type
only (its traceback goes to the server log, never to the client). Status codes: 404 unknown
identity / no gallery / empty gallery, 409 the client's ``X-Model-Fingerprint`` or the gallery's
model differs from the served model, 413 too large, 422 bad input (not an image, no face, a
missing field).

Requests run in the server's thread pool; at most ``concurrency`` of them run the model at once
(default: the machine's cores divided by ``threads``), the others wait their turn. A verify embeds
its two crops in one batch and an enrolment all its images in one batch.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime, and
# fastapi is imported inside `create_app` (optional extra), so they must be evaluated there

import base64
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np
import torch

from marginface.data.images import MAX_PIXELS, decode_image, header_size, image_format
from marginface.deploy.api import face_embedder
from marginface.deploy.embedder import FaceEmbedder, face_info
from marginface.deploy.gallery import decide
from marginface.deploy.gallery_store import GalleryStore, is_sqlite_path
from marginface.errors import UserError
from marginface.inference import ModelInfo

log = logging.getLogger("marginface.serve")
STATIC = Path(__file__).resolve().parent / "static"

MAX_REQUEST_BYTES = 64 << 20  # a whole request (an enrolment of many photos)
MAX_IMAGE_BYTES = 16 << 20  # one uploaded image
MAX_IMAGES = 64  # images in one enrolment request
MAX_TOP_K = 100
FINGERPRINT_HEADER = "X-Model-Fingerprint"


class ApiError(Exception):
    """An HTTP error with a JSON body ``{"error": message, "status": status}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = int(status), str(message)


def error_body(status: int, message: str) -> dict:
    return {"error": " ".join(str(message).split()), "status": int(status)}


class BodyLimit:
    """ASGI middleware: a request whose ``Content-Length`` is above ``limit`` gets 413 before its body is
    read; a body that streams more than ``limit`` bytes (chunked, or a lying header) is cut off with 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, error_body(
                413, f"request body of {int(declared)} bytes is above the server's {self.limit}-byte limit "
                     f"(max_request_bytes)"))
        seen = 0
        limit = self.limit

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    from fastapi import HTTPException  # deferred: fastapi is the optional serve extra

                    raise HTTPException(413, f"request body is above the server's {limit}-byte limit "
                                             f"(max_request_bytes)")
            return message

        return await self.app(scope, counted, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def crop_data_url(crop: np.ndarray) -> str:
    """An aligned RGB crop as a ``data:image/png;base64,...`` URL (for the web page)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(crop[:, :, ::-1]))
    if not ok:  # pragma: no cover - PNG encoding of a uint8 array does not fail
        raise ApiError(500, "could not encode a face crop")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


class Service:
    """What the endpoints share: the embedder, the gallery path, the limits, the model semaphore."""

    def __init__(self, embedder: FaceEmbedder, gallery: Optional[Path], *, max_request_bytes: int,
                 max_image_bytes: int, max_pixels: int, max_images: int, concurrency: int):
        self.embedder = embedder
        self.gallery_path = gallery
        self.max_request_bytes, self.max_image_bytes = int(max_request_bytes), int(max_image_bytes)
        self.max_pixels, self.max_images = int(max_pixels), int(max_images)
        self.concurrency = int(concurrency)
        self.model_slots = threading.BoundedSemaphore(self.concurrency)
        self.fingerprint, self.probe = embedder.fingerprint()
        self.info = ModelInfo.of(embedder.model)
        self._local = threading.local()
        self._thumbs: dict[str, str] = {}  # identity -> crop data URL of a face enrolled through this server
        self._thumbs_lock = threading.Lock()
        if gallery is not None:
            store = GalleryStore(gallery, create=True)  # a new gallery file is made now
            try:
                if store.meta()["model_fingerprint"] or store.meta()["model_probe"] is not None:
                    store.check_model(self.fingerprint, self.probe)
            finally:
                store.close()

    # ------------------------------------------------------------------ gallery
    def store(self) -> GalleryStore:
        """This thread's connection to the gallery (a `GalleryStore` is one connection per thread)."""
        if self.gallery_path is None:
            raise ApiError(404, "no gallery: start the server with --gallery G.sqlite")
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = GalleryStore(self.gallery_path, create=True)
        return store

    def check_gallery_model(self, store: GalleryStore) -> None:
        try:
            store.check_model(self.fingerprint, self.probe)
        except UserError as exc:
            raise ApiError(409, str(exc)) from None

    def thumb(self, name: str) -> Optional[str]:
        with self._thumbs_lock:
            return self._thumbs.get(name)

    def set_thumb(self, name: str, url: Optional[str]) -> None:
        with self._thumbs_lock:
            if url is None:
                self._thumbs.pop(name, None)
            else:
                self._thumbs.setdefault(name, url)

    # ------------------------------------------------------------------ inputs
    def read_image(self, upload, field: str) -> np.ndarray:
        """An uploaded image -> RGB array, its byte size, format and claimed pixels checked first."""
        name = getattr(upload, "filename", None) or ""
        where = f"{field} ({name})" if name else field
        size = getattr(upload, "size", None)
        if size is not None and size > self.max_image_bytes:
            raise ApiError(413, f"{where}: {size} bytes is above the {self.max_image_bytes}-byte limit per image "
                                f"(max_image_bytes)")
        data = upload.file.read(self.max_image_bytes + 1)
        if len(data) > self.max_image_bytes:
            raise ApiError(413, f"{where}: above the {self.max_image_bytes}-byte limit per image (max_image_bytes)")
        if not data:
            raise ApiError(422, f"{where}: image is empty (0 bytes)")
        fmt = image_format(data)
        if fmt is None:
            raise ApiError(422, f"{where}: not an image (not a JPEG, PNG, GIF, BMP, WebP or TIFF file)")
        dims = header_size(data)
        if dims is not None and dims[0] * dims[1] > self.max_pixels:
            raise ApiError(413, f"{where}: {fmt.upper()} header claims {dims[0]}x{dims[1]} pixels, above the "
                                f"server's {self.max_pixels}-pixel limit (max_pixels)")
        try:
            return decode_image(data, where)
        except UserError as exc:
            raise ApiError(422, str(exc)) from None

    def check_fingerprint(self, claimed: Optional[str]) -> None:
        if claimed and claimed.strip() != self.fingerprint:
            raise ApiError(409, f"{FINGERPRINT_HEADER} is {claimed.strip()!r} but the server's model has "
                                f"fingerprint {self.fingerprint!r} ({self.info.source or 'model'}); embeddings "
                                f"of different models cannot be compared")

    # ------------------------------------------------------------------ model work (bounded)
    def pick(self, image: np.ndarray, label: str):
        with self.model_slots:
            faces = self.embedder.detect(image, label)
        if not faces:
            raise ApiError(422, f"{label}: no face found")
        return faces

    def embed(self, crops: np.ndarray) -> np.ndarray:
        with self.model_slots:
            return self.embedder.embed_crops(crops)


def _face_json(index: int, face, count: int, crops: bool) -> dict:
    out = face_info(index, face, count)
    out["landmarks"] = [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(face.landmarks)]
    if crops:
        out["crop"] = crop_data_url(face.crop)
    return out


def default_concurrency(threads: Optional[int]) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, int(threads or 1)))


def create_app(model, gallery: Union[str, Path, None] = None, *, normalize: Optional[str] = None,
               detector_weights: Union[str, Path, None] = None, threshold: Optional[float] = None,
               flip: bool = True, threads: Optional[int] = None, trust_code: bool = False,
               max_request_bytes: int = MAX_REQUEST_BYTES, max_image_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_PIXELS, max_images: int = MAX_IMAGES, concurrency: Optional[int] = None,
               title: str = "marginface"):
    """The FastAPI app serving ``model`` (a path for `load_model`, a loaded model or a `FaceEmbedder`)
    and, with ``gallery`` (a ``.sqlite``/``.db`` file, created when missing), the gallery endpoints.
    ``threads``: torch (detector) and ONNX Runtime threads per request. ``concurrency``: requests
    running the model at once. The ``max_*`` limits are described in the module docstring."""
    try:  # deferred: fastapi is the optional serve extra
        from fastapi import FastAPI, File, Form, Header, HTTPException, Query, UploadFile
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, Response
    except ImportError:
        raise UserError("marginface serve needs FastAPI: pip install 'marginface[serve]'") from None

    for key, value in (("max_request_bytes", max_request_bytes), ("max_image_bytes", max_image_bytes),
                       ("max_pixels", max_pixels), ("max_images", max_images)):
        if int(value) < 1:
            raise UserError(f"serve: {key} must be at least 1, got {value}")
    if concurrency is not None and int(concurrency) < 1:
        raise UserError(f"serve: concurrency must be at least 1, got {concurrency}")
    if threads is not None and int(threads) < 1:
        raise UserError(f"serve: threads must be at least 1, got {threads}")
    gallery_path = None
    if gallery is not None:
        gallery_path = Path(gallery).expanduser()
        if not is_sqlite_path(gallery_path):
            raise UserError(f"{gallery_path}: serve needs an SQLite gallery (.sqlite or .db); convert an .npz "
                            f"with `marginface gallery convert`")
    if threads:
        torch.set_num_threads(int(threads))  # the detector runs in torch (as `marginface verify --threads`)
    if isinstance(model, (str, Path)):
        embedder = FaceEmbedder(model, normalize=normalize, threshold=threshold, detector_weights=detector_weights,
                                flip=flip, threads=threads, trust_code=trust_code)
    else:
        embedder = face_embedder(model, normalize=normalize, threshold=threshold,
                                 detector_weights=detector_weights, flip=flip)
    embedder.detect(np.zeros((64, 64, 3), np.uint8))  # builds the detector now: missing weights fail at start
    svc = Service(embedder, gallery_path, max_request_bytes=max_request_bytes, max_image_bytes=max_image_bytes,
                  max_pixels=max_pixels, max_images=max_images,
                  concurrency=concurrency or default_concurrency(threads))

    app = FastAPI(title=title, summary="Face verification, embedding and gallery search",
                  description="JSON API of `marginface serve`. Images are multipart uploads; errors are "
                              "`{\"error\", \"status\"}`.", version="1")
    app.state.service = svc

    # ------------------------------------------------------------------ errors: always one JSON line
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.status, exc.message), status_code=exc.status)

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):
        return JSONResponse(error_body(422, str(exc)), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return JSONResponse(error_body(exc.status_code, exc.detail), status_code=exc.status_code)

    from starlette.exceptions import HTTPException as StarletteHTTPException  # deferred: optional serve extra

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, exc):
        return JSONResponse(error_body(exc.status_code, exc.detail), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header"))
            parts.append(f"{loc or 'request'}: {e.get('msg', 'invalid')}")
        return JSONResponse(error_body(422, "; ".join(parts) or "invalid request"), status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); see the server log"),
                            status_code=500)

    app.add_middleware(BodyLimit, limit=svc.max_request_bytes)

    Fingerprint = Header(None, alias=FINGERPRINT_HEADER, description="the model fingerprint the client expects "
                                                                     "(409 when it differs)")

    # ------------------------------------------------------------------ endpoints
    @app.get("/health", summary="model, fingerprint, threshold, gallery size, limits")
    def health() -> dict:
        out = {"status": "ok", "model": str(svc.info.source or type(embedder.model).__name__),
               "kind": svc.info.kind, "precision": svc.info.precision, "fingerprint": svc.fingerprint,
               "embedding_size": int(len(svc.probe)), "input_size": list(embedder.input_size),
               "normalize": embedder.normalize, "flip": embedder.flip,
               "threshold": float(embedder.threshold), "threshold_source": embedder.threshold_source,
               "gallery": None if svc.gallery_path is None else str(svc.gallery_path), "gallery_size": None,
               "gallery_images": None, "concurrency": svc.concurrency, "threads": torch.get_num_threads(),
               "limits": {"max_request_bytes": svc.max_request_bytes, "max_image_bytes": svc.max_image_bytes,
                          "max_pixels": svc.max_pixels, "max_images": svc.max_images, "max_top_k": MAX_TOP_K}}
        if svc.gallery_path is not None:
            listing = svc.store().list()
            out["gallery_size"] = len(listing)
            out["gallery_images"] = int(sum(r["images"] for r in listing))
        return out

    @app.post("/verify", summary="same person? (the fields of `marginface verify --json`)")
    def verify(image_a: UploadFile = File(..., description="first photo"),
               image_b: UploadFile = File(..., description="second photo"),
               crops: bool = Query(False, description="include the aligned crops as PNG data URLs"),
               fingerprint: Optional[str] = Fingerprint) -> dict:
        svc.check_fingerprint(fingerprint)
        a, b = svc.read_image(image_a, "image_a"), svc.read_image(image_b, "image_b")
        faces_a = svc.pick(a, f"image_a ({image_a.filename})" if image_a.filename else "image_a")
        faces_b = svc.pick(b, f"image_b ({image_b.filename})" if image_b.filename else "image_b")
        # as `verify_images`: the largest face of each, both crops in one batch, cosine > threshold
        ea, eb = svc.embed(np.stack([faces_a[0].crop, faces_b[0].crop]))
        sim = float(np.dot(ea, eb))
        return {"similarity": sim, "same": bool(sim > embedder.threshold), "threshold": float(embedder.threshold),
                "threshold_source": embedder.threshold_source, "a": image_a.filename or "image_a",
                "b": image_b.filename or "image_b", "face_a": _face_json(0, faces_a[0], len(faces_a), crops),
                "face_b": _face_json(0, faces_b[0], len(faces_b), crops), "model_fingerprint": svc.fingerprint}

    @app.post("/embed", summary="every face of a photo (largest first) with its unit embedding")
    def embed(image: UploadFile = File(...), crops: bool = Query(False),
              fingerprint: Optional[str] = Fingerprint) -> dict:
        svc.check_fingerprint(fingerprint)
        rgb = svc.read_image(image, "image")
        found = svc.pick(rgb, f"image ({image.filename})" if image.filename else "image")
        unit = svc.embed(np.stack([f.crop for f in found]))
        faces = []
        for k, f in enumerate(found):
            row = _face_json(k, f, len(found), crops)
            row["embedding"] = [float(v) for v in unit[k]]
            faces.append(row)
        return {"faces": faces, "embedding_size": int(unit.shape[1]), "model_fingerprint": svc.fingerprint}

    @app.get("/gallery", summary="the enrolled identities")
    def gallery_list() -> dict:
        rows = svc.store().list()
        return {"identities": rows, "count": len(rows), "images": int(sum(r["images"] for r in rows))}

    @app.post("/gallery/enroll", summary="add photos of one person (largest face of each) to the gallery")
    def gallery_enroll(name: str = Form(..., description="identity name"),
                       images: list[UploadFile] = File(..., description="one or more photos"),
                       skip_no_face: bool = Form(False, description="leave out photos without a face "
                                                                    "(default: refuse the request)"),
                       crops: bool = Query(False), fingerprint: Optional[str] = Fingerprint) -> dict:
        svc.check_fingerprint(fingerprint)
        name = name.strip()
        if not name or "/" in name or len(name) > 200:
            raise ApiError(422, f"name: bad identity name {name!r} (empty, containing '/' or over 200 characters)")
        if len(images) > svc.max_images:
            raise ApiError(413, f"images: {len(images)} photos in one request, above the limit of {svc.max_images} "
                                f"(max_images); enroll in several requests")
        store = svc.store()
        svc.check_gallery_model(store)
        picked, hashes, files, skipped = [], [], [], []
        for k, upload in enumerate(images):
            label = f"images[{k}] ({upload.filename})" if upload.filename else f"images[{k}]"
            rgb = svc.read_image(upload, f"images[{k}]")
            upload.file.seek(0)
            digest = hashlib.sha256(upload.file.read()).hexdigest()
            try:
                face = svc.pick(rgb, label)[0]
            except ApiError as exc:
                if not skip_no_face or "no face" not in exc.message:
                    raise
                skipped.append({"file": upload.filename or label, "reason": "no face found"})
                continue
            picked.append(face)
            hashes.append(digest)
            files.append(upload.filename or label)
        if not picked:
            raise ApiError(422, "images: no photo with a face; nothing enrolled")
        unit = svc.embed(np.stack([f.crop for f in picked]))
        model_name = str(svc.info.source or type(embedder.model).__name__)
        result = store.add([name] * len(picked), unit, sources=[f"upload:{f}" for f in files], sha256=hashes,
                           fingerprint=svc.fingerprint, probe=svc.probe, model_name=model_name)
        svc.set_thumb(name, crop_data_url(picked[0].crop))
        out = {"identity": name, "images": len(picked), "added": result["added"],
               "already_enrolled": result["already_enrolled"], "skipped": skipped,
               "gallery_identities": len(store), "generation": result["generation"]}
        if crops:
            out["crops"] = [crop_data_url(f.crop) for f in picked]
        return out

    @app.delete("/gallery/{name}", summary="remove an identity and its photos")
    def gallery_remove(name: str) -> dict:
        store = svc.store()
        try:
            result = store.remove([name])
        except UserError as exc:
            raise ApiError(404, str(exc)) from None
        svc.set_thumb(name, None)
        return {"removed": name, "image_rows": result["image_rows"], "gallery_identities": len(store)}

    @app.post("/gallery/search", summary="who is it? the gallery's top matches, thresholded")
    def gallery_search(image: UploadFile = File(...),
                       top_k: int = Form(5, ge=1, le=MAX_TOP_K, description="matches to return"),
                       crops: bool = Query(False), fingerprint: Optional[str] = Fingerprint) -> dict:
        svc.check_fingerprint(fingerprint)
        store = svc.store()
        svc.check_gallery_model(store)
        if len(store) == 0:
            raise ApiError(404, f"{svc.gallery_path}: the gallery is empty; enroll someone first")
        rgb = svc.read_image(image, "image")
        found = svc.pick(rgb, f"image ({image.filename})" if image.filename else "image")
        query = svc.embed(found[0].crop[None])[0]
        result = decide(store.matches(query, top_k), embedder.threshold)
        result["threshold_source"] = embedder.threshold_source
        result["face"] = _face_json(0, found[0], len(found), crops)
        if crops:
            for m in result["matches"]:
                m["crop"] = svc.thumb(m["identity"])
        return result

    # ------------------------------------------------------------------ the web page
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/app.js", include_in_schema=False)
    def script():
        return Response((STATIC / "app.js").read_text(encoding="utf-8"), media_type="text/javascript")

    return app


def app_from_environment():
    """The app for ``uvicorn --factory`` workers: `create_app` keywords as JSON in $MARGINFACE_SERVE."""
    spec = json.loads(os.environ["MARGINFACE_SERVE"])
    return create_app(spec.pop("model"), spec.pop("gallery", None), **spec)
