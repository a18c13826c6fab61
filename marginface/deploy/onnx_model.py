"""An ONNX face embedder as a plain callable: normalised ``N×3×H×W`` float -> ``N×D`` embeddings.

`OnnxEmbedder` runs our exports and foreign insightface-style recognition models in ONNX Runtime.
It reads the preprocessing our exporter records in the model's metadata (see
``marginface.deploy.export.METADATA_KEYS``); a foreign model without it takes ``normalize=``
("arcface" unless told otherwise).

Models exported with a fixed batch of 1 (common for downloaded weights) are re-batched in memory
when that is provably safe: the batch dimension of the input/output is made symbolic and
``Reshape`` targets that hard-code the batch become ``0`` ("copy this dimension"); the result is
checked against the original graph on two inputs, and if anything differs the wrapper simply
loops over the batch one image at a time.

Foreign models are read the way the insightface package's ``ArcFaceONNX`` reads its model zoo
(``w600k_r50.onnx``, ``w600k_mbf.onnx``, ``glintr100.onnx``): the input name and shape come from
the graph; when one of the first 8 nodes is named ``Sub``/``_minus*`` and one ``Mul``/``_mul*``
(mxnet-converted models), the graph normalises itself and takes raw 0-255 RGB pixels (mean 0,
std 1), otherwise it takes ``(x - 127.5) / 127.5`` (`graph_normalization`). The wrapper keeps the
`Embedder` contract either way: it is called with normalised images (``info.normalize``) and turns
them back into pixels for a self-normalising graph. An NHWC input (``N×H×W×3``) is transposed
for it. Our own exports carry metadata and are read from it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from marginface.data.transforms import NORMALIZATIONS
from marginface.errors import UserError
from marginface.inference import DEFAULT_NORMALIZE, NORMALIZE_NAMES, InfoAttributes, ModelInfo, check_normalize


INSIGHTFACE_SCAN_NODES = 8  # ArcFaceONNX looks at this many first nodes for Sub/Mul
MAX_EMBEDDING_SIZE = 65536  # a declared output dimension beyond this (or 0) is not an embedding
MAX_INPUT_SIDE = 4096


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def session_options(threads: Optional[int] = None, optimization: str = "all"):
    """ONNX Runtime session options: ``threads`` intra-op threads (None: ORT's default, all
    physical cores), graph optimisation ``all`` / ``extended`` / ``basic`` / ``none``."""
    import onnxruntime as ort

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3  # errors only: keep --json output clean
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        # no spin-waiting: on a shared/busy machine spinning threads steal each other's cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0" if threads > 1 else "1")
    return so


def load_onnx_proto(path: Union[str, Path], load_external_data: bool = True):
    """``onnx.load`` with a one-line UserError for files that are not ONNX models."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"{path}: not an ONNX model ({_first_line(exc)})") from None
    if not len(proto.graph.node) or not len(proto.graph.output):
        raise UserError(f"{path}: not an ONNX model (no graph)")
    locations = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    missing = sorted(loc for loc in locations if not (path.parent / loc).is_file())
    if missing:
        raise UserError(f"{path}: its external weights file {', '.join(missing)} is missing; keep the .onnx "
                        f"and its .onnx.data side by side")
    if load_external_data and locations:
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise UserError(f"{path}: cannot read its external weights ({_first_line(exc)})") from None
    return proto


def graph_normalization(proto) -> str:
    """``"raw"`` when the graph normalises its input itself (a ``Sub``/``_minus`` and a
    ``Mul``/``_mul`` node among the first 8, by node name: insightface's ``ArcFaceONNX`` rule for
    mxnet-converted models, mean 0 / std 1), else ``"external"`` (mean 127.5 / std 127.5, done
    by the caller)."""
    names = [node.name for node in proto.graph.node[:INSIGHTFACE_SCAN_NODES]]
    sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    return "raw" if sub and mul else "external"


def _dim(d) -> Optional[int]:
    return int(d.dim_value) if d.HasField("dim_value") else None


