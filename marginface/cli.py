"""The `marginface` command: parses arguments, calls the library, prints. No logic of its own.

Every subcommand has --help; --json prints exactly one JSON object on stdout; bad input prints one
line `error: ...` on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from marginface.errors import UserError
from marginface.jsonout import dumps

# deferred: every command imports the modules it runs inside its own function, so `--help`, a
# usage error and the light commands (data inspect, gallery list, ...) start without loading
# torch, OpenCV or the deployment stack, and a broken optional dependency only breaks the
# commands that use it. The other modules import each other at the top.


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `error:` line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _print_json(obj) -> None:
    """The one place --json output is printed: always valid JSON (NaN/inf become null, numpy
    values plain numbers; ``allow_nan=False`` makes a stray non-finite number fail here, loudly)."""
    print(dumps(obj))


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


def _run_config(run_dir: Path, checkpoint, overrides: list):
    """The config of the run being resumed: its config.yaml; when that is empty or unreadable (a kill while
    it was written by an older version), the config saved in the checkpoint, with a note."""
    from marginface.config import config_from_dict, load_config, read_config_file
    from marginface.train import rundir

    path = run_dir / "config.yaml"
    if not path.is_file():
        if checkpoint is None:
            return load_config(None, overrides)  # killed before it was written: nothing trained either
        problem = "is missing"
    else:
        try:
            problem = "" if read_config_file(str(path)) else "is empty"
        except UserError as exc:
            problem = f"is unreadable ({exc})"
        if not problem:
            return load_config(str(path), overrides)
    saved = (rundir.peek(checkpoint) or {}).get("config") if checkpoint is not None else None
    if not saved:
        where = f" nor a config in {checkpoint}" if checkpoint is not None else " and no checkpoint holds one"
        raise UserError(f"--resume: {path} {problem}{where}; pass the run's config with --config")
    _note(f"{path} {problem}; resuming with the config saved in {checkpoint}")
    return config_from_dict(saved, overrides, where=f"{checkpoint}: ")


def cmd_train(args) -> int:
    from marginface.config import load_config
    from marginface.train import rundir
    from marginface.train.trainer import Trainer

    overrides = args.set or []
    resume_from = Path(args.resume_from) if args.resume_from else None
    resume = args.resume or resume_from is not None
    if args.overwrite and resume:
        raise UserError("--overwrite starts the run afresh; it cannot be combined with --resume/--resume-from")
    if resume:
        if resume_from is not None:
            if not resume_from.is_file():
                raise UserError(f"--resume-from {resume_from}: checkpoint not found")
            if not args.out and resume_from.parent.name != "checkpoints":
                raise UserError(f"--resume-from {resume_from}: name the run directory to continue with --out")
            run_dir = Path(args.out) if args.out else resume_from.parent.parent
        elif args.out:
            run_dir = Path(args.out)
        else:  # the newest run of this config's name
            run_dir = _pick_run_dir(None, load_config(args.config, overrides).name, True)
        checkpoint = resume_from or rundir.resume_checkpoint(run_dir)  # refuses: checkpoints but no last.pt
        cfg = load_config(args.config, overrides) if args.config else _run_config(run_dir, checkpoint, overrides)
    else:
        cfg = load_config(args.config, overrides)
        run_dir = _pick_run_dir(args.out, cfg.name, False)
        rundir.require_fresh(run_dir, args.overwrite, dry_run=True)  # refuse now; the trainer clears it
    if args.dry_run:
        return _dry_run(cfg, run_dir, args.json)
    try:
        trainer = Trainer(cfg, run_dir, resume=resume, resume_from=resume_from, overwrite=args.overwrite,
                          console=not args.json)
        report = trainer.fit()
    except KeyboardInterrupt:
        last = run_dir / "checkpoints" / "last.pt"
        info = rundir.peek(last) if last.is_file() else None
        saved = f"state saved in {last} (step {info['step']})" if info else "no checkpoint was written yet"
        print(f"interrupted: {saved}; continue with marginface train --out {run_dir} --resume", file=sys.stderr)
        return 130
    if not trainer.dist.is_main:  # under torchrun only rank 0 reports
        return 0
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
    setup.build_batch_order(cfg, source)  # a batch larger than the data fails here as it would in training
    val_sets = setup.build_val_sets(cfg.data, cfg.model.input_size)  # missing or unreadable sets fail now
    from marginface.train.trainer import check_best_metric

    best_metric = check_best_metric(cfg.eval.best_metric, val_sets)
    backbone = setup.build_model(cfg.model)
    n = min(cfg.train.batch_size, len(source))
    from marginface.data.dataset import FaceDataset  # the training pipeline: decode + resize to the input size

    dataset = FaceDataset(source, image_size=cfg.model.input_size, flip=False, skip_bad=cfg.data.skip_bad_images)
    first = torch.stack([dataset[i][0] for i in range(n)])
    with torch.inference_mode():
        emb = backbone.eval()(first[:2].float() / 127.5 - 1.0)
    summary = {
        "run_dir": str(run_dir), "config": to_dict(cfg), "data": source.describe(),
        "images": len(source), "identities": source.num_classes,
        "backbone_params": count_parameters(backbone),
        "classifier_mb": source.num_classes * cfg.model.embedding_size * 4 / 2**20,
        "first_batch": {"images": list(first.shape), "embeddings": [n, emb.shape[1]]},
        "val": [{"name": ps.name, "pairs": len(ps)} for ps in val_sets], "best_metric": best_metric,
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
def _eval_device(name: str, model):
    import torch

    if not isinstance(model, torch.nn.Module):
        return torch.device("cpu")  # ONNX Runtime models run on the CPU here
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: not a device: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available")
    return device


def _eval_model_info(model) -> dict:
    import torch

    from marginface.models import count_parameters

    info = model.info
    # reports have always named an exported file's wrapper class here, not the metadata's backbone
    backbone = info.backbone if info.kind in ("checkpoint", "random") else None
    return {"backbone": backbone or type(model).__name__,
            "params": count_parameters(model) if isinstance(model, torch.nn.Module) else None,
            "embedding_size": info.embedding_size}


def _embedding_model(args) -> tuple:
    """``(model, EmbedOptions, model_info)`` from ``--model/--normalize/--device/--precision/
    --compile/--no-flip/--batch-size`` (eval, identify, embed): bf16 is autocast unless compiled;
    int8 exists only as a compiled x86 path (`marginface.deploy.compiled`), calibrated on the first
    --batch-size images."""
    import torch

    from marginface.deploy.load import load_model
    from marginface.inference import EmbedOptions

    model = load_model(args.model, normalize=args.normalize, trust_code=args.trust_code)
    device = _eval_device(args.device, model)
    if isinstance(model, torch.nn.Module):
        model.to(device)
    info = _eval_model_info(model)
    if _compiled(args):
        from marginface.deploy.compiled import CompiledEmbedder

        model, amp_dtype = CompiledEmbedder(model, args.precision, device=device), None
    else:
        amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    options = EmbedOptions(flip=not args.no_flip, batch_size=args.batch_size, device=device,
                           normalize=args.normalize, amp_dtype=amp_dtype)
    return model, options, info


def _compiled(args) -> bool:
    """Whether `_embedding_model` compiles (recorded in reports: it changes the numbers' rounding)."""
    return args.compile or args.precision == "int8"


MODEL_HELP = ("run directory, checkpoint (.pt), ONNX, TorchScript or compiled .pt2 model; TorchScript and "
              ".pt2 files run code when loaded and need --trust-code")
TRUST_CODE_HELP = ("allow TorchScript archives and compiled .pt2 packages: loading them runs the code inside "
                   "(TorchScript) or a native library (.pt2). Only for files you trust; checkpoints and ONNX "
                   "models never need it")


def _add_model_argument(parser, *, required: bool = True) -> None:
    """``--model`` and ``--trust-code``: every command that loads a model for inference."""
    parser.add_argument("--model", required=required, help=MODEL_HELP)
    _add_trust_code(parser)


def _add_trust_code(parser) -> None:
    parser.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)


