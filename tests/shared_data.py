"""Where the read-only sample data lives (`../shared/data` beside the checkout, or
$MARGINFACE_SHARED_DATA), and a skip with a reason when a test's file is absent."""
import os
from pathlib import Path

import pytest


def shared_data() -> Path:
    env = os.environ.get("MARGINFACE_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def need(rel: str) -> Path:
    path = shared_data() / rel
    if not path.exists():
        pytest.skip(f"shared sample data {path} is absent (set MARGINFACE_SHARED_DATA)")
    return path


def unaligned_lfw_mini(images: Path, meta: Path, sep: str = " ") -> Path:
    """lfw_mini's aligned crops pasted into 250x250 grey canvases under ``images`` (an LFW layout that
    needs alignment), their 5 landmarks (``sep``-separated, in the OpenVINO trainer's
    ``lfw_landmark.txt`` form) and ``pairs.txt`` written to ``meta``; returns lfw_mini's folder."""
    import cv2  # deferred: only the tests that build this set need OpenCV
    import numpy as np

    from marginface.data.align import ARCFACE_TEMPLATE_112

    mini = need("verification/lfw_mini")
    meta.mkdir(parents=True, exist_ok=True)
    lines = []
    for src in sorted(mini.rglob("*.jpg")):
        rel = src.relative_to(mini)
        canvas = np.full((250, 250, 3), 90, np.uint8)
        canvas[40:208, 50:218] = cv2.resize(cv2.imread(str(src)), (168, 168), interpolation=cv2.INTER_CUBIC)
        (images / rel.parent).mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(images / rel), canvas, [cv2.IMWRITE_JPEG_QUALITY, 98])
        pts = np.asarray(ARCFACE_TEMPLATE_112) * 1.5 + np.array([50, 40])
        lines.append(str(rel) + sep + sep.join(f"{v:.3f}" for v in pts.ravel()))
    (meta / "lfw_landmark.txt").write_text("\n".join(lines) + "\n")
    (meta / "pairs.txt").write_bytes((mini / "pairs.txt").read_bytes())
    return mini
