"""Face alignment: warp 5 landmarks onto the ArcFace template with a similarity transform.

Landmark order everywhere: left eye, right eye, nose tip, left mouth corner, right mouth corner,
as image ``(x, y)`` ("left" = smaller x in the image).
"""
from __future__ import annotations

import cv2
import numpy as np

from marginface.errors import UserError

# The field's reference points for a 112x112 crop (insightface / ArcFace).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
# 112 high x 96 wide crops (SphereFace / CosFace papers): the same face with 8 px cut off each side.
ARCFACE_TEMPLATE_112x96 = ARCFACE_TEMPLATE_112 - np.array([8.0, 0.0])


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))  # type: ignore[index]


def arcface_template(size: int | tuple[int, int] = 112) -> np.ndarray:
    """Template points for an output of ``size`` (``int`` square or ``(height, width)``).

    112x112 and 112x96 are the standard crops; other sizes scale the 112x112 template by height and
    centre it horizontally.
    """
    h, w = _size_hw(size)
    if (h, w) == (112, 96):
        return ARCFACE_TEMPLATE_112x96.copy()
    scale = h / 112.0
    return ARCFACE_TEMPLATE_112 * scale + np.array([(w - 112.0 * scale) / 2.0, 0.0])


def similarity_transform(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama (1991), including the sign fix that keeps the result a rotation, not a reflection.
    Returns the 2x3 matrix ``M`` with ``dst ≈ M[:, :2] @ src + M[:, 2]``.
    """
    src = np.asarray(src_pts, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst_pts, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    var_src = (src_c**2).sum() / len(src)
    if var_src < 1e-12:
        raise ValueError("source points are all the same point; no transform is defined")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0  # best proper rotation instead of a reflection
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / var_src
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mu_dst - scale * rotation @ mu_src
    return matrix


def align_face(image: np.ndarray, landmarks5: np.ndarray, size: int | tuple[int, int] = 112) -> np.ndarray:
    """Warp ``image`` so its 5 landmarks land on the ArcFace template; returns ``size`` crop (RGB uint8)."""
    points = np.asarray(landmarks5, dtype=np.float64).reshape(-1, 2)
    if points.shape != (5, 2) or not np.all(np.isfinite(points)):
        raise UserError(f"align_face: expected 5 finite (x, y) landmarks, got shape {np.shape(landmarks5)}")
    h, w = _size_hw(size)
    matrix = similarity_transform(points, arcface_template((h, w)))
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def crop_box(image: np.ndarray, box: tuple[float, float, float, float], size: int | tuple[int, int] = 112) -> np.ndarray:
    """Square crop around ``box`` (x1, y1, x2, y2), resized to ``size``; the fallback without landmarks."""
    h, w = _size_hw(size)
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1)
    if side <= 0:
        raise UserError(f"crop_box: empty box {box}")
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    scale = h / side
    matrix = np.array([[scale, 0.0, w / 2.0 - scale * cx], [0.0, scale, h / 2.0 - scale * cy]])
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
