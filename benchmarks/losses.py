"""Train the same backbone for the same budget with each loss on synthetic identities.

Prints one JSON object (per loss: held-out 10-fold accuracy, AUC, TAR@FAR=1e-3, seconds) and, with
--markdown, the table for docs/losses.md. Usage:
    python benchmarks/losses.py [--steps 300] [--markdown] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from marginface.train.runconfig import load_config
from marginface.train.trainer import Trainer

VARIANTS = {
    "softmax": ["head.loss=softmax"],
    "plain_softmax (un-normalised)": ["head.loss=plain_softmax"],
    "sphereface": ["head.loss=sphereface"],
    "cosface": ["head.loss=cosface"],
    "arcface": ["head.loss=arcface"],
    "combined": ["head.loss=combined"],
    "sv_softmax": ["head.loss=sv_softmax"],
    "sv_softmax (cosface base)": ["head.loss=sv_softmax", "head.params={base: cosface}"],
    "focal + arcface": ["head.loss=arcface", "head.focal_gamma=2"],
    "softmax + center": ["head.loss=softmax", "head.center_weight=0.01"],
    "sub-center arcface (K=3)": ["head.loss=arcface", "head.num_subcenters=3"],
    "curricularface": ["head.loss=curricularface"],
    "adaface": ["head.loss=adaface"],
    "magface": ["head.loss=magface"],
    "pair_bce": ["head.loss=pair_bce", "data.samples_per_identity=4"],
    "triplet": ["head.loss=triplet", "head.params={}", "data.samples_per_identity=4"],
    "contrastive": ["head.loss=contrastive", "head.params={}", "data.samples_per_identity=4"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--identities", type=int, default=300)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these rows")
    args = ap.parse_args()
    base = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=128",
            f"data.synthetic.identities={args.identities}", "data.synthetic.images_per_identity=10",
            "data.synthetic.val_identities=200", "data.synthetic.val_images_per_identity=5",
            "data.synthetic.val_pairs=3000", "train.batch_size=64", f"train.max_steps={args.steps}",
            "schedule.warmup_steps=20", "eval.every=0"]
    results = {}
    for name, extra in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        t = time.time()
        with tempfile.TemporaryDirectory() as run_dir:
            report = Trainer(load_config(None, base + extra), run_dir, console=False).fit()
        m = report["eval"]["synthetic"]
        results[name] = {"accuracy": round(m["accuracy"], 4), "auc": round(m["auc"], 4),
                         "tar@1e-3": round(m["tar_at_far"].get("1e-3", float("nan")), 4),
                         "seconds": round(time.time() - t, 1)}
    out = {"setup": {"backbone": "mbf x0.25 @32px", "steps": args.steps, "batch": 64,
                     "train_identities": args.identities, "val_pairs": 3000}, "results": results}
    print(json.dumps(out))
    if args.markdown:
        print("\n| loss | accuracy | AUC | TAR@FAR=1e-3 | seconds |\n|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['accuracy']:.4f} | {r['auc']:.4f} | {r['tar@1e-3']:.4f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
