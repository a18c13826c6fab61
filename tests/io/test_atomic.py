"""marginface.io.atomic: whole files or nothing. Unit tests of the helper, then the full disk for
real: commands run in a subprocess whose file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes
writes past N bytes fail with EFBIG. Each must exit 2 with one `error:` line naming the file,
leave the previous file as it was and leave no temp file behind."""
from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from marginface.errors import UserError
from marginface.io.atomic import (
    atomic_path,
    atomic_save_torch,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
)
from shared_data import need  # tests/shared_data.py

ROOT = Path(__file__).resolve().parents[2]


def temps(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------- the helper
def test_writes_whole_files_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
    with atomic_path(tmp_path / "feats.npy") as tmp:
        np.save(tmp, np.arange(3))  # a file name without .npy: np.save appends it
        assert tmp.name.startswith(".feats.npy.") and tmp.suffix == ".tmp"
    assert temps(tmp_path) == []


def test_any_error_keeps_the_previous_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("previous")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, "w") as f:
            f.write("half of the new")
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise KeyboardInterrupt
    with pytest.raises(TypeError):  # serialised before anything is written
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "previous" and os.listdir(tmp_path) == ["report.md"]


def test_os_errors_become_one_user_error_line(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    with pytest.raises(UserError) as info:
        with atomic_write(target) as f:
            f.write(b"x")
            raise OSError(28, "No space left on device")
    assert str(info.value) == f"{target}: could not write (No space left on device)"
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.bin"]
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        atomic_write_bytes(tmp_path / "dir", b"x")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="could not write"):
        atomic_write_bytes(tmp_path / "file" / "below.bin", b"x")  # a file where a folder should be


def test_stale_temps_removed_are_ours_only(tmp_path):
    ours = [".last.pt.abcd_123.tmp", "last.pt.k2j4h5g6.tmp"]  # this module's names and the old checkpoint ones
    others = ["last.pt", "last.pt.tmp", "notes.tmp", ".last.pt.x.tmp", ".best.pt.abcd1234.tmp",
              "last.pt.abcd1234.tmp.keep", "my.last.pt.abcd1234.tmp"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in remove_stale_temps(tmp_path / "last.pt")) == sorted(ours)
    assert sorted(os.listdir(tmp_path)) == sorted(others)


def test_torch_save_round_trip_and_stale_cleanup(tmp_path):
    (tmp_path / ".last.pt.zzzz9999.tmp").write_bytes(b"left by a killed save")
    (tmp_path / "thesis.tex").write_text("mine")
    atomic_save_torch({"w": torch.arange(4.0)}, tmp_path / "last.pt")
    back = torch.load(tmp_path / "last.pt", weights_only=True)
    assert torch.equal(back["w"], torch.arange(4.0))
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "thesis.tex"]


def test_image_writes_are_checked(tmp_path):
    """`imwrite_rgb` (data synth/convert/align): a failure raises naming the file, where
    ``cv2.imwrite`` returned False and the commands carried on."""
    from marginface.data.images import imwrite_rgb
    from marginface.data.sources import read_image_file

    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0] = 255  # red, to check the channel order
    assert np.array_equal(read_image_file(imwrite_rgb(tmp_path / "red.png", image)), image)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"file/x\.png: could not write"):
        imwrite_rgb(tmp_path / "file" / "x.png", image)
    with pytest.raises(UserError, match=r"x\.nope: cannot encode the image"):
        imwrite_rgb(tmp_path / "x.nope", image)
    assert sorted(os.listdir(tmp_path)) == ["file", "red.png"]


def test_the_io_package_imports_nothing_else_of_marginface():
    code = ("import sys, marginface.io.atomic, marginface.io.trust; "
            "print(sorted(m for m in sys.modules if m.startswith('marginface')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == ["marginface", "marginface.errors", "marginface.io",
                                                  "marginface.io.atomic", "marginface.io.trust"]


