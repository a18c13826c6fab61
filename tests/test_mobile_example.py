"""examples/mobile/face_app.py end to end on the real deepface photos: the pretrained MobileFaceNet ONNX
embedder converted to a full-integer int8 `.tflite` through `marginface export --format tflite`, the
RetinaFace detector as a `.tflite` (examples/mobile/make_detector.py), the app running with numpy, OpenCV
and the LiteRT interpreter only. Its AUC on the 300 labelled pairs must stay within 0.01 of the fp32 ONNX
model's on the same aligned crops."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="LiteRT runtime missing: pip install 'marginface[litert]'")
pytest.importorskip("litert_torch", reason="LiteRT converter missing: pip install 'marginface[litert]'")
pytest.importorskip("ai_edge_quantizer", reason="LiteRT quantizer missing: pip install 'marginface[litert]'")
ort = pytest.importorskip("onnxruntime", reason="the fp32 reference needs onnxruntime: pip install 'marginface[onnx]'")

from marginface.cli import main  # noqa: E402
from marginface.data.images import imwrite_rgb  # noqa: E402
from marginface.data.verification import load_bin  # noqa: E402

from shared_data import need  # noqa: E402  (tests/shared_data.py)

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "examples" / "mobile"


@pytest.fixture(scope="module")
def app_models(tmp_path_factory):
    onnx_path = need("weights/mobilefacenet_onnx/MobileFaceNet.onnx")
    weights = need("weights/retinaface/mobilenet0.25_Final.pth")
    work = tmp_path_factory.mktemp("mobile_app")
    calib = work / "calib"
    calib.mkdir()
    for i, face in enumerate(load_bin(need("verification/lfw_head20.bin")).images):  # real aligned crops
        imwrite_rgb(calib / f"{i}.png", face)
    model = work / "mobilefacenet_int8.tflite"
    assert main(["export", str(onnx_path), "--normalize", "imagenet", "--format", "tflite", "--precision", "int8",
                 "--calib", str(calib), "--out", str(model)]) == 0
    detector = work / "retinaface640.tflite"
    sys.path.insert(0, str(APP_DIR))
    try:
        import make_detector
    finally:
        sys.path.remove(str(APP_DIR))
    assert make_detector.main([str(detector), "--weights", str(weights)]) == 0
    return onnx_path, model, detector


def test_app_runs_without_torch_and_keeps_the_fp32_onnx_auc(app_models, capsys):
    onnx_path, model, detector = app_models
    pairs_csv = need("photos/deepface/pairs.csv")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import face_app; rc = face_app.main(sys.argv[2:]); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'marginface')], 'imported torch'; "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(APP_DIR), "--model", str(model), "--detector",
                           str(detector), "--pairs", str(pairs_csv), "--threads", "1"],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["no_face"] == [] and result["eval"]["pairs"] == 300
    assert result["threshold_source"] == "default"  # the pretrained file records no threshold

    # The fp32 ONNX reference on the app's own crops (same detector and alignment).
    sys.path.insert(0, str(APP_DIR))
    try:
        import face_app
    finally:
        sys.path.remove(str(APP_DIR))
    app = face_app.FaceApp(str(model), str(detector), threads=1)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    embeddings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for row in result["pairs"]:
        for photo in (row["a"], row["b"]):
            if photo not in embeddings:
                rgb = cv2.cvtColor(cv2.imread(str(pairs_csv.parent / photo)), cv2.COLOR_BGR2RGB)
                crop = face_app.align(rgb, app.detector.detect(rgb)[0]["landmarks"], 112, 112)
                x = ((crop.astype(np.float32) - app.mean) / app.std).transpose(2, 0, 1)[None]
                ref = session.run(None, {name: np.ascontiguousarray(x)})[0][0]
                embeddings[photo] = (app.embed_crop(crop), ref / np.linalg.norm(ref))
    labels = np.array([row["label"] for row in result["pairs"]])
    scores = {k: np.array([float(embeddings[r["a"]][k] @ embeddings[r["b"]][k]) for r in result["pairs"]])
              for k in (0, 1)}
    app_scores = np.array([row["similarity"] for row in result["pairs"]])
    assert np.allclose(app_scores, scores[0], atol=1e-5)  # the subprocess computed the same thing
    auc_int8, auc_fp32 = face_app.auc(scores[0], labels), face_app.auc(scores[1], labels)
    with capsys.disabled():
        print(f"\n[mobile app] deepface pairs AUC: tflite int8 {auc_int8:.4f}, fp32 ONNX {auc_fp32:.4f}; "
              f"accuracy at {result['threshold']} {result['eval']['accuracy_at_threshold']:.4f}")
    assert auc_fp32 > 0.95  # the detector, alignment and normalisation are right
    assert abs(auc_int8 - auc_fp32) <= 0.01
