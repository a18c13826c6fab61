"""Photo -> every face, aligned: the one detect-and-align path.

`FaceEmbedder` (verify, gallery, serve) and the evaluation readers (`marginface eval --align
detect`, `data.val_align: detect`) both call `detect_faces`, so a photo gives the same crop
everywhere. A photo larger than ``max_detect_side`` is detected on a downscaled copy (landmarks
are mapped back and the face is cut from the full-resolution image); when nothing is found, the
detector runs again on the photo padded by ``pad_fraction`` on every side (tight face chips,
whose face fills the frame, need that context).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import cv2
import numpy as np

from marginface.data.align import align_face
from marginface.data.images import MAX_PIXELS
from marginface.errors import UserError

MAX_DETECT_SIDE = 1280  # longer photos are shrunk to this for detection only
PAD_FRACTION = 0.25  # the padded retry's border, a fraction of the longer side


@dataclass(frozen=True)
class DetectedFace:
    """A face in original-image coordinates and its aligned crop (``H×W×3`` uint8 RGB)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray  # 5x2 (x, y)
    crop: np.ndarray
    padded: bool = False  # found only by the padded-retry fallback

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def _detect_scaled(detector: Any, image: np.ndarray, max_detect_side: int) -> list:
    """``(box, score, landmarks)`` in ``image`` coordinates, detecting on a copy shrunk to
    ``max_detect_side`` when the image is larger."""
    h, w = image.shape[:2]
    scale = min(1.0, max_detect_side / max(h, w))
    small = image if scale == 1.0 else cv2.resize(
        image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return [(tuple(float(v) / scale for v in f.box), float(f.score), np.asarray(f.landmarks, np.float64) / scale)
            for f in detector.detect(small)]


def detect_faces(detector: Any, image: np.ndarray, size: Union[int, tuple[int, int]], *,
                 max_detect_side: int = MAX_DETECT_SIDE, pad_fraction: float = PAD_FRACTION) -> list[DetectedFace]:
    """Every face of an RGB photo, largest first, each aligned to the ArcFace template at ``size``
    (``int`` or ``(height, width)``); [] when there is none. ``detector``: anything with
    ``detect(rgb) -> [Face]`` (`marginface.data.detect.build_detector`)."""
    found, padded = _detect_scaled(detector, image, max_detect_side), False
    h, w = image.shape[:2]
    pad = int(round(max(h, w) * pad_fraction))
    source, shift = image, 0
    # the padded copy of a 60000x16 strip would be 8 GB: no retry beyond the pixel limit
    if not found and pad_fraction > 0 and (h + 2 * pad) * (w + 2 * pad) <= MAX_PIXELS:
        border = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        found = [((b[0] - pad, b[1] - pad, b[2] - pad, b[3] - pad), s, lm - pad)
                 for b, s, lm in _detect_scaled(detector, border, max_detect_side)]
        padded = bool(found)
        source, shift = border, pad
    faces = [DetectedFace(box, score, landmarks.astype(np.float32), align_face(source, landmarks + shift, size), padded)
             for box, score, landmarks in found]
    return sorted(faces, key=lambda f: f.area, reverse=True)


def largest_face_crop(detector: Any, image: np.ndarray, size: Union[int, tuple[int, int]], where: str, *,
                      max_detect_side: int = MAX_DETECT_SIDE, pad_fraction: float = PAD_FRACTION) -> np.ndarray:
    """The aligned crop of the largest face of a photo; none is one `UserError` naming ``where``."""
    faces = detect_faces(detector, image, size, max_detect_side=max_detect_side, pad_fraction=pad_fraction)
    if not faces:
        raise UserError(f"{where}: no face found")
    return faces[0].crop
