"""How long does evaluation take to embed a verification set (flip-sum: 2 forward passes per image)?

Prints one JSON object. The target set is LFW-sized: 12,000 112x112 images (6,000 pairs).
Variants (all through `marginface.evaluate.runner.embed_images`):

- ``plain_fp32``: the model called as given (``optimize=False``), the old path;
- ``fast_fp32``: the default path: BatchNorm folded into the convolutions (torch.fx) and
  channels_last inputs; fp32 throughout;
- ``fast_bf16``: the fast path under bf16 autocast (``marginface eval --precision bf16``);
- ``compiled_fp32`` / ``compiled_bf16`` / ``compiled_int8``: the model compiled by TorchInductor
  (``marginface eval --compile --precision ...``; int8 is static x86 int8 calibrated on the first
  batch, needs torchao). The one-off compile is timed separately (``compile_seconds``).

Each variant's embeddings are compared with ``plain_fp32`` (minimum cosine over all images).
The variants run interleaved, round by round, so that a shared machine's changing load falls on
all of them alike.
``--images`` below 12,000 times a sample and extrapolates (``seconds_per_12k``), which is linear
in the image count once the batch size is fixed. The backbone has random weights with BatchNorm
statistics and PReLU slopes perturbed to look trained (speed does not depend on the values).

    python benchmarks/eval_speed.py                      # full 12,000 images
    python benchmarks/eval_speed.py --images 1200        # quick: time 1/10 and extrapolate
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import cv2
import numpy as np
import torch

from marginface.deploy.compiled import CompiledEmbedder
from marginface.deploy.load import trained_looking
from marginface.evaluate.runner import embed_images
from marginface.models import build_backbone

TARGET_IMAGES = 12000


def synthetic_faces(n: int, size: int = 112, seed: int = 0) -> np.ndarray:
    """Smooth random RGB images (a random 8x8 pattern upscaled): no decoding cost, real pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in small])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=TARGET_IMAGES, help="images to embed (each also flipped)")
    ap.add_argument("--backbone", default="mbf")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--compile-batch", type=int, default=None,
                    help="images per compiled call (default: CompiledEmbedder's, 16 on the CPU)")
    ap.add_argument("--round-size", type=int, default=400, help="images per interleaved round")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--variants", nargs="+", default=["plain_fp32", "fast_fp32", "fast_bf16"],
                    choices=["plain_fp32", "fast_fp32", "fast_bf16", "compiled_fp32", "compiled_bf16",
                             "compiled_int8"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = trained_looking(build_backbone(args.backbone))
    images = synthetic_faces(args.images)
    load_start = os.getloadavg()[0]
    embed_images(model, images[:8], batch_size=8)  # warm-up (oneDNN primitive creation)
    embed_images(model, images[:8], batch_size=8, optimize=False)

    settings = {"plain_fp32": (model, False, None), "fast_fp32": (model, True, None),
                "fast_bf16": (model, True, torch.bfloat16)}
    compile_seconds = {}
    for name in args.variants:
        if name.startswith("compiled_"):  # compile (and for int8 calibrate) before the timed rounds
            precision = name.split("_", 1)[1]
            t0 = time.perf_counter()
            embedder = CompiledEmbedder(model, precision, batch_size=args.compile_batch)
            embed_images(embedder, images[: args.batch_size], batch_size=args.batch_size)
            compile_seconds[name] = (round(time.perf_counter() - t0, 1), embedder.batch_size)
            settings[name] = (embedder, True, None)
    # Interleaved rounds (the variant order rotates every round): on a shared machine the load
    # changes over minutes, and interleaving spreads it evenly over the variants.
    seconds = {name: 0.0 for name in args.variants}
    parts: dict = {name: [] for name in args.variants}
    rounds = range(0, args.images, args.round_size)
    for r, start in enumerate(rounds):
        chunk = images[start : start + args.round_size]
        order = args.variants[r % len(args.variants):] + args.variants[: r % len(args.variants)]
        for name in order:
            net, optimize, amp = settings[name]
            t0 = time.perf_counter()
            parts[name].append(embed_images(net, chunk, batch_size=args.batch_size, flip=True,
                                            optimize=optimize, amp_dtype=amp))
            seconds[name] += time.perf_counter() - t0
    results = {}
    reference = np.concatenate(parts["plain_fp32"]) if "plain_fp32" in parts else None
    for name in args.variants:
        entry = {"seconds": round(seconds[name], 2),
                 "images_per_second": round(args.images / seconds[name], 1),
                 "forward_passes_per_second": round(2 * args.images / seconds[name], 1),
                 "seconds_per_12k": round(seconds[name] * TARGET_IMAGES / args.images, 1)}
        if reference is not None and name != "plain_fp32":
            entry["min_cosine_vs_plain_fp32"] = round(min_cosine(np.concatenate(parts[name]), reference), 7)
        if name in compile_seconds:
            # once per process, not in "seconds"; the images per compiled call
            entry["compile_seconds"], entry["compile_batch"] = compile_seconds[name]
        results[name] = entry
    report = {
        "backbone": args.backbone,
        "images": args.images,
        "image_size": 112,
        "flip": True,
        "batch_size": args.batch_size,
        "round_size": args.round_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "results": results,
    }
    if "plain_fp32" in results and "fast_fp32" in results:
        report["speedup_fast_fp32"] = round(results["plain_fp32"]["seconds"] / results["fast_fp32"]["seconds"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
