"""The endpoints of ``marginface serve`` (FastAPI; the ``serve`` extra): errors as one JSON line, the
request-size limit, the model endpoints (health, verify, embed), the gallery endpoints and the web
page. Imported by `marginface.serve.app.create_app` once FastAPI is known to be installed; the work
itself is `marginface.serve.service.Service`'s."""
# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Header, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from marginface.errors import UserError
from marginface.serve.service import (FINGERPRINT_HEADER, MAX_TOP_K, ApiError, Service, error_body, face_json)

log = logging.getLogger("marginface.serve")
STATIC = Path(__file__).resolve().parent / "static"


def add_routes(app: FastAPI, svc: Service) -> None:
    """Everything `create_app` serves, on ``app``."""
    _error_handlers(app)
    app.add_middleware(BodyLimit, limit=svc.max_request_bytes)
    fingerprint = Header(None, alias=FINGERPRINT_HEADER, description="the model fingerprint the client expects "
                                                                     "(409 when it differs)")
    _model_routes(app, svc, fingerprint)
    _gallery_routes(app, svc, fingerprint)
    _page_routes(app)


def _error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, is ``{"error": "<one line>", "status": <code>}``."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.status, exc.message), status_code=exc.status)

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):
        return JSONResponse(error_body(422, str(exc)), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return JSONResponse(error_body(exc.status_code, exc.detail), status_code=exc.status_code)

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
                    raise HTTPException(413, f"request body is above the server's {limit}-byte limit "
                                             f"(max_request_bytes)")
            return message

        return await self.app(scope, counted, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _model_routes(app: FastAPI, svc: Service, Fingerprint) -> None:
    """``GET /health``, ``POST /verify``, ``POST /embed``."""

    @app.get("/health", summary="model, fingerprint, threshold, gallery size, limits")
    def health() -> dict:
        out = {"status": "ok", "model": str(svc.info.source or type(svc.embedder.model).__name__),
               "kind": svc.info.kind, "precision": svc.info.precision, "fingerprint": svc.fingerprint,
               "embedding_size": int(len(svc.probe)), "input_size": list(svc.embedder.input_size),
               "normalize": svc.embedder.normalize, "flip": svc.embedder.flip,
               "threshold": float(svc.embedder.threshold), "threshold_source": svc.embedder.threshold_source,
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
        return {"similarity": sim, "same": bool(sim > svc.embedder.threshold), "threshold": float(svc.embedder.threshold),
                "threshold_source": svc.embedder.threshold_source, "a": image_a.filename or "image_a",
                "b": image_b.filename or "image_b", "face_a": face_json(0, faces_a[0], len(faces_a), crops),
                "face_b": face_json(0, faces_b[0], len(faces_b), crops), "model_fingerprint": svc.fingerprint}

    @app.post("/embed", summary="every face of a photo (largest first) with its unit embedding")
    def embed(image: UploadFile = File(...), crops: bool = Query(False),
              fingerprint: Optional[str] = Fingerprint) -> dict:
        svc.check_fingerprint(fingerprint)
        rgb = svc.read_image(image, "image")
        found = svc.pick(rgb, f"image ({image.filename})" if image.filename else "image")
        unit = svc.embed(np.stack([f.crop for f in found]))
        faces = []
        for k, f in enumerate(found):
            row = face_json(k, f, len(found), crops)
            row["embedding"] = [float(v) for v in unit[k]]
            faces.append(row)
        return {"faces": faces, "embedding_size": int(unit.shape[1]), "model_fingerprint": svc.fingerprint}


def _gallery_routes(app: FastAPI, svc: Service, Fingerprint) -> None:
    """``GET /gallery``, ``POST /gallery/enroll``, ``DELETE /gallery/{name}``, ``POST /gallery/search``."""

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
        return svc.enroll(name, images, skip_no_face=skip_no_face, crops=crops)

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
        return svc.search(image, top_k, crops=crops)


def _page_routes(app: FastAPI) -> None:
    """The single-page UI (``static/``)."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/app.js", include_in_schema=False)
    def script():
        return Response((STATIC / "app.js").read_text(encoding="utf-8"), media_type="text/javascript")

