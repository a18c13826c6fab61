"""The `marginface` command: parses arguments, calls the library, prints. No logic of its own.

Every subcommand has --help; --json prints exactly one JSON object on stdout; bad input prints one
line `error: ...` on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from marginface.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `error:` line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ---------------------------------------------------------------------------------------------- train
def _pick_run_dir(out: str | None, name: str, resume: bool) -> Path:
    """``--out`` as given; otherwise runs/<name> (a fresh -2, -3... when it already holds a run).

    With --resume and no --out, the newest runs/<name>* that has a last checkpoint.
    """
    if out:
        return Path(out)
    root = Path("runs")
    if resume:
        cands = sorted((p for p in root.glob(f"{name}*") if (p / "checkpoints" / "last.pt").is_file()),
                       key=lambda p: (p / "checkpoints" / "last.pt").stat().st_mtime)
        if not cands:
            raise UserError(f"--resume: no run of {name!r} with checkpoints/last.pt under {root}/ (use --out RUN_DIR)")
        return cands[-1]
    path, k = root / name, 1
    while path.exists() and any(path.iterdir()):
        k += 1
        path = root / f"{name}-{k}"
    return path


def cmd_train(args) -> int:
    from marginface.config import dump_yaml, load_config
    from marginface.train.trainer import Trainer

    config_path = args.config
    if args.resume and not config_path and args.out and (Path(args.out) / "config.yaml").is_file():
        config_path = str(Path(args.out) / "config.yaml")  # resume with the run's own resolved config
    cfg = load_config(config_path, args.set or [])
    if args.resume and not args.config and not args.out:
        run_dir = _pick_run_dir(None, cfg.name, True)
        cfg = load_config(str(run_dir / "config.yaml"), args.set or [])
    else:
        run_dir = _pick_run_dir(args.out, cfg.name, args.resume)
    if args.dry_run:
        return _dry_run(cfg, run_dir, args.json)
    trainer = Trainer(cfg, run_dir, resume=args.resume, console=not args.json)
    try:
        report = trainer.fit()
    except KeyboardInterrupt:
        print(f"interrupted: state saved in {run_dir}/checkpoints/last.pt; continue with "
              f"marginface train --out {run_dir} --resume", file=sys.stderr)
        return 130
    if args.json:
        _print_json({"run_dir": str(run_dir), **report})
    else:
        print(f"run directory: {run_dir}")
    return 0


def _dry_run(cfg, run_dir: Path, as_json: bool) -> int:
    """Resolved config, data summary, parameter count, classifier memory, first batch shapes."""
    import torch

    from marginface.config import dump_yaml, to_dict
    from marginface.models import count_parameters
    from marginface.train import setup

    source = setup.build_train_source(cfg.data, cfg.model.input_size)
    backbone = setup.build_model(cfg.model)
    n = min(cfg.train.batch_size, len(source))
    first = torch.stack([torch.from_numpy(source.read(i)).permute(2, 0, 1) for i in range(n)])
    with torch.inference_mode():
        emb = backbone.eval()(first[:2].float() / 127.5 - 1.0)
    summary = {
        "run_dir": str(run_dir), "config": to_dict(cfg), "data": source.describe(),
        "images": len(source), "identities": source.num_classes,
        "backbone_params": count_parameters(backbone),
        "classifier_mb": source.num_classes * cfg.model.embedding_size * 4 / 2**20,
        "first_batch": {"images": list(first.shape), "embeddings": [n, emb.shape[1]]},
    }
    if as_json:
        _print_json(summary)
    else:
        print(dump_yaml(cfg))
        for k, v in summary.items():
            if k != "config":
                print(f"{k}: {v}")
    return 0


# ---------------------------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from marginface.data.verification import load_pair_set
    from marginface.evaluate.runner import evaluate_sets
    from marginface.train.checkpoint import load_backbone
    from marginface.train.loggers import format_table

    model = load_backbone(args.model)
    sets = [load_pair_set(p, image_size=model.input_size) for p in args.sets]
    normalize = args.normalize or getattr(model, "normalize", "arcface")
    results = evaluate_sets(model, sets, flip=not args.no_flip, batch_size=args.batch_size, normalize=normalize)
    if args.json:
        _print_json(results)
    else:
        print(format_table(results))
    return 0


# ---------------------------------------------------------------------------------------------- data
def cmd_data_synth(args) -> int:
    from marginface.data.synthetic import write_synthetic

    info = write_synthetic(args.out, identities=args.identities, images_per_identity=args.images,
                           image_size=args.size, seed=args.seed, fmt=args.format)
    if args.json:
        _print_json(info)
    else:
        print(f"wrote {info['images']} images of {info['identities']} identities to {info['path']} ({info['format']})")
    return 0


def cmd_data_inspect(args) -> int:
    from marginface.data.tools import inspect_path

    info = inspect_path(args.path)
    if args.json:
        _print_json(info)
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def cmd_data_convert(args) -> int:
    from marginface.data.tools import convert

    info = convert(args.src, args.dst, image_size=args.size)
    _print_json(info) if args.json else print(f"converted {args.src} -> {args.dst}: {info}")
    return 0


def cmd_data_align(args) -> int:
    from marginface.data.detect import build_detector
    from marginface.data.tools import align_folder

    detector = build_detector(args.detector, **({"weights_dir": args.weights} if args.weights else {}))
    info = align_folder(args.src, args.dst, detector, size=args.size)
    if args.json:
        _print_json(info)
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def cmd_data_get_detector(args) -> int:
    from marginface.data.detect.weights import fetch_mtcnn_weights

    path = fetch_mtcnn_weights(args.cache_dir)
    _print_json({"path": str(path)}) if args.json else print(f"MTCNN weights ready in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="marginface", description="Train, evaluate and ship margin-softmax face recognition models.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)

    t = sub.add_parser("train", help="train a model (no arguments: the built-in synthetic recipe)")
    t.add_argument("--config", help="YAML or .py config file (default: built-in synthetic_mbf)")
    t.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="override config keys, e.g. optim.lr=0.05")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config, data and model summary, then exit")
    t.add_argument("--json", action="store_true", help="print the final report as one JSON object")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model on verification sets")
    e.add_argument("--model", required=True, help="run directory, checkpoint (.pt)")
    e.add_argument("--sets", nargs="+", required=True, help=".bin files, LFW directories (with pairs.txt), pairs .csv")
    e.add_argument("--no-flip", action="store_true", help="do not add the flipped image's embedding")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--normalize", choices=["arcface", "imagenet"], help="input normalisation (default: the model's)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("data", help="make, inspect and convert datasets")
    dsub = d.add_subparsers(dest="data_command", parser_class=_Parser, required=True)
    s = dsub.add_parser("synth", help="write synthetic identities to disk")
    s.add_argument("out", help="output directory")
    s.add_argument("--identities", type=int, default=100)
    s.add_argument("--images", type=int, default=10, help="images per identity")
    s.add_argument("--size", type=int, default=112)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=["folder", "rec"], default="folder", help="image folder or insightface RecordIO")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_data_synth)
    i = dsub.add_parser("inspect", help="summarise a training source or a verification set")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_data_inspect)
    c = dsub.add_parser("convert", help="folder/list -> RecordIO pack; RecordIO -> folder; .bin -> images + pairs.csv")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--size", type=int, help="resize images to SIZE x SIZE")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_data_convert)
    a = dsub.add_parser("align", help="detect and align every photo under SRC into 112x112 crops under DST")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--detector", choices=["mtcnn", "retinaface"], default="mtcnn")
    a.add_argument("--weights", help="detector weights directory (default: the cache filled by get-detector)")
    a.add_argument("--size", type=int, default=112)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_data_align)
    g = dsub.add_parser("get-detector", help="download the MTCNN weights (facenet-pytorch wheel via pip) into a cache")
    g.add_argument("--cache-dir", help="default: ~/.cache/marginface/mtcnn")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_data_get_detector)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
