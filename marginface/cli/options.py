"""What the `marginface` commands share: the parser class, --json printing, notes, and the options
several commands take (--model, --threads, --device, embedding and detector options)."""
from __future__ import annotations

import argparse
import sys

from marginface.errors import UserError
from marginface.io.progress import Working
from marginface.jsonout import dumps

# deferred: startup time. The helpers that load a model import the library inside the function, so
# `marginface --help`, a usage error and the light commands start without torch or the deploy stack.


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless its help already says it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS, [])
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `error:` line with exit code 2 and shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        # argparse formats a new option's metavar once to check it, which would read `Names` choices
        # (importing torch) while the parser is built; a stand-in metavar skips that, then goes
        if isinstance(kwargs.get("choices"), Names) and "metavar" not in kwargs:
            action = super().add_argument(*args, metavar="NAME", **kwargs)
            action.metavar = None
            return action
        return super().add_argument(*args, **kwargs)

    def add_command_group(self, dest: str, **kwargs):
        """Subcommands under this parser; the parser alone (``marginface data``) prints its usage."""
        sub = self.add_subparsers(dest=dest, parser_class=Parser, metavar="COMMAND", **kwargs)
        self.set_defaults(func=lambda args: self.usage_exit())
        return sub

    def usage_exit(self) -> int:
        """No subcommand given: the help on stderr, exit code 2 (nothing ran)."""
        self.print_help(sys.stderr)
        return 2

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def print_json(obj) -> None:
    """The one place --json output is printed: always valid JSON (NaN/inf become null, numpy
    values plain numbers; ``allow_nan=False`` makes a stray non-finite number fail here, loudly)."""
    print(dumps(obj))


class Names:
    """argparse ``choices`` read from a library registry (``module.ATTR``: a mapping or tuple of names)
    the first time they are needed: checking a given value, ``--help`` or an error message. The
    registry modules import torch, so building the parser stays light (`marginface --help`)."""

    def __init__(self, module: str, attr: str, exclude: tuple = ()):
        self.module, self.attr, self.exclude = module, attr, tuple(exclude)
        self._names = None

    def names(self) -> list:
        if self._names is None:
            import importlib

            registry = getattr(importlib.import_module(self.module), self.attr)
            self._names = [str(n) for n in registry if n not in self.exclude]
        return self._names

    def __contains__(self, value) -> bool:
        return value in self.names()

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Names({self.module}.{self.attr})"


# the registries behind the command line's choices (docs/architecture.md: registries are the one list of names)
DETECTORS = Names("marginface.data.detect", "DETECTORS")
NORMALIZATIONS = Names("marginface.data.transforms", "NORMALIZATIONS")
PRECISIONS = Names("marginface.deploy.compiled", "PRECISIONS")  # the compiled subset of inference.PRECISIONS
EXPORT_PRECISIONS = Names("marginface.deploy.export", "EXPORT_PRECISIONS")  # + auto (export --format aoti)
EXPORT_FORMATS = Names("marginface.deploy.export", "FORMATS")


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def check_positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name} must be >= 1, got {value}")


SHOWN_PROBLEMS = 5  # text output lists this many skipped files; --json lists every one


def problem_lines(title: str, items: list, shown: int = SHOWN_PROBLEMS) -> list:
    """Text output's summary of the files a command skipped (collected, reported once at the end):
    ``title: N`` then the first ``shown`` items indented, and how many more ``--json`` lists."""
    if not items:
        return []
    lines = [f"{title}: {len(items)}"] + [f"  {item}" for item in items[:shown]]
    if len(items) > shown:
        lines.append(f"  ... and {len(items) - shown} more (--json lists them all)")
    return lines


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


BACKBONE_HELP = ("architecture of a plain state dict given as --model (e.g. insightface's backbone.pth), "
                 "instead of the one recognised from its tensors; not for checkpoints, ONNX or TorchScript")


def add_backbone_override(parser) -> None:
    """``--backbone NAME``: every command that loads a model for inference (`load_model(backbone=)`)."""
    parser.add_argument("--backbone", metavar="NAME", help=BACKBONE_HELP)


def add_trust_code(parser) -> None:
    parser.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)


THREADS_HELP = ("CPU threads for PyTorch (intra- and inter-op) and ONNX Runtime (default: PyTorch's and ONNX "
                "Runtime's own choice)")


def add_threads(parser, help: str = THREADS_HELP) -> None:
    """``--threads N``: every command that runs a model."""
    parser.add_argument("--threads", type=int, metavar="N", help=help)


def apply_threads(threads) -> None:
    """``--threads``: torch's intra-op threads and (when torch has not started its pool yet) inter-op threads."""
    check_positive("--threads", threads)
    if not threads:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # the inter-op pool can be sized only before its first use
        pass


