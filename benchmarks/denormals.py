"""Subnormal floats: a freshly initialised vs a trained-looking mbf, flush to zero on vs off.

A fresh network in eval mode (BatchNorm = identity, all PReLU slopes 0.25) shrinks its activations
layer by layer into subnormal floats, which x86 CPUs compute 10-100x slower; a trained-looking one
(`deploy.load.trained_looking`: BN statistics/affines and PReLU slopes from trained ranges) and
the same network with FTZ/DAZ on do not. The four combinations are timed eager fp32 at batch 1,
interleaved round by round in one process; prints one JSON object: medians, same-round ratios, and
the fraction of subnormal values in each network's activations (flush off). A third model,
``fresh, input x 1e-38``, forces the case: with identity BatchNorms and zero biases its
activations stay subnormal through the whole network, so it shows what subnormals cost on this CPU
even where the fresh network itself does not produce them.

    python benchmarks/denormals.py                      # mbf 112 px, 2 threads, 5 rounds
    python benchmarks/denormals.py --backbone mobilefacenet --rounds 3 --runs 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from marginface import hardware
from marginface.deploy.load import random_backbone, trained_looking


def time_forward(model, x, runs: int) -> float:
    """Median seconds of ``runs`` batch-1 forwards after one warm-up."""
    with torch.inference_mode():
        model(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def subnormal_fraction(model, x) -> float:
    """Fraction of fp32 activation values (every module's output) that are subnormal, flush off."""
    counts = [0, 0]

    def hook(_module, _inputs, out):
        if torch.is_tensor(out) and out.dtype == torch.float32:
            a = out.abs()
            counts[0] += int(((a > 0) & (a < torch.finfo(torch.float32).tiny)).sum())
            counts[1] += a.numel()
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counts[0] / max(counts[1], 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mbf")
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=7, help="timed forwards per variant and round (median kept)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {"fresh": random_backbone(args.backbone, input_size=args.input_size),
              "trained-looking": trained_looking(random_backbone(args.backbone, input_size=args.input_size))}
    x = torch.randn(1, 3, args.input_size, args.input_size, generator=torch.Generator().manual_seed(0))
    inputs = {"fresh": x, "trained-looking": x, "fresh, input x 1e-38": x * 1e-38}
    models["fresh, input x 1e-38"] = models["fresh"]
    hardware.flush_denormals(False)
    fractions = {name: round(subnormal_fraction(m, inputs[name]), 4) for name, m in models.items()}
    variants = [(name, flush) for name in models for flush in (False, True)]
    times: dict = {f"{n} flush={'on' if f else 'off'}": [] for n, f in variants}
    for r in range(args.rounds):
        for name, flush in variants[r % len(variants):] + variants[: r % len(variants)]:
            hardware.flush_denormals(flush)
            times[f"{name} flush={'on' if flush else 'off'}"].append(time_forward(models[name], inputs[name], args.runs))
    hardware.flush_denormals(True)
    ms = {k: round(statistics.median(v) * 1000, 2) for k, v in times.items()}

    def ratio(a, b):
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 2)
    result = {
        "backbone": args.backbone, "input_size": args.input_size, "threads": args.threads, "rounds": args.rounds,
        "cpu": platform.processor() or platform.machine(), "isa": hardware.isa_key(),
        "torch": torch.__version__, "load_average": [round(v, 2) for v in os.getloadavg()],
        "median_ms_batch1": ms,
        "subnormal_fraction_of_activations": fractions,
        "ratio_same_round": {
            "fresh off / fresh on": ratio("fresh flush=off", "fresh flush=on"),
            "trained-looking off / on": ratio("trained-looking flush=off", "trained-looking flush=on"),
            "fresh on / trained-looking on": ratio("fresh flush=on", "trained-looking flush=on"),
            "fresh off / trained-looking on": ratio("fresh flush=off", "trained-looking flush=on"),
            "input x 1e-38: off / on": ratio("fresh, input x 1e-38 flush=off", "fresh, input x 1e-38 flush=on"),
        },
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
