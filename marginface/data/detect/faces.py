"""What every detector returns (``Face``) and the non-maximum suppression they share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Face:
    """One detection: ``box`` (x1, y1, x2, y2) in pixels, clipped to the image; ``landmarks`` 5x2
    (x, y) in order left eye, right eye, nose, left mouth corner, right mouth corner."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def faces_in_image(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, keep, width: int,
                   height: int) -> list[Face]:
    """`Face` records of the detections ``keep`` (boxes clipped to the image), largest first: what
    every detector returns."""
    faces = [Face(box=(float(np.clip(boxes[i, 0], 0, width)), float(np.clip(boxes[i, 1], 0, height)),
                       float(np.clip(boxes[i, 2], 0, width)), float(np.clip(boxes[i, 3], 0, height))),
                  score=float(scores[i]), landmarks=landmarks[i].astype(np.float32))
             for i in keep]
    return sorted(faces, key=lambda f: f.area, reverse=True)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; ``mode="min"`` divides the overlap by the smaller box."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        denom = np.minimum(areas[i], areas[rest]) if mode == "min" else areas[i] + areas[rest] - inter
        order = rest[inter <= threshold * np.maximum(denom, 1e-9)]
    return np.asarray(keep, dtype=np.int64)
