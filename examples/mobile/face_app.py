"""What a phone app does with a marginface `.tflite` export, in plain Python: numpy, OpenCV and the LiteRT
interpreter only (no torch, no marginface), so every step maps onto Android/iOS code (docs/mobile.md).

    read photo -> detect (RetinaFace .tflite, 640x640 letterbox) -> 5-point similarity alignment onto the
    ArcFace template -> normalise with the sidecar's mean/std -> embedder .tflite (int8: quantise the
    input, dequantise the output) -> L2 norm -> cosine -> same if cosine > the sidecar's threshold

Models:
    marginface export RUN --format tflite --precision int8 --calib CROPS/ --out face.tflite  (+ face.tflite.json)
    python examples/mobile/make_detector.py retinaface640.tflite --weights DIR_OR_FILE

Use:
    python face_app.py --model face.tflite --detector retinaface640.tflite a.jpg b.jpg
    python face_app.py --model face.tflite --detector retinaface640.tflite --pairs pairs.csv
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from itertools import product
from pathlib import Path

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter

# ArcFace 5-point template for a 112x112 crop (x, y): left eye, right eye, nose tip, left and right mouth corner
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]])
# RetinaFace-MobileNet0.25 anchors: strides, two square sizes per stride; offsets scaled by VARIANCE
STEPS, ANCHOR_SIZES, VARIANCE = (8, 16, 32), ((16, 32), (64, 128), (256, 512)), (0.1, 0.2)
DEFAULT_THRESHOLD = 0.3  # used (and reported as "default") only when the model's metadata has none


# ------------------------------------------------------------------------------------------------ runtime
class Model:
    """One ``.tflite`` with its tensors allocated; ``run`` quantises/dequantises int8 tensors."""

    def __init__(self, path: str, threads: int = 2):
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)  # XNNPACK on by default
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = self.interpreter.get_output_details()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.input["dtype"] == np.int8:
            scale, zero = self.input["quantization"]
            x = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
        self.interpreter.set_tensor(self.input["index"], x.astype(self.input["dtype"]))
        self.interpreter.invoke()
        outs = []
        for d in self.outputs:
            y = self.interpreter.get_tensor(d["index"])
            if d["dtype"] == np.int8:
                scale, zero = d["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            outs.append(np.array(y, dtype=np.float32))
        return outs


# ------------------------------------------------------------------------------------------------ detection
def anchors(size: int) -> np.ndarray:
    rows = []
    for step, sizes in zip(STEPS, ANCHOR_SIZES):
        cells = -(-size // step)
        for i, j in product(range(cells), range(cells)):
            rows += [((j + 0.5) * step, (i + 0.5) * step, s, s) for s in sizes]
    return np.asarray(rows, dtype=np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    order, keep = np.argsort(-scores, kind="stable"), []
    areas = np.prod(np.maximum(boxes[:, 2:] - boxes[:, :2], 0), axis=1)
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        wh = np.maximum(0, np.minimum(boxes[i, 2:], boxes[rest, 2:]) - np.maximum(boxes[i, :2], boxes[rest, :2]))
        inter = wh[:, 0] * wh[:, 1]
        order = rest[inter <= iou * (areas[i] + areas[rest] - inter)]
    return keep


class Detector:
    """RetinaFace: the photo scaled to fit ``S×S`` (top-left, zero padding), RGB 0-255 NCHW float32 in."""

    def __init__(self, path: str, threads: int = 2, threshold: float = 0.8, iou: float = 0.4):
        self.model = Model(path, threads)
        self.size = int(self.model.input["shape"][2])
        self.prior = anchors(self.size)
        self.threshold, self.iou = threshold, iou

    def detect(self, rgb: np.ndarray) -> list[dict]:
        h, w = rgb.shape[:2]
        scale = self.size / max(h, w)
        resized = cv2.resize(rgb, (min(self.size, round(w * scale)), min(self.size, round(h * scale))),
                             interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        canvas = np.zeros((self.size, self.size, 3), np.float32)
        canvas[: resized.shape[0], : resized.shape[1]] = resized
        scores, deltas, points = (o[0] for o in self.model.run(canvas.transpose(2, 0, 1)[None]))
        keep = scores >= self.threshold
        scores, deltas, points, prior = scores[keep], deltas[keep], points[keep], self.prior[keep]
        centre = prior[:, :2] + deltas[:, :2] * VARIANCE[0] * prior[:, 2:]
        size = prior[:, 2:] * np.exp(deltas[:, 2:] * VARIANCE[1])
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) / scale
        marks = (prior[:, None, :2] + points.reshape(-1, 5, 2) * VARIANCE[0] * prior[:, None, 2:]) / scale
        faces = [{"box": np.clip(boxes[i], 0, [w, h, w, h]), "score": float(scores[i]), "landmarks": marks[i]}
                 for i in nms(boxes, scores, self.iou)]
        return sorted(faces, key=lambda f: -np.prod(f["box"][2:] - f["box"][:2]))  # largest first


# ------------------------------------------------------------------------------------------------ alignment
def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation (Umeyama) taking ``src`` onto ``dst``: 2x3."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sv, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rotation = u @ np.diag(sign) @ vt
    scale = (sv * sign).sum() / ((s ** 2).sum() / len(src))
    return np.hstack([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]])


def align(rgb: np.ndarray, landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    if (height, width) == (112, 96):
        template = TEMPLATE_112 - [8.0, 0.0]
    else:
        k = height / 112.0
        template = TEMPLATE_112 * k + [(width - 112.0 * k) / 2.0, 0.0]
    matrix = similarity_transform(np.asarray(landmarks, np.float64), template)
    return cv2.warpAffine(rgb, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


# ------------------------------------------------------------------------------------------------ embedding
class FaceApp:
    def __init__(self, model: str, detector: str, threads: int = 2, threshold: float | None = None):
        self.embedder = Model(model, threads)
        sidecar = Path(str(model) + ".json")
        self.meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        self.height, self.width = (int(v) for v in self.meta.get("input_size", "112,112").split(","))
        self.mean = np.array([float(v) for v in self.meta.get("mean", "127.5,127.5,127.5").split(",")], np.float32)
        self.std = np.array([float(v) for v in self.meta.get("std", "127.5,127.5,127.5").split(",")], np.float32)
        recorded = self.meta.get("threshold", "none")
        if threshold is not None:
            self.threshold, self.threshold_source = float(threshold), "--threshold"
        elif recorded not in ("none", ""):
            self.threshold, self.threshold_source = float(recorded), self.meta.get("threshold_source", "metadata")
        else:
            self.threshold, self.threshold_source = DEFAULT_THRESHOLD, "default"
        self.detector = Detector(detector, threads)

    def embed_crop(self, crop: np.ndarray) -> np.ndarray:
        """An aligned RGB crop -> its L2-normalised embedding."""
        x = ((crop.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1)[None]  # NCHW, RGB
        e = self.embedder.run(np.ascontiguousarray(x))[0][0]
        return e / max(float(np.linalg.norm(e)), 1e-12)

    def embed_photo(self, path: str) -> np.ndarray | None:
        """The largest face of the photo, or None when no face is found."""
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"error: {path}: not an image")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        faces = self.detector.detect(rgb)
        return self.embed_crop(align(rgb, faces[0]["landmarks"], self.height, self.width)) if faces else None

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.dot(a, b))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a same pair > score of a different pair), ties half."""
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def run_pairs(app: FaceApp, csv_path: Path) -> dict:
    rows = list(csv.DictReader(csv_path.open(newline="")))
    cache: dict[str, np.ndarray | None] = {}
    out, no_face = [], []
    for row in rows:
        for key in ("file_x", "file_y"):
            if row[key] not in cache:
                cache[row[key]] = app.embed_photo(csv_path.parent / row[key])
        a, b = cache[row["file_x"]], cache[row["file_y"]]
        label = row.get("Decision", row.get("same"))
        same_label = None if label is None else label.strip().lower() in ("yes", "1", "true")
        if a is None or b is None:
            no_face.append([row["file_x"], row["file_y"]])
            continue
        sim = app.similarity(a, b)
        out.append({"a": row["file_x"], "b": row["file_y"], "similarity": sim, "same": sim > app.threshold,
                    "label": same_label})
    result = {"pairs": out, "no_face": no_face, "threshold": app.threshold, "threshold_source": app.threshold_source}
    labelled = [p for p in out if p["label"] is not None]
    if labelled:
        scores = np.array([p["similarity"] for p in labelled])
        labels = np.array([p["label"] for p in labelled])
        result["eval"] = {"auc": auc(scores, labels), "accuracy_at_threshold": float(np.mean((scores > app.threshold)
                                                                                               == labels)),
                          "pairs": len(labelled)}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("photos", nargs="*", help="two photos to compare")
    p.add_argument("--model", required=True, help="embedder .tflite (its .tflite.json sidecar beside it)")
    p.add_argument("--detector", required=True, help="RetinaFace .tflite (examples/mobile/make_detector.py)")
    p.add_argument("--pairs", help="CSV with file_x,file_y[,Decision|same] (paths relative to the CSV)")
    p.add_argument("--threshold", type=float, help="cosine threshold instead of the metadata's")
    p.add_argument("--threads", type=int, default=2, help="interpreter threads")
    args = p.parse_args(argv)
    app = FaceApp(args.model, args.detector, args.threads, args.threshold)
    if args.pairs:
        result = run_pairs(app, Path(args.pairs))
    elif len(args.photos) == 2:
        a, b = (app.embed_photo(f) for f in args.photos)
        if a is None or b is None:
            print(f"error: no face found in {args.photos[0] if a is None else args.photos[1]}", file=sys.stderr)
            return 2
        sim = app.similarity(a, b)
        result = {"similarity": sim, "same": sim > app.threshold, "threshold": app.threshold,
                  "threshold_source": app.threshold_source}
    else:
        p.error("give two photos or --pairs CSV")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
