"""`deploy.mobile.onnx_graph`: a plain convolutional ONNX embedder as a torch module (what the mobile
converters that take PyTorch convert), checked against ONNX Runtime on the pretrained MobileFaceNet and
on a small graph with the other operators; an unsupported operator is one error line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install 'marginface[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'marginface[onnx]'")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from marginface.data.verification import load_bin  # noqa: E402
from marginface.data.transforms import to_tensor  # noqa: E402
from marginface.deploy.export import export_model  # noqa: E402
from marginface.deploy.mobile.onnx_graph import OnnxGraphModule, module_from_onnx  # noqa: E402
from marginface.errors import UserError  # noqa: E402

from shared_data import need  # noqa: E402  (tests/shared_data.py)


def _ort(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i : i + 1]})[0] for i in range(len(x))])


def test_pretrained_mobilefacenet_matches_onnxruntime():
    path = need("weights/mobilefacenet_onnx/MobileFaceNet.onnx")
    module = module_from_onnx(path, "imagenet")
    assert (module.info.input_size, module.info.embedding_size, module.info.normalize) == ((112, 112), 128, "imagenet")
    x = to_tensor(load_bin(need("verification/lfw_head20.bin")).images[:4], "imagenet")
    with torch.no_grad():
        ours = module(x).numpy()  # a batch of 4 although the file fixes batch 1
    assert np.allclose(ours, _ort(path, x.numpy()), atol=1e-4)


def _small_graph(tmp_path, op="Relu"):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in (
        ("w", (4, 3, 3, 3)), ("b", (4,)), ("slope", (4, 1, 1)), ("scale", (4,)), ("bias", (4,)), ("mean", (4,)),
        ("var", (4,)), ("fc", (6, 4)), ("fcb", (6,)))]
    inits[6] = numpy_helper.from_array(np.abs(numpy_helper.to_array(inits[6])) + 0.5, "var")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"], epsilon=1e-5),
             helper.make_node("PRelu", ["n", "slope"], ["p"]),
             helper.make_node(op, ["p"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / f"small_{op}.onnx"
    onnx.save(model, str(path))
    return path, model


def test_other_operators_match_onnxruntime(tmp_path):
    path, model = _small_graph(tmp_path)
    x = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ours = OnnxGraphModule(model)(torch.from_numpy(x)).numpy()
    assert np.allclose(ours, _ort(path, x), atol=1e-4)


def test_unsupported_operator_is_one_line(tmp_path):
    path, _ = _small_graph(tmp_path, op="Softplus")
    with pytest.raises(UserError, match=r"small_Softplus.onnx: ONNX operator Softplus is not supported"):
        module_from_onnx(path)


def test_normalize_only_with_an_onnx_source(tmp_path):
    with pytest.raises(UserError, match="--normalize applies to an ONNX embedder"):
        export_model(None, tmp_path / "x.onnx", backbone="mbf", normalize="imagenet")
