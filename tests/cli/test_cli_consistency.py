"""One consistent command line (issue 21): the same option names on every command, help for every
option, usage for a bare command, one --precision for every export format, refused bad numbers,
messages that name only options the command has, and Ctrl-C as one line with exit code 130."""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from marginface import __version__
from marginface.cli import build_parser, main
from tests.shared_data import need

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
FOREIGN = "weights/mobilefacenet_onnx/MobileFaceNet.onnx"


def run(capsys, *argv) -> tuple:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def subparsers(parser: argparse.ArgumentParser, path=("marginface",)):
    """(command path, parser) of the parser and every subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subparsers(child, path + (name,))


def parse(*argv):
    return build_parser().parse_args([str(a) for a in argv])


# -------------------------------------------------------------------------------------- option names
def test_export_and_bench_take_model_as_an_option_too(capsys, tmp_path):
    assert parse("export", "--model", "run", "--out", "x.onnx").model_option == "run"
    assert parse("export", "run", "--out", "x.onnx").model == "run"  # the positional still works
    assert parse("bench", "--model", "m.onnx").model_option == "m.onnx"
    rc, _, err = run(capsys, "export", "--model", tmp_path / "nope.pt", "--out", tmp_path / "x.onnx")
    assert rc == 2 and "nope.pt" in error_line(err)
    rc, _, err = run(capsys, "export", "a.pt", "--model", "b.pt", "--out", tmp_path / "x.onnx")
    assert rc == 2 and "give the model once" in error_line(err)


def test_bench_names_every_model_kind_it_takes(capsys, tmp_path):
    rc, _, err = run(capsys, "bench", "--model", tmp_path / "missing.onnx")
    line = error_line(err)
    assert rc == 2 and "missing.onnx: not found" in line and ".onnx" in line.split("not found", 1)[1]
    assert "expected a .pt file" not in line


def test_detector_options_are_the_same_everywhere():
    for argv in (["data", "align", "src", "dst"], ["verify", "a.jpg", "b.jpg", "--model", "m"],
                 ["gallery", "enroll", "dir", "--db", "g.sqlite", "--model", "m"],
                 ["gallery", "search", "x.jpg", "--db", "g.sqlite", "--model", "m"]):
        args = parse(*argv, "--detector", "retinaface", "--detector-weights", "w")
        assert (args.detector, args.detector_weights) == ("retinaface", "w"), argv
        assert parse(*argv, "--weights", "old").detector_weights == "old", argv  # the old name, hidden
    text = build_parser()._subparsers._group_actions[0].choices["data"]._subparsers._group_actions[0] \
        .choices["align"].format_help()
    assert "--detector-weights" in text and "--weights" not in text.replace("--detector-weights", "")


def test_face_embedder_builds_the_named_detector(tmp_path):
    from marginface.data.detect.retinaface import RetinaFaceDetector
    from marginface.deploy.embedder import FaceEmbedder
    from marginface.errors import UserError

    fe = FaceEmbedder(need(FOREIGN), normalize="imagenet", detector="retinaface",
                      detector_weights=need("weights/retinaface"), threads=1)
    assert isinstance(fe.detector, RetinaFaceDetector)
    with pytest.raises(UserError, match="unknown detector 'nope'"):
        FaceEmbedder(need(FOREIGN), detector="nope")


def test_verify_with_retinaface_on_real_photos(capsys):
    photos = need("photos/deepface")
    rc, out, err = run(capsys, "verify", photos / "img1.jpg", photos / "img2.jpg", "--model", need(FOREIGN),
                       "--normalize", "imagenet", "--detector", "retinaface", "--detector-weights",
                       need("weights/retinaface"), "--threads", "1", "--threshold", "0.4", "--json")
    assert rc == 0, err
    import json

    result = json.loads(out)
    assert -1 <= result["similarity"] <= 1 and result["threshold"] == 0.4


MODEL_COMMANDS = {
    "train": [], "eval": ["--model", "m", "--sets", "s"],
    "identify": ["--model", "m", "--gallery", "g", "--probes", "p"], "embed": ["--model", "m", "--images", "i",
                                                                              "--out", "f.npy"],
    "verify": ["a", "b", "--model", "m"], "gallery enroll": ["d", "--db", "g.sqlite", "--model", "m"],
    "gallery search": ["x", "--db", "g.sqlite", "--model", "m"], "bench": ["m"], "export": ["m", "--out", "x.onnx"],
}


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_threads_on_every_command_that_runs_a_model(command):
    assert parse(*command.split(), *MODEL_COMMANDS[command], "--threads", "3").threads == 3


def test_threads_sets_torch_threads_and_refuses_zero(capsys, tmp_path):
    before = torch.get_num_threads()
    try:
        rc, _, err = run(capsys, "train", "--dry-run", "--threads", "1", "--out", tmp_path / "run", "--set",
                         "data.synthetic.identities=4", "data.synthetic.images_per_identity=2", "data.val=[]",
                         "model.input_size=32", "train.batch_size=8")
        assert rc == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    rc, _, err = run(capsys, "train", "--dry-run", "--threads", "0", "--out", tmp_path / "run")
    assert rc == 2 and error_line(err) == "error: --threads must be >= 1, got 0"


# -------------------------------------------------------------------------------------- usage and help
def test_bare_command_prints_usage_and_version_prints_the_version():
    bare = subprocess.run([sys.executable, "-m", "marginface"], env=ENV, capture_output=True, text=True, timeout=120)
    assert bare.returncode == 2 and "usage: marginface" in bare.stderr and "train" in bare.stderr
    assert "Traceback" not in bare.stderr and "error:" not in bare.stderr
    group = subprocess.run([sys.executable, "-m", "marginface", "gallery"], env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert group.returncode == 2 and "usage: marginface gallery" in group.stderr and "enroll" in group.stderr
    version = subprocess.run([sys.executable, "-m", "marginface", "--version"], env=ENV, capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"marginface {__version__}"


def test_every_option_of_every_command_has_help():
    missing = []
    for path, parser in subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without a help line: {missing}"


def test_help_shows_defaults_and_train_help_points_at_the_config_keys():
    commands = {" ".join(path): parser for path, parser in subparsers(build_parser())}
    export = commands["marginface export"].format_help()
    assert "(default: onnx)" in " ".join(export.split()) and "(default: 13)" in " ".join(export.split())
    assert "(default: 5)" in " ".join(commands["marginface gallery search"].format_help().split())
    train = " ".join(commands["marginface train"].format_help().split())
    assert "configs/synthetic_mbf.yaml" in train and (ROOT / "configs" / "synthetic_mbf.yaml").is_file()


def test_help_texts_hold_no_machine_timings():
    for path, parser in subparsers(build_parser()):
        text = parser.format_help()
        assert not re.search(r"~\s*\d+(\.\d+)?\s*x|\d+\s*-?core|\d+-\d+ s\b", text), (path, text)


# -------------------------------------------------------------------------------------- export --precision
def test_export_precision_is_checked_per_format(capsys, tmp_path):
    rc, _, err = run(capsys, "export", "--backbone", "mbf", "--format", "torchscript", "--precision", "bf16",
                     "--out", tmp_path / "x.pt")
    assert rc == 2 and error_line(err) == ("error: --precision bf16 needs --format aoti; --format torchscript "
                                          "does fp32")
    rc, _, err = run(capsys, "export", "--backbone", "mbf", "--format", "torchscript", "--precision", "int8",
                     "--out", tmp_path / "x.pt")
    assert rc == 2 and "--precision int8 needs --format onnx or aoti" in error_line(err)
    rc, _, err = run(capsys, "export", "--backbone", "mbf", "--precision", "bf16", "--out", tmp_path / "x.onnx")
    assert rc == 2 and "--format onnx does fp32, int8" in error_line(err)
    rc, _, err = run(capsys, "export", "--backbone", "mbf", "--precision", "int8", "--out", tmp_path / "x.onnx")
    assert rc == 2 and "--int8" not in error_line(err) and "--calib" in error_line(err)


@pytest.mark.parametrize("flag", [["--precision", "int8"], ["--int8"]])
def test_export_onnx_int8_through_precision_or_the_old_flag_on_real_faces(capsys, tmp_path, flag):
    calib = need("verification/lfw_mini")
    rc, out, err = run(capsys, "export", "--backbone", "mbf", *flag, "--calib", calib,
                       "--out", tmp_path / "q.onnx", "--threads", "1", "--json")
    assert rc == 0, err
    import json

    report = json.loads(out)
    assert report["int8"] is True and report["format"] == "onnx" and (tmp_path / "q.onnx").is_file()
    notes = ["note: export --int8 is deprecated; use --precision int8"] if flag == ["--int8"] else []
    assert err.strip().splitlines() == notes
    rc, _, err = run(capsys, "export", "--backbone", "mbf", *flag, "--out", tmp_path / "x.onnx")
    assert rc == 2 and "needs --calib" in error_line(err) and len(err.strip().splitlines()) == 1


# -------------------------------------------------------------------------------------- refused values
@pytest.mark.parametrize("top", ["0", "-2"])
def test_gallery_search_refuses_top_below_one(capsys, tmp_path, top):
    rc, _, err = run(capsys, "gallery", "search", tmp_path / "x.jpg", "--db", tmp_path / "g.sqlite",
                     "--model", tmp_path / "m.onnx", "--top", top)
    assert rc == 2 and error_line(err) == f"error: --top must be >= 1, got {top}"


def test_gallery_enroll_threshold_is_deprecated(capsys, tmp_path):
    import shutil

    johns = need("identities/johns")
    people = tmp_path / "people"
    for person in sorted(p for p in johns.iterdir() if p.is_dir())[:2]:
        (people / person.name).mkdir(parents=True)
        shutil.copy(sorted(person.glob("*.jpg"))[0], people / person.name)
    model = ["--model", need(FOREIGN), "--normalize", "imagenet", "--detector-weights", need("weights/mtcnn"),
             "--threads", "1"]
    rc, _, err = run(capsys, "gallery", "enroll", people, "--db", tmp_path / "g.sqlite", *model,
                     "--threshold", "0.3", "--json")
    assert rc == 0, err
    assert err.strip().splitlines() == [
        "note: gallery enroll --threshold is deprecated and ignored: enrolment compares no faces "
        "(give --threshold to `gallery search` or `verify`)"]
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "gallery", "enroll", tmp_path / "empty", "--db", tmp_path / "g.sqlite", *model,
                     "--threshold", "0.3")
    assert rc == 2 and len(err.strip().splitlines()) == 1  # an error stays the only line
    commands = {" ".join(path): parser for path, parser in subparsers(build_parser())}
    assert "--threshold" not in commands["marginface gallery enroll"].format_help()  # hidden, still accepted
    assert "--threshold" in commands["marginface gallery search"].format_help()


# -------------------------------------------------------------------------------------- messages
def test_eval_on_an_identity_folder_names_only_its_own_options(capsys, tmp_path):
    (tmp_path / "alice").mkdir()
    rc, _, err = run(capsys, "eval", "--model", tmp_path / "m.onnx", "--sets", tmp_path)
    line = error_line(err)
    assert rc == 2 and line.startswith(f"error: --sets {tmp_path}: directory has no pairs.txt")
    assert "data.val_sample_pairs" not in line and "image_size" not in line


def test_mixed_size_pair_set_message_names_no_parameter():
    from marginface.data.verification import load_pair_set
    from marginface.errors import UserError

    with pytest.raises(UserError) as info:
        load_pair_set(need("photos/deepface/pairs.csv"))
    message = str(info.value)
    assert "pass image_size" not in message and "share one size" in message and "marginface eval" in message


def test_identify_gallery_named_gallery_is_not_prefixed_twice(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("gallery").mkdir()
    rc, _, err = run(capsys, "identify", "--model", need(FOREIGN), "--gallery", "gallery", "--probes", "probes",
                     "--top", "1", "--threads", "1")
    line = error_line(err)
    assert rc == 2 and "no images found" in line and "gallery: gallery:" not in line, line


def test_unreadable_checkpoint_error_has_no_bare_number(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"hello, not a checkpoint")
    rc, _, err = run(capsys, "export", bad, "--out", tmp_path / "x.onnx")
    line = error_line(err)
    assert rc == 2 and "not a readable marginface checkpoint" in line
    assert not re.search(r"\(\d+\)", line), line


# -------------------------------------------------------------------------------------- Ctrl-C
def interrupt(argv, wait_for: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "marginface", *map(str, argv)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(wait_for)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("wait", [1.0, 3.0])
def test_ctrl_c_before_the_training_loop_is_one_line(tmp_path, wait):
    """While Python imports torch (about 1 s) or while the synthetic identities render (3 s)."""
    done = interrupt(["train", "--out", tmp_path / "run", "--set", "data.synthetic.identities=20000",
                      "train.max_steps=1"], wait)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 130, done.stderr
    assert len(lines) == 1 and lines[0].startswith("interrupted"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("wait", [2.0, 4.0])
def test_ctrl_c_in_verify_pairs_is_one_line(tmp_path, wait):
    photos = need("photos/deepface")
    done = interrupt(["verify", "--pairs", photos / "pairs.csv", "--model", need(FOREIGN), "--normalize",
                      "imagenet", "--detector-weights", need("weights/mtcnn"), "--threads", "1"], wait)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["interrupted"], done.stderr


# -------------------------------------------------------------------------------------- train --dry-run
@pytest.mark.parametrize("sets,needle", [
    # 55 real images (5 identities x 11) and the default batch of 128: issue 21
    (["data.train={johns}", "data.val=[]"], "'train.batch_size' = 128 is larger than the training data (55 images"),
    (["train.amp=fp16", "data.val=[]"], "'train.amp' = fp16 needs CUDA"),
])
def test_dry_run_refuses_what_the_real_run_refuses_with_the_same_line(sets, needle, capsys, tmp_path):
    if torch.cuda.is_available() and "fp16" in " ".join(sets):
        pytest.skip("fp16 is valid with CUDA")
    sets = [s.format(johns=need("identities/johns")) if "{johns}" in s else s for s in sets]
    small = ["data.synthetic.identities=8", "data.synthetic.images_per_identity=4", "model.input_size=32"]
    rc_dry, _, err_dry = run(capsys, "train", "--dry-run", "--out", tmp_path / "dry", "--set", *small, *sets)
    rc_real, _, err_real = run(capsys, "train", "--out", tmp_path / "real", "--set", *small, *sets,
                               "train.max_steps=1")
    assert rc_dry == rc_real == 2, (err_dry, err_real)
    assert error_line(err_dry) == error_line(err_real) and needle in error_line(err_dry)
    assert not (tmp_path / "real" / "checkpoints").exists()
