"""`marginface viz`: 2-D features of a few identities, softmax vs softmax + center loss."""
from __future__ import annotations

from marginface.cli.options import print_json, stderr_log

# deferred: startup time. The visualisation (torch, matplotlib) is imported when the command runs.


def register(sub) -> None:
    v = sub.add_parser("viz", help="2-D features of a few identities: softmax vs softmax + center loss (PNG/GIF)",
                       description="Train a 2-D embedding on a few synthetic identities twice (same weights and "
                                   "batches): plain softmax, then softmax + center loss; plot how they separate.")
    v.add_argument("--out", required=True, help="output directory (PNGs, GIFs with --gif, viz.json)")
    v.add_argument("--identities", type=int, default=10, help="number of synthetic identities")
    v.add_argument("--images", type=int, default=24, help="images per identity")
    v.add_argument("--steps", type=int, default=240, help="training steps of each run")
    v.add_argument("--batch-size", type=int, default=64, help="images per step")
    v.add_argument("--input-size", type=int, default=32, help="image side in pixels")
    v.add_argument("--lr", type=float, default=0.1, help="learning rate")
    v.add_argument("--center-weight", type=float, default=0.3, help="lambda of softmax + lambda * center loss")
    v.add_argument("--seed", type=int, default=0, help="random seed")
    v.add_argument("--gif", action="store_true", help="also write an animated GIF of the features during training")
    v.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    v.set_defaults(func=run)


def run(args) -> int:
    from marginface.viz import VizOptions, run_viz

    options = VizOptions(identities=args.identities, images_per_identity=args.images, steps=args.steps,
                         batch_size=args.batch_size, input_size=args.input_size, lr=args.lr,
                         center_weight=args.center_weight, seed=args.seed)
    summary = run_viz(args.out, options, gif=args.gif, log=stderr_log(args))
    if args.json:
        print_json(summary)
    else:
        for name, run_ in summary["runs"].items():
            print(f"{name:15s} compactness {run_['compactness']:.3f}  {', '.join(run_['files'])}")
        print(f"side by side: {summary['comparison']}")
    return 0
