"""Build step (needs torch, marginface and its `litert` extra; the app itself does not): the RetinaFace
detector marginface uses, as a fixed 640x640 `.tflite` for examples/mobile/face_app.py.

    python examples/mobile/make_detector.py retinaface640.tflite --weights mobilenet0.25_Final.pth
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from marginface.deploy.mobile.litert_tflite import DETECTOR_SIZE, export_retinaface
from marginface.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the .tflite to write")
    p.add_argument("--weights", help="RetinaFace-MobileNet0.25 weights (file or folder; default: where marginface "
                                     "looks for them)")
    p.add_argument("--size", type=int, default=DETECTOR_SIZE, help="square input side in pixels (multiple of 32)")
    args = p.parse_args(argv)
    if args.size < 32 or args.size % 32:
        print(f"error: --size {args.size}: give a multiple of 32", file=sys.stderr)
        return 2
    try:
        print(json.dumps(export_retinaface(args.weights, Path(args.out), args.size)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
