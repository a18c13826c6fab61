"""`marginface eval` (verification sets, run comparison), `identify` (1:N), `eval-megaface` (MegaFace
challenge 1) and `embed` (folder -> .npy)."""
from __future__ import annotations

import sys
from pathlib import Path

from marginface.cli.options import (Names, add_detector_options, add_embedding_options, add_model_argument, compiled,
                                    embedding_model, print_json, stderr_log)
from marginface.errors import UserError

# deferred: startup time. The evaluation stack is imported when a command runs.

ALIGN_MODES = Names("marginface.data.verification", "ALIGN_MODES")


def register(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model on verification sets, or compare two runs' reports",
                       description="Evaluate with and without the flip-sum embedding; --out (default: the run "
                                   "directory) gets report.json, report.md, roc.png and scores.png. "
                                   "Protocols: docs/evaluation.md.")
    add_model_argument(e, required=False)
    e.add_argument("--sets", nargs="+", help=".bin files, LFW directories (with pairs.txt), pairs .txt/.csv, "
                                             "IJB-B/IJB-C directories (insightface layout), identity folders "
                                             "with --sample-pairs")
    e.add_argument("--align", choices=ALIGN_MODES, default="auto",
                   help="how faces are aligned: auto (an LFW directory's landmarks.txt, else the images as they "
                        "are; whole photos in a pairs CSV are refused), detect (every image of a directory or CSV "
                        "set through --detector, as `verify --pairs` does), landmarks (the landmark file: "
                        "landmarks.txt or --landmarks), none (resize the images as they are); .bin and IJB sets "
                        "are read as they are")
    add_detector_options(e)
    e.add_argument("--sample-pairs", type=int, default=0, metavar="N",
                   help="an identity folder (DIR/<identity>/*.jpg) in --sets: sample N balanced pairs from it "
                        "(half same, half different; as data.val_sample_pairs in training); 0: identity folders "
                        "are refused")
    e.add_argument("--seed", type=int, default=0, help="seed of --sample-pairs (training samples with "
                                                       "data.synthetic.seed, 0 by default)")
    e.add_argument("--pairs", metavar="FILE", help="pairs.txt of the LFW directory in --sets, kept outside it")
    e.add_argument("--landmarks", metavar="FILE",
                   help="landmark file of the LFW directory in --sets (path x1 y1 ... x5 y5 per image), kept "
                        "outside it")
    e.add_argument("--out", help="directory for report.json/report.md/plots (default: --model when it is a run "
                                 "directory; its report.json keeps its training sections)")
    e.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    add_embedding_options(e)
    e.add_argument("--no-detector-score", action="store_true",
                   help="IJB: do not weight image features by the detector score")
    e.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="print two runs' report.json eval side by side (set x metric, B - A)")
    e.add_argument("--json", action="store_true", help="print the eval object (or the comparison) as JSON")
    e.set_defaults(func=run_eval)

    i = sub.add_parser("identify", help="1:N identification: gallery and probe identity folders (+ distractors)",
                       description="Enrol DIR/<identity>/*.jpg of --gallery (one template per identity), search "
                                   "every probe image among the templates and the distractors; report rank-r "
                                   "identification rates and open-set TPIR@FPIR. Protocol: docs/evaluation.md.")
    add_model_argument(i)
    i.add_argument("--gallery", required=True, help="identity folders to enrol: DIR/<identity>/*.jpg")
    i.add_argument("--probes", required=True, help="identity folders to search; identities without a gallery "
                                                   "folder are non-mated (open-set) probes")
    i.add_argument("--distractors", nargs="+", action="extend", metavar="DIR_OR_NPY",
                   help="folders of images (any depth) or .npy N x D features from the same model and flip setting")
    i.add_argument("--top", type=int, default=5, help="report rank-1 and rank-TOP (default 5)")
    i.add_argument("--fpir", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3], help="FPIR targets for TPIR@FPIR")
    add_embedding_options(i)
    i.add_argument("--chunk-size", type=int, default=65536, help="candidates scored per matmul (bounds memory)")
    i.add_argument("--out", help="directory for identification.json and identification.md")
    i.add_argument("--json", action="store_true", help="print the result as one JSON object")
    i.set_defaults(func=run_identify)

    g = sub.add_parser("eval-megaface", help="MegaFace: rank-1 per distractor-set size (10..1M), TAR@FAR=1e-6",
                       description="MegaFace challenge 1 as the devkit defines it: every probe image of an identity "
                                   "against one other image of it plus the first N distractors (N = --sizes); CMC "
                                   "and rank-1 per size; verification TAR@FAR over probe x distractor impostor pairs. "
                                   "Noise lists give the refined protocol. Protocol: docs/evaluation.md.")
    add_model_argument(g)
    g.add_argument("--probes", required=True, help="FaceScrub-style identity folders DIR/<identity>/*.jpg, or the "
                                                   "root the --probe-list paths are relative to")
    g.add_argument("--probe-list", help="devkit facescrub_features_list.json ({path: [...], id: [...]})")
    g.add_argument("--distractors", required=True, metavar="DIR_OR_NPY",
                   help="folder of distractor images (any depth), or a .npy made by `marginface embed` with this "
                        "model (its .txt path listing beside it is needed for --distractor-noises)")
    g.add_argument("--distractor-list", help="devkit megaface_features_list.json_1000000_1: the distractors in "
                                             "this order (paths relative to --distractors); size N = the first N")
    g.add_argument("--probe-noises", help="facescrub_noises.txt: probe images to leave out (refined protocol)")
    g.add_argument("--distractor-noises", help="megaface_noises.txt: distractors to leave out (refined protocol)")
    g.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000, 100000, 1000000],
                   help="distractor-set sizes; those above the distractors given are skipped")
    g.add_argument("--max-rank", type=int, default=100, help="length of the CMC curve")
    g.add_argument("--far", type=float, nargs="+", default=[1e-6], help="FAR targets for the verification TAR")
    add_embedding_options(g)
    g.add_argument("--chunk-size", type=int, default=65536, help="distractors scored per matmul (bounds memory)")
    g.add_argument("--out", help="directory for megaface.json and megaface_cmc.png")
    g.add_argument("--no-plots", action="store_true", help="write no CMC plot")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object")
    g.set_defaults(func=run_megaface)

    m = sub.add_parser("embed", help="embed every image under a folder into an N x D .npy (e.g. identify --distractors)",
                       description="Embed every image under --images (any depth, sorted) with the model; write the "
                                   "N x D float32 features to --out (.npy) and the image paths, one per row, to the "
                                   ".txt beside it. Use the same model, flip and precision as the identify run.")
    add_model_argument(m)
    m.add_argument("--images", required=True, help="folder of images (any depth)")
    m.add_argument("--out", required=True, help="feature file to write (.npy)")
    add_embedding_options(m)
    m.add_argument("--json", action="store_true", help="print the result as one JSON object")
    m.set_defaults(func=run_embed)