def _add_embedding_options(parser) -> None:
    """How eval, identify and embed run the model: the options `_embedding_model` reads."""
    parser.add_argument("--no-flip", action="store_true", help="do not add the flipped image's embedding")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--normalize", choices=["arcface", "imagenet"], help="input normalisation (default: the model's)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                        help="bf16: autocast (faster on CPUs with AVX512-BF16/AMX and on GPUs); int8: static "
                             "x86 int8 calibrated on the first batch, always compiled (needs torchao; CPU, PyTorch "
                             "models); fp32 is the reference")
    parser.add_argument("--compile", action="store_true",
                        help="compile the model ahead of time (AOTInductor, 10-30 s once): ~1.3x faster fp32/bf16 "
                             "embedding on the CPU, worth it from a few thousand images; PyTorch models only")


def cmd_eval(args) -> int:
    from marginface.evaluate import report as rep

    if args.compare:
        if args.model or args.sets:
            raise UserError("eval --compare RUN_A RUN_B takes no --model/--sets")
        a, b = args.compare
        comparison = rep.compare_reports(rep.load_report(a), rep.load_report(b), labels=(a, b))
        if args.json:
            _print_json(comparison)
        else:
            print(rep.format_comparison(comparison))
        return 0
    if not args.model or not args.sets:
        raise UserError("eval needs --model and --sets (or --compare RUN_A RUN_B)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, options, model_info = _embedding_model(args)
    log = None if args.json else (lambda message: print(message, file=sys.stderr, flush=True))
    results, curves, sources = rep.evaluate_suite(
        model, args.sets, options=options, detector_score=not args.no_detector_score, log=log)
    out = args.out or (args.model if Path(args.model).is_dir() else None)
    written = None
    if out:
        report = rep.merge_eval(out, results, model_info=model_info, sources=sources)
        report["eval_precision"] = args.precision  # how these numbers were made
        report["eval_compiled"] = _compiled(args)
        written = rep.write_report(out, report, curves, plots=not args.no_plots)
    if args.json:
        _print_json(rep.json_safe(results))
    else:
        print(rep.format_results_table(results))
        if written:
            print(f"report: {written['report_md']}" + "".join(f", {p}" for p in written["plots"]))
    return 0


def cmd_identify(args) -> int:
    from marginface.evaluate import identification as ident

    for name, value in (("--top", args.top), ("--batch-size", args.batch_size), ("--chunk-size", args.chunk_size)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    bad = [f for f in args.fpir if not 0 < f <= 1]
    if bad:
        raise UserError(f"--fpir: each target must be in (0, 1], got {bad[0]}")
    model, options, _ = _embedding_model(args)  # the same loader as `eval`
    log = None if args.json else (lambda message: print(message, file=sys.stderr, flush=True))
    result = ident.evaluate_identification_folders(
        model, args.gallery, args.probes, args.distractors or [], options=options, ranks=sorted({1, args.top}),
        fpir_targets=args.fpir, chunk_size=args.chunk_size, log=log)
    result["precision"], result["compiled"] = args.precision, _compiled(args)
    written = ident.write_identification_report(args.out, result) if args.out else None
    if args.json:
        from marginface.evaluate.report import json_safe

        _print_json(json_safe(result))
    else:
        print(ident.format_identification(result))
        if written:
            print(f"report: {written['md']}, {written['json']}")
    return 0


def cmd_embed(args) -> int:
    from marginface.evaluate import identification as ident

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.out.lower().endswith(".npy"):
        raise UserError(f"--out {args.out}: the feature file must end in .npy")
    files = ident.image_files(Path(args.images), "--images")  # cheap checks before loading the model
    model, options, _ = _embedding_model(args)
    if not args.json:
        print(f"embedding {len(files)} images under {args.images}", file=sys.stderr, flush=True)
    from marginface.data.images import read_image

    features = ident.embed_image_files(model, lambda i: read_image(files[i]), len(files), options=options)
    written = ident.save_features(args.out, features, files)
    result = {**written, "images": len(files), "dim": int(features.shape[1]), "flip": not args.no_flip,
              "precision": args.precision, "compiled": _compiled(args)}
    if args.json:
        _print_json(result)
    else:
        print(f"wrote {written['features']} ({len(files)} x {features.shape[1]}) and {written['files']}")
    return 0


def _add_embed_parser(sub) -> None:
    m = sub.add_parser("embed", help="embed every image under a folder into an N x D .npy (e.g. identify --distractors)",
                       description="Embed every image under --images (any depth, sorted) with the model; write the "
                                   "N x D float32 features to --out (.npy) and the image paths, one per row, to the "
                                   ".txt beside it. Use the same model, flip and precision as the identify run.")
    _add_model_argument(m)
    m.add_argument("--images", required=True, help="folder of images (any depth)")
    m.add_argument("--out", required=True, help="feature file to write (.npy)")
    _add_embedding_options(m)
    m.add_argument("--json", action="store_true", help="print the result as one JSON object")
    m.set_defaults(func=cmd_embed)


def _add_identify_parser(sub) -> None:
    i = sub.add_parser("identify", help="1:N identification: gallery and probe identity folders (+ distractors)",
                       description="Enrol DIR/<identity>/*.jpg of --gallery (one template per identity), search "
                                   "every probe image among the templates and the distractors; report rank-r "
                                   "identification rates and open-set TPIR@FPIR. Protocol: docs/evaluation.md.")
    _add_model_argument(i)
    i.add_argument("--gallery", required=True, help="identity folders to enrol: DIR/<identity>/*.jpg")
    i.add_argument("--probes", required=True, help="identity folders to search; identities without a gallery "
                                                   "folder are non-mated (open-set) probes")
    i.add_argument("--distractors", nargs="+", action="extend", metavar="DIR_OR_NPY",
                   help="folders of images (any depth) or .npy N x D features from the same model and flip setting")
    i.add_argument("--top", type=int, default=5, help="report rank-1 and rank-TOP (default 5)")
    i.add_argument("--fpir", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3], help="FPIR targets for TPIR@FPIR")
    _add_embedding_options(i)
    i.add_argument("--chunk-size", type=int, default=65536, help="candidates scored per matmul (bounds memory)")
    i.add_argument("--out", help="directory for identification.json and identification.md")
    i.add_argument("--json", action="store_true", help="print the result as one JSON object")
    i.set_defaults(func=cmd_identify)


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

    detector = build_detector(args.detector, weights=args.weights)
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


# ---------------------------------------------------------------------------------------------- viz
def cmd_viz(args) -> int:
    from marginface.viz import VizOptions, run_viz

    options = VizOptions(identities=args.identities, images_per_identity=args.images, steps=args.steps,
                         batch_size=args.batch_size, input_size=args.input_size, lr=args.lr,
                         center_weight=args.center_weight, seed=args.seed)
    log = None if args.json else (lambda message: print(message, file=sys.stderr, flush=True))
    summary = run_viz(args.out, options, gif=args.gif, log=log)
    if args.json:
        _print_json(summary)
    else:
        for name, run in summary["runs"].items():
            print(f"{name:15s} compactness {run['compactness']:.3f}  {', '.join(run['files'])}")
        print(f"side by side: {summary['comparison']}")
    return 0


def _add_viz_parser(sub) -> None:
    v = sub.add_parser("viz", help="2-D features of a few identities: softmax vs softmax + center loss (PNG/GIF)",
                       description="Train a 2-D embedding on a few synthetic identities twice (same weights and "
                                   "batches): plain softmax, then softmax + center loss; plot how they separate.")
    v.add_argument("--out", required=True, help="output directory (PNGs, GIFs with --gif, viz.json)")
    v.add_argument("--identities", type=int, default=10)
    v.add_argument("--images", type=int, default=24, help="images per identity")
    v.add_argument("--steps", type=int, default=240)
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--input-size", type=int, default=32)
    v.add_argument("--lr", type=float, default=0.1)
    v.add_argument("--center-weight", type=float, default=0.3, help="lambda of softmax + lambda * center loss")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--gif", action="store_true", help="also write an animated GIF of the features during training")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_viz)


# ---------------------------------------------------------------------------------------------- deploy
def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _face_embedder(args):
    from marginface.deploy.embedder import FaceEmbedder

    if args.threads:  # the detector runs in torch: same thread count (1 is best on a busy machine)
        import torch

        torch.set_num_threads(args.threads)
    fe = FaceEmbedder(args.model, normalize=args.normalize, detector_weights=args.detector_weights,
                      flip=not args.no_flip, threshold=args.threshold, batch_size=args.batch_size,
                      threads=args.threads, trust_code=args.trust_code)
    return fe


def cmd_export(args) -> int:
    from marginface.deploy.export import export_model
    from marginface.deploy.quantize import QuantOptions

    if not args.model and not args.backbone:
        raise UserError("export: give RUN_DIR|CKPT or --backbone NAME")
    options = QuantOptions(fmt=args.quant_format, activations=args.activations, per_channel=not args.per_tensor,
                           reduce_range=args.reduce_range, calibration=args.calibration,
                           grouped_convs=args.grouped_convs)
    report = export_model(args.model, args.out, fmt=args.format, int8=args.int8, calib=args.calib,
                          opset=args.opset, backbone=args.backbone, quant_options=options if args.int8 else None,
                          precision=args.precision, batch_size=args.batch_size)
    if args.json:
        _print_json(report)
    else:
        parity = report.get("parity", {})
        kind = report.get("precision", "int8" if report["int8"] else "")
        print(f"wrote {report['out']} ({report['format']}{', ' + kind if kind else ''}, "
              f"{report['file_mb']:.2f} MiB); parity vs PyTorch on {parity.get('images')} faces: "
              f"min cosine {parity.get('min_cosine', float('nan')):.6f}, max abs diff {parity.get('max_abs_diff', float('nan')):.2e}")
    return 0


def cmd_bench(args) -> int:
    from marginface.deploy.bench import DEFAULT_RUNTIMES, bench

    if not args.model and not args.backbone:
        raise UserError("bench: give MODEL (run dir, .pt or .onnx) or --backbone NAME")
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()] if args.runtimes else list(DEFAULT_RUNTIMES)
    result = bench(args.model, backbone=args.backbone, runtimes=runtimes, threads=args.threads, runs=args.runs,
                   normalize=args.normalize, input_size=args.input_size, trust_code=args.trust_code)
    if args.json:
        _print_json(result)
    else:
        size = (f"{result['params'] / 1e6:.2f}M params, {result['gmacs']:.3f} GMACs" if result["params"] is not None
                else f"compiled {result['precision']} package, batch {result['compiled_batch']}")
        print(f"{result['model']}: {size}, {result['file_mb']:.2f} MiB, {result['threads']} threads")
        for name, lat in result["latency_ms"].items():
            print(f"  {name:24s} batch 1: {lat['median']:7.2f} ms (p90 {lat['p90']:.2f})   "
                  f"batch {result['batch']['throughput']}: {result['throughput_ips'][name]:8.1f} img/s")
        for name, why in result.get("skipped", {}).items():
            print(f"  {name:24s} skipped: {why}")
    return 0


