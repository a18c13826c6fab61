"""``FaceEmbedder``: photo -> detect -> 5-point ArcFace alignment -> embedding (the inference API).

    from marginface.deploy.embedder import FaceEmbedder
    fe = FaceEmbedder("runs/x", detector_weights="~/.cache/marginface/mtcnn")
    a, b = fe.embed("a.jpg"), fe.embed("b.jpg")       # unit vectors of the largest face
    same = float(a @ b) > fe.threshold
    for face in fe.faces("group.jpg"):                  # every face: box, landmarks, score, embedding
        print(face.index, face.box, face.score)

The model is anything `marginface.deploy.load.load_model` reads (run dir, checkpoint, our
ONNX/TorchScript export, a foreign insightface-style ONNX with ``normalize=``). Embeddings are
L2-normalised; with ``flip=True`` (default) the mirror image's embedding is added first (the
field's test-time augmentation).

Input handling, each with a one-line `UserError` naming the file: unreadable or non-image
files; grayscale, 16-bit and 4-channel (alpha, composited on white) images are converted to
RGB; images larger than ``max_detect_side`` are downscaled for detection only (landmarks are
mapped back and the face is cropped from the full-resolution image); an image with no face.

Tight face crops (e.g. 150x150 dlib chips, whose face fills the frame) are a documented
fallback case: when nothing is found, detection is retried on the image padded by
``pad_fraction`` on every side (the detector wants some context around a face).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import cv2
import numpy as np

from marginface.data.detect import DETECTORS, MTCNNDetector, build_detector
from marginface.data.detect.aligned import DetectedFace, detect_faces  # noqa: F401  (DetectedFace: public here too)
from marginface.data.images import as_rgb, read_image
from marginface.data.sources import list_image_files
from marginface.data.synthetic import render_image
from marginface.deploy.load import load_model
from marginface.errors import UserError
from marginface.hardware import flush_denormals
from marginface.evaluate.runner import embed_images, l2_normalize
from marginface.inference import EmbedOptions, ModelInfo

ImageLike = Union[str, Path, np.ndarray]
DEFAULT_THRESHOLD = 0.3  # cosine; used (and reported as such) only when the model carries none
PIPELINE_OPTIONS = EmbedOptions(flip=True, batch_size=32)  # FaceEmbedder's defaults


@dataclass(frozen=True)
class FaceResult:
    """One face of a photo, embedded: ``index`` (0 = the largest; faces are sorted by box area),
    ``box`` (x1, y1, x2, y2) and ``landmarks`` (5x2: eyes, nose, mouth corners) in original-image
    pixels, the detector's ``score``, and the unit ``embedding``."""

    index: int
    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float
    embedding: np.ndarray
    padded: bool = False

    def to_dict(self, *, embedding: bool = False) -> dict:
        """JSON-ready: ``{"face", "box", "landmarks", "score"}`` (+ ``"embedding"`` as a list)."""
        out = {"face": self.index, "box": [round(float(v), 2) for v in self.box],
               "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(self.landmarks)],
               "score": float(self.score)}
        if embedding:
            out["embedding"] = [float(v) for v in self.embedding]
        return out


def face_info(index: int, face: DetectedFace, count: int) -> dict:
    """Which face of a photo a result used: ``{"face", "box", "score", "faces"}`` (``faces``: how
    many the photo holds; ``face`` indexes them largest first)."""
    return {"face": int(index), "box": [round(float(v), 2) for v in face.box], "score": float(face.score),
            "faces": int(count)}


read_rgb = read_image  # the old name; `marginface.data.images` is the one image reader