def run_eval(args) -> int:
    from marginface.evaluate import report as rep

    if args.compare:
        if args.model or args.sets:
            raise UserError("eval --compare RUN_A RUN_B takes no --model/--sets")
        a, b = args.compare
        comparison = rep.compare_reports(rep.load_report(a), rep.load_report(b), labels=(a, b))
        if args.json:
            print_json(comparison)
        else:
            print(rep.format_comparison(comparison))
        return 0
    if not args.model or not args.sets:
        raise UserError("eval needs --model and --sets (or --compare RUN_A RUN_B)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    loader = _pair_set_loader(args)  # cheap checks and the detector before the model loads
    model, options, model_info = embedding_model(args)
    results, curves, sources = rep.evaluate_suite(
        model, args.sets, options=options, detector_score=not args.no_detector_score, log=stderr_log(args),
        loader=loader)
    out = args.out or (args.model if Path(args.model).is_dir() else None)
    written = None
    if out:
        report = rep.merge_eval(out, results, model_info=model_info, sources=sources)
        report["eval_precision"] = args.precision  # how these numbers were made
        report["eval_compiled"] = compiled(args)
        report["eval_align"] = args.align if args.align != "detect" else f"detect ({args.detector})"
        written = rep.write_report(out, report, curves, plots=not args.no_plots)
    if args.json:
        print_json(rep.json_safe(results))
    else:
        print(rep.format_results_table(results))
        if written:
            print(f"report: {written['report_md']}" + "".join(f", {p}" for p in written["plots"]))
    return 0


def _pair_set_loader(args):
    """`load_pair_set` with eval's --align / --detector / --sample-pairs / --seed / --pairs /
    --landmarks, after the checks that need no model (the detector is built here, so missing
    weights stop the command before the model loads)."""
    import functools

    from marginface.data.verification import load_pair_set

    for option, value in (("--sample-pairs", args.sample_pairs), ("--seed", args.seed)):
        if value < 0:
            raise UserError(f"{option} must be >= 0, got {value}")
    if args.landmarks and args.align in ("detect", "none"):
        raise UserError(f"--landmarks aligns by the landmark file; it does not go with --align {args.align}")
    _check_set_dirs(args.sets, sample_pairs=args.sample_pairs, pairs_file=args.pairs)
    detector = None
    if args.align == "detect":
        from marginface.data.detect import build_detector

        detector = build_detector(args.detector, weights=args.detector_weights)
    return functools.partial(load_pair_set, detector=detector, align=args.align, sample_pairs=args.sample_pairs,
                             seed=args.seed, pairs_file=args.pairs, landmarks=args.landmarks,
                             file_labels=("--pairs", "--landmarks"))


def _check_set_dirs(paths, *, sample_pairs: int = 0, pairs_file=None) -> None:
    """A directory in --sets is an LFW-style pair set (pairs.txt or --pairs), an IJB directory, or
    with --sample-pairs an identity folder (checked before the model loads)."""
    from marginface.evaluate.ijb import is_ijb_dir

    for path in map(Path, paths):
        if path.is_dir() and not (path / "pairs.txt").is_file() and not pairs_file and not sample_pairs \
                and not is_ijb_dir(path):
            raise UserError(f"--sets {path}: directory has no pairs.txt and is not an IJB-B/IJB-C directory; "
                            f"--sample-pairs N samples pairs from an identity folder (DIR/<identity>/*.jpg), "
                            f"--pairs FILE names a pairs file kept elsewhere, `marginface identify` runs 1:N")


def run_identify(args) -> int:
    from marginface.evaluate import identification as ident

    for name, value in (("--top", args.top), ("--batch-size", args.batch_size), ("--chunk-size", args.chunk_size)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    bad = [f for f in args.fpir if not 0 < f <= 1]
    if bad:
        raise UserError(f"--fpir: each target must be in (0, 1], got {bad[0]}")
    model, options, _ = embedding_model(args)  # the same loader as `eval`
    result = ident.evaluate_identification_folders(
        model, args.gallery, args.probes, args.distractors or [], options=options, ranks=sorted({1, args.top}),
        fpir_targets=args.fpir, chunk_size=args.chunk_size, log=stderr_log(args))
    result["precision"], result["compiled"] = args.precision, compiled(args)
    written = ident.write_identification_report(args.out, result) if args.out else None
    if args.json:
        from marginface.evaluate.report import json_safe

        print_json(json_safe(result))
    else:
        print(ident.format_identification(result))
        if written:
            print(f"report: {written['md']}, {written['json']}")
    return 0


def run_megaface(args) -> int:
    from marginface.evaluate import megaface

    for name, value in (("--max-rank", args.max_rank), ("--batch-size", args.batch_size),
                        ("--chunk-size", args.chunk_size), *(("--sizes", s) for s in args.sizes)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    bad = [f for f in args.far if not 0 < f <= 1]
    if bad:
        raise UserError(f"--far: each target must be in (0, 1], got {bad[0]}")
    for flag, path in (("--probe-list", args.probe_list), ("--distractor-list", args.distractor_list),
                       ("--probe-noises", args.probe_noises), ("--distractor-noises", args.distractor_noises)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{flag} {path}: file not found")
    model, options, _ = embedding_model(args)
    result = megaface.evaluate_megaface(
        model, args.probes, args.distractors, probe_list=args.probe_list, distractor_list=args.distractor_list,
        probe_noises=args.probe_noises, distractor_noises=args.distractor_noises, sizes=args.sizes,
        max_rank=args.max_rank, far_targets=args.far, options=options, chunk_size=args.chunk_size,
        log=stderr_log(args))
    result["precision"], result["compiled"] = args.precision, compiled(args)
    written = megaface.write_megaface_report(args.out, result, plots=not args.no_plots) if args.out else None
    if args.json:
        from marginface.evaluate.report import json_safe

        print_json(json_safe(result))
    else:
        print(megaface.format_megaface(result))
        if written:
            print("report: " + ", ".join(written.values()))
    return 0


def run_embed(args) -> int:
    from marginface.data.images import read_image
    from marginface.evaluate import identification as ident

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.out.lower().endswith(".npy"):
        raise UserError(f"--out {args.out}: the feature file must end in .npy")
    files = ident.image_files(Path(args.images), "--images")  # cheap checks before loading the model
    model, options, _ = embedding_model(args)
    if not args.json:
        print(f"embedding {len(files)} images under {args.images}", file=sys.stderr, flush=True)
    features = ident.embed_image_files(model, lambda i: read_image(files[i]), len(files), options=options)
    written = ident.save_features(args.out, features, files)
    result = {**written, "images": len(files), "dim": int(features.shape[1]), "flip": not args.no_flip,
              "precision": args.precision, "compiled": compiled(args)}
    if args.json:
        print_json(result)
    else:
        print(f"wrote {written['features']} ({len(files)} x {features.shape[1]}) and {written['files']}")
    return 0
