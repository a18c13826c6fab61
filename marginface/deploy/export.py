"""Export a trained backbone to ONNX or TorchScript for deployment.

What an export holds:

- BatchNorm folded into the preceding conv/linear (``marginface.deploy.fold``), eval mode;
- a dynamic batch axis (input ``input`` ``N×3×H×W`` float32, output ``embedding`` ``N×D``,
  un-normalised: L2-normalise before comparing);
- ONNX opset 13 by default (see ``DEFAULT_OPSET``);
- the preprocessing and the verification threshold in the model's metadata (ONNX
  ``metadata_props``; TorchScript ``marginface.json`` extra file), keys ``METADATA_KEYS``.

Files are written atomically: to a temporary file in the target folder, then renamed, so an
error (or a kill) never leaves a half-written model behind under the target name.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from marginface.data.synthetic import render_identities
from marginface.data.transforms import NORMALIZATIONS, to_tensor
from marginface.deploy.autoprecision import AUTO, choose_precision
from marginface.deploy.compiled import CompiledEmbedder, PRECISIONS
from marginface.deploy.fold import fold_batchnorm, rewrite_prelu
from marginface.deploy import mobile
from marginface.deploy.mobile.onnx_graph import module_from_onnx
from marginface.deploy.load import TORCHSCRIPT_EXTRA, load_model, load_torch_model, random_backbone
from marginface.deploy.modelfile import atomic_path, file_mb, set_onnx_metadata  # noqa: F401  (public here too)
from marginface.deploy.quantize import QuantOptions, load_calibration_images, quantize_onnx
from marginface.errors import UserError
from marginface.inference import ModelInfo
from marginface.io.atomic import atomic_save_torch
from marginface.models import build_backbone
from marginface.models.insightface import OURS_TO_INSIGHTFACE, to_insightface

# Opset 13 is the newest opset that every mobile runtime we target reads (ONNX Runtime Mobile,
# NCNN/pnnx, MNN, TNN, onnx2tf -> TFLite, Qualcomm QNN/SNPE, TensorRT) and the first with
# per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute), which int8 per-channel
# weights need. Our graphs use only Conv, PRelu, Add, Flatten, MatMul/Gemm (plus Mul, Sigmoid,
# ReduceMean for SE blocks), all unchanged since opset 13, so a newer opset buys nothing and
# would lock out older converters. 13..17 are accepted.
DEFAULT_OPSET = 13
OPSET_RANGE = (13, 17)
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
FORMAT_VERSION = "marginface-export-v1"

METADATA_KEYS = {
    "marginface_format": "export format version",
    "input_name": "name of the image input",
    "input_size": "H,W of the input in pixels",
    "layout": "NCHW",
    "color_order": "RGB",
    "pixel_range": "0-255: mean/std apply to raw 8-bit pixel values",
    "mean": "per-channel mean subtracted (R,G,B)",
    "std": "per-channel std divided by (R,G,B)",
    "normalize": "name of the normalisation (arcface | imagenet)",
    "alignment": "arcface-5-point: faces aligned to the ArcFace template",
    "embedding_size": "D",
    "output_normalized": "false: L2-normalise the output before computing cosines",
    "threshold": "verification threshold on cosine similarity (same if > threshold), or none",
    "threshold_source": "eval set the threshold was picked on",
    "backbone": "backbone name",
    "bn_folded": "true",
    "quantization": "none | int8 scheme",
    "prelu_form": "max: PReLU written as Max(x, a*x) (exact); native: ONNX PRelu",
    "source": "checkpoint it came from",
}


# ---------------------------------------------------------------------------------------------- sources
def load_source(model_or_path, *, backbone: Optional[str] = None, embedding_size: Optional[int] = None,
                input_size: int = 112, width_mult: Optional[float] = None) -> torch.nn.Module:
    """A torch backbone to export: an ``nn.Module`` as is, a run dir / checkpoint, or (with
    ``backbone`` and no model) a randomly initialised architecture. ``backbone`` with a path: the
    architecture of a plain state dict (an error for a marginface checkpoint, which records its own)."""
    if backbone and isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if path.suffix.lower() == ".onnx":
            raise UserError(f"{path}: already an ONNX model; export takes a run directory or a .pt checkpoint")
        return load_torch_model(path, backbone=backbone)
    if backbone:
        options = {"width_mult": width_mult} if width_mult else {}
        return random_backbone(backbone, embedding_size, input_size, **options)
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path.eval()
    if model_or_path is None:
        raise UserError("export: give a run directory or checkpoint (or --backbone NAME)")
    path = Path(model_or_path)
    if path.suffix.lower() == ".onnx":
        raise UserError(f"{path}: already an ONNX model; export takes a run directory or a .pt checkpoint")
    return load_torch_model(path)  # a run, a checkpoint or a plain state dict (insightface's backbone.pth)


def _input_hw(model) -> tuple[int, int]:
    return ModelInfo.of(model).image_size


def build_metadata(model, *, quantization: str = "none", extra: Optional[dict] = None) -> dict[str, str]:
    """The metadata our exports carry (all values strings, as ONNX metadata_props require)."""
    info = ModelInfo.of(model)
    normalize = info.normalize
    mean, std = NORMALIZATIONS[normalize]
    h, w = info.image_size
    threshold = info.threshold
    meta = {
        "marginface_format": FORMAT_VERSION,
        "input_name": INPUT_NAME,
        "input_size": f"{h},{w}",
        "layout": "NCHW",
        "color_order": "RGB",
        "pixel_range": "0-255",
        "mean": ",".join(f"{v:g}" for v in mean),
        "std": ",".join(f"{v:g}" for v in std),
        "normalize": normalize,
        "alignment": "arcface-5-point",
        "embedding_size": str(info.embedding_size if info.embedding_size is not None else ""),
        "output_normalized": "false",
        "threshold": f"{threshold:.6f}" if threshold is not None else "none",
        "threshold_source": str(info.threshold_source or "none"),
        "backbone": str(info.backbone or type(model).__name__),
        "bn_folded": "true",
        "quantization": quantization,
        "source": str(info.source or "none"),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def parity_images(input_size: tuple[int, int], count: int = 16, seed: int = 0) -> np.ndarray:
    """Deterministic synthetic faces (``N×H×W×3`` uint8) for parity checks and calibration."""
    import cv2

    faces = render_identities(range(count), 1, 112, seed)
    h, w = input_size
    if (h, w) != (112, 112):
        faces = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in faces])
    return faces


def compare_embeddings(reference: np.ndarray, other: np.ndarray) -> dict:
    """``max_abs_diff`` and the smallest / mean cosine between two sets of raw embeddings."""
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()), "images": int(len(a))}


# ---------------------------------------------------------------------------------------------- ONNX
def _torch_onnx_export(model, example, target: Path, opset: int, dynamic_batch: bool) -> None:
    """Write ``model`` to ``target`` with torch's exporter (TorchScript-based when available: it
    exports opset 13 natively and in ~1 s; else the dynamo exporter, converted down)."""
    dynamic_axes = {INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}} if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(target), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True,
                              dynamo=False)
            return
        except TypeError:  # a torch without the TorchScript exporter
            pass
        shapes = {"x": {0: torch.export.Dim("N")}} if dynamic_batch else None
        torch.onnx.export(model, (example,), str(target), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_shapes=shapes, dynamo=True, external_data=False)


def export_onnx(model: torch.nn.Module, out: Union[str, Path], *, opset: int = DEFAULT_OPSET,
                metadata: Optional[dict] = None, dynamic_batch: bool = True, fold: bool = True,
                prelu: str = "max") -> Path:
    """Fold BN, export to ONNX with metadata, check the graph, write ``out`` atomically.

    ``prelu="max"`` writes each PReLU in the exactly equivalent Mul/Max form (`MaxFormPReLU`),
    which ONNX Runtime runs ~2x faster end to end; ``"native"`` keeps ONNX ``PRelu`` ops.
    """
    import onnx

    if prelu not in ("max", "native"):
        raise UserError(f"prelu must be 'max' or 'native', got {prelu!r}")

    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise UserError(f"--opset {opset}: choose {OPSET_RANGE[0]}..{OPSET_RANGE[1]} (13 = widest mobile support)")
    model = model.eval()
    folded = fold_batchnorm(model) if fold else copy.deepcopy(model)
    if prelu == "max":
        folded = rewrite_prelu(folded)
    example = torch.zeros((1, 3) + _input_hw(model))
    meta = dict(metadata if metadata is not None else build_metadata(model))
    meta["prelu_form"] = prelu
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as work:
        raw = Path(work) / "raw.onnx"
        try:
            _torch_onnx_export(folded, example, raw, opset, dynamic_batch)
        except Exception as exc:
            raise UserError(f"ONNX export of {type(model).__name__} failed: {str(exc).strip().splitlines()[0][:300]}") from None
        proto = onnx.load(str(raw))
        set_onnx_metadata(proto, meta, "marginface face embedder: aligned RGB face -> embedding; see metadata_props")
        onnx.checker.check_model(proto)
        with atomic_path(out) as tmp:
            onnx.save(proto, str(tmp))
    return out


def export_torchscript(model: torch.nn.Module, out: Union[str, Path], *, metadata: Optional[dict] = None,
                       fold: bool = True) -> Path:
    """BN-folded, traced and frozen TorchScript with ``marginface.json`` metadata, written atomically."""
    model = model.eval()
    folded = fold_batchnorm(model) if fold else model
    example = torch.zeros((2, 3) + _input_hw(model))
    meta = metadata if metadata is not None else build_metadata(model)
    info = ModelInfo.of(model)
    h, w = info.image_size
    extra = {**meta, "input_size": [h, w], "embedding_size": info.embedding_size,
             "threshold": info.threshold, "mean": [float(v) for v in meta["mean"].split(",")],
             "std": [float(v) for v in meta["std"].split(",")]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(folded, example, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
    with atomic_path(out) as tmp, open(tmp, "wb") as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # to a file object: torch writes the bytes with handle.write, so a full disk is an OSError
        # (one error line naming out) rather than an opaque RuntimeError from its C++ writer
        torch.jit.save(frozen, handle, _extra_files={TORCHSCRIPT_EXTRA: json.dumps(extra)})
    return Path(out)


# ---------------------------------------------------------------------------------------------- the command
def export_compiled(model: torch.nn.Module, out: Union[str, Path], *, precision: str = "fp32", batch_size: int = 1,
                    calib: Optional[Union[str, Path]] = None, calib_limit: int = 256) -> dict:
    """An ahead-of-time compiled package (``.pt2``, `deploy.compiled`): the fastest CPU path
    (x86 int8 / bf16), tied to this torch version and CPU; runs every call in batches of
    ``batch_size`` (1: lowest latency)."""
    _check_compiled_args(out, precision, calib)

    if calib:
        images = load_calibration_images(calib, _input_hw(model), limit=calib_limit)
    else:
        images = parity_images(_input_hw(model), max(batch_size, 1 if precision != AUTO else 16))
    x = to_tensor(images, ModelInfo.of(model).normalize)
    report: dict = {}
    if precision == AUTO:  # the fastest path that reproduces fp32 on these images (int8 only with real faces)
        choice = choose_precision(model, x, precisions=tuple(p for p in PRECISIONS if calib or p != "int8"))
        report["precision_auto"] = choice.to_dict()
        if choice.precision not in PRECISIONS:
            raise UserError("--precision auto: no compiled path reproduced eager fp32 within its bound "
                            "(see `marginface bench --runtimes torch-compiled-auto`); export --precision fp32")
        precision = choice.precision
    embedder = CompiledEmbedder(model, precision, batch_size=batch_size, calibration=x)
    embedder(x[:batch_size])  # compiles (int8: calibrated on every calibration image)
    embedder.save(out)
    return {"precision": precision, "batch_size": batch_size, **report}


def _check_compiled_args(out: Union[str, Path], precision: str, calib) -> None:
    if Path(out).suffix != ".pt2":
        raise UserError(f"--out {out}: a compiled package must end in .pt2")
    if precision not in PRECISIONS + (AUTO,):
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS + (AUTO,))}, got {precision!r}")
    if precision == "int8" and not calib:
        raise UserError("--precision int8 needs --calib DIR: a folder of aligned face crops for calibration")


def export_insightface_pth(model: torch.nn.Module, out: Union[str, Path]) -> dict:
    """A state dict with insightface arcface_torch's names: ``get_model(name,
    num_features=D).load_state_dict(torch.load(out))`` accepts it (r18..r200, mbf at 112 px)."""
    info = ModelInfo.of(model)
    name = info.backbone or ""
    where = f"--format insightface-pth ({name or type(model).__name__})"
    if name not in OURS_TO_INSIGHTFACE:
        raise UserError(f"{where}: insightface's arcface_torch builds only "
                        f"{', '.join(sorted(OURS_TO_INSIGHTFACE))}; export this model as onnx instead")
    if info.image_size != (112, 112):
        raise UserError(f"{where}: insightface's {OURS_TO_INSIGHTFACE[name]} takes 112x112 crops, "
                        f"this model {info.image_size[0]}x{info.image_size[1]}")
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}
    reference = build_backbone(name, embedding_size=info.embedding_size).state_dict()
    odd = next((k for k in reference if k not in state or state[k].shape != reference[k].shape), None)
    if odd is not None or len(state) != len(reference):  # e.g. width_mult != 1: no insightface equivalent
        raise UserError(f"{where}: this {name} differs from the standard one at {odd or 'its extra tensors'} "
                        f"(a width multiplier?); insightface has no such model")
    atomic_save_torch(to_insightface(state, name, where=f"{where}: "), Path(out))
    return {"insightface_name": OURS_TO_INSIGHTFACE[name], "num_features": info.embedding_size}


# `export --precision`: auto picks among the compiled ones; fp16: weight storage of some mobile formats
EXPORT_PRECISIONS = PRECISIONS + ("fp16", AUTO)
FORMATS = ("onnx", "torchscript", "aoti", "insightface-pth") + tuple(mobile.MOBILE_FORMATS)


def export_model(source, out: Union[str, Path], *, fmt: str = "onnx", int8: bool = False,
                 calib: Optional[Union[str, Path]] = None, opset: int = DEFAULT_OPSET,
                 backbone: Optional[str] = None, quant_options=None, check: bool = True,
                 calib_limit: int = 256, precision: str = "fp32", batch_size: int = 1,
                 normalize: Optional[str] = None) -> dict:
    """``marginface export``: returns a report (file, size, metadata, parity with PyTorch).
    A mobile format also takes a plain convolutional ONNX embedder as ``source`` (`mobile.onnx_graph`;
    ``normalize``: its input normalisation when the file does not record one)."""
    out = Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if int8 and fmt != "onnx":
        raise UserError("--int8 needs --format onnx (a compiled package takes --precision int8)")
    if precision != "fp32" and fmt != "aoti" and fmt not in mobile.MOBILE_FORMATS:
        raise UserError(f"--precision {precision} needs --format aoti (ONNX int8: --int8)")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if int8 and not calib:
        raise UserError("--int8 needs --calib DIR: a folder of aligned face crops for calibration")
    if fmt == "aoti":
        _check_compiled_args(out, precision, calib)  # before the (slow) model load
    if fmt in mobile.MOBILE_FORMATS:
        mobile.MOBILE_FORMATS[fmt].load_module("converter")  # a missing converter: one line, before the load
    if fmt in mobile.MOBILE_FORMATS and not backbone and isinstance(source, (str, Path)) \
            and Path(source).suffix.lower() == ".onnx":
        model = module_from_onnx(source, normalize)  # an ONNX embedder through the same converter
    elif normalize is not None:
        raise UserError("--normalize applies to an ONNX embedder given as the model of a mobile export "
                        "(a marginface model records its own)")
    else:
        model = load_source(source, backbone=backbone)
    hw = _input_hw(model)
    if fmt in mobile.MOBILE_FORMATS:
        return _finish_report(export_mobile(model, out, fmt, precision, calib, calib_limit), model, out, check)
    if fmt == "aoti":
        report = {"out": str(out), "format": fmt, "int8": precision == "int8",
                  **export_compiled(model, out, precision=precision, batch_size=batch_size, calib=calib,
                                    calib_limit=calib_limit)}
        return _finish_report(report, model, out, check)
    if int8:
        quant_options = quant_options or QuantOptions()
        calib_images = load_calibration_images(calib, hw, limit=calib_limit)  # fail early, before exporting
    report = {"out": str(out), "format": fmt, "int8": bool(int8)}
    if fmt == "insightface-pth":
        report.update(export_insightface_pth(model, out))
    elif fmt == "torchscript":
        export_torchscript(model, out)
    elif not int8:
        export_onnx(model, out, opset=opset)
        report["opset"] = opset
    else:
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as work:
            fp32 = Path(work) / "fp32.onnx"
            export_onnx(model, fp32, opset=opset)
            report["fp32_mb"] = file_mb(fp32)
            quantize_onnx(fp32, out, calib_images, options=quant_options, normalize=ModelInfo.of(model).normalize)
        report["opset"] = opset
        report["quantization"] = quant_options.describe()
    return _finish_report(report, model, out, check)


def export_mobile(model: torch.nn.Module, out: Path, fmt: str, precision: str, calib, calib_limit: int) -> dict:
    """An ExecuTorch / LiteRT / NCNN / OpenVINO export (`deploy.mobile`) of the BN-folded model, with
    the metadata sidecar; int8 formats calibrate on the ``calib`` folder's aligned crops."""
    if precision == "int8" and not calib:
        raise UserError("--precision int8 needs --calib DIR: a folder of aligned face crops for calibration")
    calib_images = load_calibration_images(calib, _input_hw(model), limit=calib_limit) if precision == "int8" else None
    quantization = "none" if precision == "fp32" else precision
    metadata = build_metadata(model, quantization=quantization)
    folded = fold_batchnorm(model.eval())
    report = {"out": str(out), "format": fmt, "int8": precision == "int8", "precision": precision}
    report.update(mobile.export(fmt, folded, out, precision=precision, calib_images=calib_images, metadata=metadata))
    return report


