"""Per-op profile of the compiled inference paths at batch 1 (where does int8 lose to bf16?).

Builds a trained-looking backbone, compiles it for each precision as ``marginface.deploy.compiled``
does (export, PT2E int8 for int8, Inductor with freezing) but through ``torch.compile`` instead of
AOTInductor, so torch.profiler sees every extern kernel (oneDNN convolutions / linear, int8
``onednn::qconv*``) and, with Inductor's ``cpp.enable_kernel_profile``, each generated C++ kernel
(the fused BN/PReLU/quantise loops) by name. Prints one JSON object: per precision the batch-1
median, the profiled total and the top ops by self CPU time (grouped into kernel classes too).

    python benchmarks/compiled_profile.py                                  # mbf 112 px, bf16 and int8
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/compiled_profile.py          # the AVX2 paths of a bigger CPU
    python benchmarks/compiled_profile.py --precisions fp32 bf16 int8 --top 15

Run each ISA cap in its own process (oneDNN reads the variable once).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch

from marginface import hardware
from marginface.deploy.compiled import _inference_copy, quantize_x86
from marginface.deploy.load import random_backbone, trained_looking


def kernel_class(name: str) -> str:
    n = name.lower()
    if "qconv" in n or "qlinear" in n:
        return "int8 conv/linear (oneDNN)"
    if "convolution" in n or "conv" in n and "mkldnn" in n:
        return "conv (oneDNN)"
    if "linear" in n or "addmm" in n or "mm" == n.split("::")[-1]:
        return "linear / matmul"
    if n.startswith("cpp_fused") or "kernel" in n or "graph_" in n:
        return "Inductor C++ loops (BN/PReLU/(de)quantise/reorders)"
    if "copy" in n or "to_dense" in n or "reorder" in n or "contiguous" in n or "empty" in n:
        return "copies / layout"
    return "other"


def build(model, precision: str, example: torch.Tensor, calibration: torch.Tensor):
    if precision == "int8":
        net = quantize_x86(model, calibration)
    else:
        net = _inference_copy(model)
        if precision == "bf16":
            net = net.to(torch.bfloat16)
        net = net.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = example.to(dtype).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch._inductor.config.patch({"freezing": True, "cpp.enable_kernel_profile": True}), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(net, dynamic=False)
        with torch.no_grad():
            compiled(x)
    return compiled, x


def profile(fn, x, runs: int, top: int) -> dict:
    with torch.no_grad():
        for _ in range(5):
            fn(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                fn(x)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    classes: dict = {}
    for e in events:
        k = kernel_class(e.key)
        classes[k] = classes.get(k, 0.0) + e.self_cpu_time_total
    return {
        "median_ms": round(statistics.median(times) * 1000, 3),
        "profiled_ms_per_call": round(total / runs / 1000, 3),
        "classes_pct": {k: round(100 * v / total, 1) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key[:90], "ms_per_call": round(e.self_cpu_time_total / runs / 1000, 3),
                     "pct": round(100 * e.self_cpu_time_total / total, 1), "calls_per_run": e.count // runs}
                    for e in events[:top]],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mbf")
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", nargs="+", default=["bf16", "int8"])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hardware.flush_denormals()
    model = trained_looking(random_backbone(args.backbone, input_size=args.input_size))
    g = torch.Generator().manual_seed(0)
    calibration = torch.randn(16, 3, args.input_size, args.input_size, generator=g)
    example = calibration[:1]
    result = {"backbone": args.backbone, "input_size": args.input_size, "threads": args.threads,
              "isa": hardware.isa_key(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
              "torch": torch.__version__, "load_average": [round(v, 2) for v in os.getloadavg()], "paths": {}}
    for precision in args.precisions:
        fn, x = build(model, precision, example, calibration)
        result["paths"][precision] = profile(fn, x, args.runs, args.top)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
