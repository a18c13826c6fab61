"""LiteRT (.tflite) export and runtime (`marginface.deploy.mobile.litert_tflite`): fp32 parity with PyTorch on
synthetic and real aligned faces, full-integer int8 close to fp32 (held-out accuracy, same-pair cosine on
lfw_head20), the CLI round trip and one-line errors for broken files. Everything runs in ai_edge_litert's
interpreter, the runtime that ships."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_litert", reason="LiteRT runtime missing: pip install 'marginface[litert]'")
pytest.importorskip("litert_torch", reason="LiteRT converter missing: pip install 'marginface[litert]'")
pytest.importorskip("ai_edge_quantizer", reason="LiteRT quantizer missing: pip install 'marginface[litert]'")

from marginface.cli import main  # noqa: E402
from marginface.data.images import imwrite_rgb  # noqa: E402
from marginface.data.synthetic import render_identities, synthetic_pair_set  # noqa: E402
from marginface.data.transforms import to_tensor  # noqa: E402
from marginface.data.verification import load_bin  # noqa: E402
from marginface.deploy.export import compare_embeddings, export_model, parity_images  # noqa: E402
from marginface.deploy.load import load_model, random_backbone, trained_looking  # noqa: E402
from marginface.deploy.mobile.litert_tflite import ReluFormPReLU  # noqa: E402
from marginface.evaluate.runner import evaluate_pair_set  # noqa: E402

from shared_data import need  # noqa: E402  (tests/shared_data.py)


def _embed(model, images: np.ndarray) -> np.ndarray:
    x = to_tensor(images, "arcface")
    with torch.no_grad():
        return torch.as_tensor(model(x)).numpy()


def test_relu_form_prelu_is_prelu_for_any_slope():
    prelu = torch.nn.PReLU(6)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([-0.5, 0.0, 0.1, 0.9, 1.0, 1.7]))
    x = torch.randn(3, 6, 5, 5) * 3
    assert torch.allclose(ReluFormPReLU(prelu)(x), prelu(x), atol=1e-6)


@pytest.fixture(scope="module")
def mbf_fp32(tmp_path_factory):
    """The full 112x112 mbf with trained-looking BatchNorm/PReLU, exported to fp32 .tflite."""
    model = trained_looking(random_backbone("mbf"), seed=3)
    out = tmp_path_factory.mktemp("tflite") / "mbf.tflite"
    report = export_model(model, out, fmt="tflite", check=False)
    return model, out, report


def test_fp32_parity_on_synthetic_and_real_aligned_faces(mbf_fp32):
    model, path, report = mbf_fp32
    assert report["metadata"]["input_size"] == "112,112" and path.with_name("mbf.tflite.json").is_file()
    exported = load_model(path, threads=1)
    assert (exported.info.kind, exported.info.precision, exported.info.embedding_size) == ("tflite", "fp32", 512)
    lfw = load_bin(need("verification/lfw_head20.bin")).images
    assert len(lfw) == 17  # the distinct real faces of the 10 pairs
    for images in (parity_images((112, 112), 16), lfw):
        parity = compare_embeddings(_embed(model, images), _embed(exported, images))
        assert parity["min_cosine"] >= 0.9999, parity


def test_foreign_tflite_without_sidecar_loads_with_defaults(mbf_fp32, tmp_path):
    _, path, _ = mbf_fp32
    copy = tmp_path / "foreign.tflite"
    shutil.copyfile(path, copy)
    model = load_model(copy, normalize="imagenet")
    assert model.info.input_size == (112, 112) and model.info.embedding_size == 512
    assert model.info.normalize == "imagenet" and model.info.threshold is None


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A quarter-width mbf trained for 60 steps on synthetic faces at 32 px (as in test_export)."""
    from marginface.train.runconfig import load_config
    from marginface.train.trainer import Trainer

    cfg = load_config(None, [
        "model.input_size=32", "model.width_mult=0.25", "model.embedding_size=128",
        "data.synthetic.identities=100", "data.synthetic.images_per_identity=8",
        "data.synthetic.val_identities=60", "data.synthetic.val_images_per_identity=5",
        "data.synthetic.val_pairs=600", "train.batch_size=64", "train.amp=none", "train.max_steps=60",
        "train.log_every=1000", "data.num_workers=0", "schedule.warmup_steps=5", "train.deterministic=true"])
    run = tmp_path_factory.mktemp("run")
    report = Trainer(cfg, run, console=False).fit()
    assert report["eval"]["synthetic"]["accuracy"] > 0.6, "the fixture model did not learn"
    return run


