"""LiteRT (TensorFlow Lite) ``.tflite``: converted from PyTorch by ``litert-torch`` (no TensorFlow), full-integer
int8 by ``ai-edge-quantizer``, run by ``ai_edge_litert``'s interpreter (XNNPACK delegate, ``num_threads``).

fp32: the BatchNorm-folded model as litert-torch lowers it (NCHW float32 input ``1×3×H×W``, the raw
``1×D`` embedding out). int8: that file statically quantised with the calibration crops: weights int8
per output channel (symmetric), activations int8 per tensor (asymmetric, min/max of the calibration set),
and int8 input and output tensors; their scale and zero point sit in the file (`Embedder` and the
examples/mobile app quantise the normalised input and dequantise the embedding with them).

PReLU is written as ``x + relu(k·x)`` with ``k = a - 1`` (a 1×1 depthwise convolution with a fused ReLU,
exact for slopes ``a <= 1``; slopes above 1 add a second branch). litert-torch's own form has a
standalone ReLU, which the XNNPACK delegate does not take in int8: every PReLU would then leave the
delegate and run in the slow reference kernels.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from marginface.data.detect.retinaface import BGR_MEAN, RetinaFaceDetector, anchors
from marginface.data.transforms import to_tensor
from marginface.deploy.mobile import RuntimeEmbedder
from marginface.deploy.modelfile import atomic_path
from marginface.errors import UserError
from marginface.inference import as_hw
from marginface.models.fold import fold_batchnorm, regroup_thin_convs

DETECTOR_SIZE = 640  # side of the square detector input (examples/mobile letterboxes photos into it)
THIN_GROUP_WIDTH = 8  # grouped convs with fewer input channels per group are widened to this (for_litert)
MAGIC = b"TFL3"  # flatbuffer file identifier, bytes 4..8 of every .tflite
INT8_SCHEME = ("static int8 (ai-edge-quantizer static_wi8_ai8): weights per-channel symmetric, activations "
               "per-tensor asymmetric (min/max calibration), int8 input and output")


# ---------------------------------------------------------------------------------------------- graph
def _depthwise_1x1(weight: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(len(weight), len(weight), 1, groups=len(weight), bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(-1, 1, 1, 1))
    return conv


class ReluFormPReLU(nn.Module):
    """``PReLU(x) = x + (1-a)·relu(-x) = x + relu(k·x) - relu(j·x)`` with ``1-a = p - n`` split into
    non-negative parts (``k = -p``, ``j = -n``); the second branch only exists when some slope ``a > 1``.
    Each ``relu(k·x)`` is a 1×1 depthwise convolution with a fused ReLU, which int8 XNNPACK runs."""

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        b = 1.0 - prelu.weight.detach().float().reshape(-1)
        self.pos = _depthwise_1x1(-b.clamp(min=0))
        self.neg = _depthwise_1x1(-(-b).clamp(min=0)) if bool((b < 0).any()) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + torch.relu(self.pos(x))
        return out if self.neg is None else out - torch.relu(self.neg(x))


def for_litert(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every per-channel ``nn.PReLU`` as `ReluFormPReLU` (a single
    shared slope stays as it is) and thin grouped convolutions (mbf's stem: 2 channels per group) as
    8 channels per group (`models.fold.regroup_thin_convs`; zero blocks, the same outputs): XNNPACK runs
    mbf about 1.3x faster so in fp32 and 1.25x in int8 on an AVX2 CPU. The same function."""
    model = regroup_thin_convs(copy.deepcopy(model).eval(), THIN_GROUP_WIDTH)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.PReLU) and child.num_parameters > 1:
                setattr(parent, name, ReluFormPReLU(child))
            else:
                swap(child)
    swap(model)
    return model