def cmd_verify(args) -> int:
    from marginface.deploy.verify import verify_images, verify_pair_list

    if args.pairs and args.images:
        raise UserError("verify: give either two images or --pairs PAIRS.csv, not both")
    if not args.pairs and len(args.images) != 2:
        raise UserError(f"verify: expected two images (A.jpg B.jpg) or --pairs PAIRS.csv, got {len(args.images)} image(s)")
    fe = _face_embedder(args)
    if fe.threshold_source == "default":  # said after the work, so an error stays the only stderr line
        defaulted = (f"the model carries no verification threshold; used the default {fe.threshold} "
                     f"(pass --threshold to set one)")
    else:
        defaulted = ""
    if args.pairs:
        result = verify_pair_list(fe, args.pairs)
        if defaulted:
            _note(defaulted)
        if args.json:
            _print_json(result)
        else:
            for row in result["pairs"]:
                print(f"{row['similarity']:+.4f}  {'same' if row['same'] else 'different':9s}  {row['a']}  {row['b']}")
            if result["eval"]:
                m = result["eval"]
                print(f"{len(result['pairs'])} pairs: accuracy {m['accuracy']:.4f} ± {m['accuracy_std']:.4f}, "
                      f"AUC {m['auc']:.4f}, EER {m['eer']:.4f}, best threshold {m['threshold']:.3f}")
        return 0
    result = verify_images(fe, *args.images)
    if defaulted:
        _note(defaulted)
    if args.json:
        _print_json({k: result[k] for k in ("similarity", "same", "threshold", "threshold_source")})
    else:
        print(f"similarity {result['similarity']:.4f} -> {'same person' if result['same'] else 'different people'} "
              f"(threshold {result['threshold']:.3f}, {result['threshold_source']})")
    return 0


