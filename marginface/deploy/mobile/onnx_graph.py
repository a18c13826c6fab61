"""A plain convolutional ONNX embedder as a torch module, so the mobile converters that take PyTorch
(litert-torch, ExecuTorch, pnnx) can convert a downloaded ONNX model through the same path as ours.

Only the operators a MobileFaceNet/ResNet-style embedder uses are read (`OPS`); anything else is one
error line naming the operator. Weights come from the file (external data included); attributes and
constant inputs (Clip bounds, Reshape targets) are fixed when the module is built, so ``torch.export``
sees a static graph. The model's `ModelInfo` comes from `deploy.onnx_model.OnnxEmbedder` (input size,
normalisation from the caller or the metadata).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marginface.deploy.onnx_model import OnnxEmbedder, load_onnx_proto
from marginface.errors import UserError
from marginface.inference import ModelInfo

OPS = ("Conv", "Clip", "Relu", "PRelu", "Sigmoid", "Add", "Sub", "Mul", "Reshape", "Flatten", "Gemm", "MatMul",
       "BatchNormalization", "GlobalAveragePool", "Constant", "Identity")


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class OnnxGraphModule(nn.Module):
    """Runs the ONNX graph's nodes in order with torch operators (weights as buffers)."""

    def __init__(self, proto, where: str = "model") -> None:
        super().__init__()
        from onnx import numpy_helper

        graph = proto.graph
        initial = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.consts: dict[str, np.ndarray] = dict(initial)
        for node in graph.node:
            if node.op_type not in OPS:
                raise UserError(f"{where}: ONNX operator {node.op_type} is not supported for mobile conversion "
                                f"(supported: {', '.join(OPS)})")
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        self._names: dict[str, str] = {}
        for i, (name, value) in enumerate(initial.items()):
            key = f"w{i}"
            self._names[name] = key
            self.register_buffer(key, torch.from_numpy(np.array(value, dtype=np.float32 if value.dtype.kind == "f"
                                                                 else value.dtype)))
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node
                      if n.op_type != "Constant"]
        initial_names = {t.name for t in graph.initializer}
        self.input_name = next(i.name for i in graph.input if i.name not in initial_names)
        self.output_name = graph.output[0].name

    def _value(self, env: dict, name: str):
        if name in env:
            return env[name]
        if name in self._names:
            return getattr(self, self._names[name])
        return torch.from_numpy(np.array(self.consts[name]))

    def _const(self, name: str):
        return None if not name else self.consts[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}
        for op, inputs, outputs, at in self.nodes:
            v = [self._value(env, n) if n else None for n in inputs]
            if op == "Conv":
                pads = at.get("pads", [0, 0, 0, 0])
                if pads[0] != pads[2] or pads[1] != pads[3]:
                    v[0] = F.pad(v[0], (pads[1], pads[3], pads[0], pads[2]))
                    pads = [0, 0, 0, 0]
                y = F.conv2d(v[0], v[1], v[2] if len(v) > 2 else None, stride=at.get("strides", 1),
                             padding=tuple(pads[:2]), dilation=at.get("dilations", 1), groups=at.get("group", 1))
            elif op == "Clip":
                lo, hi = (self._const(inputs[i]) if len(inputs) > i else None for i in (1, 2))
                y = torch.clamp(v[0], min=None if lo is None else float(lo), max=None if hi is None else float(hi))
            elif op == "Relu":
                y = torch.relu(v[0])
            elif op == "PRelu":
                slope = v[1].reshape(-1)
                y = F.prelu(v[0], slope) if v[0].dim() == 4 and slope.numel() in (1, v[0].shape[1]) else \
                    torch.where(v[0] >= 0, v[0], v[0] * v[1])
            elif op == "Sigmoid":
                y = torch.sigmoid(v[0])
            elif op in ("Add", "Sub", "Mul"):
                y = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}[op](v[0], v[1])
            elif op == "Reshape":
                shape = [int(s) for s in self._const(inputs[1])]
                shape = [x.shape[0] if (s == 0 and i == 0) else s for i, s in enumerate(shape)]
                if shape and shape[0] == 1:  # a batch hard-coded as 1: keep the real batch
                    shape[0] = -1 if -1 not in shape[1:] else x.shape[0]
                y = v[0].reshape(shape)
            elif op == "Flatten":
                y = torch.flatten(v[0], at.get("axis", 1))
            elif op == "Gemm":
                a = v[0].transpose(0, 1) if at.get("transA", 0) else v[0]
                b = v[1].transpose(0, 1) if at.get("transB", 0) else v[1]
                y = at.get("alpha", 1.0) * (a @ b)
                if len(v) > 2 and v[2] is not None:
                    y = y + at.get("beta", 1.0) * v[2]
            elif op == "MatMul":
                y = v[0] @ v[1]
            elif op == "BatchNormalization":
                y = F.batch_norm(v[0], v[3], v[4], v[1], v[2], False, 0.0, at.get("epsilon", 1e-5))
            elif op == "GlobalAveragePool":
                y = v[0].mean(dim=(2, 3), keepdim=True)
            else:  # Identity
                y = v[0]
            env[outputs[0]] = y
        return env[self.output_name]


def module_from_onnx(path: Union[str, Path], normalize: Optional[str] = None) -> nn.Module:
    """The ONNX embedder at ``path`` as an eval-mode torch module carrying its `ModelInfo` (as
    `deploy.load.load_model` reads the file: input size, embedding size, ``normalize`` or the file's)."""
    path = Path(path)
    reference = OnnxEmbedder(path, normalize, threads=1)
    module = OnnxGraphModule(load_onnx_proto(path), where=str(path)).eval()
    info = reference.info
    module.info = ModelInfo(input_size=info.input_size, embedding_size=info.embedding_size, normalize=info.normalize,
                            threshold=info.threshold, threshold_source=info.threshold_source, source=str(path),
                            kind="onnx", precision="fp32", backbone=info.backbone or path.stem)
    module.input_size, module.embedding_size = info.input_size, info.embedding_size
    return module
