"""OnnxEmbedder and quantize_onnx, tested directly (not only through `marginface export`)."""
import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from marginface.data.transforms import to_tensor  # noqa: E402
from marginface.deploy.export import export_onnx, parity_images  # noqa: E402
from marginface.deploy.load import random_backbone, trained_looking  # noqa: E402
from marginface.deploy.onnx_model import OnnxEmbedder  # noqa: E402
from marginface.deploy.quantize import QuantOptions, quantize_onnx  # noqa: E402
from marginface.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = trained_looking(random_backbone("mbf", embedding_size=64, input_size=64))
    path = tmp_path_factory.mktemp("onnx") / "mbf.onnx"
    export_onnx(model, path)
    return model, path


def test_our_export_loads_with_its_metadata_and_matches_torch(exported):
    model, path = exported
    emb = OnnxEmbedder(path, threads=1)
    assert emb.info.input_size == (64, 64) and emb.info.embedding_size == 64
    assert emb.info.normalize == "arcface" and emb.info.precision == "fp32" and not emb.quantized
    x = to_tensor(parity_images((64, 64), 3), "arcface")
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = emb(x).numpy()
    assert got.shape == (3, 64)
    # same graph, BN folded by the export: equal up to fp32 rounding relative to the output's scale
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_normalize_argument_overrides_the_metadata(exported):
    assert OnnxEmbedder(exported[1], "imagenet", threads=1).info.normalize == "imagenet"


def _graph(path, inputs, out_shape):
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    node = helper.make_node("GlobalAveragePool", [inputs[0][0]], ["y"])
    onnx.save(helper.make_model(helper.make_graph([node], "g", ins, [out]),
                                opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("inputs, out_shape, message", [
    ([("a", [1, 3, 112, 112]), ("b", [1, 3, 112, 112])], [1, 3], "expected 1 image input"),
    ([("a", [1, 1, 112, 112])], [1, 3], "expected N×3×H×W"),
    ([("a", [1, 3, 112, 112])], [1, 3, 1, 1], "expected N×D"),
])
def test_graphs_that_are_not_face_embedders_are_refused(tmp_path, inputs, out_shape, message):
    path = _graph(tmp_path / "bad.onnx", inputs, out_shape)
    with pytest.raises(UserError, match=message) as err:
        OnnxEmbedder(path, threads=1)
    assert str(path) in str(err.value)


def test_quantize_onnx_keeps_metadata_and_stays_close_to_fp32(exported, tmp_path):
    model, path = exported
    calib = parity_images((64, 64), 8, seed=1)
    out = quantize_onnx(path, tmp_path / "int8.onnx", calib, options=QuantOptions())
    fp32, int8 = OnnxEmbedder(path, threads=1), OnnxEmbedder(out, threads=1)
    assert int8.quantized and int8.info.precision == "int8"
    assert int8.info.input_size == (64, 64) and int8.info.embedding_size == 64
    assert int8.metadata["quantization"] == QuantOptions().describe()
    x = to_tensor(parity_images((64, 64), 4, seed=2), "arcface")
    a, b = fp32(x).numpy(), int8(x).numpy()
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.9, cos  # int8 tracks fp32 (any x86 CPU; no bound on speed here)
    assert not np.allclose(a, b, atol=1e-6), "the int8 graph must actually compute in int8"


@pytest.mark.parametrize("options, message", [
    (QuantOptions(fmt="qint"), "qdq or qoperator"),
    (QuantOptions(activations="int4"), "uint8 or int8"),
    (QuantOptions(calibration="median"), "calibration must be"),
])
def test_quantize_onnx_refuses_unknown_options(exported, tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        quantize_onnx(exported[1], tmp_path / "q.onnx", parity_images((64, 64), 2), options=options)
    assert not (tmp_path / "q.onnx").exists()


def test_quantize_onnx_needs_calibration_images(exported, tmp_path):
    with pytest.raises(UserError, match="at least one image"):
        quantize_onnx(exported[1], tmp_path / "q.onnx", np.zeros((0, 64, 64, 3), np.uint8))
