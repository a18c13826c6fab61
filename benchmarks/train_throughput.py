"""Training-step throughput: plain eager fp32 against each optimisation, interleaved in one process.

One step is what `Trainer._train_step` does: normalise a uint8 batch, backbone (autocast), fp32
cosine classifier + ArcFace + cross-entropy, backward, clip the global grad norm, SGD with momentum.
Every variant gets its own copy of the same initial weights; the rounds alternate the variants (in a
rotating order), so a change of machine load hits all of them alike, and each variant's speed-up is
the median over rounds of (baseline step time / its step time) *in the same round*; the best-of-rounds
figures (``step_s_min``, ``speedup_best``: ratio of the fastest rounds) are the least disturbed by a
burst of load from other jobs, which on a shared 2-core box can slow one round 3-10x. A variant is a
``+``-joined list of levers:

    fp32 | bf16 | fp16    autocast dtype (fp16: CUDA only, with a GradScaler)
    cl                    channels_last model and input              (train.channels_last)
    fastprelu             marginface.models.layers.PReLU backward    (train.fast_layers)
    fastconv              layers.Conv2d: grouped convs fp32 in bf16  (train.fast_layers)
    keepmem               glibc keeps freed memory, CPU only         (train.cpu_keep_memory)
    compile               torch.compile of the backbone, inductor    (train.compile)
    fusedsgd              torch.optim.SGD(fused=True) instead of foreach
    tf32                  CUDA: TF32 matmuls/convolutions (default off in this benchmark's fp32)
    t1, t2, ...           torch.set_num_threads for this variant

The first variant is the baseline (default ``fp32``: stock nn.PReLU, NCHW, no autocast). Prints one
JSON object; ``--markdown`` adds the table for docs/performance.md.

    python benchmarks/train_throughput.py                        # CPU: mbf 112 px, batch 64, 10k classes
    python benchmarks/train_throughput.py --threads 1 --rounds 5 --variants fp32 bf16+cl+fastprelu+keepmem
    python benchmarks/train_throughput.py --iresnet-batch 16     # + a 1-step iresnet50 figure per round
    python benchmarks/train_throughput.py --device cuda          # batch 128, bf16/fp16/compile, % of peak
"""
from __future__ import annotations

import argparse
import atexit
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from marginface.data.dataset import normalize_batch
from marginface.heads import build_head
from marginface.models import build_backbone, count_macs
from marginface.models.layers import set_fast_conv, set_fast_prelu
from marginface import hardware, malloc

CPU_VARIANTS = [
    "fp32",
    "fp32+cl",
    "fp32+keepmem",
    "fp32+cl+fastprelu+keepmem",
    "bf16+cl",  # the best eager lever set (stock layers)
    "bf16+cl+fastprelu",
    "bf16+cl+fastprelu+fastconv",
    "bf16+cl+fastprelu+fastconv+keepmem",  # the trainer's CPU default
    "bf16+cl+fastprelu+fastconv+keepmem+compile",  # + train.compile=true
]
CUDA_VARIANTS = ["fp32", "tf32", "tf32+cl", "bf16+cl", "fp16+cl", "bf16+cl+compile"]
IRESNET_VARIANTS = ["fp32", "bf16+cl", "bf16+cl+fastprelu+fastconv+keepmem"]

# Dense peak TFLOP/s by GPU name (bf16/fp16 tensor cores, tf32 tensor cores, plain fp32), from the
# vendors' data sheets (SXM parts); --peak-tflops overrides.
GPU_PEAKS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
}


@dataclass
class Variant:
    name: str
    amp: torch.dtype | None = None
    channels_last: bool = False
    fast_prelu: bool = False
    fast_conv: bool = False
    keep_memory: bool = False
    compile: bool = False
    fused_sgd: bool = False
    tf32: bool = False
    threads: int | None = None
    times: list = field(default_factory=list)  # seconds per step, one per round
    faults: list = field(default_factory=list)  # minor page faults per step
    compile_seconds: float | None = None