def cmd_gallery_enroll(args) -> int:
    from marginface.deploy.gallery import check_enroll_target, enroll_store

    check_enroll_target(args.db, args.dir)  # before the model loads
    fe = _face_embedder(args)
    report = enroll_store(fe, args.dir, args.db, replace=args.replace, skip_no_face=args.skip_no_face)
    if args.json:
        _print_json(report)
    else:
        print(f"enrolled {report['identities']} identities ({report['added']} new images, "
              f"{report['already_enrolled']} already enrolled{', replaced' if args.replace else ''}) into "
              f"{args.db}; it holds {report['gallery_identities']} identities")
        for item in report["skipped"]:
            print(f"  skipped {item['file']}: {item['reason']}")
    return 0


def cmd_gallery_search(args) -> int:
    from marginface.deploy.gallery import open_gallery

    gallery = open_gallery(args.db)
    fe = _face_embedder(args)
    gallery.check_model(*fe.fingerprint(), where=str(args.db))
    matches = gallery.matches(fe.embed(args.image), args.top, index=args.index)
    if args.json:
        _print_json({"matches": matches, "threshold": fe.threshold})
    else:
        for rank, m in enumerate(matches, 1):
            print(f"{rank:2d}. {m['identity']:30s} {m['similarity']:+.4f}")
    return 0


