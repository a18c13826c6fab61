"""The pretrained MobileFaceNet ONNX through OpenVINO on real photos; prints JSON.

The ONNX file in shared/data/weights/mobilefacenet_onnx/ is converted to OpenVINO IR by the same
code as ``marginface export --format openvino`` (`marginface.deploy.mobile.openvino_ir.export`, which
takes an ONNX file as well as a torch model): fp32, and int8 through NNCF calibrated on real aligned
crops that are not in the test (identities/ms1m_sample and verification/lfw_mini). Then
``marginface verify --pairs`` runs the whole photo pipeline (MTCNN detection, 5-point alignment,
embedding) on the deepface pairs (photos/deepface/pairs.csv: 300 labelled pairs of unaligned
photos) with the fp32 ONNX in ONNX Runtime and with each IR in OpenVINO, and the verification
metrics (AUC, accuracy, same-pair mean cosine) are printed side by side.

    python benchmarks/openvino_pretrained.py [--data ../shared/data] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from marginface.cli import main as cli_main
from marginface.deploy import mobile
from marginface.deploy.export import build_metadata
from marginface.deploy.load import load_model
from marginface.deploy.mobile import openvino_ir
from marginface.deploy.quantize import load_calibration_images


def verify_pairs(model: Path, data: Path, threads: int, normalize=None) -> dict:
    argv = ["verify", "--pairs", str(data / "photos/deepface/pairs.csv"), "--model", str(model),
            "--detector-weights", str(data / "weights/mtcnn"), "--threads", str(threads), "--json"]
    if normalize:
        argv += ["--normalize", normalize]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(argv)
    if code != 0:
        raise SystemExit(f"verify failed for {model}")
    metrics = json.loads(out.getvalue())["eval"]
    return {k: metrics[k] for k in ("auc", "accuracy", "pos_mean", "neg_mean", "pairs") if k in metrics}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    data = Path(args.data)
    onnx_path = data / "weights/mobilefacenet_onnx/MobileFaceNet.onnx"
    source = load_model(onnx_path, "imagenet", threads=args.threads)  # its authors' normalisation
    calib = np.concatenate([load_calibration_images(data / "identities/ms1m_sample/images", (112, 112)),
                            load_calibration_images(data / "verification/lfw_mini", (112, 112))])
    result = {"model": str(onnx_path), "calibration_images": len(calib),
              "onnxruntime-fp32": verify_pairs(onnx_path, data, args.threads, "imagenet")}
    with tempfile.TemporaryDirectory(prefix="marginface-ov-bench-") as work:
        for precision in ("fp32", "int8"):
            out = Path(work) / f"mobilefacenet-{precision}.xml"
            metadata = build_metadata(source, quantization="none" if precision == "fp32" else precision)
            report = openvino_ir.export(onnx_path, out, precision=precision,
                                        calib_images=calib if precision == "int8" else None, metadata=metadata)
            mobile.write_sidecar(out, metadata)
            loaded = load_model(out, threads=args.threads)
            result[f"openvino-{precision}"] = {**verify_pairs(out, data, args.threads),
                                               "bin_mb": report["bin_mb"], "precision": loaded.info.precision,
                                               "batch": "dynamic" if loaded.fixed_batch is None else loaded.fixed_batch}
    base = result["onnxruntime-fp32"]["auc"]
    for key in ("openvino-fp32", "openvino-int8"):
        result[key]["auc_minus_onnx_fp32"] = round(result[key]["auc"] - base, 4)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