DETECTOR_WEIGHTS_HELP = ("detector weights: the MTCNN folder or the RetinaFace file (default: "
                         "$MARGINFACE_DETECTOR_DIR or the cache filled by `marginface data get-detector`)")


def add_detector_options(parser) -> None:
    """``--detector mtcnn|retinaface`` and ``--detector-weights`` (``--weights``: the old name, hidden)."""
    parser.add_argument("--detector", choices=DETECTORS, default="mtcnn",
                        help="face detector that finds and aligns the faces")
    parser.add_argument("--detector-weights", metavar="PATH", help=DETECTOR_WEIGHTS_HELP)
    parser.add_argument("--weights", dest="detector_weights", help=argparse.SUPPRESS)


def add_json(parser, help: str = "print the result as one JSON object") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_embedding_options(parser) -> None:
    """How eval, identify and embed run the model: the options `embedding_model` reads."""
    add_backbone_override(parser)
    parser.add_argument("--no-flip", action="store_true", help="do not add the flipped image's embedding")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    add_threads(parser)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, help="input normalisation (default: the model's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: autocast (faster on CPUs with AVX512-BF16/AMX and on GPUs); int8: static "
                             "x86 int8 calibrated on the first batch, always compiled (needs torchao; CPU, PyTorch "
                             "models); fp32 is the reference")
    parser.add_argument("--compile", action="store_true",
                        help="compile the model ahead of time (AOTInductor; compiling takes a while once): faster "
                             "fp32/bf16 embedding on the CPU for large sets (figures: docs/performance.md); "
                             "PyTorch models only")


def eval_device(name: str, model):
    """``--device``: `inference.resolve_device` (the one resolver); ONNX Runtime models run on the CPU here."""
    import torch

    from marginface.inference import resolve_device

    if not isinstance(model, torch.nn.Module):
        return torch.device("cpu")
    return resolve_device(name, "--device")


def eval_model_info(model) -> dict:
    import torch

    from marginface.models import count_parameters

    info = model.info
    # reports have always named an exported file's wrapper class here, not the metadata's backbone
    backbone = info.backbone if info.kind in ("checkpoint", "state_dict", "random") else None
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

    apply_threads(args.threads)
    model = load_model(args.model, normalize=args.normalize, threads=args.threads, trust_code=args.trust_code,
                       backbone=args.backbone)
    device = eval_device(args.device, model)
    if isinstance(model, torch.nn.Module):
        model.to(device)
    info = eval_model_info(model)
    if compiled(args):
        from marginface.deploy.compiled import CompiledEmbedder

        model, amp_dtype = CompiledEmbedder(model, args.precision, device=device), None
        what = ("quantising to int8 (calibrated on the first batch) and compiling the model" if args.precision == "int8"
                else f"compiling the model ({args.precision})")
        model.build_progress = lambda: Working(what, enabled=not getattr(args, "json", False))
    else:
        amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    options = EmbedOptions(flip=not args.no_flip, batch_size=args.batch_size, device=device,
                           normalize=args.normalize, amp_dtype=amp_dtype)
    return model, options, info


# ---------------------------------------------------------------------------------------- photos
THRESHOLD_HELP = "cosine threshold for 'same' (default: the model's eval threshold)"


def add_face_model_options(p, *, threshold_help: str = THRESHOLD_HELP) -> None:
    """verify and gallery enroll/search: a model plus the detector that finds the faces."""
    add_model_argument(p)
    add_backbone_override(p)
    p.add_argument("--normalize", choices=NORMALIZATIONS,
                   help="input normalisation for a model without metadata (default: the model's, else arcface)")
    add_detector_options(p)
    p.add_argument("--threshold", type=float, help=threshold_help)
    p.add_argument("--no-flip", action="store_true", help="do not add the mirror image's embedding")
    p.add_argument("--batch-size", type=int, default=32, help="faces per forward pass")
    add_threads(p, "CPU threads for the detector (PyTorch) and the model (PyTorch or ONNX Runtime; default: "
                   "all cores; 1 is best on a busy machine)")
    add_json(p)


def face_embedder(args):
    from marginface.deploy.embedder import FaceEmbedder

    apply_threads(args.threads)  # the detector runs in torch: same thread count
    model = args.model
    if getattr(args, "backbone", None) is not None:  # a plain state dict with an architecture override
        from marginface.deploy.load import load_model

        model = load_model(args.model, normalize=args.normalize, threads=args.threads,
                           trust_code=args.trust_code, backbone=args.backbone)
    fe = FaceEmbedder(model, normalize=args.normalize, detector=args.detector,
                      detector_weights=args.detector_weights, flip=not args.no_flip, threshold=args.threshold,
                      batch_size=args.batch_size, threads=args.threads, trust_code=args.trust_code)
    return fe
