"""OpenVINO IR export (``.xml`` + ``.bin``), run with OpenVINO's own CPU runtime.

Export: ``openvino.convert_model`` on the BN-folded model (batch dimension dynamic, height and
width fixed), then ``openvino.save_model``: ``fp32`` keeps 32-bit weights (``compress_to_fp16``
off), ``fp16`` stores them as half floats (the CPU plugin computes in fp32 all the same), ``int8``
is NNCF post-training quantisation (``nncf.quantize``: per-channel int8 weights, int8 activations
calibrated on the ``--calib`` crops, fast bias correction). OpenVINO writes the pair itself; it
goes to a private temporary folder first and each file is then copied into place atomically (the
``.bin`` first, so an ``.xml`` never appears without its weights).

Run: ``openvino.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": n,
"INFERENCE_PRECISION_HINT": "f32"})``: without the hint the CPU plugin computes in bf16 on CPUs
with AMX/AVX512-BF16, which breaks parity with PyTorch fp32. The program's input shape gives the
input size, its output the embedding size; its precision is read from the graph (int8 constants or
FakeQuantize nodes: int8; half-float constants: fp16).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from marginface.data.transforms import to_tensor
from marginface.deploy.mobile import RuntimeEmbedder, check_companions_free, export_hw
from marginface.deploy.modelfile import atomic_path
from marginface.errors import UserError

PRECISIONS = ("fp32", "fp16", "int8")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # OpenVINO's messages start with "Exception from src/...cpp:123:"; the reason is the next line
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return ((useful or lines or [type(exc).__name__])[0])[:200]


def _nncf():
    try:
        import nncf  # deferred: optional extra (marginface[openvino]), needed for int8 only
    except ImportError:
        raise UserError("--format openvino --precision int8 needs the Python package 'nncf': "
                        "pip install 'marginface[openvino]'") from None
    return nncf


def _quantize(ov_model, calib_images: np.ndarray, normalize: str):
    nncf = _nncf()
    x = to_tensor(calib_images, normalize).numpy()
    dataset = nncf.Dataset([x[i : i + 1] for i in range(len(x))])
    nncf.set_log_level(logging.WARNING)
    # NNCF draws progress bars on stdout: keep `--json` output clean
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(ov_model, dataset, subset_size=len(x), preset=nncf.QuantizationPreset.MIXED)


def _convert(model: Union[torch.nn.Module, Path], metadata: dict):
    """OpenVINO's model of a torch module, or of an ONNX file (the batch dimension made dynamic
    where the graph allows it)."""
    import openvino as ov  # deferred: optional extra (marginface[openvino])

    if isinstance(model, torch.nn.Module):
        h, w = export_hw(metadata, model)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings
            return ov.convert_model(model.eval(), example_input=torch.zeros(1, 3, h, w),
                                    input=[ov.PartialShape([-1, 3, h, w])])
    try:
        ov_model = ov.convert_model(str(model))
    except Exception as exc:
        raise UserError(f"{model}: OpenVINO could not convert this ONNX model ({_first_line(exc)})") from None
    shape = ov_model.inputs[0].get_partial_shape()
    if shape.rank.is_static and shape.rank.get_length() == 4:
        dynamic = ov.PartialShape([-1, *(shape[i] for i in range(1, 4))])
        with contextlib.suppress(Exception):  # a graph with the batch baked into a Reshape keeps batch 1
            ov_model.reshape({ov_model.inputs[0]: dynamic})
    return ov_model


def export(model: Union[torch.nn.Module, Path], out: Path, *, precision: str, calib_images: Optional[np.ndarray],
           metadata: dict) -> dict:
    """Convert ``model`` (a torch module, or the path of an ONNX model such as a pretrained embedder)
    with OpenVINO (and NNCF for int8); write ``out`` (.xml) and ``out``.bin."""
    import openvino as ov  # deferred: optional extra (marginface[openvino])

    out = Path(out)
    if out.suffix.lower() != ".xml":
        raise UserError(f"{out}: an OpenVINO export is an .xml file (its weights go beside it as .bin); "
                        f"name --out like model.xml")
    if precision not in PRECISIONS:
        raise UserError(f"--format openvino takes --precision {' or '.join(PRECISIONS)}, got {precision}")
    check_companions_free(out)
    if precision == "int8" and (calib_images is None or not len(calib_images)):
        raise UserError("--precision int8 needs --calib DIR: a folder of aligned face crops for calibration")
    nncf = _nncf() if precision == "int8" else None  # before the conversion
    report = {"converter": f"openvino {ov.get_version().split('-')[0]}"}
    ov_model = _convert(model, metadata)
    if nncf is not None:
        ov_model = _quantize(ov_model, calib_images, metadata.get("normalize", "arcface"))
        report["quantization"] = (f"nncf {nncf.__version__} post-training: int8 per-channel weights, int8 activations "
                                  f"(mixed preset), {len(calib_images)} calibration images, fast bias correction")
    with tempfile.TemporaryDirectory(prefix="marginface-openvino-") as work:
        xml = Path(work) / "model.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=precision == "fp16")
        weights = xml.with_suffix(".bin")
        with atomic_path(out.with_suffix(".bin")) as tmp:
            shutil.copyfile(weights, tmp)
        with atomic_path(out) as tmp:
            shutil.copyfile(xml, tmp)
    report.update({"companions": [str(out.with_suffix(".bin"))], "weights": precision,
                   "bin_mb": round(out.with_suffix(".bin").stat().st_size / 2**20, 3)})
    return report


def _program_precision(ov_model) -> str:
    ops = ov_model.get_ops()
    if any(op.get_type_name() == "FakeQuantize" for op in ops):
        return "int8"
    types = {op.get_output_element_type(0).get_type_name() for op in ops if op.get_type_name() == "Constant"}
    if types & {"i8", "u8"}:
        return "int8"
    return "fp16" if "f16" in types else "fp32"


def _static(dim) -> Optional[int]:
    return dim.get_length() if dim.is_static else None


class Embedder(RuntimeEmbedder):
    """An OpenVINO IR (``.xml`` + ``.bin``) compiled for the CPU plugin."""

    kind = "openvino"
    fixed_batch = None

    def __init__(self, path, normalize=None, *, threads: Optional[int] = None):
        import openvino as ov  # deferred: optional extra (marginface[openvino])

        path = Path(path)
        try:
            with open(path, "rb") as f:
                head = f.read(512).lstrip()
        except OSError as exc:
            raise UserError(f"{path}: could not read the OpenVINO model ({exc.strerror or exc})") from None
        if not head.startswith(b"<") or b"<net" not in head:
            raise UserError(f"{path}: not an OpenVINO IR .xml file (no <net> element at its start)")
        core = ov.Core()
        try:
            ov_model = core.read_model(str(path), str(path.with_suffix(".bin")))
        except Exception as exc:  # OpenVINO raises RuntimeError/ov.Exception with a C++ trace
            raise UserError(f"{path}: not a readable OpenVINO IR with its .bin ({_first_line(exc)})") from None
        if len(ov_model.inputs) != 1 or len(ov_model.outputs) != 1:
            raise UserError(f"{path}: expected one input and one output, found {len(ov_model.inputs)} and "
                            f"{len(ov_model.outputs)}")
        shape = ov_model.inputs[0].get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 4:
            raise UserError(f"{path}: expected an N×3×H×W input, found {shape}")
        h, w = _static(shape[2]), _static(shape[3])
        out_shape = ov_model.outputs[0].get_partial_shape()
        size = _static(out_shape[out_shape.rank.get_length() - 1]) if out_shape.rank.is_static else None
        self.fixed_batch = _static(shape[0])
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        precision = _program_precision(ov_model)
        self._set_info(path, normalize, input_size=(h, w) if h and w else None, embedding_size=size,
                       precision=precision)
        try:
            self._compiled = core.compile_model(ov_model, "CPU", config)
        except Exception as exc:
            raise UserError(f"{path}: OpenVINO could not compile the model for the CPU ({_first_line(exc)})") from None
        self._request = self._compiled.create_infer_request()

    def _run(self, x: np.ndarray) -> np.ndarray:
        return np.array(self._request.infer({0: x})[0], dtype=np.float32)
