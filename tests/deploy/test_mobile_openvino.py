"""OpenVINO IR export (`marginface.deploy.mobile.openvino_ir`): fp32 parity with PyTorch on synthetic
and real aligned faces, NNCF int8 within the issue's bounds, fp16 weights through the CLI, and one
`error:` line for broken files, all run by OpenVINO's own runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'marginface[openvino]'")

from marginface.cli import main  # noqa: E402
from marginface.data.transforms import to_tensor  # noqa: E402
from marginface.data.verification import load_bin  # noqa: E402
from marginface.deploy import mobile  # noqa: E402
from marginface.deploy.export import build_metadata, compare_embeddings, parity_images  # noqa: E402
from marginface.deploy.fold import fold_batchnorm  # noqa: E402
from marginface.deploy.load import load_model, random_backbone, trained_looking  # noqa: E402
from marginface.deploy.quantize import load_calibration_images  # noqa: E402
from marginface.errors import UserError  # noqa: E402

from shared_data import need  # noqa: E402  (tests/shared_data.py)


@pytest.fixture(scope="module")
def model():
    return trained_looking(random_backbone("mbf"))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The model as fp32 IR."""
    folder = tmp_path_factory.mktemp("openvino")
    fp32 = folder / "mbf.xml"
    report = mobile.export("openvino", fold_batchnorm(model), fp32, precision="fp32", calib_images=None,
                           metadata=build_metadata(model))
    return {"fp32": fp32, "report": report, "folder": folder}


@pytest.fixture(scope="module")
def int8_file(model, exported):
    """The same model as NNCF int8 IR, calibrated on real aligned MS1M crops (not the faces the
    checks use) and synthetic ones."""
    pytest.importorskip("nncf", reason="OpenVINO int8 needs NNCF: pip install 'marginface[openvino]'")
    calib = np.concatenate([load_calibration_images(need("identities/ms1m_sample/images"), (112, 112)),
                            parity_images((112, 112), 16, seed=1)])
    int8 = exported["folder"] / "mbf-int8.xml"
    mobile.export("openvino", fold_batchnorm(model), int8, precision="int8", calib_images=calib,
                  metadata=build_metadata(model, quantization="int8"))
    return int8


def _embed(model_or_file, images: np.ndarray) -> np.ndarray:
    x = to_tensor(images, "arcface")
    if isinstance(model_or_file, torch.nn.Module):
        with torch.no_grad():
            return model_or_file(x).numpy()
    return load_model(model_or_file, threads=1)(x).numpy()


def test_fp32_parity_on_synthetic_and_real_faces(model, exported):
    emb = load_model(exported["fp32"], threads=1)
    assert type(emb).__name__ == "Embedder" and emb.info.kind == "openvino"
    assert (emb.info.input_size, emb.info.embedding_size, emb.info.precision) == ((112, 112), 512, "fp32")
    assert emb.fixed_batch is None  # dynamic batch: the whole set in one call
    assert sorted(p.name for p in exported["folder"].iterdir() if p.name.startswith("mbf.")) == \
        ["mbf.bin", "mbf.xml", "mbf.xml.json"]  # nothing else beside the user's file
    assert exported["report"]["converter"].startswith("openvino ")
    lfw = load_bin(need("verification/lfw_head20.bin"))
    assert len(lfw.images) == 17
    for images in (parity_images((112, 112), 8), lfw.images):
        cos = compare_embeddings(_embed(model, images), _embed(exported["fp32"], images))["min_cosine"]
        assert cos >= 0.9999, cos


def test_int8_same_pair_cosine_close_to_fp32_and_smaller(exported, int8_file):
    exported = {**exported, "int8": int8_file}
    emb = load_model(exported["int8"], threads=1)
    assert emb.info.precision == "int8"
    lfw = load_bin(need("verification/lfw_head20.bin"))
    means = {}
    for name in ("fp32", "int8"):
        e = _embed(exported[name], lfw.images)
        means[name] = compare_embeddings(e[lfw.pairs[:, 0]], e[lfw.pairs[:, 1]])["mean_cosine"]
    assert abs(means["int8"] - means["fp32"]) <= 0.02, means
    sizes = {k: exported[k].with_suffix(".bin").stat().st_size for k in ("fp32", "int8")}
    assert sizes["int8"] < 0.4 * sizes["fp32"], sizes


