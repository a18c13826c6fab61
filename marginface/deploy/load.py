"""One loader for every model marginface can run: ``load_model(path_or_run, normalize=None)``.

It accepts a run directory, a training checkpoint (``.pt``), our TorchScript export, our ONNX
export, our compiled package (``.pt2``, `deploy.compiled`) or a foreign insightface-style ONNX
recognition model, and returns a callable embedder
(normalised float ``N×3×H×W`` -> ``N×D``) with the attributes evaluation and deployment read:

- ``input_size`` (int or (H, W)), ``embedding_size``;
- ``normalize``: "arcface" or "imagenet" (the ``normalize`` argument overrides what the model
  records; a foreign ONNX model without metadata defaults to "arcface");
- ``threshold``: the verification threshold (cosine) picked at eval time, from the checkpoint's
  ``last_eval`` or the export's metadata; None when the model carries none;
- ``threshold_source``: which eval set it came from;
- ``model_path``: the file that was loaded.

TorchScript archives and compiled packages run code when loaded (`marginface.io.trust`): they are
refused, before anything in them is read by torch, unless ``trust_code=True`` (``--trust-code``).
Checkpoints load with ``torch.load(weights_only=True)`` and ONNX files with ONNX Runtime: no code.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from marginface.config import Config, from_dict
from marginface.deploy.compiled import CompiledEmbedder
from marginface.deploy.onnx_model import OnnxEmbedder
from marginface.errors import UserError
from marginface.io.trust import COMPILED, TORCHSCRIPT, WHY, code_kind, refuse_untrusted
from marginface.models import build_backbone
from marginface.train.checkpoint import load_checkpoint, resolve_checkpoint
from marginface.train.setup import build_model

NORMALIZE_NAMES = ("arcface", "imagenet")
TORCHSCRIPT_EXTRA = "marginface.json"  # metadata file inside our TorchScript exports


def _check_normalize(normalize: Optional[str]) -> None:
    if normalize is not None and normalize not in NORMALIZE_NAMES:
        raise UserError(f"--normalize must be one of {', '.join(NORMALIZE_NAMES)}, got {normalize!r}")


def pick_threshold(last_eval: dict, best_metric: str = "") -> tuple[Optional[float], Optional[str]]:
    """The eval-time threshold of a checkpoint's ``last_eval``: the set named by the run's
    ``eval.best_metric`` ("<set>/<metric>") if it has one, else the first set that reports one."""
    if not isinstance(last_eval, dict) or not last_eval:
        return None, None
    preferred = best_metric.split("/", 1)[0] if best_metric else ""
    names = ([preferred] if preferred in last_eval else []) + [n for n in last_eval if n != preferred]
    for name in names:
        metrics = last_eval.get(name)
        value = metrics.get("threshold") if isinstance(metrics, dict) else None
        if isinstance(value, (int, float)) and value == value:  # not NaN
            return float(value), str(name)
    return None, None


def load_checkpoint_model(model_path: Union[str, Path], prefer: str = "best") -> torch.nn.Module:
    """A run directory / checkpoint -> its backbone in eval mode on the CPU, with ``input_size``,
    ``embedding_size``, ``normalize``, ``threshold``, ``threshold_source``, ``backbone_name``,
    ``model_path``. Reads the checkpoint once (see ``train.checkpoint.load_backbone``)."""
    path = resolve_checkpoint(str(model_path), prefer)
    ckpt = load_checkpoint(path)
    cfg = from_dict(Config, ckpt.get("config") or {}, where=f"{path}: ")
    cfg.model.pretrained = None  # the checkpoint holds the weights
    state = ckpt["model"] if isinstance(ckpt["model"], dict) else {}
    bad = next((k for k, v in state.items()
                if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # a diverged run: exporting or evaluating it would only fail later, less clearly
        raise UserError(f"{path}: weight '{bad}' holds NaN or inf values (did training diverge?); refusing to load it")
    model = build_model(cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit {cfg.model.backbone}: {str(exc).splitlines()[0]}") from None
    model.eval()
    model.normalize = cfg.data.normalize
    model.threshold, model.threshold_source = pick_threshold(ckpt.get("last_eval") or {}, cfg.eval.best_metric)
    model.backbone_name = cfg.model.backbone
    model.model_path = str(path)
    model.checkpoint_path = str(path)
    return model


def random_backbone(name: str, embedding_size: Optional[int] = None, input_size: int = 112,
                    seed: int = 0, **options) -> torch.nn.Module:
    """A backbone with random weights (for timing and size checks), same attributes as above."""
    torch.manual_seed(seed)
    model = build_backbone(name, embedding_size=embedding_size, input_size=input_size, **options).eval()
    model.normalize = "arcface"
    model.threshold, model.threshold_source = None, None
    model.backbone_name = name
    model.model_path = None
    return model


def trained_looking(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` in eval mode with BatchNorm statistics/affines and PReLU slopes drawn from ranges a
    trained network has. Fresh ones make every BN an identity and every PReLU alike, which hides
    folding, quantisation and precision errors in numeric checks and benchmarks of untrained models."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(0.05 + 0.3 * torch.rand(m.weight.shape, generator=generator))
    return model.eval()


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips holding ``<name>/code/`` (checkpoints hold ``data.pkl`` only);
    read from the zip's member names only."""
    return code_kind(path) == TORCHSCRIPT