class FaceEmbedder:
    """Detect, align and embed faces with one model (see the module docstring).

    ``model``: a path for `load_model` or an already loaded embedder (left as it is: a
    ``normalize`` override is kept here, in ``info``). ``detector``: an object with
    ``detect(rgb) -> [Face]``, or a name from ``DETECTORS`` ("mtcnn", "retinaface") built from
    ``detector_weights`` on first use (default: `MTCNNDetector` from ``detector_weights`` or its
    usual lookup, built on first use). ``threshold``: overrides the model's own. ``trust_code``: allow
    TorchScript and compiled ``.pt2`` models, which run code when loaded (see `load_model`).
    ``options``: `EmbedOptions` (flip, batch size 32 by default, device, autocast); ``flip`` and
    ``batch_size`` override it.
    """

    def __init__(self, model, *, normalize: Optional[str] = None, detector=None,
                 detector_weights: Optional[Union[str, Path]] = None, flip: Optional[bool] = None,
                 batch_size: Optional[int] = None, max_detect_side: int = 1280, pad_fraction: float = 0.25,
                 threshold: Optional[float] = None, threads: Optional[int] = None, trust_code: bool = False,
                 options: Optional[EmbedOptions] = None):
        flush_denormals()  # detector and embedder: subnormals are 10-100x slower on x86 (docs/performance.md)
        if isinstance(model, (str, Path)):
            model = load_model(model, normalize, threads=threads, trust_code=trust_code)
        # The caller's model is never changed: a ``normalize`` override lives in this embedder's
        # info and options (the runner puts an nn.Module in eval mode per call and restores it).
        self.model = model
        self.info = ModelInfo.of(model).with_normalize(
            normalize if normalize is not None else (options.normalize if options is not None else None))
        if batch_size is not None:
            batch_size = max(1, int(batch_size))
        self.options = EmbedOptions.make(options, default=PIPELINE_OPTIONS, flip=flip, batch_size=batch_size,
                                         normalize=self.info.normalize)
        self.normalize = self.info.normalize
        self.input_size = self.info.image_size
        self.embedding_size = self.info.embedding_size
        self.max_detect_side = int(max_detect_side)
        self.pad_fraction = float(pad_fraction)
        if isinstance(detector, str) and detector not in DETECTORS:
            raise UserError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")
        self._detector = detector
        self._detector_weights = detector_weights
        if threshold is not None:
            self.threshold, self.threshold_source = float(threshold), "given"
        elif self.info.threshold is not None:
            self.threshold = self.info.threshold
            self.threshold_source = f"model ({self.info.threshold_source or 'eval'})"
        else:
            self.threshold, self.threshold_source = DEFAULT_THRESHOLD, "default"

    @property
    def flip(self) -> bool:
        return self.options.flip

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    # ------------------------------------------------------------------ detection + alignment
    @property
    def detector(self):
        if self._detector is None:
            self._detector = MTCNNDetector(self._detector_weights)
        elif isinstance(self._detector, str):  # a detector name: built on first use
            self._detector = build_detector(self._detector, weights=self._detector_weights)
        return self._detector

    def load_image(self, image: ImageLike, name: Optional[str] = None) -> tuple[np.ndarray, str]:
        if isinstance(image, (str, Path)):
            return read_rgb(image), str(image)
        return as_rgb(image, name or "image"), name or "image"

    def detect(self, image: ImageLike, name: Optional[str] = None) -> list[DetectedFace]:
        """All faces, largest first, each with its aligned crop; [] when there is none
        (`marginface.data.detect.aligned.detect_faces`, the path evaluation also takes)."""
        rgb, name = self.load_image(image, name)
        return detect_faces(self.detector, rgb, self.input_size, max_detect_side=self.max_detect_side,
                            pad_fraction=self.pad_fraction)

    def largest_face(self, image: ImageLike, name: Optional[str] = None) -> DetectedFace:
        faces = self.detect(image, name)
        if not faces:
            label = str(image) if isinstance(image, (str, Path)) else (name or "image")
            raise UserError(f"{label}: no face found")
        return faces[0]

    def pick_face(self, image: ImageLike, face: Union[str, int] = "largest",
                  name: Optional[str] = None) -> tuple[int, DetectedFace, int]:
        """``(index, face, number of faces)`` of one face of a photo: ``face="largest"`` (index 0)
        or an index into the faces sorted largest first. A missing face is a `UserError`."""
        faces = self.detect(image, name)
        label = str(image) if isinstance(image, (str, Path)) else (name or "image")
        if not faces:
            raise UserError(f"{label}: no face found")
        if face == "largest":
            index = 0
        elif isinstance(face, (int, np.integer)) and not isinstance(face, bool):
            index = int(face)
            if not 0 <= index < len(faces):
                raise UserError(f"{label}: face {index} asked for, but the photo has {len(faces)} face(s) "
                                f"(0..{len(faces) - 1}, largest first)")
        else:
            raise UserError(f"face must be 'largest' or a face index (0 = largest), got {face!r}")
        return index, faces[index], len(faces)

    def faces(self, image: ImageLike, name: Optional[str] = None) -> list[FaceResult]:
        """Every face of a photo, largest first, each embedded (one batch): [] when there is none."""
        found = self.detect(image, name)
        if not found:
            return []
        unit = self.embed_crops(np.stack([f.crop for f in found]))
        return [FaceResult(k, f.box, f.landmarks, f.score, unit[k], f.padded) for k, f in enumerate(found)]

    # ------------------------------------------------------------------ embedding
    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Aligned ``N×H×W×3`` uint8 crops -> ``N×D`` float32 unit embeddings (flip-sum)."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        raw = embed_images(self.model, crops, options=self.options)
        if not np.isfinite(raw).all():  # a NaN probe would pass every comparison (NaN < t is False)
            raise UserError(f"{self.info.source or 'model'}: the model gave NaN/inf "
                            f"embeddings (broken weights or an overflow at this precision)")
        return l2_normalize(raw.astype(np.float64)).astype(np.float32)

    def embed(self, image: ImageLike, name: Optional[str] = None) -> np.ndarray:
        """The unit embedding (``D``) of the largest face in one image."""
        return self.embed_crops(self.largest_face(image, name).crop[None])[0]

    def embed_many(self, images: Sequence[ImageLike], *, progress=None) -> np.ndarray:
        """Unit embeddings (``N×D``) of the largest face of each image; detections one image at
        a time, the network in batches of ``batch_size``. A repeated path is processed once."""
        crops: dict = {}
        order = []
        for k, image in enumerate(images):
            key = str(Path(image).resolve()) if isinstance(image, (str, Path)) else f"#array{k}"
            if key not in crops:
                crops[key] = self.largest_face(image).crop
                if progress is not None:
                    progress(len(crops))
            order.append(key)
        keys = list(crops)
        if not keys:
            return np.zeros((0, self.embedding_size or 0), np.float32)
        unit = self.embed_crops(np.stack([crops[k] for k in keys]))
        index = {k: i for i, k in enumerate(keys)}
        return unit[[index[k] for k in order]]

    def similarity(self, a: ImageLike, b: ImageLike) -> float:
        """Cosine similarity of the largest faces of two images."""
        ea, eb = self.embed_many([a, b])
        return float(np.dot(ea, eb))

    # ------------------------------------------------------------------ identity of the model
    def fingerprint(self, normalize: Optional[str] = None) -> tuple[str, np.ndarray]:
        """``(hex id, probe embedding)``: the model's unit embedding of a fixed synthetic face.

        Two models that embed the same way (a checkpoint and its fp32 export) give nearly the
        same probe; galleries store it to refuse searches with a different model. ``normalize``:
        the probe as this model would give it with that input normalisation instead of its own
        (how a gallery tells "only --normalize differs" from "another model").
        """
        probe = cv2.resize(render_image(7, 7, 0), self.input_size[::-1], interpolation=cv2.INTER_AREA)
        if normalize is not None and normalize != self.normalize:
            raw = embed_images(self.model, probe[None], options=replace(self.options, normalize=normalize))
            vec = l2_normalize(raw.astype(np.float64)).astype(np.float32)[0]
        else:
            vec = self.embed_crops(probe[None])[0]
        digest = hashlib.sha256(np.round(vec, 2).astype(np.float32).tobytes()).hexdigest()[:16]
        return digest, vec


def iter_image_files(folder: Union[str, Path]) -> Iterable[Path]:
    """The images directly in ``folder``, sorted (one gallery identity's photos)."""
    yield from list_image_files(folder, recursive=False)