def parse_variant(spec: str) -> Variant:
    v = Variant(spec)
    for token in spec.split("+"):
        if token in ("fp32", "bf16", "fp16"):
            v.amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[token]
        elif token == "tf32":
            v.tf32 = True
        elif token == "cl":
            v.channels_last = True
        elif token == "fastprelu":
            v.fast_prelu = True
        elif token == "fastconv":
            v.fast_conv = True
        elif token == "keepmem":
            v.keep_memory = True
        elif token == "compile":
            v.compile = True
        elif token == "fusedsgd":
            v.fused_sgd = True
        elif token[:1] == "t" and token[1:].isdigit():
            v.threads = int(token[1:])
        else:
            raise SystemExit(f"unknown lever {token!r} in variant {spec!r}")
    return v


class Runner:
    """One variant's model, head, optimizer and step function (its own copy of the weights)."""

    def __init__(self, v: Variant, backbone: torch.nn.Module, head: torch.nn.Module, device: torch.device,
                 clip: float) -> None:
        self.v, self.device, self.clip = v, device, clip
        self.backbone = copy.deepcopy(backbone)
        set_fast_prelu(self.backbone, v.fast_prelu)
        set_fast_conv(self.backbone, v.fast_conv)
        self.backbone.to(device)
        if v.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.head = copy.deepcopy(head).to(device)
        self.params = list(self.backbone.parameters()) + list(self.head.parameters())
        kw = {"fused": True} if v.fused_sgd else {"foreach": True}
        self.optimizer = torch.optim.SGD(self.params, lr=0.01, momentum=0.9, weight_decay=5e-4, **kw)
        self.scaler = torch.amp.GradScaler(device.type, enabled=v.amp == torch.float16)
        self.forward = torch.compile(self.backbone) if v.compile else self.backbone
        self.backbone.train()
        self.head.train()

    def enter(self) -> None:
        if self.v.threads:
            torch.set_num_threads(self.v.threads)
        if self.device.type == "cpu":
            malloc.keep_freed_memory(self.v.keep_memory)
        else:
            torch.backends.cuda.matmul.allow_tf32 = self.v.tf32
            torch.backends.cudnn.allow_tf32 = self.v.tf32

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        x = normalize_batch(images)
        if self.v.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.v.amp, enabled=self.v.amp is not None):
            emb = self.forward(x)
        loss = self.head(emb.float(), labels).loss
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())  # the trainer syncs on the loss every step too


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return float("nan")


