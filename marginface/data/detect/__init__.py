"""Face detectors returning boxes + 5 landmarks for alignment: MTCNN and RetinaFace-MobileNet0.25."""
from __future__ import annotations

from typing import Any

from marginface.data.detect.faces import Face
from marginface.data.detect.mtcnn import MTCNNDetector
from marginface.data.detect.retinaface import RetinaFaceDetector
from marginface.errors import UserError

DETECTORS = ("mtcnn", "retinaface")


def build_detector(name: str = "mtcnn", weights: Any = None, **kw: Any) -> Any:
    """``mtcnn`` (weights via ``marginface data get-detector``) or ``retinaface`` (a local checkpoint).

    ``weights``: where the detector's weights are (MTCNN: its folder; RetinaFace: the file or its
    folder), whichever detector it is; None looks in the usual places."""
    if weights is not None:
        kw["weights_dir" if name == "mtcnn" else "weights"] = weights
    if name == "mtcnn":
        return MTCNNDetector(**kw)
    if name == "retinaface":
        return RetinaFaceDetector(**kw)
    raise UserError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")


__all__ = ["DETECTORS", "Face", "MTCNNDetector", "build_detector"]
