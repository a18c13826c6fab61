"""Every shell command in the docs is exercised, so the docs cannot drift from the code.

Convention (for everyone writing README.md and docs/*.md):

* Fenced blocks tagged ``bash``, ``sh`` or ``shell`` hold commands a reader can paste; they are
  tested. Output, file trees and pseudo-commands go in ``text`` (or ``console``) blocks, which are
  not. ``python`` blocks are not run here (tests/test_recipes.py runs the one in recipes.md).
* Each line (``\\`` continuations joined, ``#`` comments dropped, split at ``&&``, ``||``, ``;``
  and ``|``) is one command. Leading ``VAR=value`` assignments are skipped.
* ``marginface ...``, ``python -m marginface ...`` and ``torchrun ... -m marginface ...`` are
  parsed by the real argument parser (``marginface.cli.build_parser``): the subcommand, every
  option and the required arguments must exist. Paths need not exist, except config files.
* ``marginface train ...`` additionally runs with ``--dry-run`` in this process: the config file
  must load, every ``--set`` key and value must validate, and the model must build and run one
  batch. The data is replaced by a stand-in (``data.train=synthetic`` with 4 tiny identities,
  ``data.val=[]``, ``model.input_size=32``, ``model.pretrained=null``, and ``train.batch_size=8`` so one
  batch fits the stand-in, as --dry-run checks), ``--out`` by a temporary
  directory and ``--resume`` / ``--resume-from`` are dropped; so a command that needs real data or GPUs still checks.
* Any other command (pip, tensorboard, bash, python scripts) is not run, but every path in it under
  the repository's own folders (configs/, docs/, benchmarks/, tests/, marginface/, .ci/, scripts/)
  must exist, as must the targets of relative Markdown links.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from marginface import cli
from marginface.errors import UserError
from shared_data import need  # noqa: E402  (tests/shared_data.py)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell"}
REPO_DIRS = ("configs/", "docs/", "benchmarks/", "tests/", "marginface/", ".ci/", "scripts/")
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.M | re.S)
SEPARATORS = {"&&", "||", ";", "|"}
STAND_IN = ["data.train=synthetic", "data.val=[]", "data.synthetic.identities=4",
            "data.synthetic.images_per_identity=2", "model.input_size=32", "model.pretrained=null",
            "train.batch_size=8"]


def shell_commands(path: Path) -> list:
    """[(line number, argv)] of every command in the doc's bash/sh/shell blocks."""
    text = path.read_text(encoding="utf-8")
    commands = []
    for block in FENCE.finditer(text):
        if block.group(1).lower() not in SHELL_LANGS:
            continue
        first_line = text.count("\n", 0, block.start(2)) + 1
        pending, pending_line = "", None
        for offset, line in enumerate(block.group(2).splitlines()):
            if pending_line is None:
                pending_line = first_line + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical, line_no = pending + line, pending_line
            pending, pending_line = "", None
            try:
                tokens = shlex.split(logical, comments=True)
            except ValueError as exc:
                commands.append((line_no, ["<unparsable>", f"{exc}: {logical}"]))
                continue
            segment: list = []
            for token in tokens + [";"]:
                if token in SEPARATORS:
                    if segment:
                        commands.append((line_no, segment))
                    segment = []
                else:
                    segment.append(token)
    return commands


def marginface_argv(argv: list):
    """The arguments after ``marginface`` if this command runs marginface, else None."""
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        argv = argv[1:]
    if not argv:
        return None
    if argv[0] == "marginface":
        return argv[1:]
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "marginface" and argv[0] in ("python", "python3", "torchrun"):
            return argv[i + 2:]
    return None


def repo_paths(argv: list) -> list:
    paths = []
    for token in argv:
        value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
        value = value.removeprefix("./")
        if value.startswith(REPO_DIRS) and not any(c in value for c in "*?<>$"):
            paths.append(value)
    return paths


