"""One loader for every model marginface can run: ``load_model(path_or_run, normalize=None)``.

It accepts a run directory, a training checkpoint (``.pt``), a plain state dict of any backbone we
build (ours, or insightface arcface_torch's ``backbone.pth`` for r18..r200 and mbf: architecture
recognised from the tensors, `marginface.models.pretrained`), our TorchScript export, our ONNX
export, our compiled package (``.pt2``, `deploy.compiled`) or a foreign insightface-style ONNX
recognition model, and returns an `marginface.inference.Embedder`: a callable
(normalised float ``N×3×H×W`` -> ``N×D``) whose ``.info`` is a frozen `ModelInfo` resolved here,
once: ``input_size`` ((H, W)), ``embedding_size``, ``normalize`` ("arcface"/"imagenet"; the
``normalize`` argument overrides what the model records; a foreign ONNX model without metadata
defaults to "arcface"), ``threshold`` / ``threshold_source`` (the verification threshold picked at
eval time, from the checkpoint's ``last_eval`` or the export's metadata; None when there is none),
``source`` (the file loaded), ``kind`` and ``precision``. Readers use ``model.info``; the plain
attributes checkpoint backbones also carry (``normalize``, ``threshold``, ``model_path``, ...) are
kept for older callers only.

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

from marginface.deploy import mobile
from marginface.deploy.compiled import CompiledEmbedder
from marginface.deploy.onnx_model import OnnxEmbedder
from marginface.errors import UserError
from marginface.hardware import flush_denormals
from marginface.inference import (DEFAULT_INPUT_SIZE, DEFAULT_NORMALIZE, NORMALIZE_NAMES, InfoAttributes, ModelInfo,
                                  check_normalize)
from marginface.io.trust import COMPILED, TORCHSCRIPT, WHY, code_kind, refuse_untrusted
from marginface.models import build_backbone
from marginface.models.pretrained import backbone_from_state, is_marginface_checkpoint, read_weights_file, state_dict_of
from marginface.train.checkpoint import backbone_from_checkpoint, load_checkpoint, resolve_checkpoint

TORCHSCRIPT_EXTRA = "marginface.json"  # metadata file inside our TorchScript exports


def _check_normalize(normalize: Optional[str]) -> None:
    check_normalize(normalize, "--normalize")


def _attach(model, info: ModelInfo):
    """``model`` with ``info`` as its ``.info`` and the legacy attributes of a checkpoint backbone
    (``normalize``, ``threshold``, ``threshold_source``, ``backbone_name``, ``model_path``) set
    from it, for callers written before `ModelInfo`."""
    model.info = info
    model.normalize = info.normalize
    model.threshold, model.threshold_source = info.threshold, info.threshold_source
    model.backbone_name = info.backbone
    model.model_path = info.source
    return model


def load_checkpoint_model(model_path: Union[str, Path], prefer: str = "best") -> torch.nn.Module:
    """A run directory / checkpoint -> its backbone in eval mode on the CPU, with ``input_size``,
    ``embedding_size``, ``normalize``, ``threshold``, ``threshold_source``, ``backbone_name``,
    ``model_path``. Reads the checkpoint once (see ``train.checkpoint.load_backbone``)."""
    path = resolve_checkpoint(str(model_path), prefer)
    return _checkpoint_model(path, load_checkpoint(path))


def load_torch_model(model_path: Union[str, Path], prefer: str = "best", *,
                     backbone: Optional[str] = None) -> torch.nn.Module:
    """A run directory, a marginface checkpoint or a plain state dict (ours or insightface
    arcface_torch's ``backbone.pth``) -> the backbone in eval mode on the CPU, with ``.info``.

    The file is read once with ``torch.load(weights_only=True)``. A state dict's architecture is
    recognised from its tensor names and shapes (`marginface.models.pretrained`); ``backbone``
    overrides the recognised name. It gets ``normalize`` "arcface" (insightface's convention)
    and no threshold.
    """
    path = resolve_checkpoint(str(model_path), prefer)
    obj = read_weights_file(path)
    if is_marginface_checkpoint(obj):
        if backbone is not None:
            raise UserError(f"{path}: is a marginface checkpoint, which records its backbone; "
                            f"--backbone applies to plain state dicts only")
        return _checkpoint_model(path, obj)
    model, found = backbone_from_state(state_dict_of(obj, str(path)), str(path), backbone)
    info = ModelInfo(input_size=found.input_size, embedding_size=model.embedding_size, normalize=DEFAULT_NORMALIZE,
                     source=str(path), kind="state_dict", precision="fp32", backbone=found.name)
    model.checkpoint_path = str(path)
    return _attach(model, info)


def _checkpoint_model(path: Path, ckpt: dict) -> torch.nn.Module:
    model = backbone_from_checkpoint(path, ckpt)
    return _attach(model, model.info)


def random_backbone(name: str, embedding_size: Optional[int] = None, input_size: int = 112,
                    seed: int = 0, **options) -> torch.nn.Module:
    """A backbone with random weights (for timing and size checks), same attributes as above."""
    torch.manual_seed(seed)
    model = build_backbone(name, embedding_size=embedding_size, input_size=input_size, **options).eval()
    info = ModelInfo(input_size=model.input_size, embedding_size=model.embedding_size, normalize=DEFAULT_NORMALIZE,
                     kind="random", precision="fp32", backbone=name)
    return _attach(model, info)


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


class TorchScriptEmbedder(InfoAttributes, torch.nn.Module):
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
        self.metadata = meta if isinstance(meta, dict) else {}
        meta = self.metadata
        recorded = meta.get("normalize")
        if normalize is None and recorded is not None and recorded not in NORMALIZE_NAMES:
            raise UserError(f"{path}: metadata asks for normalisation {recorded!r}, which marginface "
                            f"does not know; pass --normalize arcface or imagenet")
        try:
            self.info = ModelInfo(input_size=meta.get("input_size") or DEFAULT_INPUT_SIZE,
                                  embedding_size=meta.get("embedding_size"),
                                  normalize=normalize or recorded or DEFAULT_NORMALIZE,
                                  threshold=meta.get("threshold"), threshold_source=meta.get("threshold_source"),
                                  source=str(path), kind="torchscript", precision="fp32",
                                  backbone=meta.get("backbone"))
        except UserError as exc:
            raise UserError(f"{path}: bad marginface metadata: {exc}") from None
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def load_model(path_or_run: Union[str, Path], normalize: Optional[str] = None, *,
               threads: Optional[int] = None, prefer: str = "best", trust_code: bool = False,
               backbone: Optional[str] = None):
    """Any supported model -> a callable embedder (see the module docstring).

    ``backbone`` (``--backbone``): the architecture of a plain state dict, instead of the one
    recognised from its tensors (an error for other kinds of model).

    ``threads`` sets ONNX Runtime's intra-op threads for ONNX models (None: its default).
    ``trust_code``: allow TorchScript archives and compiled ``.pt2`` packages, which run code
    when loaded; without it they raise `UserError` before torch opens them.
    """
    _check_normalize(normalize)
    flush_denormals()  # subnormal activations: 10-100x slower on x86 (docs/performance.md)
    path = Path(path_or_run)
    if not path.exists():
        raise UserError(f"{path}: model not found (expected a run directory, a .pt checkpoint, a .onnx or .pt2 file, "
                        f"or a mobile export: {', '.join(s for f in mobile.MOBILE_FORMATS.values() for s in f.suffixes)})")
    kind = refuse_untrusted(path, trust_code)  # before any torch/ONNX Runtime code touches the file
    if backbone is not None and (kind is not None or (path.is_file() and (_looks_like_onnx(path)
                                                                           or mobile.format_of(path)))):
        raise UserError(f"{path}: --backbone applies to plain state dicts (.pth) only")
    if path.is_file() and _looks_like_onnx(path):
        return OnnxEmbedder(path, normalize, threads=threads)
    if path.is_file() and mobile.format_of(path) is not None:  # runs in the format's own runtime
        return mobile.load(path, normalize, threads=threads)
    if kind == COMPILED:
        return CompiledEmbedder.load(path, normalize, trust_code=trust_code)
    if kind == TORCHSCRIPT:
        return TorchScriptEmbedder(path, normalize, trust_code=trust_code)
    model = load_torch_model(path, prefer, backbone=backbone)
    if normalize is not None:
        _attach(model, model.info.with_normalize(normalize))
    return model


def model_files(model) -> list[Path]:
    """The files a loaded model came from (an ONNX model's external data included)."""
    path = ModelInfo.of(model).source
    if not path:
        return []
    path = Path(path)
    files = [path]
    fmt = mobile.format_of(path)
    companions = [path.with_suffix(s) for s in fmt.companions] if fmt else []
    for extra in [path.with_name(path.name + ".data")] + companions:
        if extra.is_file():
            files.append(extra)
    return files
