"""Model files that run code when loaded (TorchScript archives, compiled .pt2 packages) are opened
only with --trust-code / trust_code=True. Without it every command that takes a model refuses them
with one `error:` line (exit 2) before torch reads anything in the file: torch.jit.load,
torch.load and the AOTInductor package loader are replaced by recorders that must stay unused."""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from marginface.cli import main
from marginface.deploy.load import load_model
from marginface.errors import UserError
from marginface.io.trust import code_kind

torch.set_num_threads(1)
TS_MESSAGE = "is a TorchScript archive, which runs code when loaded; pass --trust-code if you trust this file"
PT2_MESSAGE = "is a compiled package, which runs native code when opened; pass --trust-code if you trust this file"


class MeanColour(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def save_torchscript(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(MeanColour().eval()), str(path),
                       _extra_files={"marginface.json": json.dumps({"input_size": [16, 16]})})
    return path


def fake_package(path: Path) -> Path:
    """A zip laid out like an AOTInductor package (what matters: nothing may open it)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/data/aotinductor/model/model.so", b"\x7fELF payload")
        z.writestr("model/data/aotinductor/model/model.wrapper.cpp", "// code")
    return path


@pytest.fixture
def world(tmp_path):
    save_torchscript(tmp_path / "best.pt")  # a TorchScript archive under a checkpoint's name
    fake_package(tmp_path / "model.pt2")
    for name in ("a", "b"):
        (tmp_path / "faces" / name).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "faces" / name / "0.png"), np.full((16, 16, 3), 90, np.uint8))
    (tmp_path / "pairs.csv").write_text("file_x,file_y,same\nfaces/a/0.png,faces/b/0.png,0\n")
    return tmp_path


@pytest.fixture
def loaders(monkeypatch):
    """Record (and refuse) every call that would read a model with torch."""
    calls = []

    def recorder(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called")
        return record

    monkeypatch.setattr(torch.jit, "load", recorder("torch.jit.load"))
    monkeypatch.setattr(torch, "load", recorder("torch.load"))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", recorder("aoti_load_package"))
    return calls


def commands(root: Path, model: Path) -> dict:
    faces = root / "faces"
    return {
        "eval": ["eval", "--model", model, "--sets", root / "pairs.csv", "--out", root / "report"],
        "identify": ["identify", "--model", model, "--gallery", faces, "--probes", faces],
        "embed": ["embed", "--model", model, "--images", faces, "--out", root / "feats.npy"],
        "verify": ["verify", faces / "a" / "0.png", faces / "b" / "0.png", "--model", model],
        "gallery enroll": ["gallery", "enroll", faces, "--db", root / "g.sqlite", "--model", model],
        "bench": ["bench", model, "--runs", "1"],
    }


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def written_files(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.parametrize("command", ["eval", "identify", "embed", "verify", "gallery enroll", "bench"])
def test_torchscript_refused_without_trust_code(world, loaders, capsys, command):
    before = written_files(world)
    argv = commands(world, world / "best.pt")[command]
    assert main([str(a) for a in argv]) == 2
    line = one_error_line(capsys)
    if command == "bench":  # bench runs checkpoints and .onnx files only: a TorchScript file is not one
        assert f"{world / 'best.pt'}: is a TorchScript archive, which runs code when loaded" in line
    else:
        assert line == f"error: {world / 'best.pt'}: {TS_MESSAGE}"
    assert loaders == []  # nothing opened it with torch
    assert written_files(world) == before


@pytest.mark.parametrize("command", ["eval", "identify", "embed", "verify", "gallery enroll", "bench"])
def test_compiled_package_refused_without_trust_code(world, loaders, capsys, command):
    before = written_files(world)
    argv = commands(world, world / "model.pt2")[command]
    assert main([str(a) for a in argv]) == 2
    assert one_error_line(capsys) == f"error: {world / 'model.pt2'}: {PT2_MESSAGE}"
    assert loaders == []
    assert written_files(world) == before


def test_export_refuses_torchscript_input_without_reading_it(world, loaders, capsys):
    out = world / "x.onnx"
    assert main(["export", str(world / "best.pt"), "--out", str(out)]) == 2
    assert "is a TorchScript archive, which runs code when loaded; not a training checkpoint" in one_error_line(capsys)
    assert loaders == [] and not out.exists()


def test_disguised_archives_are_found_by_their_members(world, loaders):
    """The name does not matter: a TorchScript zip called .onnx, or inside a run directory."""
    disguised = world / "model.onnx"
    disguised.write_bytes((world / "best.pt").read_bytes())
    run = world / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes((world / "best.pt").read_bytes())
    package_as_pt = world / "package.pt"
    package_as_pt.write_bytes((world / "model.pt2").read_bytes())
    assert code_kind(disguised) == "torchscript" and code_kind(package_as_pt) == "compiled"
    with pytest.raises(UserError, match="model.onnx: is a TorchScript archive"):
        load_model(disguised)
    with pytest.raises(UserError, match="best.pt: is a TorchScript archive"):
        load_model(run)  # the run's checkpoint is resolved, then refused by the checkpoint loader
    with pytest.raises(UserError, match="package.pt: is a compiled package"):
        load_model(package_as_pt)
    assert loaders == []


def test_library_entry_points_refuse_without_trust_code(world, loaders):
    from marginface.deploy.compiled import CompiledEmbedder
    from marginface.deploy.embedder import FaceEmbedder
    from marginface.deploy.load import TorchScriptEmbedder

    with pytest.raises(UserError, match=TS_MESSAGE.split(";")[0]):
        TorchScriptEmbedder(world / "best.pt")
    with pytest.raises(UserError, match=PT2_MESSAGE.split(";")[0]):
        CompiledEmbedder.load(world / "model.pt2")
    with pytest.raises(UserError, match="pass --trust-code"):
        FaceEmbedder(world / "best.pt")
    assert loaders == []


def test_checkpoints_and_plain_files_are_not_code(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "ckpt.pt")
    (tmp_path / "notes.zip").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        z.writestr("images/0.png", b"png")
    assert code_kind(tmp_path / "ckpt.pt") is None
    assert code_kind(tmp_path / "notes.zip") is None and code_kind(tmp_path / "data.zip") is None
    assert code_kind(tmp_path / "missing.pt") is None


def test_our_torchscript_export_runs_with_trust_code(tmp_path, capsys):
    """`export --format torchscript` of a (random) mbf, then embed with --trust-code: it loads and runs;
    the same command without the flag is refused."""
    model = tmp_path / "mbf.ts"
    assert main(["export", "--backbone", "mbf", "--format", "torchscript", "--out", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parity"]["min_cosine"] > 0.9999
    (tmp_path / "faces").mkdir()
    for k in range(2):
        cv2.imwrite(str(tmp_path / "faces" / f"{k}.png"), np.full((112, 112, 3), 60 + 80 * k, np.uint8))
    feats = tmp_path / "feats.npy"
    argv = ["embed", "--model", str(model), "--images", str(tmp_path / "faces"), "--out", str(feats), "--json"]
    assert main(argv) == 2
    assert one_error_line(capsys) == f"error: {model}: {TS_MESSAGE}"
    assert not feats.exists()
    assert main(argv + ["--trust-code"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert (result["images"], result["dim"]) == (2, 512)
    rows = np.load(feats)
    assert rows.shape == (2, 512) and np.isfinite(rows).all() and not np.allclose(rows[0], rows[1])


def test_help_says_what_runs_code(capsys):
    for argv in (["eval", "--help"], ["embed", "--help"], ["identify", "--help"], ["verify", "--help"],
                 ["gallery", "enroll", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert "--trust-code" in text and ("run code when loaded" in text or "runs native code" in text), argv
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a .py config is Python and runs with your permissions" in text