def dry_run_argv(argv: list, tmp_path: Path) -> list:
    """A train command made runnable here: --dry-run --json, stand-in data, no --resume(-from), tmp --out."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--resume":
            i += 1
            continue
        if token in ("--out", "--resume-from"):
            i += 2
            continue
        if token.startswith(("--out=", "--resume-from=")):
            i += 1
            continue
        out.append(token)
        i += 1
    return [*out, "--out", str(tmp_path / "dry-run"), "--dry-run", "--json", "--set", *STAND_IN]


def check_command(argv: list, tmp_path: Path, capsys) -> str:
    """'' when the command is fine, else what is wrong."""
    if argv and argv[0] == "<unparsable>":
        return argv[1]
    missing = [p for p in repo_paths(argv) if not (ROOT / p).exists()]
    if missing:
        return f"names {', '.join(missing)}, which does not exist in the repository"
    args = marginface_argv(argv)
    if args is None:
        return ""
    if "-h" in args or "--help" in args:
        with pytest.raises(SystemExit) as info:
            cli.build_parser().parse_args(args)
        capsys.readouterr()
        return "" if info.value.code == 0 else f"--help exited {info.value.code}"
    try:
        parsed = cli.build_parser().parse_args(args)
    except UserError as exc:
        return f"does not parse: {exc}"
    if parsed.command != "train":
        return ""
    capsys.readouterr()
    try:
        rc = cli.main(dry_run_argv(args, tmp_path))
    except Exception as exc:  # a crash is a doc/code mismatch to report, not a test error
        return f"--dry-run crashed: {type(exc).__name__}: {exc}"
    captured = capsys.readouterr()
    return "" if rc == 0 else f"--dry-run failed (exit {rc}): {captured.err.strip()}"


def test_the_docs_hold_commands():
    assert DOCS[0].name == "README.md" and (ROOT / "docs" / "recipes.md") in DOCS
    counts = {p.name: len(shell_commands(p)) for p in DOCS}
    assert counts["recipes.md"] >= 15 and counts["quickstart.md"] >= 5, counts


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_shell_command_in_the_doc_works(doc, tmp_path, capsys):
    torch.set_num_threads(1)
    failures, seen = [], set()
    for line_no, argv in shell_commands(doc):
        key = tuple(argv)
        if key in seen:
            continue
        seen.add(key)
        problem = check_command(argv, tmp_path, capsys)
        if problem:
            failures.append(f"{doc.relative_to(ROOT)}:{line_no}: `{shlex.join(argv)}` {problem}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_relative_links_resolve(doc):
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_every_subcommand_is_documented():
    """Each subcommand shows up as `marginface <name>` somewhere in the docs (any block or text)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = "\n".join(doc.read_text(encoding="utf-8") for doc in DOCS)
    missing = [name for name in sub.choices if not re.search(rf"marginface {name}\b", text)]
    assert not missing, f"subcommands never shown in README.md or docs/: {missing}"


def test_the_checker_catches_stale_commands(tmp_path, capsys):
    """The checks above fail on the kinds of drift they exist for."""
    assert check_command(["marginface", "trian"], tmp_path, capsys)
    assert check_command(["marginface", "eval", "--modle", "x"], tmp_path, capsys)
    assert "optim.lrr" in check_command(["marginface", "train", "--set", "optim.lrr=1"], tmp_path, capsys)
    assert check_command(["marginface", "train", "--config", "configs/nope.yaml"], tmp_path, capsys)
    assert check_command(["python", "benchmarks/nope.py"], tmp_path, capsys)
    assert check_command(["marginface", "train", "--set", "train.max_steps=3"], tmp_path, capsys) == ""
    cmds = shell_commands_from("```bash\nOMP_NUM_THREADS=1 marginface train \\\n  --set a=1 && tensorboard --logdir runs  # c\n```\n",
                               tmp_path)
    assert cmds == [(2, ["OMP_NUM_THREADS=1", "marginface", "train", "--set", "a=1"]),
                    (2, ["tensorboard", "--logdir", "runs"])]
    assert marginface_argv(cmds[0][1]) == ["train", "--set", "a=1"]
    assert marginface_argv(["torchrun", "--nproc_per_node", "2", "-m", "marginface", "train"]) == ["train"]


def shell_commands_from(text: str, tmp_path: Path) -> list:
    path = tmp_path / "doc.md"
    path.write_text(text)
    return shell_commands(path)


# ---------------------------------------------------------------------------------------------- walk-through
# Every marginface command of README.md and docs/quickstart.md, run in order in one temporary directory
# (so `runs/...` and `model.onnx` written by one command are read by the next) on the shared sample data:
# the files the docs name (lfw.bin, a.jpg, faces/, people/, ...) are links to it, /data/x is ./data/x,
# and every training is made tiny by arguments appended to the command (argparse and --set: the last wins).
TINY_TRAIN = ["--set", "train.max_steps=2", "train.batch_size=8", "eval.every=0", "schedule.warmup_steps=0",
              "model.input_size=32", "data.synthetic.identities=8", "data.synthetic.images_per_identity=2",
              "data.synthetic.val_identities=6", "data.synthetic.val_images_per_identity=3",
              "data.synthetic.val_pairs=20", "train.log_every=1"]