def test_cli_fp16_export_then_eval(tmp_path, capsys):
    out = tmp_path / "m16.xml"
    assert main(["export", "--backbone", "mbf", "--format", "openvino", "--precision", "fp16",
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp16" and report["parity"]["min_cosine"] >= 0.999
    assert report["file_mb"] > report["bin_mb"] > 0  # the .bin is counted in the size
    assert load_model(out).info.precision == "fp16"
    lfw_bin = need("verification/lfw_head20.bin")
    assert main(["eval", "--model", str(out), "--sets", str(lfw_bin), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (metrics,) = result.values()
    assert metrics["pairs"] == 10 and -1 <= metrics["pos_mean"] <= 1


def _error_lines(capfd, argv) -> list:
    assert main(argv) == 2
    err = capfd.readouterr().err
    return err.strip().splitlines()


def test_bad_files_are_one_error_line(exported, tmp_path, capfd):
    lfw_bin = str(need("verification/lfw_head20.bin"))

    def copy(stem: str, xml_bytes=None, bin_bytes=None, with_bin=True):
        xml, bin_ = tmp_path / f"{stem}.xml", tmp_path / f"{stem}.bin"
        xml.write_bytes(exported["fp32"].read_bytes() if xml_bytes is None else xml_bytes)
        if with_bin:
            bin_.write_bytes(exported["fp32"].with_suffix(".bin").read_bytes() if bin_bytes is None else bin_bytes)
        return xml

    full_bin = exported["fp32"].with_suffix(".bin").read_bytes()
    full_xml = exported["fp32"].read_bytes()
    cases = {
        "truncated-bin": (copy("tb", bin_bytes=full_bin[: len(full_bin) // 2]), "tb.xml"),
        "truncated-xml": (copy("tx", xml_bytes=full_xml[: len(full_xml) // 2]), "tx.xml"),
        "onnx-named-xml": (copy("wrong", xml_bytes=b"\x08\x07\x12\x0bmarginface" + bytes(200)), "not an OpenVINO IR"),
        "missing-bin": (copy("nobin", with_bin=False), "its .bin file nobin.bin is missing"),
    }
    for name, (path, expected) in cases.items():
        lines = _error_lines(capfd, ["eval", "--model", str(path), "--sets", lfw_bin, "--json"])
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (name, lines)


def test_export_refuses_to_replace_another_models_bin(model, tmp_path):
    (tmp_path / "m.param").write_text("7767517\n")
    (tmp_path / "m.bin").write_bytes(b"ncnn weights")
    with pytest.raises(UserError, match=r"m.bin would replace the weights of m.param \(ncnn\)"):
        mobile.export("openvino", fold_batchnorm(model), tmp_path / "m.xml", precision="fp32", calib_images=None,
                      metadata=build_metadata(model))
    assert (tmp_path / "m.bin").read_bytes() == b"ncnn weights" and not (tmp_path / "m.xml").exists()


def test_pretrained_onnx_converts_with_the_same_exporter(tmp_path):
    """The pretrained MobileFaceNet ONNX (ImageNet normalisation, 128-d) as IR: the same embeddings
    as ONNX Runtime gives on the real aligned faces, batch made dynamic, metadata from the sidecar."""
    onnx_path = need("weights/mobilefacenet_onnx/MobileFaceNet.onnx")
    source = load_model(onnx_path, "imagenet", threads=1)
    out = tmp_path / "mobilefacenet.xml"
    metadata = build_metadata(source)
    mobile.export("openvino", onnx_path, out, precision="fp32", calib_images=None, metadata=metadata)
    emb = load_model(out, threads=1)
    assert (emb.info.normalize, emb.info.embedding_size, emb.fixed_batch) == ("imagenet", 128, None)
    faces = load_bin(need("verification/lfw_head20.bin")).images
    x = to_tensor(faces, "imagenet")
    cos = compare_embeddings(np.asarray(source(x)), emb(x).numpy())["min_cosine"]
    assert cos >= 0.9999, cos
