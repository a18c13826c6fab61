"""ExecuTorch (`marginface.deploy.mobile.executorch_pte`): `export --format executorch` (fp32 and
PT2E/XNNPACK int8) run by ExecuTorch's own runtime: parity with PyTorch on synthetic and real
aligned faces, int8 same-pair cosines against fp32, the CLI round trip, the thread pool, and one
`error:` line for a truncated, empty or foreign `.pte`.

Two exports of a trained-looking ``mbf`` (one fp32, one int8) are shared by the module; lowering is
pure-Python graph work: the file takes ~70 s on the 2-core VM when it is quiet (the two exports
63 s), about 3 minutes at load 10-14."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="ExecuTorch is not installed: pip install 'marginface[executorch]'")

from marginface.cli import main  # noqa: E402
from marginface.data.transforms import to_tensor  # noqa: E402
from marginface.data.verification import load_bin  # noqa: E402
from marginface.deploy.export import compare_embeddings, parity_images  # noqa: E402
from marginface.deploy.load import load_model, random_backbone, trained_looking  # noqa: E402
from marginface.deploy.mobile import executorch_pte  # noqa: E402
from marginface.errors import UserError  # noqa: E402

from shared_data import need  # noqa: E402  (tests/shared_data.py)


def _same_pair_mean(embeddings: np.ndarray, pairs: np.ndarray) -> float:
    return compare_embeddings(embeddings[pairs[:, 0]], embeddings[pairs[:, 1]])["mean_cosine"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained-looking mbf state dict and its fp32 and int8 ``.pte`` exports through the CLI
    (``export --json``'s reports); int8 is calibrated on the 10 real MS1M crops, not on the LFW faces
    it is tested on."""
    calib = need("identities/ms1m_sample/images")
    root = tmp_path_factory.mktemp("executorch")
    model = trained_looking(random_backbone("mbf"), seed=3)
    weights = root / "mbf.pth"
    torch.save(model.state_dict(), weights)
    files, reports = {}, {}
    for precision in ("fp32", "int8"):
        files[precision] = root / f"mbf-{precision}.pte"
        argv = ["export", str(weights), "--format", "executorch", "--precision", precision,
                "--out", str(files[precision]), "--json"]
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(argv + (["--calib", str(calib)] if precision == "int8" else []))
        assert code == 0
        reports[precision] = json.loads(stdout.getvalue())
    return model, files, reports


def _export(exported, precision):
    model, files, reports = exported
    return model, files[precision], reports[precision]


def test_fp32_export_report_parity_and_sidecar(exported):
    model, out, report = _export(exported, "fp32")
    assert report["format"] == "executorch" and report["precision"] == "fp32"
    assert report["converter"].startswith("executorch ") and report["delegate"] == "XnnpackBackend"
    assert report["delegated_nodes"] > 50 and report["non_delegated_nodes"] <= 2  # all compute in XNNPACK
    assert report["parity"]["min_cosine"] >= 0.9999, report["parity"]
    assert report["metadata"]["backbone"] == "mbf" and (out.parent / (out.name + ".json")).is_file()
    emb = load_model(out, threads=1)
    assert (emb.info.kind, emb.info.precision, emb.info.input_size, emb.info.embedding_size, emb.fixed_batch) == \
        ("executorch", "fp32", (112, 112), 512, 1)
    x = to_tensor(parity_images((112, 112), 5, seed=7), "arcface")
    with torch.no_grad():
        reference = model(x).numpy()
    got = emb(x).numpy()  # 5 images through a batch-1 program
    assert got.shape == (5, 512) and compare_embeddings(reference, got)["min_cosine"] >= 0.9999


def test_fp32_parity_on_real_aligned_lfw_faces(exported):
    model, out, _ = _export(exported, "fp32")
    faces = load_bin(need("verification/lfw_head20.bin"))
    x = to_tensor(faces.images, "arcface")
    assert len(x) == 17
    with torch.no_grad():
        reference = model(x).numpy()
    got = load_model(out, threads=2)(x).numpy()
    assert compare_embeddings(reference, got)["min_cosine"] >= 0.9999


