"""int8 against fp32 for the phone/edge exports of a trained run; prints JSON (docs/mobile.md).

For each format: export fp32 and int8 (int8 calibrated on 256 synthetic *training* crops, never the
held-out identities), then run each file in its own runtime on the held-out synthetic pairs that
the default run's report uses (300 identities x 6 images, 3000 pairs, seed 0) and on the 10 pairs
of ``verification/lfw_head20.bin`` (same-pair mean cosine). Needs the formats' extras.

    python benchmarks/mobile_int8_accuracy.py runs/synthetic_mbf --formats executorch,tflite,openvino
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from marginface.data.images import imwrite_rgb
from marginface.data.synthetic import render_identities, synthetic_pair_set
from marginface.data.verification import load_bin
from marginface.deploy.export import export_model
from marginface.deploy.load import load_model
from marginface.deploy.mobile import MOBILE_FORMATS
from marginface.evaluate.runner import embed_images, evaluate_pair_set

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from shared_data import shared_data  # noqa: E402  (tests/shared_data.py: MARGINFACE_SHARED_DATA or ../shared/data)


def same_pair_cosine(model, pair_set) -> float:
    e = embed_images(model, pair_set.images, flip=False)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return float((e[pair_set.pairs[:, 0]] * e[pair_set.pairs[:, 1]]).sum(1).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained run directory (its best.pt is exported)")
    p.add_argument("--formats", default="executorch,tflite,openvino")
    args = p.parse_args(argv)
    source = load_model(args.run)
    size = source.info.input_size[0]
    held_out = synthetic_pair_set(300, 6, 3000, image_size=size, seed=0, name="held_out")
    lfw = load_bin(shared_data() / "verification" / "lfw_head20.bin", image_size=size)
    rows = {"torch": {"accuracy": evaluate_pair_set(source, held_out)["accuracy"],
                      "lfw_same_cos": same_pair_cosine(source, lfw)}}
    with tempfile.TemporaryDirectory() as work:
        calib = Path(work) / "calib"
        calib.mkdir()
        for i, image in enumerate(render_identities(range(128), 2, size, seed=0)):
            imwrite_rgb(calib / f"{i}.png", image)
        for fmt in args.formats.split(","):
            for precision in ("fp32", "int8"):
                out = Path(work) / f"{fmt}-{precision}{MOBILE_FORMATS[fmt].suffixes[0]}"
                report = export_model(args.run, out, fmt=fmt, precision=precision,
                                      calib=calib if precision == "int8" else None, check=False)
                model = load_model(out, threads=2)
                metrics = evaluate_pair_set(model, held_out)
                rows[f"{fmt}-{precision}"] = {"accuracy": metrics["accuracy"], "auc": metrics.get("auc"),
                                              "lfw_same_cos": same_pair_cosine(model, lfw),
                                              "file_mb": round(report["file_mb"], 3)}
                print(f"{fmt}-{precision} done", file=sys.stderr)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
