"""What the `marginface` commands share: the parser class, --json printing, notes, and the options
several commands take (--model, --threads, --device, embedding and detector options)."""
from __future__ import annotations

import argparse
import sys

from marginface.errors import UserError
from marginface.jsonout import dumps

# deferred: startup time. The helpers that load a model import the library inside the function, so
# `marginface --help`, a usage error and the light commands start without torch or the deploy stack.


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `error:` line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def print_json(obj) -> None:
    """The one place --json output is printed: always valid JSON (NaN/inf become null, numpy
    values plain numbers; ``allow_nan=False`` makes a stray non-finite number fail here, loudly)."""
    print(dumps(obj))


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def stderr_log(args):
    """The progress printer of a command: None with --json (stdout holds only the JSON object)."""
    return None if args.json else (lambda message: print(message, file=sys.stderr, flush=True))


# ---------------------------------------------------------------------------------------- models
MODEL_HELP = ("run directory, checkpoint (.pt), ONNX, TorchScript or compiled .pt2 model; TorchScript and "
              ".pt2 files run code when loaded and need --trust-code")
TRUST_CODE_HELP = ("allow TorchScript archives and compiled .pt2 packages: loading them runs the code inside "
                   "(TorchScript) or a native library (.pt2). Only for files you trust; checkpoints and ONNX "
                   "models never need it")


def add_model_argument(parser, *, required: bool = True) -> None:
    """``--model`` and ``--trust-code``: every command that loads a model for inference."""
    parser.add_argument("--model", required=required, help=MODEL_HELP)
    add_trust_code(parser)


def add_trust_code(parser) -> None:
    parser.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)


def add_json(parser, help: str = "print the result as one JSON object") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_embedding_options(parser) -> None:
    """How eval, identify and embed run the model: the options `embedding_model` reads."""
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


def eval_device(name: str, model):
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


def eval_model_info(model) -> dict:
    import torch

    from marginface.models import count_parameters

    info = model.info
    # reports have always named an exported file's wrapper class here, not the metadata's backbone
    backbone = info.backbone if info.kind in ("checkpoint", "random") else None
    return {"backbone": backbone or type(model).__name__,
            "params": count_parameters(model) if isinstance(model, torch.nn.Module) else None,
            "embedding_size": info.embedding_size}


def compiled(args) -> bool:
    """Whether `embedding_model` compiles (recorded in reports: it changes the numbers' rounding)."""
    return args.compile or args.precision == "int8"


def embedding_model(args) -> tuple:
    """``(model, EmbedOptions, model_info)`` from ``--model/--normalize/--device/--precision/
    --compile/--no-flip/--batch-size`` (eval, identify, embed): bf16 is autocast unless compiled;
    int8 exists only as a compiled x86 path (`marginface.deploy.compiled`), calibrated on the first
    --batch-size images."""
    import torch

    from marginface.deploy.load import load_model
    from marginface.inference import EmbedOptions

    model = load_model(args.model, normalize=args.normalize, trust_code=args.trust_code)
    device = eval_device(args.device, model)
    if isinstance(model, torch.nn.Module):
        model.to(device)
    info = eval_model_info(model)
    if compiled(args):
        from marginface.deploy.compiled import CompiledEmbedder

        model, amp_dtype = CompiledEmbedder(model, args.precision, device=device), None
    else:
        amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    options = EmbedOptions(flip=not args.no_flip, batch_size=args.batch_size, device=device,
                           normalize=args.normalize, amp_dtype=amp_dtype)
    return model, options, info


# ---------------------------------------------------------------------------------------- photos
def add_face_model_options(p) -> None:
    """verify and gallery enroll/search: a model plus the detector that finds the faces."""
    add_model_argument(p)
    p.add_argument("--normalize", choices=["arcface", "imagenet"],
                   help="input normalisation for a model without metadata (default: the model's, else arcface)")
    p.add_argument("--detector-weights", help="MTCNN weights directory (default: $MARGINFACE_DETECTOR_DIR or the cache)")
    p.add_argument("--threshold", type=float, help="cosine threshold for 'same' (default: the model's eval threshold)")
    p.add_argument("--no-flip", action="store_true", help="do not add the mirror image's embedding")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--json", action="store_true")


def face_embedder(args):
    from marginface.deploy.embedder import FaceEmbedder

    if args.threads:  # the detector runs in torch: same thread count (1 is best on a busy machine)
        import torch

        torch.set_num_threads(args.threads)
    fe = FaceEmbedder(args.model, normalize=args.normalize, detector_weights=args.detector_weights,
                      flip=not args.no_flip, threshold=args.threshold, batch_size=args.batch_size,
                      threads=args.threads, trust_code=args.trust_code)
    return fe
