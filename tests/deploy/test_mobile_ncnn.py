"""NCNN export through pnnx (`marginface.deploy.mobile.ncnn_param`): fp32 parity with PyTorch on
synthetic and real aligned faces (fp32 arithmetic forced), fp16 weight storage, the CLI round trip,
no pnnx debris beside the user's file, and one `error:` line for broken files, all run by the
``ncnn`` binding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("ncnn", reason="the NCNN runtime is not installed: pip install 'marginface[ncnn]'")
pytest.importorskip("pnnx", reason="the pnnx converter is not installed: pip install 'marginface[ncnn]'")

from marginface.cli import main  # noqa: E402
from marginface.data.transforms import to_tensor  # noqa: E402
from marginface.data.verification import load_bin  # noqa: E402
from marginface.deploy import mobile  # noqa: E402
from marginface.deploy.export import build_metadata, compare_embeddings, parity_images  # noqa: E402
from marginface.deploy.fold import fold_batchnorm  # noqa: E402
from marginface.deploy.load import load_model, random_backbone, trained_looking  # noqa: E402
from marginface.errors import UserError  # noqa: E402

from shared_data import need  # noqa: E402  (tests/shared_data.py)


@pytest.fixture(scope="module")
def model():
    return trained_looking(random_backbone("mbf"))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The same model with fp32 and with fp16 weights."""
    folder = tmp_path_factory.mktemp("ncnn")
    folded = fold_batchnorm(model)
    files, reports = {}, {}
    for precision in ("fp32", "fp16"):
        files[precision] = folder / f"mbf-{precision}.param"
        reports[precision] = mobile.export("ncnn", folded, files[precision], precision=precision, calib_images=None,
                                           metadata=build_metadata(model, quantization=precision.replace("fp32", "none")))
    return {**files, "reports": reports, "folder": folder}


def _embed(model_or_file, images: np.ndarray) -> np.ndarray:
    x = to_tensor(images, "arcface")
    if isinstance(model_or_file, torch.nn.Module):
        with torch.no_grad():
            return model_or_file(x).numpy()
    return load_model(model_or_file, threads=1)(x).numpy()


def test_fp32_parity_on_synthetic_and_real_faces(model, exported):
    emb = load_model(exported["fp32"], threads=2)
    assert emb.info.kind == "ncnn" and emb.fixed_batch == 1
    assert (emb.info.input_size, emb.info.embedding_size, emb.info.precision) == ((112, 112), 512, "fp32")
    assert not emb._net.opt.use_fp16_arithmetic and not emb._net.opt.use_fp16_storage
    # only the pairs and their sidecars: pnnx's intermediates stayed in its temporary folder
    assert sorted(p.name for p in exported["folder"].iterdir()) == \
        ["mbf-fp16.bin", "mbf-fp16.param", "mbf-fp16.param.json", "mbf-fp32.bin", "mbf-fp32.param", "mbf-fp32.param.json"]
    assert exported["reports"]["fp32"]["converter"].startswith("pnnx ")
    lfw = load_bin(need("verification/lfw_head20.bin"))
    assert len(lfw.images) == 17
    for images in (parity_images((112, 112), 8), lfw.images):
        cos = compare_embeddings(_embed(model, images), _embed(exported["fp32"], images))["min_cosine"]
        assert cos >= 0.9999, cos


def test_fp16_storage_halves_the_weights_and_keeps_the_pairs(model, exported):
    emb = load_model(exported["fp16"], threads=1)
    assert emb.info.precision == "fp16" and emb._net.opt.use_fp16_storage
    sizes = {k: exported[k].with_suffix(".bin").stat().st_size for k in ("fp32", "fp16")}
    assert sizes["fp16"] < 0.55 * sizes["fp32"], sizes
    lfw = load_bin(need("verification/lfw_head20.bin"))
    means = {}
    for name in ("fp32", "fp16"):
        e = _embed(exported[name], lfw.images)
        means[name] = compare_embeddings(e[lfw.pairs[:, 0]], e[lfw.pairs[:, 1]])["mean_cosine"]
    assert abs(means["fp16"] - means["fp32"]) <= 0.005, means
    assert compare_embeddings(_embed(model, lfw.images), _embed(exported["fp16"], lfw.images))["min_cosine"] >= 0.999


def test_cli_export_then_eval(tmp_path, capsys):
    out = tmp_path / "m.param"
    assert main(["export", "--backbone", "mbf", "--format", "ncnn", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "ncnn" and report["parity"]["min_cosine"] >= 0.9999
    assert report["file_mb"] > report["bin_mb"] > 7  # the .bin is counted in the size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.param", "m.param.json"]
    lfw_bin = need("verification/lfw_head20.bin")
    assert main(["eval", "--model", str(out), "--sets", str(lfw_bin), "--json"]) == 0
    (metrics,) = json.loads(capsys.readouterr().out).values()
    assert metrics["pairs"] == 10 and -1 <= metrics["pos_mean"] <= 1


def test_bad_files_are_one_error_line(exported, tmp_path, capfd):
    lfw_bin = str(need("verification/lfw_head20.bin"))
    full_param = exported["fp32"].read_bytes()
    full_bin = exported["fp32"].with_suffix(".bin").read_bytes()

    def pair(stem: str, param=full_param, weights=full_bin):
        (tmp_path / f"{stem}.param").write_bytes(param)
        if weights is not None:
            (tmp_path / f"{stem}.bin").write_bytes(weights)
        return tmp_path / f"{stem}.param"

    cases = {
        "truncated-bin": (pair("tb", weights=full_bin[: len(full_bin) // 2]), "tb.bin: truncated"),
        "truncated-param": (pair("tp", param=full_param[: len(full_param) // 2]), "tp.param: not a readable NCNN"),
        "onnx-named-param": (pair("wrong", param=b"\x08\x07\x12\x0bmarginface" + bytes(200)), "not an NCNN .param"),
        "missing-bin": (pair("nobin", weights=None), "its .bin file nobin.bin is missing"),
    }
    for name, (path, expected) in cases.items():
        assert main(["eval", "--model", str(path), "--sets", lfw_bin, "--json"]) == 2
        captured = capfd.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (name, lines)
        assert captured.out == ""


def test_wrong_suffix_and_another_models_bin_are_refused(model, tmp_path):
    folded = fold_batchnorm(model)
    with pytest.raises(UserError, match=r"m.ncnn: an NCNN export is a .param file"):
        mobile.export("ncnn", folded, tmp_path / "m.ncnn", precision="fp32", calib_images=None,
                      metadata=build_metadata(model))
    (tmp_path / "m.xml").write_text("<net/>")
    (tmp_path / "m.bin").write_bytes(b"openvino weights")
    with pytest.raises(UserError, match=r"m.bin would replace the weights of m.xml \(openvino\)"):
        mobile.export("ncnn", folded, tmp_path / "m.param", precision="fp32", calib_images=None,
                      metadata=build_metadata(model))
    assert (tmp_path / "m.bin").read_bytes() == b"openvino weights" and not (tmp_path / "m.param").exists()
