"""`marginface export` (ONNX, TorchScript, compiled .pt2) and `marginface bench` (size, MACs, latency)."""
from __future__ import annotations

import sys
from pathlib import Path

from marginface.cli.options import (EXPORT_FORMATS, NORMALIZATIONS, EXPORT_PRECISIONS as PRECISION_NAMES, add_json,
                                    add_threads, add_trust_code, apply_threads, print_json)
from marginface.errors import UserError
from marginface.io.progress import Working
from marginface.io.texttable import table, wrap

# deferred: startup time. The deployment stack (torch, onnx, onnxruntime) is imported when a command runs.


def register(sub) -> None:
    x = sub.add_parser("export", help="export a trained model to ONNX (optionally int8), TorchScript or a "
                                      "compiled x86/CUDA package")
    x.add_argument("model", nargs="?", metavar="MODEL", help="run directory or checkpoint (.pt); loaded with "
                                                             "torch.load(weights_only=True), so it runs no code")
    x.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the positional MODEL")
    x.add_argument("--backbone", help="without a model: export this architecture with random weights (size "
                                      "checks); with a plain state dict as the model: its architecture, instead "
                                      "of the one recognised from its tensors")
    x.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                   help="aoti: an ahead-of-time compiled .pt2 (fastest on x86 servers; same torch and CPU to run); "
                        "insightface-pth: a state dict insightface's arcface_torch loads (iresnet*, mbf); "
                        "executorch (.pte), tflite, ncnn (.param + .bin), openvino (.xml + .bin): phone/edge "
                        "runtimes, each an optional extra (docs/mobile.md)")
    x.add_argument("--precision", choices=PRECISION_NAMES, default="fp32",
                   help="arithmetic of the exported model; onnx: fp32 or int8 (static, needs --calib); "
                        "aoti: fp32, bf16, int8 (needs --calib and torchao) or auto (the fastest path whose "
                        "output matches fp32, timed here; int8 is a candidate with --calib); "
                        "executorch, tflite: fp32 or int8 (needs --calib); openvino: fp32, fp16 or int8 (needs --calib); "
                        "ncnn: fp32 or fp16; "
                        "torchscript, insightface-pth: fp32")
    x.add_argument("--normalize", choices=NORMALIZATIONS,
                   help="with an ONNX embedder as MODEL (mobile formats): its input normalisation when the file "
                        "records none (default arcface)")
    x.add_argument("--batch-size", type=int, default=1,
                   help="with --format aoti: images per compiled call (1: lowest latency; 16: throughput on a CPU)")
    x.add_argument("--out", required=True, help="output file (written atomically)")
    x.add_argument("--opset", type=int, default=13, help="ONNX opset, 13..17 (13: widest mobile runtime support)")
    x.add_argument("--int8", action="store_true", help="deprecated: the same as --precision int8")
    x.add_argument("--calib", help="folder of aligned face crops for int8 calibration")
    x.add_argument("--quant-format", choices=["qdq", "qoperator"], default="qdq",
                   help="ONNX int8: QDQ (quantise/dequantise pairs) or QOperator (integer operators) graph")
    x.add_argument("--activations", choices=["uint8", "int8"], default="uint8", help="int8 activation type (U8S8 / S8S8)")
    x.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default: per channel)")
    x.add_argument("--reduce-range", action="store_true", help="7-bit weights (CPUs without VNNI)")
    x.add_argument("--grouped-convs", choices=["float", "int8"], default="float",
                   help="grouped (not depthwise) convs such as mbf's stem: float (default; ONNX Runtime's "
                        "int8 kernel for them is slow) or int8")
    x.add_argument("--calibration", choices=["minmax", "percentile", "entropy"], default="minmax",
                   help="ONNX int8: how activation ranges are chosen from the calibration images")
    add_threads(x)
    add_json(x)
    x.set_defaults(func=run_export)

    b = sub.add_parser("bench", help="parameters, MACs, file size, latency and throughput per runtime")
    b.add_argument("model", nargs="?", metavar="MODEL", help="run directory, checkpoint (.pt), .onnx, or a compiled "
                                                             ".pt2 package (runs native code when opened: needs "
                                                             "--trust-code)")
    b.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the positional MODEL")
    add_trust_code(b)
    b.add_argument("--backbone", help="time this architecture (random weights; with MODEL: the architecture of a "
                                      "plain state dict)")
    b.add_argument("--weights", choices=["trained-looking", "fresh"], default="trained-looking",
                   help="with --backbone and no MODEL: random weights with trained BatchNorm/PReLU ranges, or as "
                        "initialised")
    b.add_argument("--input-size", type=int, default=112, help="with --backbone: input side in pixels")
    add_threads(b, "threads for every runtime (default: cores, at most 4)")
    b.add_argument("--runtimes", help="comma-separated (default: torch,onnxruntime,onnxruntime-int8); "
                                      "torch-compiled-auto compiles fp32/bf16/int8 and shows which --precision auto "
                                      "takes")
    b.add_argument("--runs", type=int, default=100, help="timed runs at batch 1")
    b.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N: time the PyTorch model on that GPU "
                                                   "(runtimes torch-cuda, torch-cuda-fp16, torch-cuda-bf16)")
    b.add_argument("--normalize", choices=NORMALIZATIONS,
                   help="input normalisation for a model without metadata (default: the model's, else arcface)")
    add_json(b)
    b.set_defaults(func=run_bench)


# what each export format can do with --precision (the mobile formats' lists: deploy.mobile.MOBILE_FORMATS)
PRECISIONS = {"onnx": ("fp32", "int8"), "torchscript": ("fp32",), "aoti": ("fp32", "bf16", "int8", "auto"),
              "insightface-pth": ("fp32",)}


