"""Load test of `marginface serve` on loopback; prints one JSON object.

Starts the server in a child process (uvicorn, a fresh gallery with a few identities), then for
``--duration`` seconds (and at most ``--max-requests``) ``--clients`` threads send verify and
search requests (alternating, photos of ``pairs.csv``) while one more thread enrolls a new identity
at a time. Reports requests/s, p50/p99 latency per endpoint, errors (must be 0), and the gallery's
final count against the enrolments that were answered 200 (nothing lost).

The same request mix is also run in this process without HTTP (the same `FaceEmbedder` calls,
the server's concurrency and threads) for ``--baseline-seconds``, and `marginface bench` times the
network alone for the same model and threads: ``served_over_inprocess`` is the share of the
pipeline's throughput that survives the HTTP layer; ``bench`` says what the network alone could do
(a request also runs face detection on a full photo, which bench does not time).

    python benchmarks/serve_load.py --clients 8 --duration 60 [--threads 1] [--concurrency 2]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from marginface.data.images import decode_image
from marginface.deploy.bench import bench
from marginface.deploy.embedder import FaceEmbedder
from marginface.deploy.gallery_store import GalleryStore
from marginface.serve.app import default_concurrency

DATA = Path(os.environ.get("MARGINFACE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    v = np.array(values) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(v, 50)), 1),
            "p99_ms": round(float(np.percentile(v, 99)), 1)}


def start_server(args, gallery: Path, port: int) -> subprocess.Popen:
    code = ("import sys, json; from marginface.serve import run; a = json.loads(sys.argv[1]); "
            "run(a.pop('model'), a.pop('gallery'), port=a.pop('port'), log_level='warning', **a)")
    spec = {"model": args.model, "gallery": str(gallery), "port": port, "normalize": args.normalize,
            "detector_weights": args.detector_weights, "threads": args.threads, "concurrency": args.concurrency}
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)])


def wait_up(base: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with {proc.returncode}")
        try:
            return httpx.get(base + "/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("error: the server did not start")


def load(base: str, pairs: list, photos: dict, args) -> dict:
    stop_at = time.monotonic() + args.duration
    budget = [args.max_requests]
    lock = threading.Lock()
    lat: dict = {"verify": [], "search": [], "enroll": []}
    errors: list = []
    enrolled: list = []

    def take() -> bool:
        with lock:
            if budget[0] <= 0 or time.monotonic() >= stop_at:
                return False
            budget[0] -= 1
            return True

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        with httpx.Client(base_url=base, timeout=120) as c:
            step = k
            while take():
                a, b = pairs[rng.integers(len(pairs))]
                t = time.perf_counter()
                if step % 2 == 0:
                    kind = "verify"
                    r = c.post("/verify", files={"image_a": (a, photos[a]), "image_b": (b, photos[b])})
                else:
                    kind = "search"
                    r = c.post("/gallery/search", data={"top_k": "5"}, files={"image": (a, photos[a])})
                dt = time.perf_counter() - t
                with lock:
                    (lat[kind] if r.status_code == 200 else errors).append(dt if r.status_code == 200 else
                                                                           f"{kind} {r.status_code} {r.text[:200]}")
                step += 1

    def enroller() -> None:
        names = sorted(photos)
        with httpx.Client(base_url=base, timeout=120) as c:
            n = 0
            while time.monotonic() < stop_at and n < args.max_requests:
                name = f"load-{n:05d}"
                photo = names[n % len(names)]
                t = time.perf_counter()
                r = c.post("/gallery/enroll", data={"name": name}, files={"images": (photo, photos[photo])})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200 and r.json()["added"] == 1:
                        lat["enroll"].append(dt)
                        enrolled.append(name)
                    else:
                        errors.append(f"enroll {r.status_code} {r.text[:200]}")
                n += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    threads.append(threading.Thread(target=enroller))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    served = len(lat["verify"]) + len(lat["search"])
    return {"wall_s": round(wall, 2), "requests": served + len(lat["enroll"]),
            "requests_per_s": round((served + len(lat["enroll"])) / wall, 2),
            "verify_search_per_s": round(served / wall, 2),
            "latency": {k: percentiles(v) for k, v in lat.items()},
            "all_latency": percentiles(lat["verify"] + lat["search"] + lat["enroll"]),
            "errors": len(errors), "error_samples": errors[:5], "enrolled": enrolled}


def inprocess(args, pairs: list, photos_dir: Path, gallery: Path, concurrency: int) -> dict:
    """The same verify/search mix on one `FaceEmbedder`, ``concurrency`` threads, no HTTP."""
    if args.threads:
        torch.set_num_threads(args.threads)
    fe = FaceEmbedder(args.model, normalize=args.normalize, detector_weights=args.detector_weights,
                      threads=args.threads)
    store = GalleryStore(gallery)
    templates = store.snapshot()
    stop_at = time.monotonic() + args.baseline_seconds
    done = [0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        step = k
        while time.monotonic() < stop_at:
            a, b = pairs[rng.integers(len(pairs))]
            if step % 2 == 0:
                fa, fb = fe.detect(decode_image((photos_dir / a).read_bytes(), a))[0], \
                    fe.detect(decode_image((photos_dir / b).read_bytes(), b))[0]
                fe.embed_crops(np.stack([fa.crop, fb.crop]))
            else:
                q = fe.embed_crops(fe.detect(decode_image((photos_dir / a).read_bytes(), a))[0].crop[None])[0]
                templates.matches(q, 5)
            step += 1
            with lock:
                done[0] += 1

    t0 = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    store.close()
    return {"requests": done[0], "wall_s": round(wall, 2), "requests_per_s": round(done[0] / wall, 2),
            "concurrency": concurrency}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DATA / "weights/mobilefacenet_onnx/MobileFaceNet.onnx"))
    p.add_argument("--normalize", default="imagenet")
    p.add_argument("--detector-weights", default=str(DATA / "weights/mtcnn"))
    p.add_argument("--photos", default=str(DATA / "photos/deepface"), help="folder with pairs.csv")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--baseline-seconds", type=float, default=None, help="in-process run (default: --duration)")
    p.add_argument("--threads", type=int, default=1, help="torch/ONNX Runtime threads per request")
    p.add_argument("--concurrency", type=int, default=None, help="requests running the model at once "
                                                                  "(default: cores / threads)")
    p.add_argument("--no-bench", action="store_true", help="skip `marginface bench`")
    args = p.parse_args()
    args.baseline_seconds = args.duration if args.baseline_seconds is None else args.baseline_seconds
    concurrency = args.concurrency or default_concurrency(args.threads)
    photos_dir = Path(args.photos)
    with open(photos_dir / "pairs.csv", newline="") as f:
        pairs = [(r["file_x"], r["file_y"]) for r in csv.DictReader(f)][:40]
    photos = {name: (photos_dir / name).read_bytes() for pair in pairs for name in pair}
    result: dict = {"clients": args.clients, "duration_s": args.duration, "threads": args.threads,
                    "concurrency": concurrency, "cpu_count": os.cpu_count(), "photos": len(photos),
                    "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="marginface-serve-load-") as work:
        gallery = Path(work) / "g.sqlite"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_server(args, gallery, port)
        try:
            health = wait_up(base, proc)
            result["model"] = health["model"]
            seed = sorted({a for a, _ in pairs})[:5]
            with httpx.Client(base_url=base, timeout=120) as c:
                for k, photo in enumerate(seed):
                    r = c.post("/gallery/enroll", data={"name": f"seed-{k}"}, files={"images": (photo, photos[photo])})
                    r.raise_for_status()
            served = load(base, pairs, photos, args)
            final = httpx.get(base + "/gallery", timeout=60).json()
        finally:
            proc.terminate()
            proc.wait(30)
        names = {x["identity"] for x in final["identities"]}
        lost = [n for n in served.pop("enrolled") if n not in names]
        served.update(gallery_final=final["count"], enrolls_answered=served["latency"]["enroll"]["n"],
                      expected_final=len(seed) + served["latency"]["enroll"]["n"], lost_enrolls=len(lost))
        result["served"] = served
        result["inprocess"] = inprocess(args, pairs, photos_dir, gallery, concurrency)
    result["served_over_inprocess"] = round(served["verify_search_per_s"] / max(1e-9, result["inprocess"]["requests_per_s"]), 3)
    if not args.no_bench:
        b = bench(args.model, runtimes=("onnxruntime",), threads=args.threads, normalize=args.normalize,
                  max_seconds=4.0)
        ips = b["throughput_ips"].get("onnxruntime")
        passes = 3.0  # network passes per request: verify 2 crops, search 1, each with its mirror -> (4 + 2) / 2
        result["bench"] = {"throughput_ips": ips, "latency_ms": b["latency_ms"].get("onnxruntime"),
                           "network_passes_per_request": passes,
                           "requests_per_s_if_network_only": None if not ips else round(ips / passes, 1)}
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