def _make_batch_dynamic(model, batch: int):
    """A copy of ``model`` whose batch dimension is symbolic, or None if we cannot tell how."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for value in list(m.graph.input) + list(m.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) and _dim(dims[0]) == batch:
            dims[0].Clear()
            dims[0].dim_param = "N"
    consts = {}
    for node in m.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0]
    inits = {init.name: init for init in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in consts:
            arr = numpy_helper.to_array(consts[name].t)
        elif name in inits:
            arr = numpy_helper.to_array(inits[name])
        else:
            continue  # computed shape: already follows the input
        if arr.ndim != 1 or arr.size == 0 or int(arr[0]) != batch:
            continue
        allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
        if allowzero:
            return None
        arr = arr.copy()
        arr[0] = 0  # 0 = copy the input's first (batch) dimension
        tensor = numpy_helper.from_array(arr.astype(np.int64), name)
        if name in consts:
            consts[name].t.CopyFrom(tensor)
        else:
            inits[name].CopyFrom(tensor)
    for value in m.graph.value_info:  # stale intermediate shapes would pin the batch again
        dims = value.type.tensor_type.shape.dim
        if len(dims) and _dim(dims[0]) == batch:
            dims[0].Clear()
            dims[0].dim_param = "N"
    return m


class OnnxEmbedder(InfoAttributes):
    """Callable ONNX Runtime embedder (an `marginface.inference.Embedder`).

    ``info``: `ModelInfo` (``input_size`` (H, W), ``embedding_size``, ``normalize``, ``threshold``
    from our export's metadata, None for foreign models; ``precision`` "int8" for quantised
    graphs); also ``metadata`` (the model's metadata props), ``quantized`` (int8 ops present),
    ``path``. ``input_size``, ``normalize``, ``threshold``... read ``info``.
    """

    def __init__(self, path: Union[str, Path], normalize: Optional[str] = None, *,
                 threads: Optional[int] = None, optimization: str = "all"):
        import onnxruntime as ort

        self.path = Path(path)
        proto = load_onnx_proto(self.path)
        self.metadata = {p.key: p.value for p in proto.metadata_props}
        graph_inputs = {i.name for i in proto.graph.initializer}
        inputs = [i for i in proto.graph.input if i.name not in graph_inputs]
        if len(inputs) != 1 or len(proto.graph.output) < 1:
            raise UserError(f"{self.path}: not a face-embedding model: expected 1 image input and an "
                            f"embedding output, found {len(inputs)} inputs and {len(proto.graph.output)} outputs")
        dims = inputs[0].type.tensor_type.shape.dim
        shape = [_dim(d) for d in dims]
        self.layout = "NCHW"
        if len(shape) == 4 and shape[3] == 3 and shape[1] != 3 and shape[1] and shape[2]:
            self.layout = "NHWC"  # channels last (some TF/Keras conversions): transposed in run_numpy
            shape = [shape[0], 3, shape[1], shape[2]]
        if len(shape) != 4 or shape[1] != 3 or not shape[2] or not shape[3]:
            raise UserError(f"{self.path}: not a face-embedding model: input {inputs[0].name!r} has shape "
                            f"{shape}, expected N×3×H×W (RGB/BGR NCHW with a fixed H, W)")
        out_dims = [_dim(d) for d in proto.graph.output[0].type.tensor_type.shape.dim]
        if len(out_dims) != 2 or (out_dims[1] is not None and not 1 <= out_dims[1] <= MAX_EMBEDDING_SIZE):
            raise UserError(f"{self.path}: not a face-embedding model: output {proto.graph.output[0].name!r} "
                            f"has shape {out_dims}, expected N×D with 1 <= D <= {MAX_EMBEDDING_SIZE}")
        if not (shape[2] <= MAX_INPUT_SIDE and shape[3] <= MAX_INPUT_SIDE):
            raise UserError(f"{self.path}: input {inputs[0].name!r} of {shape[2]}x{shape[3]} pixels is larger than "
                            f"{MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}; not a face-embedding model")
        self.input_name = inputs[0].name
        self.output_name = proto.graph.output[0].name
        self.fixed_batch = shape[0]  # None = dynamic
        # our exports record their preprocessing; a foreign graph may normalise its own input
        self.graph_normalization = "external" if "marginface_format" in self.metadata else graph_normalization(proto)
        self.quantized = any(n.op_type in ("QLinearConv", "QuantizeLinear", "ConvInteger", "MatMulInteger")
                             for n in proto.graph.node)
        self.opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
        recorded_size = self.metadata.get("embedding_size", "")
        embedding_size = out_dims[1] or (int(recorded_size) if str(recorded_size).isdigit() else None) or None
        try:
            self.info = ModelInfo(
                input_size=(int(shape[2]), int(shape[3])), embedding_size=embedding_size,
                normalize=self._pick_normalize(normalize), threshold=self.metadata.get("threshold"),
                threshold_source=self.metadata.get("threshold_source"), source=str(self.path), kind="onnx",
                precision="int8" if self.quantized else "fp32", backbone=self.metadata.get("backbone"))
        except UserError as exc:
            raise UserError(f"{self.path}: bad marginface metadata: {exc}") from None
        self.threads = threads
        options = session_options(threads, optimization)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"{self.path}: ONNX Runtime cannot load this model ({_first_line(exc)})") from None
        self._batched = None  # a dynamic-batch session for fixed-batch models, when safe
        if self.fixed_batch is not None:
            self._batched = self._try_dynamic(proto, options)
        del proto

    # ------------------------------------------------------------------ set-up helpers
    def _pick_normalize(self, normalize: Optional[str]) -> str:
        if normalize is not None:
            return check_normalize(normalize)
        recorded = self.metadata.get("normalize")
        if recorded in NORMALIZE_NAMES:
            return recorded
        if recorded:
            raise UserError(f"{self.path}: metadata asks for normalisation {recorded!r}, which marginface "
                            f"does not know; pass normalize='arcface' or 'imagenet'")
        return DEFAULT_NORMALIZE  # the field's convention for insightface-style models

    def _try_dynamic(self, proto, options):
        import onnxruntime as ort

        patched = _make_batch_dynamic(proto, self.fixed_batch)
        if patched is None:
            return None
        try:
            session = ort.InferenceSession(patched.SerializeToString(), options, providers=["CPUExecutionProvider"])
            rng = np.random.default_rng(0)
            probe = rng.standard_normal((2,) + self._graph_shape()).astype(np.float32)
            together = session.run([self.output_name], {self.input_name: probe})[0]
            alone = np.concatenate([self._run_fixed(probe[i : i + 1]) for i in range(2)])
        except Exception:
            return None
        if together.shape != alone.shape or not np.allclose(together, alone, rtol=1e-4, atol=1e-4):
            return None
        return session

    # ------------------------------------------------------------------ running
    def _graph_shape(self) -> tuple[int, ...]:
        h, w = self.input_size
        return (h, w, 3) if self.layout == "NHWC" else (3, h, w)

    def _to_graph_input(self, x: np.ndarray) -> np.ndarray:
        """Normalised ``N×3×H×W`` -> what the graph takes (raw pixels and/or channels last)."""
        if self.graph_normalization == "raw":  # back to 0-255 RGB pixels: undo info.normalize
            mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in NORMALIZATIONS[self.normalize])
            x = x * std + mean
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _run_fixed(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        """``N×3×H×W`` float32 (already normalised) -> ``N×D`` float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"{self.path.name}: expected N×3×{self.input_size[0]}×{self.input_size[1]} input, "
                             f"got {tuple(x.shape)}")
        x = self._to_graph_input(x)
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            out = self._run_fixed(x)
        elif self._batched is not None:
            out = self._batched.run([self.output_name], {self.input_name: x})[0]
        elif self.fixed_batch == 1:
            out = np.concatenate([self._run_fixed(x[i : i + 1]) for i in range(len(x))])
        else:
            raise ValueError(f"{self.path.name}: model has a fixed batch of {self.fixed_batch}; got {len(x)}")
        return out.reshape(len(x), -1)

    def __call__(self, x) -> torch.Tensor:
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return torch.from_numpy(self.run_numpy(arr))

    def describe(self) -> dict:
        return {"path": str(self.path), "input_size": list(self.input_size), "embedding_size": self.embedding_size,
                "normalize": self.normalize, "threshold": self.threshold, "quantized": self.quantized,
                "opset": self.opset, "fixed_batch": self.fixed_batch, "layout": self.layout,
                "graph_normalization": self.graph_normalization,
                "rebatched": self._batched is not None}

    def __repr__(self) -> str:
        return f"OnnxEmbedder({json.dumps(self.describe())})"