def _load() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_model(name: str, specs: list, args, device: torch.device, batch: int, steps: int, log) -> dict:
    torch.manual_seed(0)
    kw = {"width_mult": args.width_mult} if args.width_mult != 1.0 and name != "iresnet50" else {}
    backbone = build_backbone(name, input_size=args.input_size, **kw)
    head = build_head("arcface", backbone.embedding_size, args.classes)
    macs = count_macs(backbone)
    variants = [parse_variant(s) for s in specs]
    default_threads = torch.get_num_threads()
    images = torch.randint(0, 256, (batch, 3, args.input_size, args.input_size), dtype=torch.uint8).to(device)
    labels = torch.randint(0, args.classes, (batch,)).to(device)
    runners = []
    for v in variants:
        r = Runner(v, backbone, head, device, args.clip)
        r.enter()
        t0 = time.perf_counter()
        r.step(images, labels)  # compiles here
        _sync(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(max(args.warmup - 1, 0)):
            r.step(images, labels)
        _sync(device)
        if v.compile:
            v.compile_seconds = round(first - (time.perf_counter() - t0) / max(args.warmup - 1, 1), 1)
        torch.set_num_threads(default_threads)
        runners.append(r)
        log(f"{name}: {v.name} warmed up ({first:.1f} s first step)")
    load_start = _load()
    for rnd in range(args.rounds):
        order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]  # rotate: no fixed position
        for r in order:
            r.enter()
            _sync(device)
            f0, t0 = _faults(), time.perf_counter()
            for _ in range(steps):
                r.step(images, labels)
            _sync(device)
            dt = (time.perf_counter() - t0) / steps
            r.v.times.append(dt)
            r.v.faults.append((_faults() - f0) // steps)
            torch.set_num_threads(default_threads)
        log(f"{name}: round {rnd + 1}/{args.rounds} done, load {_load()}")
    if device.type == "cpu":
        malloc.keep_freed_memory(False)
    base = variants[0]
    flops_per_image = 6 * (macs + backbone.embedding_size * args.classes)  # 2 FLOPs/MAC x 3 (fwd + bwd)
    results = {}
    for v in variants:
        med = statistics.median(v.times)
        ratios = [b / t for b, t in zip(base.times, v.times)]
        row = {"step_s_median": round(med, 3), "images_per_s": round(batch / med, 1),
               "speedup_vs_baseline": round(statistics.median(ratios), 2),
               "step_s_min": round(min(v.times), 3), "images_per_s_best": round(batch / min(v.times), 1),
               "speedup_best": round(min(base.times) / min(v.times), 2),
               "speedup_per_round": [round(x, 2) for x in ratios],
               "step_s_per_round": [round(x, 3) for x in v.times],
               "minor_faults_per_step": int(statistics.median(v.faults)),
               "gflops_per_s": round(batch * flops_per_image / med / 1e9, 1)}
        if v.compile_seconds is not None:
            row["compile_s"] = v.compile_seconds
        if device.type == "cuda":
            peak = args.peak_tflops or _gpu_peak(v)
            if peak:
                row["fraction_of_peak"] = round(batch * flops_per_image / med / (peak * 1e12), 4)
                row["peak_tflops_assumed"] = peak
        results[v.name] = row
    return {"model": name, "input_size": args.input_size, "batch": batch, "classes": args.classes,
            "width_mult": kw.get("width_mult", 1.0), "steps_per_round": steps, "rounds": args.rounds,
            "backbone_gmacs_per_image": round(macs / 1e9, 3), "load_average_start": load_start,
            "load_average_end": _load(), "rss_gb_end": round(_rss_gb(), 2), "results": results}


def _gpu_peak(v: Variant) -> float | None:
    name = torch.cuda.get_device_name()
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(v.amp, "tf32" if v.tf32 else "fp32")
            return peaks[kind]
    return None


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = getattr(torch, "cpu", None)
    for flag, fn in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported")):
        check = getattr(cpu, fn, None)
        if check is not None:
            info[flag] = bool(check())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(out: dict) -> str:
    lines = []
    for run in out["runs"]:
        lines.append(f"\n{run['model']} {run['input_size']} px, batch {run['batch']}, {run['classes']} classes "
                     f"(load {run['load_average_start']} -> {run['load_average_end']})\n")
        lines.append("| variant | step s (median) | images/s | speed-up (median of per-round) | best step s | "
                     "speed-up (best rounds) | faults/step |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, r in run["results"].items():
            extra = f" (compile {r['compile_s']} s)" if "compile_s" in r else ""
            lines.append(f"| {name}{extra} | {r['step_s_median']} | {r['images_per_s']} | "
                         f"{r['speedup_vs_baseline']}x | {r['step_s_min']} | {r['speedup_best']}x | "
                         f"{r['minor_faults_per_step']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--backbone", default="mbf")
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--batch", type=int, help="default 64 on CPU, 128 on CUDA")
    p.add_argument("--classes", type=int, default=10000)
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--steps", type=int, help="timed steps per variant per round (default 2 CPU, 20 CUDA)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (the first compiles)")
    p.add_argument("--variants", nargs="+", help="default: every CPU (or CUDA) variant; the first is the baseline")
    p.add_argument("--iresnet-batch", type=int, default=0,
                   help="also time iresnet50 at this batch, 1 step per round (0: skip)")
    p.add_argument("--peak-tflops", type=float, help="CUDA: the GPU's peak for the fraction-of-peak column")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="reuse inductor's on-disk cache (default: a fresh one, so compile_s is a cold compile)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if not args.warm_compile_cache:
        cache = tempfile.mkdtemp(prefix="inductor-cold-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    flushed = hardware.flush_denormals()  # as the Trainer does (MARGINFACE_FLUSH_DENORMALS=0: off)
    cuda = device.type == "cuda"
    specs = args.variants or (CUDA_VARIANTS if cuda else CPU_VARIANTS)
    batch = args.batch or (128 if cuda else 64)
    steps = args.steps or (20 if cuda else 2)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    out = {"machine": {**machine_info(device), "isa": hardware.isa_key(), "flush_denormals": flushed},
           "command": " ".join(sys.argv), "runs": []}
    out["runs"].append(run_model(args.backbone, specs, args, device, batch, steps, log))
    if args.iresnet_batch:
        ir_specs = IRESNET_VARIANTS if not cuda else ["tf32", "bf16+cl"]
        out["runs"].append(run_model("iresnet50", ir_specs, args, device, args.iresnet_batch, 1, log))
    print(json.dumps(out, indent=1))
    if args.markdown:
        print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
