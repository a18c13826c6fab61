"""How fast is one grouped 3x3 convolution as its groups get wider? Prints JSON.

The case is mbf's stem conv (128 channels, 64 groups of 2, 56x56 maps, stride 1). Regrouping it
(`marginface.deploy.fold.regroup_thin_convs`) into fewer groups with zero blocks computes the same
function with more multiply-adds; on oneDNN the thin groups are so slow that the wider ones win.
Forward only (inference), channels_last, fp32 and bf16, batch 32, median of the timed runs.

    python benchmarks/grouped_conv.py
    python benchmarks/grouped_conv.py --threads 1 --groups 64 32 16
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def median_ms(fn, runs: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--groups", type=int, nargs="+", default=[64, 32, 16, 8])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=8)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size).contiguous(memory_format=torch.channels_last)
    rows = []
    with torch.no_grad():
        for groups in args.groups:
            row = {"groups": groups, "channels_per_group": args.channels // groups,
                   "gmacs": round(args.batch * args.size ** 2 * args.channels * (args.channels // groups) * 9 / 1e9, 3)}
            for dtype, name in ((torch.float32, "fp32_ms"), (torch.bfloat16, "bf16_ms")):
                conv = torch.nn.Conv2d(args.channels, args.channels, 3, 1, 1, groups=groups, bias=False)
                conv = conv.to(dtype).to(memory_format=torch.channels_last).eval()
                xd = x.to(dtype)
                row[name] = median_ms(lambda: conv(xd), args.runs)
            rows.append(row)
    print(json.dumps({"threads": torch.get_num_threads(), "batch": args.batch, "torch": torch.__version__,
                      "load_average_1m": round(os.getloadavg()[0], 2), "convs": rows}))


if __name__ == "__main__":
    main()
