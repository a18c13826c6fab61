"""Post-training static int8 quantisation of an exported ONNX embedder (ONNX Runtime).

Calibration runs the fp32 model on a folder of aligned face crops (a few hundred are plenty) and
records each activation's range; weights are quantised per output channel (symmetric int8),
activations per tensor. Options (``QuantOptions``):

- ``fmt``: ``qoperator`` (QLinearConv / QLinearAdd / QGemm ops) or ``qdq`` (QuantizeLinear /
  DequantizeLinear pairs around float ops, which ONNX Runtime fuses back into int8 kernels at
  load time; the portable choice for other runtimes such as TensorRT or QNN);
- ``activations``: ``uint8`` (U8S8: the x86 VNNI fast path) or ``int8`` (S8S8: what ARM
  runtimes prefer);
- ``per_channel`` weights (needed for depthwise convs: per-tensor scales lose them),
  ``reduce_range`` (7-bit weights, for CPUs without VNNI where U8S8 can saturate);
- ``calibration``: ``minmax`` or ``percentile`` (99.999th).

- ``grouped_convs``: ``float`` (default) keeps *grouped* convolutions with several input channels
  per group (mbf's stem: 64 groups of 2) in float: ONNX Runtime's int8 kernel for them is ~7x
  slower than its float one (8.5 vs 1.2 ms of a 12 ms mbf), which alone made int8 mbf slower than
  fp32. Depthwise and dense convolutions are quantised either way. ``int8`` quantises them too.

PReLU has no int8 kernel in ONNX Runtime: each one runs in float between a DequantizeLinear and
a QuantizeLinear. docs/deployment.md reports what that costs.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from marginface.data.images import read_image
from marginface.data.sources import IMAGE_EXTENSIONS, list_image_files
from marginface.data.transforms import to_tensor
from marginface.deploy.modelfile import atomic_path, set_onnx_metadata
from marginface.errors import UserError


@dataclass(frozen=True)
class QuantOptions:
    fmt: str = "qdq"  # qdq | qoperator
    activations: str = "uint8"  # uint8 (U8S8) | int8 (S8S8)
    per_channel: bool = True
    reduce_range: bool = False
    calibration: str = "minmax"  # minmax | percentile | entropy
    grouped_convs: str = "float"  # float | int8

    def describe(self) -> str:
        acts = "U8S8" if self.activations == "uint8" else "S8S8"
        return (f"int8-static-{self.fmt}-{acts}-{'per-channel' if self.per_channel else 'per-tensor'}"
                f"{'-reduce-range' if self.reduce_range else ''}-{self.calibration}"
                f"{'-grouped-float' if self.grouped_convs == 'float' else ''}")

    def as_dict(self) -> dict:
        return asdict(self)


def load_calibration_images(folder: Union[str, Path], input_size: tuple[int, int], limit: int = 256,
                            seed: int = 0) -> np.ndarray:
    """Up to ``limit`` images under ``folder`` (recursively; a spread-out sample when there are
    more), resized to ``input_size``, as ``N×H×W×3`` uint8 RGB. They should be aligned face
    crops like the ones the model will see (e.g. ``marginface data align`` output)."""
    import cv2

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--calib {folder}: not a directory of calibration images")
    files = list_image_files(folder)
    if not files:
        raise UserError(f"--calib {folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    if len(files) > limit:
        pick = np.random.default_rng(seed).choice(len(files), limit, replace=False)
        files = [files[i] for i in sorted(pick)]
    h, w = input_size
    images = []
    for path in files:
        image = read_image(path)
        if image.shape[:2] != (h, w):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        images.append(image)
    return np.stack(images)


def grouped_conv_nodes(proto) -> list[str]:
    """Names of the Conv nodes that are grouped but not depthwise (weights ``C×k×kh×kw``, k > 1,
    ``group`` > 1): the ones ONNX Runtime runs slowly in int8."""
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    names = []
    for node in proto.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = shapes.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if group > 1 and weight is not None and len(weight) == 4 and weight[1] > 1:
            names.append(node.name)
    return names


class _Reader:
    """onnxruntime ``CalibrationDataReader``: batches of normalised calibration images."""

    def __init__(self, input_name: str, images: np.ndarray, normalize: str, batch: int = 16):
        self.input_name = input_name
        self.data = to_tensor(images, normalize).numpy()
        self.batch = batch
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.data):
            return None
        chunk = self.data[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: chunk}

    def rewind(self):
        self.pos = 0


def quantize_onnx(fp32_path: Union[str, Path], out: Union[str, Path], calib_images: np.ndarray, *,
                  options: Optional[QuantOptions] = None, normalize: Optional[str] = None) -> Path:
    """Static int8 quantisation of ``fp32_path`` into ``out`` (written atomically), keeping the
    fp32 model's metadata (``quantization`` records the scheme)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = options or QuantOptions()
    if options.fmt not in ("qdq", "qoperator"):
        raise UserError(f"quantisation format must be qdq or qoperator, got {options.fmt!r}")
    if options.activations not in ("uint8", "int8"):
        raise UserError(f"quantised activations must be uint8 or int8, got {options.activations!r}")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if options.calibration not in methods:
        raise UserError(f"calibration must be one of {', '.join(methods)}, got {options.calibration!r}")
    if options.grouped_convs not in ("float", "int8"):
        raise UserError(f"grouped_convs must be float or int8, got {options.grouped_convs!r}")
    if len(calib_images) == 0:
        raise UserError("int8 calibration needs at least one image")
    fp32_path = Path(fp32_path)
    proto = onnx.load(str(fp32_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    input_name = proto.graph.input[0].name
    normalize = normalize or meta.get("normalize") or "arcface"

    class Reader(_Reader, CalibrationDataReader):
        pass

    first_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    batch = int(first_dim.dim_value) if first_dim.HasField("dim_value") else 8  # fixed-batch models
    reader = Reader(input_name, calib_images, normalize, batch=batch)
    # Activation ranges are merged every `hold` batches so memory stays bounded (all activations of
    # `hold` batches are kept). onnxruntime's MinMax calibrator fails ("No data is collected") when
    # the number of batches is a multiple of `hold`, so pick one that is not.
    n_batches = -(-len(calib_images) // batch)
    hold = next(k for k in (4, 3, 5, 7, 11, 13, 17) if n_batches % k)
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as work:
        source = fp32_path
        pre = Path(work) / "pre.onnx"
        try:  # shape inference + graph clean-up: better quantisation coverage
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
            source = pre
        except Exception:
            source = fp32_path
        raw = Path(work) / "int8.onnx"
        exclude = grouped_conv_nodes(onnx.load(str(source))) if options.grouped_convs == "float" else []
        extra = {"CalibMaxIntermediateOutputs": hold}
        if options.calibration == "percentile":
            extra["CalibPercentile"] = 99.999
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs advice as root warnings; keep --json clean
        try:
            quantize_static(
                str(source), str(raw), reader,
                quant_format=QuantFormat.QDQ if options.fmt == "qdq" else QuantFormat.QOperator,
                per_channel=options.per_channel, reduce_range=options.reduce_range,
                activation_type=QuantType.QUInt8 if options.activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, calibrate_method=methods[options.calibration],
                nodes_to_exclude=exclude, extra_options=extra,
            )
        except Exception as exc:
            raise UserError(f"int8 quantisation of {fp32_path.name} failed: {str(exc).strip().splitlines()[0][:300]}") from None
        finally:
            root.setLevel(level)
        qproto = onnx.load(str(raw))
        meta["quantization"] = options.describe()
        set_onnx_metadata(qproto, meta, proto.doc_string)
        with atomic_path(out) as tmp:
            onnx.save(qproto, str(tmp))
    return out
