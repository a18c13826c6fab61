"""Inference latency (batch 1) and throughput (batch 32) of a backbone across runtimes; prints JSON.

Plain eager fp32 PyTorch is compared, in the same process and on the same input, with the
optimised paths: TorchScript traced + frozen, ``torch.jit.optimize_for_inference``, channels_last,
bf16 autocast + channels_last, PyTorch FX int8 (x86), ONNX Runtime fp32 (all graph optimisations
and basic only), and static int8 in ONNX Runtime with QDQ / QOperator, U8S8 / S8S8, per-channel /
per-tensor and reduce_range, plus dynamic int8; with the mobile extras installed (docs/mobile.md) also
the phone/edge runtimes ``executorch[-int8]``, ``tflite[-int8]``, ``ncnn[-fp16]``,
``openvino[-fp16|-int8]``, each running the file it exported. Uses the same code as ``marginface bench``
(``marginface.deploy.bench``); ``min_cosine_vs_first`` shows whether a fast path still computes
the same embeddings as eager PyTorch.

    python benchmarks/inference_latency.py [--backbone mbf] [--threads 1 2] [--runs 100]
    python benchmarks/inference_latency.py --model runs/x            # a trained checkpoint

Timings on a shared machine are noisy: each result records the load average at its start.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from marginface.deploy.bench import DEFAULT_RUNTIMES, EXTRA_RUNTIMES, bench


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="mbf", help="architecture with random weights (default mbf)")
    p.add_argument("--model", help="a run directory / checkpoint / .onnx instead of --backbone")
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=5.0, help="per runtime and measurement")
    p.add_argument("--runtimes", help="comma-separated subset (default: all)")
    args = p.parse_args(argv)
    runtimes = args.runtimes.split(",") if args.runtimes else list(DEFAULT_RUNTIMES) + list(EXTRA_RUNTIMES)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
           "runs": []}
    try:
        import onnxruntime

        out["machine"]["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    for threads in args.threads:
        result = bench(args.model, backbone=None if args.model else args.backbone, runtimes=runtimes,
                       threads=threads, runs=args.runs, max_seconds=args.max_seconds, input_size=args.input_size)
        eager = result["latency_ms"].get("torch", {}).get("median")
        if eager:
            result["speedup_vs_eager"] = {k: round(eager / v["median"], 2) for k, v in result["latency_ms"].items()}
        out["runs"].append(result)
        print(f"threads={threads} done", file=sys.stderr)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
