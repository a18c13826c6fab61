"""What the HTTP endpoints of ``marginface serve`` share, without FastAPI: the `Service` (embedder,
gallery connection per thread, limits, the model semaphore, enrolment), `ApiError` and the JSON
error body, and the limits' defaults. `marginface.serve.routes` turns these into endpoints."""
from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from marginface.data.images import decode_image, header_size, image_format
from marginface.deploy.embedder import FaceEmbedder, face_info
from marginface.deploy.gallery import decide
from marginface.deploy.gallery_store import GalleryStore
from marginface.errors import UserError
from marginface.inference import ModelInfo

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

    # ------------------------------------------------------------------ the gallery operations
    def enroll(self, name: str, uploads: list, *, skip_no_face: bool, crops: bool) -> dict:
        """``POST /gallery/enroll``: the largest face of each upload, embedded in one batch and added
        to the gallery under ``name`` (a photo already enrolled, by its bytes' SHA-256, is not added
        twice); photos without a face refuse the request unless ``skip_no_face``."""
        name = name.strip()
        if not name or "/" in name or len(name) > 200:
            raise ApiError(422, f"name: bad identity name {name!r} (empty, containing '/' or over 200 characters)")
        if len(uploads) > self.max_images:
            raise ApiError(413, f"images: {len(uploads)} photos in one request, above the limit of {self.max_images} "
                                f"(max_images); enroll in several requests")
        store = self.store()
        self.check_gallery_model(store)
        picked, hashes, files, skipped = [], [], [], []
        for k, upload in enumerate(uploads):
            label = f"images[{k}] ({upload.filename})" if upload.filename else f"images[{k}]"
            rgb = self.read_image(upload, f"images[{k}]")
            upload.file.seek(0)
            digest = hashlib.sha256(upload.file.read()).hexdigest()
            try:
                face = self.pick(rgb, label)[0]
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
        unit = self.embed(np.stack([f.crop for f in picked]))
        model_name = str(self.info.source or type(self.embedder.model).__name__)
        result = store.add([name] * len(picked), unit, sources=[f"upload:{f}" for f in files], sha256=hashes,
                           fingerprint=self.fingerprint, probe=self.probe, model_name=model_name)
        self.set_thumb(name, crop_data_url(picked[0].crop))
        out = {"identity": name, "images": len(picked), "added": result["added"],
               "already_enrolled": result["already_enrolled"], "skipped": skipped,
               "gallery_identities": len(store), "generation": result["generation"]}
        if crops:
            out["crops"] = [crop_data_url(f.crop) for f in picked]
        return out

    def search(self, upload, top_k: int, *, crops: bool) -> dict:
        """``POST /gallery/search``: the largest face's top ``top_k`` matches, thresholded (`decide`)."""
        store = self.store()
        self.check_gallery_model(store)
        if len(store) == 0:
            raise ApiError(404, f"{self.gallery_path}: the gallery is empty; enroll someone first")
        rgb = self.read_image(upload, "image")
        found = self.pick(rgb, f"image ({upload.filename})" if upload.filename else "image")
        query = self.embed(found[0].crop[None])[0]
        result = decide(store.matches(query, top_k), self.embedder.threshold)
        result["threshold_source"] = self.embedder.threshold_source
        result["face"] = face_json(0, found[0], len(found), crops)
        if crops:
            for m in result["matches"]:
                m["crop"] = self.thumb(m["identity"])
        return result


def face_json(index: int, face, count: int, crops: bool) -> dict:
    """A detected face as the API reports it (`face_info` + landmarks, and its crop when asked)."""
    out = face_info(index, face, count)
    out["landmarks"] = [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(face.landmarks)]
    if crops:
        out["crop"] = crop_data_url(face.crop)
    return out


def default_concurrency(threads: Optional[int]) -> int:
    """Requests that run the model at once by default: the cores divided by the threads per request."""
    return max(1, (os.cpu_count() or 1) // max(1, int(threads or 1)))