@pytest.fixture(scope="module")
def run_exports(trained_run, tmp_path_factory):
    """The trained run exported through the CLI: fp32 and int8 (64 synthetic training crops)."""
    work = tmp_path_factory.mktemp("run_tflite")
    calib = work / "calib"
    calib.mkdir()
    for i, image in enumerate(render_identities(range(32), 2, 32, seed=0)):
        imwrite_rgb(calib / f"{i}.png", image)
    files = {"fp32": work / "fp32.tflite", "int8": work / "int8.tflite"}
    assert main(["export", str(trained_run), "--format", "tflite", "--out", str(files["fp32"])]) == 0
    assert main(["export", str(trained_run), "--format", "tflite", "--precision", "int8", "--calib", str(calib),
                 "--out", str(files["int8"]), "--json"]) == 0
    return files


def test_int8_keeps_accuracy_and_same_pair_cosine(trained_run, run_exports, capsys):
    capsys.readouterr()
    fp32, int8 = (load_model(run_exports[p], threads=1) for p in ("fp32", "int8"))
    assert int8.info.precision == "int8" and run_exports["int8"].stat().st_size < run_exports["fp32"].stat().st_size / 1.5
    held_out = synthetic_pair_set(200, 6, 2000, image_size=32, seed=5, name="held_out")
    acc = {name: evaluate_pair_set(m, held_out)["accuracy"] for name, m in (("fp32", fp32), ("int8", int8))}
    lfw = load_bin(need("verification/lfw_head20.bin"), image_size=32)
    same = {}
    for name, m in (("fp32", fp32), ("int8", int8)):
        e = _embed(m, lfw.images)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        same[name] = float((e[lfw.pairs[:, 0]] * e[lfw.pairs[:, 1]]).sum(1).mean())
    with capsys.disabled():
        print(f"\n[tflite int8] held-out accuracy fp32 {acc['fp32']:.4f} int8 {acc['int8']:.4f}; lfw_head20 "
              f"same-pair cosine fp32 {same['fp32']:.4f} int8 {same['int8']:.4f}")
    assert acc["fp32"] - acc["int8"] <= 0.005
    assert abs(same["fp32"] - same["int8"]) <= 0.02


def test_cli_round_trip_eval_and_embed(run_exports, tmp_path, capsys):
    capsys.readouterr()
    bin_path = need("verification/lfw_head20.bin")
    assert main(["eval", "--model", str(run_exports["int8"]), "--sets", str(bin_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (metrics,) = result.values()
    assert metrics["pairs"] == 10 and 0.0 <= metrics["accuracy"] <= 1.0
    faces = tmp_path / "faces"
    faces.mkdir()
    for i, image in enumerate(load_bin(bin_path).images[:3]):
        imwrite_rgb(faces / f"{i}.png", image)
    out = tmp_path / "feats.npy"
    assert main(["embed", "--model", str(run_exports["fp32"]), "--images", str(faces), "--out", str(out)]) == 0
    assert np.load(out).shape == (3, 128)


@pytest.mark.parametrize("damage", ["truncated", "onnx_bytes", "empty"])
def test_broken_files_are_one_error_line(run_exports, tmp_path, capsys, damage):
    good = run_exports["fp32"].read_bytes()
    bad = tmp_path / "model.tflite"
    if damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "onnx_bytes":  # a model of another format under the right name
        bad.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(200))
    else:
        bad.write_bytes(b"")
    capsys.readouterr()
    code = main(["eval", "--model", str(bad), "--sets", str(need("verification/lfw_head20.bin"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "model.tflite" in err[0], err