def test_int8_same_pair_cosine_close_to_fp32_and_small(exported):
    model, fp32_out, _ = _export(exported, "fp32")
    _, int8_out, report = _export(exported, "int8")
    assert report["precision"] == "int8" and report["calibration_images"] == 10
    assert "per output channel" in report["quantization"] and report["metadata"]["quantization"] == "int8"
    assert int8_out.stat().st_size < 0.35 * fp32_out.stat().st_size  # int8 weights: about a quarter
    faces = load_bin(need("verification/lfw_head20.bin"))
    x = to_tensor(faces.images, "arcface")
    fp32 = load_model(fp32_out, threads=1)(x).numpy()
    int8_model = load_model(int8_out, threads=1)
    assert int8_model.info.precision == "int8"
    int8 = int8_model(x).numpy()
    assert abs(_same_pair_mean(int8, faces.pairs) - _same_pair_mean(fp32, faces.pairs)) <= 0.02
    assert compare_embeddings(fp32, int8)["mean_cosine"] >= 0.95  # quantised, not a different network


def test_cli_eval_round_trip_matches_pytorch(exported, capsys):
    model, out, _ = _export(exported, "fp32")
    bin_path = need("verification/lfw_head20.bin")
    assert main(["eval", "--model", str(out), "--sets", str(bin_path), "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["lfw_head20"]
    faces = load_bin(bin_path)
    x = to_tensor(faces.images, "arcface")
    with torch.no_grad():
        emb = model(x).numpy() + model(torch.flip(x, dims=[3])).numpy()  # eval's flip-sum
    assert result["pairs"] == 10
    assert result["pos_mean"] == pytest.approx(_same_pair_mean(emb, faces.pairs), abs=1e-4)


def test_thread_count_is_honoured_per_embedder(exported):
    _, out, _ = _export(exported, "fp32")
    one = load_model(out, threads=1)
    assert executorch_pte._bindings._threadpool_get_thread_count() == 1
    two = load_model(out, threads=2)
    assert executorch_pte._bindings._threadpool_get_thread_count() == 2
    x = np.zeros((1, 3, 112, 112), np.float32)
    one.run_numpy(x)
    assert executorch_pte._bindings._threadpool_get_thread_count() == 1
    two.run_numpy(x)
    assert executorch_pte._bindings._threadpool_get_thread_count() == 2


def test_without_sidecar_the_program_gives_the_shapes(exported, tmp_path):
    _, out, _ = _export(exported, "fp32")
    bare = tmp_path / "bare.pte"
    bare.write_bytes(out.read_bytes())
    emb = load_model(bare, threads=1)
    assert (emb.info.input_size, emb.info.embedding_size, emb.info.normalize, emb.info.threshold) == \
        ((112, 112), 512, "arcface", None)


@pytest.mark.parametrize("case,needle", [
    ("truncated", "File size is too small"),
    ("empty", "not a loadable ExecuTorch program"),
    ("onnx", "Program identifier"),
    ("text", "not a loadable ExecuTorch program"),
])
def test_bad_pte_is_one_error_line(exported, case, needle, capfd, tmp_path):
    _, out, _ = _export(exported, "fp32")
    bad = tmp_path / "bad.pte"
    if case == "truncated":
        bad.write_bytes(out.read_bytes()[: out.stat().st_size // 3])
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "onnx":
        bad.write_bytes(need("weights/mobilefacenet_onnx/MobileFaceNet.onnx").read_bytes())
    else:
        bad.write_text("7767517\n3 3\nInput data 0 1 data\n")  # an NCNN .param under the .pte name
    capfd.readouterr()
    assert main(["eval", "--model", str(bad), "--sets", str(need("verification/lfw_head20.bin")), "--json"]) == 2
    captured = capfd.readouterr()  # file-descriptor level: the runtime's own log lines count too
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and needle in lines[0], captured.err
    assert captured.out == ""
    with pytest.raises(UserError, match="bad.pte"):
        executorch_pte.Embedder(bad)


def test_int8_export_without_calibration_is_refused(capsys, tmp_path):
    assert main(["export", "--backbone", "mbf", "--format", "executorch", "--precision", "int8",
                 "--out", str(tmp_path / "x.pte")]) == 2
    assert "--calib" in capsys.readouterr().err and not list(tmp_path.iterdir())