def cmd_gallery_list(args) -> int:
    from marginface.deploy.gallery import open_gallery

    gallery = open_gallery(args.db)
    rows = gallery.list()
    if args.json:
        _print_json({"db": str(args.db), "identities": len(rows), "images": sum(r["images"] for r in rows),
                     "entries": rows})
    else:
        for r in rows:
            print(f"{r['identity']:30s} {r['images']:6d}")
        print(f"{len(rows)} identities, {sum(r['images'] for r in rows)} images in {args.db}")
    return 0


def cmd_gallery_remove(args) -> int:
    from marginface.deploy.gallery_store import GalleryStore

    if Path(args.db).suffix.lower() == ".npz":
        raise UserError(f"{args.db}: .npz galleries are read-only (legacy); convert it with "
                        f"`marginface gallery convert {args.db} {Path(args.db).with_suffix('.sqlite')}`")
    with GalleryStore(args.db) as store:
        report = store.remove(args.names)
        report.update(db=str(args.db), gallery_identities=len(store))
    if args.json:
        _print_json(report)
    else:
        print(f"removed {', '.join(report['removed'])} ({report['image_rows']} image rows) from {args.db}; "
              f"it holds {report['gallery_identities']} identities")
    return 0


def cmd_gallery_convert(args) -> int:
    from marginface.deploy.gallery_store import convert_npz

    report = convert_npz(args.src, args.dst)
    if args.json:
        _print_json(report)
    else:
        print(f"converted {report['identities']} identities ({report['images']} images) from {args.src} to {args.dst}")
    return 0