def _looks_like_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


class TorchScriptEmbedder(torch.nn.Module):
    """Our TorchScript export (``marginface export --format torchscript``) with its metadata."""

    def __init__(self, path: Path, normalize: Optional[str] = None, *, trust_code: bool = False):
        super().__init__()
        if not trust_code:  # torch.jit.load runs the archive's code
            raise UserError(f"{path}: {WHY[TORCHSCRIPT]}; pass --trust-code if you trust this file")
        extra = {TORCHSCRIPT_EXTRA: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            raise UserError(f"{path}: not a loadable TorchScript model ({str(exc).strip().splitlines()[0][:200]})") from None
        try:
            meta = json.loads(extra[TORCHSCRIPT_EXTRA] or "{}")
        except ValueError:
            meta = {}
        self.metadata = meta
        size = meta.get("input_size") or [112, 112]
        self.input_size = (int(size[0]), int(size[1]))
        self.embedding_size = meta.get("embedding_size")
        self.normalize = normalize or meta.get("normalize") or "arcface"
        self.threshold = meta.get("threshold")
        self.threshold_source = meta.get("threshold_source")
        self.model_path = str(path)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def load_model(path_or_run: Union[str, Path], normalize: Optional[str] = None, *,
               threads: Optional[int] = None, prefer: str = "best", trust_code: bool = False):
    """Any supported model -> a callable embedder (see the module docstring).

    ``threads`` sets ONNX Runtime's intra-op threads for ONNX models (None: its default).
    ``trust_code``: allow TorchScript archives and compiled ``.pt2`` packages, which run code
    when loaded; without it they raise `UserError` before torch opens them.
    """
    _check_normalize(normalize)
    path = Path(path_or_run)
    if not path.exists():
        raise UserError(f"{path}: model not found (expected a run directory, a .pt checkpoint, a .onnx or .pt2 file)")
    kind = refuse_untrusted(path, trust_code)  # before any torch/ONNX Runtime code touches the file
    if path.is_file() and _looks_like_onnx(path):
        model = OnnxEmbedder(path, normalize, threads=threads)
        model.model_path = str(path)
        return model
    if kind == COMPILED:
        return CompiledEmbedder.load(path, normalize, trust_code=trust_code)
    if kind == TORCHSCRIPT:
        return TorchScriptEmbedder(path, normalize, trust_code=trust_code)
    model = load_checkpoint_model(path, prefer)
    if normalize is not None:
        model.normalize = normalize
    return model


def model_files(model) -> list[Path]:
    """The files a loaded model came from (an ONNX model's external data included)."""
    path = getattr(model, "model_path", None)
    if not path:
        return []
    path = Path(path)
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.is_file():
        files.append(data)
    return files
