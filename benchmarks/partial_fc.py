"""Classifier memory and step time per rank: full FC (data parallel) vs Partial FC; prints JSON.

Two gloo ranks on the CPU (one thread each); the backbone is replaced by random embeddings
(a leaf tensor, so the backward still computes the embedding gradient a backbone would need,
including Partial FC's all-gather backward). What is measured is the classifier alone:

- ``full_fc_dp``: the classic data-parallel classifier: every rank holds all C classes, computes
  its local batch's logits over all of them, and all-reduces the C×D weight gradient (as DDP would).
- ``pfc``: Partial FC at ``sample_rate`` 1.0 (pure model parallel), 0.3 and 0.1: rank r holds C/W
  classes, all-gathers the global batch, and computes logits for the sampled classes only.

Per configuration (fresh processes each, so peak RSS is that configuration's): step time
(forward + backward + communication + SGD step with momentum), the classifier's parameter
memory (weights, gradient, momentum), its activation memory (the bytes autograd saves for the
backward of the head), the logit compute (GFLOP of the cosine matmul per step, forward) and the
peak RSS of the rank.

    python benchmarks/partial_fc.py [--classes 100000 1000000] [--embedding-size 512]
                                    [--batch-size 64] [--steps 3] [--rates 1.0 0.3 0.1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from marginface.heads import Classifier, build_margin
from marginface.heads.partial_fc import PartialFC

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _saved_bytes(fn):
    """Run fn() and return (its result, bytes of the distinct storages autograd saved for backward)."""
    seen: dict = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _worker(rank: int, port: int, cfg: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        c, d, b = cfg["classes"], cfg["embedding_size"], cfg["batch_size"]
        torch.manual_seed(1234)
        if cfg["mode"] == "full_fc_dp":
            head = Classifier(d, c, build_margin("arcface"))
        else:
            head = PartialFC(d, c, build_margin("arcface"), sample_rate=cfg["sample_rate"], rank=rank,
                             world_size=WORLD, seed=0)
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        if hasattr(head, "attach_optimizer"):
            head.attach_optimizer(opt)
        g = torch.Generator().manual_seed(rank)
        times, act, cols = [], 0, 0
        for step in range(cfg["steps"] + 1):  # step 0 warms up (allocations, first-touch)
            emb = torch.randn(b, d, generator=g).requires_grad_()
            labels = torch.randint(0, c, (b,), generator=g)
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if hasattr(head, "begin_step"):
                head.begin_step(step)
            out, saved = _saved_bytes(lambda: head(emb, labels))
            out.loss.backward()
            if cfg["mode"] == "full_fc_dp":  # what DDP does for a replicated classifier
                dist.all_reduce(head.weight.grad)
                head.weight.grad.div_(WORLD)
            opt.step()
            dist.barrier()
            if step:
                times.append(time.perf_counter() - t0)
            act, cols = max(act, saved), out.logits.shape[1]
        rows = b if cfg["mode"] == "full_fc_dp" else b * WORLD  # logits rows: local vs global batch
        mom = opt.state[head.weight].get("momentum_buffer")
        result = {
            **cfg,
            "step_ms": 1000 * sum(times) / len(times),
            "images_per_second": b * WORLD * len(times) / sum(times),
            "columns": cols,
            "logit_rows": rows,
            "logit_gflop": 2 * rows * cols * d / 1e9,
            "weights_mb": head.weight.numel() * head.weight.element_size() / 2 ** 20,
            "grad_mb": head.weight.numel() * head.weight.element_size() / 2 ** 20,  # dense, shard-sized
            "momentum_mb": (mom.numel() * mom.element_size() / 2 ** 20) if mom is not None else 0.0,
            "activation_mb": act / 2 ** 20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run(cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.json")
        mp.spawn(_worker, args=(_free_port(), cfg, path), nprocs=WORLD, join=True)
        with open(path) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--embedding-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64, help="per rank")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    args = ap.parse_args()
    results = []
    for c in args.classes:
        base = {"classes": c, "embedding_size": args.embedding_size, "batch_size": args.batch_size,
                "steps": args.steps}
        full = run({**base, "mode": "full_fc_dp", "sample_rate": 1.0})
        results.append(full)
        for rate in args.rates:
            r = run({**base, "mode": "pfc", "sample_rate": rate})
            r["logit_compute_vs_full"] = r["logit_gflop"] / full["logit_gflop"]
            r["activation_vs_full"] = r["activation_mb"] / full["activation_mb"]
            r["speedup_vs_full"] = full["step_ms"] / r["step_ms"]
            results.append(r)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "threads_per_rank": 1, "world_size": WORLD, "backend": "gloo", "torch": torch.__version__,
               "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            machine["cpu"] = names[0]
    except OSError:
        pass
    print(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