def _add_model_options(p) -> None:
    _add_model_argument(p)
    p.add_argument("--normalize", choices=["arcface", "imagenet"],
                   help="input normalisation for a model without metadata (default: the model's, else arcface)")
    p.add_argument("--detector-weights", help="MTCNN weights directory (default: $MARGINFACE_DETECTOR_DIR or the cache)")
    p.add_argument("--threshold", type=float, help="cosine threshold for 'same' (default: the model's eval threshold)")
    p.add_argument("--no-flip", action="store_true", help="do not add the mirror image's embedding")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--json", action="store_true")


def _add_deploy_parsers(sub) -> None:
    x = sub.add_parser("export", help="export a trained model to ONNX (optionally int8), TorchScript or a "
                                      "compiled x86/CUDA package")
    x.add_argument("model", nargs="?", help="run directory or checkpoint (.pt); loaded with torch.load("
                                            "weights_only=True), so it runs no code")
    x.add_argument("--backbone", help="export this architecture with random weights instead (size checks)")
    x.add_argument("--format", choices=["onnx", "torchscript", "aoti"], default="onnx",
                   help="aoti: an ahead-of-time compiled .pt2 (fastest on x86 servers; same torch and CPU to run)")
    x.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="with --format aoti: arithmetic of the package (int8 needs --calib and torchao)")
    x.add_argument("--batch-size", type=int, default=1,
                   help="with --format aoti: images per compiled call (1: lowest latency; 16: throughput on a CPU)")
    x.add_argument("--out", required=True, help="output file (written atomically)")
    x.add_argument("--opset", type=int, default=13, help="ONNX opset, 13..17 (13: widest mobile runtime support)")
    x.add_argument("--int8", action="store_true", help="static int8 quantisation (needs --calib)")
    x.add_argument("--calib", help="folder of aligned face crops for int8 calibration")
    x.add_argument("--quant-format", choices=["qdq", "qoperator"], default="qdq")
    x.add_argument("--activations", choices=["uint8", "int8"], default="uint8", help="int8 activation type (U8S8 / S8S8)")
    x.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default: per channel)")
    x.add_argument("--reduce-range", action="store_true", help="7-bit weights (CPUs without VNNI)")
    x.add_argument("--grouped-convs", choices=["float", "int8"], default="float",
                   help="grouped (not depthwise) convs such as mbf's stem: float (default; ONNX Runtime's "
                        "int8 kernel for them is slow) or int8")
    x.add_argument("--calibration", choices=["minmax", "percentile", "entropy"], default="minmax")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="parameters, MACs, file size, latency and throughput per runtime")
    b.add_argument("model", nargs="?", help="run directory, checkpoint (.pt), .onnx, or a compiled .pt2 "
                                            "package (runs native code when opened: needs --trust-code)")
    _add_trust_code(b)
    b.add_argument("--backbone", help="time this architecture with random weights")
    b.add_argument("--input-size", type=int, default=112, help="with --backbone: input side in pixels")
    b.add_argument("--threads", type=int, help="threads for every runtime (default: cores, at most 4)")
    b.add_argument("--runtimes", help="comma-separated (default: torch,onnxruntime,onnxruntime-int8)")
    b.add_argument("--runs", type=int, default=100, help="timed runs at batch 1")
    b.add_argument("--normalize", choices=["arcface", "imagenet"])
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("verify", help="same person? two photos, or every pair of a pairs CSV")
    v.add_argument("images", nargs="*", metavar="IMAGE", help="A.jpg B.jpg")
    v.add_argument("--pairs", help="CSV with file_x,file_y[,Decision|same]; paths relative to the CSV")
    _add_model_options(v)
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser("gallery", help="enrol identities and search faces (1:N)")
    gsub = g.add_subparsers(dest="gallery_command", parser_class=_Parser, required=True)
    en = gsub.add_parser("enroll", help="add DIR/<identity>/*.jpg to a gallery (.sqlite/.db; created when missing)")
    en.add_argument("dir")
    en.add_argument("--db", required=True, help="gallery file: .sqlite or .db (SQLite, safe to share between "
                                                "processes); .npz galleries are read-only, see `gallery convert`")
    en.add_argument("--replace", action="store_true",
                    help="replace the enrolled images of the identities in DIR (default: add to them)")
    en.add_argument("--skip-no-face", action="store_true", help="skip images without a face instead of failing")
    _add_model_options(en)
    en.set_defaults(func=cmd_gallery_enroll)
    se = gsub.add_parser("search", help="the closest enrolled identities of the largest face in IMAGE")
    se.add_argument("image")
    se.add_argument("--db", required=True, help="gallery file (.sqlite, .db, or a legacy .npz)")
    se.add_argument("--top", type=int, default=5)
    se.add_argument("--index", choices=["auto", "exact", "faiss"], default="auto")
    _add_model_options(se)
    se.set_defaults(func=cmd_gallery_search)
    ls = gsub.add_parser("list", help="enrolled identities and their image counts")
    ls.add_argument("--db", required=True, help="gallery file (.sqlite, .db, or a legacy .npz)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_gallery_list)
    rm = gsub.add_parser("remove", help="delete identities (all their images) from a gallery")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("--db", required=True, help="gallery file (.sqlite or .db)")
    rm.add_argument("--json", action="store_true")
    rm.set_defaults(func=cmd_gallery_remove)
    cv = gsub.add_parser("convert", help="copy a legacy .npz gallery into a new .sqlite gallery")
    cv.add_argument("src", help="the .npz gallery")
    cv.add_argument("dst", help="the new .sqlite/.db file (must not exist)")
    cv.add_argument("--json", action="store_true")
    cv.set_defaults(func=cmd_gallery_convert)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="marginface", description="Train, evaluate and ship margin-softmax face recognition models.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)

    t = sub.add_parser("train", help="train a model (no arguments: the built-in synthetic recipe)")
    t.add_argument("--config", help="YAML or .py config file (default: built-in synthetic_mbf); a .py config is "
                                    "Python and runs with your permissions: use only files you trust")
    t.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="override config keys, e.g. optim.lr=0.05")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the newest runs/<name>*) from its checkpoints/last.pt")
    t.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue the run from this checkpoint (e.g. RUN/checkpoints/best.pt when last.pt is lost); "
                        "the run directory is --out or the checkpoint's own")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that already holds a run: deletes its checkpoints, log and report")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config, data and model summary, then exit")
    t.add_argument("--json", action="store_true", help="print the final report as one JSON object")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model on verification sets, or compare two runs' reports",
                        description="Evaluate with and without the flip-sum embedding; --out (default: the run "
                                    "directory) gets report.json, report.md, roc.png and scores.png. "
                                    "Protocols: docs/evaluation.md.")
    _add_model_argument(e, required=False)
    e.add_argument("--sets", nargs="+", help=".bin files, LFW directories (with pairs.txt), pairs .txt/.csv, "
                                             "IJB-B/IJB-C directories (insightface layout)")
    e.add_argument("--out", help="directory for report.json/report.md/plots (default: --model when it is a run "
                                 "directory; its report.json keeps its training sections)")
    e.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    _add_embedding_options(e)
    e.add_argument("--no-detector-score", action="store_true",
                   help="IJB: do not weight image features by the detector score")
    e.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="print two runs' report.json eval side by side (set x metric, B - A)")
    e.add_argument("--json", action="store_true", help="print the eval object (or the comparison) as JSON")
    e.set_defaults(func=cmd_eval)

    _add_identify_parser(sub)
    _add_embed_parser(sub)

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
    _add_deploy_parsers(sub)
    _add_viz_parser(sub)
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
