"""Training-loader throughput (images/s) over a RecordIO pack and an image folder; prints JSON.

Builds both in a temp dir from synthetic faces (112x112 JPEG q95), then times the full path the
trainer uses: read + decode + random flip in DataLoader workers -> uint8 batch -> normalize_batch.
Also times each step in one process, to show what limits the loader.

    python benchmarks/data_throughput.py [--images 4000] [--batch-size 128] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from marginface.data.dataset import FaceDataset, normalize_batch
from marginface.data.images import decode_image
from marginface.data.recordio import RecordIOSource, write_pack
from marginface.data.sources import FolderSource


def face_images(count: int, identities: int) -> tuple[list[np.ndarray], list[int]]:
    """Synthetic faces when that module is there, else smooth random images (similar JPEG sizes)."""
    per_identity = max(1, count // identities)
    try:
        from marginface.data.synthetic import SyntheticSource

        source = SyntheticSource(identities, per_identity, image_size=112, seed=0)
        return [source.read(i) for i in range(len(source))], source.labels.tolist()
    except ImportError:
        rng = np.random.default_rng(0)
        images = [
            cv2.resize(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_CUBIC)
            for _ in range(identities * per_identity)
        ]
        return images, [i // per_identity for i in range(len(images))]


def build(root: Path, count: int, identities: int) -> tuple[Path, Path, float]:
    images, labels = face_images(count, identities)
    encoded = [cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for im in images]
    write_pack(root / "pack", zip(encoded, labels), identities, (112, 112))
    for k, (data, label) in enumerate(zip(encoded, labels)):
        folder = root / "folder" / f"id{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{k:06d}.jpg").write_bytes(data)
    return root / "pack", root / "folder", float(np.mean([len(e) for e in encoded]))


def loader_rate(source: Any, workers: int, batch_size: int, epochs: int) -> float:
    dataset = FaceDataset(source, flip=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
    )
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    count, start = 0, time.perf_counter()
    for epoch in range(epochs):
        for images, _ in (it if epoch == 0 else loader):
            normalize_batch(images)
            count += images.shape[0]
    return count / (time.perf_counter() - start)


def step_costs(source: RecordIOSource, n: int = 500, repeats: int = 3) -> dict[str, float]:
    """Microseconds per image of each step in this process (best of ``repeats``, no DataLoader)."""
    idx = np.random.default_rng(0).permutation(len(source))[:n].tolist()
    blobs = [source.read_bytes(i) for i in idx]
    images = [decode_image(b, "bench") for b in blobs]
    tensors = [torch.from_numpy(np.ascontiguousarray(im[:, ::-1].transpose(2, 0, 1))) for im in images]
    batch = torch.stack(tensors[:128])
    steps = {
        "read_record_us": (lambda: [source.read_bytes(i) for i in idx], n),
        "jpeg_decode_to_rgb_us": (lambda: [decode_image(b, "bench") for b in blobs], n),
        "flip_to_chw_tensor_us": (lambda: [torch.from_numpy(np.ascontiguousarray(im[:, ::-1].transpose(2, 0, 1))) for im in images], n),
        "collate_us": (lambda: torch.stack(tensors[:128]), 128),
        "normalize_batch_cpu_us": (lambda: normalize_batch(batch), 128),
    }
    costs = {}
    for name, (step, count) in steps.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
        costs[name] = round(best * 1e6 / count, 1)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--identities", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collates/normalises; keep it off the workers' cores
    with tempfile.TemporaryDirectory() as tmp:
        pack, folder, jpeg_bytes = build(Path(tmp), args.images, args.identities)
        sources = {"recordio": RecordIOSource(pack / "train.rec"), "folder": FolderSource(folder)}
        result: dict[str, Any] = {
            "images": len(sources["recordio"]), "image_size": 112, "mean_jpeg_bytes": round(jpeg_bytes),
            "batch_size": args.batch_size, "cpu_count": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "images_per_s": {},
            "step_costs_us_per_image": step_costs(sources["recordio"]),
        }
        for name, source in sources.items():
            for workers in args.workers:
                rate = loader_rate(source, workers, args.batch_size, args.epochs)
                result["images_per_s"][f"{name}_workers{workers}"] = round(rate)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