def format_precisions() -> dict[str, tuple[str, ...]]:
    from marginface.deploy.mobile import MOBILE_FORMATS  # deferred: startup time

    return {**PRECISIONS, **{name: fmt.precisions for name, fmt in MOBILE_FORMATS.items()}}


def model_argument(args, command: str):
    """MODEL given positionally or as --model (once)."""
    if args.model and args.model_option and args.model != args.model_option:
        raise UserError(f"{command}: give the model once, as MODEL or --model, not both "
                        f"({args.model} and {args.model_option})")
    return args.model or args.model_option


def run_export(args) -> int:
    from marginface.deploy.export import export_model
    from marginface.deploy.quantize import QuantOptions

    args.model = model_argument(args, "export")
    if not args.model and not args.backbone:
        raise UserError("export: give RUN_DIR|CKPT or --backbone NAME (the model may also be given as --model)")
    if args.int8:
        if args.precision not in ("fp32", "int8"):
            raise UserError(f"export: --int8 and --precision {args.precision} disagree; give --precision only")
        args.precision = "int8"
    precisions = format_precisions()
    if args.precision not in precisions[args.format]:
        able = " or ".join(f for f, p in precisions.items() if args.precision in p)
        raise UserError(f"--precision {args.precision} needs --format {able}; --format {args.format} does "
                        f"{', '.join(precisions[args.format])}")
    if args.precision == "int8" and not args.calib:
        raise UserError("--precision int8 needs --calib DIR: a folder of aligned face crops for calibration")
    apply_threads(args.threads)
    int8 = args.format == "onnx" and args.precision == "int8"  # ONNX int8: quantised by ONNX Runtime
    precision = args.precision if args.format != "onnx" else "fp32"  # ONNX int8 goes through `int8`
    options = QuantOptions(fmt=args.quant_format, activations=args.activations, per_channel=not args.per_tensor,
                           reduce_range=args.reduce_range, calibration=args.calibration,
                           grouped_convs=args.grouped_convs)
    # int8 calibration and ahead-of-time compiling take a minute or more and report nothing themselves
    slow = int8 or args.format == "aoti"
    what = (f"exporting {args.format}" + (f" ({args.precision}: calibrating on {args.calib} and quantising)" if int8
                                          else f" ({args.precision}: compiling ahead of time)" if args.format == "aoti"
                                          else ""))
    with Working(what, enabled=slow and not args.json):
        report = export_model(args.model, args.out, fmt=args.format, int8=int8, calib=args.calib,
                              opset=args.opset, backbone=args.backbone, quant_options=options if int8 else None,
                              precision=precision, batch_size=args.batch_size, normalize=args.normalize)
    if args.int8:  # said after the work, so an error stays the only stderr line
        print("note: export --int8 is deprecated; use --precision int8", file=sys.stderr)
    if args.json:
        print_json(report)
    else:
        parity = report.get("parity", {})
        kind = report.get("precision", "int8" if report["int8"] else "")
        print(f"wrote {report['out']} ({report['format']}{', ' + kind if kind else ''}, "
              f"{report['file_mb']:.2f} MiB); parity vs PyTorch on {parity.get('images')} faces: "
              f"min cosine {parity.get('min_cosine', float('nan')):.6f}, max abs diff {parity.get('max_abs_diff', float('nan')):.2e}")
    return 0


def run_bench(args) -> int:
    from marginface.deploy.autoprecision import choice_lines  # deferred: startup time
    from marginface.deploy.bench import DEFAULT_RUNTIMES, bench

    args.model = model_argument(args, "bench")
    if not args.model and not args.backbone:
        raise UserError("bench: give MODEL (run dir, .pt, .onnx or .pt2) or --backbone NAME")
    if args.model and not Path(args.model).exists():
        raise UserError(f"{args.model}: not found (bench takes a run directory, a .pt checkpoint, an .onnx model "
                        f"or a compiled .pt2 package)")
    apply_threads(args.threads)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()] if args.runtimes else DEFAULT_RUNTIMES
    result = bench(args.model, backbone=args.backbone, runtimes=runtimes, threads=args.threads, runs=args.runs,
                   normalize=args.normalize, input_size=args.input_size, trust_code=args.trust_code,
                   weights=args.weights, device=args.device)
    if args.json:
        print_json(result)
    else:
        size = (f"{result['params'] / 1e6:.2f}M params, {result['gmacs']:.3f} GMACs" if result["params"] is not None
                else f"compiled {result['precision']} package, batch {result['compiled_batch']}")
        weights = f", {result['weights']} weights" if result.get("weights") not in (None, "model") else ""
        where = f", on {result['device']}" if "device" in result else f", {result['threads']} threads"
        lines = wrap(f"{result['model']}: {size}, {result['file_mb']:.2f} MiB{where}{weights}")
        agreement = result.get("min_cosine_vs_first", {})
        rows = [["runtime", "batch 1 ms", "p90 ms", f"batch {result['batch']['throughput']} img/s", "min cosine"]]
        for name, lat in result["latency_ms"].items():
            rows.append([name, f"{lat['median']:.2f}", f"{lat['p90']:.2f}", f"{result['throughput_ips'][name]:.1f}",
                         f"{agreement[name]:.4f}" if name in agreement else ""])
        if len(rows) > 1:
            lines += table(rows).splitlines()
        for name, why in result.get("skipped", {}).items():
            lines += wrap(f"{name} skipped: {why}")
        if agreement:
            lines += wrap(f"(min cosine: each runtime's embeddings against the first runtime's, {next(iter(agreement))})")
        if "precision_auto" in result:
            lines += choice_lines(result["precision_auto"])
        print("\n".join(lines))
    return 0
