"""Name the people in a folder of photos with the public API (the first hour of marginface).

    python examples/who_is_who.py KNOWN_DIR UNKNOWN_DIR --model model.onnx [--normalize imagenet]
        [--detector-weights DIR] [--threshold 0.3]

KNOWN_DIR holds one sub-folder of photos per person (KNOWN_DIR/<name>/*.jpg). Prints one line per
photo of UNKNOWN_DIR: ``file,name,similarity`` (``unknown`` below the threshold, ``no_face`` when
the photo has none).
"""
from __future__ import annotations

import argparse
import sys

import marginface
from marginface.deploy.gallery import format_identify_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("known")
    parser.add_argument("unknown")
    parser.add_argument("--model", required=True)
    parser.add_argument("--normalize", choices=["arcface", "imagenet"])
    parser.add_argument("--detector-weights")
    parser.add_argument("--threshold", type=float)
    args = parser.parse_args(argv)
    options = {"normalize": args.normalize, "detector_weights": args.detector_weights}
    try:
        result = marginface.identify_folder(args.known, args.unknown, model=args.model,
                                            threshold=args.threshold, **options)
    except marginface.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_identify_rows(result))
    print(f"# threshold {result['threshold']:.3f} ({result['threshold_source']}), "
          f"{result['identities']} known people", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