# ---------------------------------------------------------------------------------------------- a full disk
def limited(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def run_limited(argv: list, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, preexec_fn=limited(limit),
                          timeout=120)


def cli(*args) -> list:
    return [sys.executable, "-m", "marginface", *map(str, args)]


def one_error_naming(result: subprocess.CompletedProcess, path: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert f"{path}: could not write (File too large)" in lines[0], lines[0]


def test_checkpoint_save_on_a_full_disk(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.pt"
    atomic_save_torch({"step": 1}, ckpt)
    before = ckpt.read_bytes()
    code = ("import sys, torch\n"
            "from marginface.errors import UserError\n"
            "from marginface.train.checkpoint import save_atomic\n"
            "try:\n"
            f"    save_atomic({{'step': 2, 'w': torch.ones(100000)}}, {str(ckpt)!r})\n"
            "except UserError as e:\n"
            "    print(f'error: {e}', file=sys.stderr); sys.exit(2)\n")
    result = run_limited([sys.executable, "-c", code], 50_000, tmp_path)
    one_error_naming(result, ckpt)
    assert ckpt.read_bytes() == before and temps(tmp_path) == []


@pytest.mark.parametrize("fmt", ["folder", "rec"])
def test_data_synth_on_a_full_disk(tmp_path, fmt):
    out = tmp_path / "synth"
    previous = out / ("id000000/0000.jpg" if fmt == "folder" else "train.rec")
    previous.parent.mkdir(parents=True)
    previous.write_bytes(b"previous")
    result = run_limited(cli("data", "synth", out, "--identities", "2", "--images", "2", "--size", "64",
                             "--format", fmt), 1000, tmp_path)
    one_error_naming(result, previous)
    assert previous.read_bytes() == b"previous" and temps(tmp_path) == []


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_data_convert_on_a_full_disk(tmp_path):
    """.bin -> images + pairs.csv (convert writes into a new or empty folder): no partial image."""
    dst = tmp_path / "pairs"
    result = run_limited(cli("data", "convert", need("verification/lfw_head20.bin"), dst), 5000, tmp_path)
    one_error_naming(result, dst / "images" / "00000.png")
    assert files_under(dst) == []


def test_data_convert_to_a_pack_on_a_full_disk(tmp_path):
    from marginface.data.synthetic import write_synthetic

    write_synthetic(str(tmp_path / "faces"), identities=2, images_per_identity=2, image_size=64)
    dst = tmp_path / "pack"
    result = run_limited(cli("data", "convert", tmp_path / "faces", dst), 1000, tmp_path)
    one_error_naming(result, dst / "train.rec")
    assert files_under(dst) == []


class MeanColour(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@pytest.fixture
def colour_model(tmp_path):
    """A TorchScript model (loaded with --trust-code) and a few uniform-colour faces with pairs."""
    path = tmp_path / "colour.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(MeanColour().eval()), str(path),
                       _extra_files={"marginface.json": json.dumps({"input_size": [16, 16]})})
    colours = [(200, 30, 30), (190, 40, 35), (30, 30, 200), (35, 45, 190)]
    for k, c in enumerate(colours):
        (tmp_path / "faces").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "faces" / f"{k}.png"), np.full((16, 16, 3), c[::-1], np.uint8))
    rows = ["file_x,file_y,same", "faces/0.png,faces/1.png,1", "faces/2.png,faces/3.png,1",
            "faces/0.png,faces/2.png,0", "faces/1.png,faces/3.png,0"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return path


def test_embed_on_a_full_disk(tmp_path, colour_model):
    feats = tmp_path / "out" / "feats.npy"
    feats.parent.mkdir()
    feats.write_bytes(b"previous")
    result = run_limited(cli("embed", "--model", colour_model, "--trust-code", "--images", tmp_path / "faces",
                             "--out", feats, "--json"), 100, tmp_path)
    one_error_naming(result, feats)
    assert feats.read_bytes() == b"previous" and temps(tmp_path) == []
    assert not (tmp_path / "out" / "feats.txt").exists()


def test_eval_report_on_a_full_disk(tmp_path, colour_model):
    out = tmp_path / "report"
    out.mkdir()
    old_json = json.dumps({"eval": {}, "note": "previous"})
    (out / "report.json").write_text(old_json)
    (out / "report.md").write_text("previous")
    result = run_limited(cli("eval", "--model", colour_model, "--trust-code", "--sets", tmp_path / "pairs.csv",
                             "--out", out, "--no-plots", "--device", "cpu", "--json"), 200, tmp_path)
    one_error_naming(result, out / "report.json")
    assert (out / "report.json").read_text() == old_json and (out / "report.md").read_text() == "previous"
    assert temps(tmp_path) == []
    # with room to write, the same command works (the limit, not the command, failed it)
    ok = run_limited(cli("eval", "--model", colour_model, "--trust-code", "--sets", tmp_path / "pairs.csv",
                         "--out", out, "--no-plots", "--device", "cpu"), 10_000_000, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "pairs" in json.loads((out / "report.json").read_text())["eval"] and temps(tmp_path) == []


def test_train_on_a_full_disk(tmp_path):
    """A checkpoint save that hits the limit ends the run with one error line (exit 2), not a
    traceback, and leaves no temp file in checkpoints/."""
    out = tmp_path / "run"
    sets = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=64",
            "data.synthetic.identities=20", "data.synthetic.images_per_identity=4", "data.val=[]",
            "train.batch_size=16", "train.amp=none", "train.max_steps=2"]
    result = run_limited(cli("train", "--out", out, "--json", "--set", *sets), 50_000, tmp_path)
    one_error_naming(result, out / "checkpoints" / "last.pt")
    assert temps(tmp_path) == [] and not (out / "checkpoints" / "last.pt").exists()


def test_export_on_a_full_disk(tmp_path):
    out = tmp_path / "model.ts"
    out.write_bytes(b"previous")
    result = run_limited(cli("export", "--backbone", "mbf", "--format", "torchscript", "--out", out), 100_000,
                         tmp_path)
    one_error_naming(result, out)
    assert out.read_bytes() == b"previous" and temps(tmp_path) == []