TINY = {"train": TINY_TRAIN, "viz": ["--steps", "3", "--identities", "3", "--images", "4", "--batch-size", "8"],
        "synth": ["--identities", "3", "--images", "2", "--size", "32"], "bench": ["--runs", "3"]}
# commands that name data these machines do not have: one `error:` line, exit 2
NEEDS_DATA = {"configs/ms1mv3_r50.yaml": "MS1MV3", "path/to/train.rec": "a training pack", "ijbc/": "IJB-C"}
# commands whose work is compiling for a minute or more on 2 cores (covered by tests/deploy/test_compiled.py)
COMPILES = {("eval", "--precision", "int8"), ("export", "--format", "aoti")}


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _sample_files(root: Path) -> None:
    """The files the docs' commands name, as links to the shared sample data."""
    lfw = need("verification/lfw_head20.bin")
    for name in ("lfw.bin", "cfp_fp.bin", "agedb_30.bin"):
        _link(lfw, root / name)
        _link(lfw, root / "data" / name)
    photos, johns = need("photos/deepface"), need("identities/johns")
    _link(photos / "img1.jpg", root / "a.jpg")
    _link(photos / "img2.jpg", root / "b.jpg")
    people = sorted(p for p in johns.iterdir() if p.is_dir())[:3]
    _link(sorted(people[0].iterdir())[-1], root / "face.jpg")
    for person in people:
        images = sorted(person.iterdir())
        for image in images[:2]:
            _link(image, root / "people" / person.name / image.name)
            _link(image, root / "gallery" / person.name / image.name)
        _link(images[2], root / "probes" / person.name / images[2].name)
        _link(images[3], root / "distractors" / images[3].name)
    for image in sorted(need("verification/lfw_mini").rglob("*.jpg"))[:8]:
        _link(image, root / "faces" / image.name)


def walkthrough_commands() -> list:
    """[(doc:line, argv)] of the marginface commands of README.md and docs/quickstart.md, in order."""
    out = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "quickstart.md"):
        for line_no, argv in shell_commands(doc):
            args = marginface_argv(argv)
            if args is not None:
                out.append((f"{doc.relative_to(ROOT)}:{line_no}", args))
    return out


@pytest.mark.slow
def test_walkthrough_of_readme_and_quickstart(tmp_path, monkeypatch, capsys):
    """Each command exits 0 on the sample data, or (when it names data these machines lack) with one
    `error:` line and code 2; never a traceback. Prints each command's wall time."""
    import time

    torch.set_num_threads(1)
    _sample_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MARGINFACE_DETECTOR_DIR", str(need("weights/mtcnn")))
    failures, timings = [], []
    for where, args in walkthrough_commands():
        if any(all(word in args for word in key) for key in COMPILES):
            timings.append(f"{where}: not run (compiles for minutes; tests/deploy/test_compiled.py)")
            continue
        argv = [token.replace("/data/", "data/", 1) if token.startswith("/data/") else token for token in args]
        argv += TINY.get(argv[1] if argv[0] == "data" and len(argv) > 1 else argv[0], [])
        started = time.perf_counter()
        try:
            rc = cli.main(argv)
        except SystemExit as exc:  # --help
            rc = exc.code
        except BaseException as exc:  # a traceback is what this test exists to catch
            rc = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        err = capsys.readouterr().err
        timings.append(f"{where}: {seconds:5.1f} s  marginface {shlex.join(args)}")
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        missing = next((what for key, what in NEEDS_DATA.items() if key in args), None)
        if missing:
            if rc != 2 or len(errors) != 1 or "Traceback" in err:
                failures.append(f"{where}: `{shlex.join(args)}` needs {missing}: expected one error line and exit 2, "
                                f"got {rc}: {err.strip()[-300:]}")
        elif rc != 0:
            failures.append(f"{where}: `{shlex.join(args)}` exited {rc}: {err.strip()[-300:]}")
    with capsys.disabled():
        print("\n" + "\n".join(timings))
    assert not failures, "\n".join(failures)
