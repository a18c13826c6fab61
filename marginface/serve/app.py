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

The endpoints are in `marginface.serve.routes` (the only module that imports FastAPI), the work
they do in `marginface.serve.service.Service`.

Requests run in the server's thread pool; at most ``concurrency`` of them run the model at once
(default: the machine's cores divided by ``threads``), the others wait their turn. A verify embeds
its two crops in one batch and an enrolment all its images in one batch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from marginface.data.images import MAX_PIXELS
from marginface.deploy.api import face_embedder
from marginface.deploy.embedder import FaceEmbedder
from marginface.deploy.gallery_store import is_sqlite_path
from marginface.errors import UserError
from marginface.serve.service import (FINGERPRINT_HEADER, MAX_IMAGE_BYTES, MAX_IMAGES, MAX_REQUEST_BYTES,
                                      Service, default_concurrency)

__all__ = ["create_app", "app_from_environment", "default_concurrency", "FINGERPRINT_HEADER"]


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
    try:
        from fastapi import FastAPI

        from marginface.serve import routes  # deferred: it imports fastapi, the optional serve extra
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

    routes.add_routes(app, svc)
    return app


def app_from_environment():
    """The app for ``uvicorn --factory`` workers: `create_app` keywords as JSON in $MARGINFACE_SERVE."""
    spec = json.loads(os.environ["MARGINFACE_SERVE"])
    return create_app(spec.pop("model"), spec.pop("gallery", None), **spec)
