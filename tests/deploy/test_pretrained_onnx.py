"""insightface model-zoo style ONNX files: input name, layout and normalisation found from the graph as
insightface's ``ArcFaceONNX`` does (mean/std 127.5 unless the graph starts with Sub and Mul), and our
own exports as drop-in recognition models for the insightface package."""
from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from marginface.cli import main
from marginface.data.synthetic import render_identities
from marginface.data.transforms import to_tensor
from marginface.deploy.export import export_model
from marginface.deploy.load import load_model, trained_looking
from marginface.deploy.onnx_model import graph_normalization
from marginface.models import build_backbone

from shared_data import need  # noqa: E402  (tests/shared_data.py)


class RawPixels(torch.nn.Module):
    """An mxnet-converted model's shape: the graph normalises raw 0-255 RGB pixels itself."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x - 127.5) * (1 / 127.5))  # mxnet models: * 0.0078125, as they were trained


class ChannelsLast(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.permute(0, 3, 1, 2))


def insightface_style(module, path, shape=(1, 3, 112, 112), mxnet_names=False):
    """Written as insightface's model zoo files are: input ``input.1``, a numbered output, a
    symbolic batch, no metadata; ``mxnet_names`` names the first Sub/Mul as mxnet's converter does."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(shape),), str(path), input_names=["input.1"],
                          output_names=["fc1"], dynamic_axes={"input.1": {0: "None"}, "fc1": {0: "None"}},
                          opset_version=13, dynamo=False)
    proto = onnx.load(str(path))
    assert not proto.metadata_props
    for node in proto.graph.node:  # a numbered output, as in the zoo's files (torch refuses the name)
        node.output[:] = ["683" if o == "fc1" else o for o in node.output]
    proto.graph.output[0].name = "683"
    if mxnet_names:
        renames = {"Sub": "_minusscalar0", "Mul": "_mulscalar0"}
        for node in proto.graph.node[:8]:
            if node.op_type in renames:
                node.name = renames.pop(node.op_type)
        assert not renames, "the normalisation ops should open the graph"
    onnx.save(proto, str(path))
    return path


def close(a, b, tol=1e-5):
    """Same embeddings up to float rounding (compared as unit vectors: raw norms here are ~300)."""
    a, b = (np.asarray(v, np.float64) for v in (a, b))
    a, b = (v / np.linalg.norm(v, axis=-1, keepdims=True) for v in (a, b))
    return np.abs(a - b).max() < tol


@pytest.fixture(scope="module")
def mbf():
    torch.manual_seed(0)
    return trained_looking(build_backbone("mbf", embedding_size=128), seed=1)


@pytest.fixture(scope="module")
def faces():
    return render_identities(range(3), 1, 112, seed=5)


def test_real_foreign_onnx_has_no_normalisation_in_its_graph():
    """foamliu's MobileFaceNet starts with Conv/Clip: by insightface's rule the caller normalises
    (127.5/127.5 unless told otherwise; its README asks for --normalize imagenet)."""
    path = need("weights/mobilefacenet_onnx/MobileFaceNet.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    assert [n.op_type for n in proto.graph.node[:2]] == ["Conv", "Constant"]
    assert graph_normalization(proto) == "external"
    model = load_model(path)
    assert (model.graph_normalization, model.layout, model.info.normalize) == ("external", "NCHW", "arcface")
    assert model.input_name == "input0" and load_model(path, normalize="imagenet").info.normalize == "imagenet"


def test_insightface_style_onnx_both_normalisation_branches_and_nhwc(mbf, faces, tmp_path):
    x = to_tensor(faces)
    with torch.no_grad():
        expected = mbf(x).numpy()
    plain = load_model(insightface_style(mbf, tmp_path / "w600k_mbf.onnx"))
    assert (plain.input_name, plain.graph_normalization, plain.info.normalize) == ("input.1", "external", "arcface")
    assert close(plain(x).numpy(), expected)

    raw_path = insightface_style(RawPixels(mbf), tmp_path / "mxnet_r.onnx", mxnet_names=True)
    raw = load_model(raw_path)
    assert raw.graph_normalization == "raw" and raw.info.normalize == "arcface"
    assert close(raw(x).numpy(), expected)  # called like any model: normalised input
    session = ort.InferenceSession(str(raw_path), providers=["CPUExecutionProvider"])
    pixels = np.ascontiguousarray(faces.transpose(0, 3, 1, 2), np.float32)  # what insightface feeds it (mean 0, std 1)
    assert close(session.run(None, {"input.1": pixels})[0], expected)

    # Sub and Mul without mxnet's names are not the rule's trigger: the graph gets normalised input
    unnamed = load_model(insightface_style(RawPixels(mbf), tmp_path / "unnamed.onnx"))
    assert unnamed.graph_normalization == "external"

    nhwc = load_model(insightface_style(ChannelsLast(mbf), tmp_path / "nhwc.onnx", shape=(1, 112, 112, 3)))
    assert nhwc.layout == "NHWC" and nhwc.info.input_size == (112, 112)
    assert close(nhwc(x).numpy(), expected)


def test_verify_uses_a_self_normalising_onnx(mbf, tmp_path, capsys):
    a, b = need("photos/deepface/img1.jpg"), need("photos/deepface/img2.jpg")
    args = ["--detector-weights", str(need("weights/mtcnn")), "--threads", "1", "--json"]
    results = []
    for path in (insightface_style(mbf, tmp_path / "plain.onnx"),
                 insightface_style(RawPixels(mbf), tmp_path / "raw.onnx", mxnet_names=True)):
        assert main(["verify", str(a), str(b), "--model", str(path), *args]) == 0
        results.append(json.loads(capsys.readouterr().out)["similarity"])
    assert results[1] == pytest.approx(results[0], abs=1e-5)


def test_our_export_is_a_drop_in_insightface_recognition_model(mbf, faces, tmp_path):
    """insightface's ModelRouter takes a square input side >= 112 divisible by 16 and < 5 outputs as
    ArcFaceONNX; that reads mean/std from the graph (127.5 here, as our metadata says) and feeds
    RGB ``(pixel - 127.5) / 127.5``."""
    out = export_model(mbf, tmp_path / "ours.onnx", check=False)["out"]
    proto = onnx.load(out)
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape[2] == shape[3] and shape[2] >= 112 and shape[2] % 16 == 0 and len(session.get_outputs()) == 1
    assert graph_normalization(proto) == "external"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["mean"] == meta["std"] == "127.5,127.5,127.5" and meta["color_order"] == "RGB"
    blob = (faces.transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 127.5  # blobFromImage(1/127.5, 127.5, swapRB)
    feat = session.run(None, {session.get_inputs()[0].name: blob})[0]
    assert close(feat, load_model(out)(to_tensor(faces)).numpy())