def _finish_report(report: dict, model, out: Path, check: bool) -> dict:
    """Size (with a mobile format's companion files), parity with the PyTorch model and the metadata
    as read back by `load_model`."""
    fmt = mobile.format_of(out)
    companions = [out.with_suffix(s) for s in fmt.companions] if fmt else []
    report["file_mb"] = file_mb(out) + sum(file_mb(p) for p in companions if p.is_file())
    if check:
        report["parity"] = check_parity(model, out, trust_code=True)  # the file we have just written
    loaded = load_model(out, threads=1, trust_code=True)  # the file we have just written
    report["metadata"] = dict(getattr(loaded, "metadata", {}))
    return report


def check_parity(model: torch.nn.Module, exported: Union[str, Path], images: Optional[np.ndarray] = None, *,
                 trust_code: bool = False) -> dict:
    """Raw embeddings of PyTorch vs the exported file on ``images`` (default: 16 synthetic faces).
    ``trust_code``: the file may be TorchScript or a compiled package (see `load_model`)."""
    hw = _input_hw(model)
    images = parity_images(hw) if images is None else images
    x = to_tensor(images, ModelInfo.of(model).normalize)
    with torch.no_grad():
        reference = model.eval()(x).numpy()
        other = torch.as_tensor(load_model(exported, threads=1, trust_code=trust_code)(x)).numpy()
    return compare_embeddings(reference, other)