@contextlib.contextmanager
def _quiet_converter():
    """litert-torch prints a progress tree on stdout (which `--json` keeps for the JSON object): off
    while we convert."""
    saved = {k: os.environ.get(k) for k in ("LITERT_TORCH_SHOW_PROGRESS",)}
    os.environ.update({"LITERT_TORCH_SHOW_PROGRESS": "n"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def convert_bytes(model: nn.Module, input_shape: tuple[int, ...], *, prepare: bool = True) -> bytes:
    """``model`` (float32 in, any outputs) as an fp32 ``.tflite`` flatbuffer with a fixed input shape."""
    import litert_torch

    module = for_litert(model) if prepare else model.eval()
    with _quiet_converter(), torch.no_grad():
        return bytes(litert_torch.convert(module, (torch.zeros(input_shape),)).model_content())


def quantize_bytes(float_model: bytes, calibration: np.ndarray) -> bytes:
    """Full-integer int8 of an fp32 ``.tflite`` (``calibration``: inputs as the model takes them, ``N×...``
    float32, fed one at a time)."""
    from ai_edge_quantizer import quantizer, recipe

    with _quiet_converter():
        qt = quantizer.Quantizer(float_model)
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        signature = _only_signature(float_model)
        samples = [{signature[1]: calibration[i : i + 1].astype(np.float32)} for i in range(len(calibration))]
        # its progress bars, and a warning about the debugging option its calibrator turns on
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ranges = qt.calibrate({signature[0]: samples}, num_threads=1)
            return bytes(qt.quantize(ranges, enable_progress_bar=False, enable_progress_report=False).quantized_model)


def _only_signature(model: bytes) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_content=model).get_signature_list()
    (key, io), = signatures.items()
    return key, io["inputs"][0]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def export(model: nn.Module, out: Path, *, precision: str, calib_images: Optional[np.ndarray],
           metadata: dict) -> dict:
    """Write ``model`` as ``out`` (.tflite), fp32 or full-integer int8 calibrated on ``calib_images``."""
    h, w = as_hw(metadata.get("input_size")) or (112, 112)
    data = convert_bytes(model, (1, 3, h, w))
    report = {"converter": " ".join(f"{k} {v}" for k, v in _versions().items()), "layout": "NCHW",
              "quantization": "none"}
    if precision == "int8":
        if calib_images is None or not len(calib_images):
            raise UserError("--precision int8 needs --calib DIR: a folder of aligned face crops for calibration")
        calibration = to_tensor(calib_images, metadata.get("normalize", "arcface")).numpy()
        report["fp32_mb"] = round(len(data) / 1e6, 3)
        data = quantize_bytes(data, calibration)
        report["quantization"] = INT8_SCHEME
        report["calibration_images"] = int(len(calib_images))
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(data)
    return report


# ---------------------------------------------------------------------------------------------- runtime
def open_interpreter(path: Path, threads: Optional[int] = None):
    """``ai_edge_litert`` interpreter for ``path`` with tensors allocated; anything that is not a
    whole ``.tflite`` is one `UserError` line naming the file."""
    from ai_edge_litert.interpreter import Interpreter

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(head) < 8 or head[4:8] != MAGIC:
        raise UserError(f"{path}: not a LiteRT/TFLite model (no TFL3 flatbuffer header)")
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: not a valid LiteRT/TFLite model (truncated or damaged: "
                        f"{str(exc).strip().splitlines()[0][:160]})") from None
    return interpreter


class Embedder(RuntimeEmbedder):
    """A ``.tflite`` embedder run by ``ai_edge_litert`` (batch 1, NCHW input; int8 models quantise the
    input and dequantise the output with the file's own scale and zero point)."""

    kind = "tflite"
    fixed_batch = 1

    def __init__(self, path, normalize=None, *, threads=None):
        self.interpreter = open_interpreter(Path(path), threads)
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0]["shape"]) != 4 or inputs[0]["shape"][1] != 3 \
                or len(outputs[0]["shape"]) != 2:
            raise UserError(f"{path}: not a face embedder (expects one 1×3×H×W input and one 1×D output, has "
                            f"{[list(d['shape']) for d in inputs]} -> {[list(d['shape']) for d in outputs]})")
        self._in, self._out = inputs[0], outputs[0]
        self.fixed_batch = int(self._in["shape"][0])
        precision = "int8" if np.dtype(self._in["dtype"]) == np.int8 else "fp32"
        self._set_info(Path(path), normalize, input_size=tuple(int(v) for v in self._in["shape"][2:]),
                       embedding_size=int(self._out["shape"][1]), precision=precision)

    def _run(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self._in["quantization"]
        if np.dtype(self._in["dtype"]) == np.int8:
            x = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
        self.interpreter.set_tensor(self._in["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self._out["index"])
        scale, zero = self._out["quantization"]
        if np.dtype(self._out["dtype"]) != np.float32:
            return (y.astype(np.float32) - zero) * scale
        return y.copy()


# ---------------------------------------------------------------------------------------------- detector
class _RetinaFaceRGB(nn.Module):
    """RetinaFace-MobileNet0.25 taking RGB 0-255 pixels (``1×3×S×S`` float32) as an app has them: the
    BGR order and the Caffe means the network was trained with are applied inside the graph."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(BGR_MEAN, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, x: torch.Tensor):
        return self.net(torch.flip(x, dims=[1]) - self.mean)


def export_retinaface(weights, out: Path, size: int = DETECTOR_SIZE) -> dict:
    """The RetinaFace detector marginface uses (``--detector retinaface``, weights as `find_retinaface_weights`
    finds them) as a fixed ``1×3×size×size`` fp32 ``.tflite`` for apps: outputs ``scores 1×A``,
    ``box deltas 1×A×4``, ``landmark deltas 1×A×10`` against the anchors of `data.detect.retinaface.anchors`
    (decoded as `RetinaFaceDetector.detect` does; docs/mobile.md)."""
    detector = RetinaFaceDetector(weights)
    module = _RetinaFaceRGB(fold_batchnorm(detector.net.eval()))
    data = convert_bytes(module, (1, 3, size, size), prepare=False)
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(data)
    return {"out": str(out), "input": f"1x3x{size}x{size} float32 RGB 0-255, image top-left, zero padded",
            "anchors": int(len(anchors(size, size))), "file_mb": round(len(data) / 1e6, 3),
            "converter": " ".join(f"{k} {v}" for k, v in _versions().items())}
