"""Evaluation suite (flip / no flip), report.json / report.md / plots, --compare, the eval CLI, the
trainer's end-of-run report and the fast embedding path."""
from __future__ import annotations

import importlib.util
import json
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marginface.cli import main
from marginface.train.runconfig import load_config
from marginface.data.verification import PairSet
from marginface.evaluate.report import (
    compare_reports,
    evaluate_pair_set_both,
    format_comparison,
    format_markdown,
    json_safe,
    load_report,
    merge_eval,
    write_report,
)
from marginface.evaluate.runner import embed_images, evaluate_pair_set

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

from test_ijb import LFW_MINI, make_ijb, needs_lfw_mini  # noqa: E402  (shared fixture builder)


class PooledProjection(torch.nn.Module):
    def __init__(self, dim: int = 8, input_size: int = 112, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(48, dim, generator=generator))
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.projection


def random_images(n: int, size: int = 112, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in small])


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------ suite


def test_flip_and_noflip_from_one_pass_match_the_runner():
    images = random_images(12, seed=1)
    rng = np.random.default_rng(0)
    pairs = rng.choice(12, size=(30, 2))
    pair_set = PairSet("toy", images, pairs, np.arange(30) % 2 == 0)
    model = PooledProjection()
    both, (scores, issame) = evaluate_pair_set_both(model, pair_set, batch_size=5)
    with_flip = evaluate_pair_set(model, pair_set, flip=True)
    without = evaluate_pair_set(model, pair_set, flip=False)
    for key in ("accuracy", "accuracy_std", "threshold", "auc", "eer", "pos_mean", "neg_mean", "xnorm"):
        assert both[key] == pytest.approx(with_flip[key], abs=1e-6), key
        assert both["noflip"][key] == pytest.approx(without[key], abs=1e-6), key
    assert both["tar_at_far"] == pytest.approx(with_flip["tar_at_far"], abs=1e-6)
    assert both["flip"] is True and both["pairs"] == 30 and both["images"] == 12
    assert both["accuracy"] != both["noflip"]["accuracy"] or both["auc"] != both["noflip"]["auc"]
    assert np.mean(scores[issame]) == pytest.approx(both["pos_mean"])
    only_plain, _ = evaluate_pair_set_both(model, pair_set, flip=False)
    assert "noflip" not in only_plain and only_plain["flip"] is False
    assert only_plain["accuracy"] == pytest.approx(without["accuracy"])


def test_fast_path_matches_plain_fp32_and_leaves_the_model_alone():
    from marginface.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("mbf", embedding_size=32, input_size=32, width_mult=0.25)
    for module in model.modules():  # non-trivial BN statistics, so folding has work to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    model.train()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    images = random_images(6, size=32, seed=2)
    fast = embed_images(model, images, optimize=True)
    plain = embed_images(model, images, optimize=False)
    cosine = (fast * plain).sum(1) / (np.linalg.norm(fast, axis=1) * np.linalg.norm(plain, axis=1))
    assert cosine.min() > 0.999999
    np.testing.assert_allclose(fast, plain, rtol=1e-3, atol=1e-4)
    assert model.training and sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == n_bn


# ------------------------------------------------------------------------------ report files


def sample_report() -> dict:
    return {
        "eval": {
            "lfw": {"accuracy": 0.9, "accuracy_std": 0.3, "threshold": 0.515, "threshold_distance": 0.97,
                    "auc": 0.95, "eer": 0.1, "tar_at_far": {"1e-1": 0.8, "1e-2": 0.5}, "pos_mean": 0.6,
                    "neg_mean": 0.1, "xnorm": 20.0, "pairs": 6000, "noflip": {"accuracy": 0.85}},
            "tiny": {"accuracy": 1.0, "accuracy_std": 0.0, "threshold": 0.5, "auc": float("nan"),
                     "eer": float("nan"), "tar_at_far": {}, "pairs": 10},
        },
        "train": {"steps": 100, "images_per_second": 50.0, "wall_seconds": 120.0},
        "model": {"backbone": "mbf", "params": 1_200_000, "embedding_size": 512},
    }


def test_report_markdown_table_by_hand():
    md = format_markdown(sample_report())
    assert "Model: backbone `mbf`, 1.20M parameters, embedding 512." in md
    assert "Training: 100 steps, 50.0 images/s, 2.0 min wall." in md
    header = next(line for line in md.splitlines() if line.startswith("| set"))
    assert header.split(" | ")[:4] == ["| set", "accuracy (flip)", "accuracy (no flip)", "threshold (cos)"]
    assert "TAR@FAR=1e-1 | TAR@FAR=1e-2" in header  # most lenient FAR first
    assert "| lfw | 0.9000 ± 0.3000 | 0.8500 | 0.5150 | 0.9700 | 0.9500 | 0.1000 | 0.8000 | 0.5000 |" in md
    assert "| tiny | 1.0000 ± 0.0000 | - | 0.5000 | - | - | - | - | - |" in md  # NaN and missing -> "-"


def test_write_report_files(tmp_path):
    report = sample_report()
    rng = np.random.default_rng(0)
    issame = np.arange(200) % 2 == 0
    curves = {"lfw": (np.where(issame, 0.5, 0.1) + rng.normal(0, 0.2, 200), issame)}
    written = write_report(tmp_path, report, curves)
    on_disk = strict_json((tmp_path / "report.json").read_text())  # NaN written as null
    assert on_disk["eval"]["tiny"]["auc"] is None and on_disk["eval"]["lfw"]["accuracy"] == 0.9
    assert written["plots"] == [str(tmp_path / "roc.png"), str(tmp_path / "scores.png")]
    for name in ("roc.png", "scores.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "report.md").read_text()
    assert "![roc](roc.png)" in md and "![scores](scores.png)" in md

    # the trainer's call: no pair scores -> ROC through operating points, no histogram
    bare = tmp_path / "bare"
    written = write_report(bare, report)
    assert written["plots"] == [str(bare / "roc.png")] and not (bare / "scores.png").exists()
    assert "operating points" in (bare / "report.md").read_text()


def test_plots_are_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    written = write_report(tmp_path, sample_report())
    assert written["plots"] == [] and not list(tmp_path.glob("*.png"))
    assert (tmp_path / "report.md").is_file()
    assert "warning: matplotlib is not installed" in capsys.readouterr().err


def test_merge_keeps_training_sections(tmp_path):
    write_report(tmp_path, sample_report(), plots=False)
    merged = merge_eval(tmp_path, {"lfw": {"accuracy": 0.99}, "cfp_fp": {"accuracy": 0.9}},
                        model_info={"backbone": "other"}, sources={"cfp_fp": "/data/cfp_fp.bin"})
    assert list(merged["eval"]) == ["lfw", "tiny", "cfp_fp"] and merged["eval"]["lfw"] == {"accuracy": 0.99}
    assert merged["train"]["steps"] == 100 and merged["model"]["backbone"] == "mbf"  # not overwritten
    assert merged["eval_sources"] == {"cfp_fp": "/data/cfp_fp.bin"}


def test_compare_by_hand():
    a = {"eval": {"lfw": {"accuracy": 0.9, "tar_at_far": {"1e-3": 0.5}, "pairs": 10}, "x": {"accuracy": 0.5}}}
    b = {"eval": {"lfw": {"accuracy": 0.95, "tar_at_far": {"1e-3": 0.75, "1e-2": 0.8}, "pairs": 10},
                  "y": {"accuracy": 0.7}}}
    cmp = compare_reports(a, b, labels=("runA", "runB"))
    assert list(cmp["sets"]) == ["lfw", "x", "y"]
    assert cmp["sets"]["lfw"]["accuracy"] == {"a": 0.9, "b": 0.95, "diff": pytest.approx(0.05)}
    assert cmp["sets"]["lfw"]["tar@1e-3"]["diff"] == pytest.approx(0.25)
    assert cmp["sets"]["lfw"]["tar@1e-2"] == {"a": None, "b": 0.8, "diff": None}
    assert cmp["sets"]["lfw"]["pairs"]["diff"] == 0
    assert cmp["sets"]["x"]["accuracy"] == {"a": 0.5, "b": None, "diff": None}
    text = format_comparison(cmp)
    assert text.splitlines()[0].split() == ["set", "metric", "runA", "runB", "diff"]
    assert any(line.split() == ["lfw", "accuracy", "0.9000", "0.9500", "+0.0500"] for line in text.splitlines())


def test_json_safe():
    assert json_safe({"a": float("nan"), "b": [np.float32(0.5), np.int64(3)], "c": np.array([1.0, np.inf])}) == \
        {"a": None, "b": [0.5, 3], "c": [1.0, None]}


# ------------------------------------------------------------------------------ trainer + CLI


TINY = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=32",
        "data.synthetic.identities=20", "data.synthetic.images_per_identity=4",
        "data.synthetic.val_identities=10", "data.synthetic.val_images_per_identity=4",
        "data.synthetic.val_pairs=40", "train.batch_size=16", "train.amp=none", "train.max_steps=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from marginface.train.trainer import Trainer

    path = tmp_path_factory.mktemp("run")
    Trainer(load_config(None, TINY), path, console=False).fit()
    return path


def test_trainer_writes_markdown_and_roc(run_dir):
    report = load_report(run_dir)
    assert "synthetic" in report["eval"] and report["train"]["steps"] == 1
    md = (run_dir / "report.md").read_text()
    assert "| synthetic |" in md and "Training: 1 steps" in md
    assert (run_dir / "roc.png").read_bytes()[:8] == PNG_MAGIC


def run_main(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_lfw_mini
def test_eval_cli_suite_report_and_compare(run_dir, tmp_path, capsys):
    ijb = tmp_path / "IJBC"
    make_ijb(ijb)
    code, out, err = run_main(capsys, "eval", "--model", str(run_dir), "--sets", str(LFW_MINI), str(ijb),
                              "--batch-size", "8", "--json")
    assert code == 0, err
    results = strict_json(out)  # one JSON object, nothing else on stdout
    assert list(results) == ["lfw_mini", "ijbc"]
    lfw = results["lfw_mini"]
    for key in ("accuracy", "accuracy_std", "threshold", "auc", "eer", "tar_at_far", "pos_mean", "neg_mean",
                "xnorm", "pairs", "accuracy_same", "accuracy_diff", "threshold_distance"):
        assert key in lfw, key
    assert lfw["pairs"] == 20 and lfw["flip"] is True and "accuracy" in lfw["noflip"]
    assert results["ijbc"]["pairs"] == 66 and set(results["ijbc"]["tar_at_far"]) == {"1e-1"}
    assert results["ijbc"]["flip"] is True and "auc" in results["ijbc"]["noflip"]  # IJB: both, as the pair sets
    # --out defaults to the run directory: its report keeps the training sections
    report = load_report(run_dir)
    assert list(report["eval"]) == ["synthetic", "lfw_mini", "ijbc"] and report["train"]["steps"] == 1
    assert report["eval_sources"]["lfw_mini"] == str(LFW_MINI)
    md = (run_dir / "report.md").read_text()
    assert "| lfw_mini |" in md and "| ijbc |" in md
    assert "AUC (no flip)" in md and f"{results['ijbc']['noflip']['auc']:.4f}" in md  # IJB's no-flip figure shown
    assert (run_dir / "scores.png").read_bytes()[:8] == PNG_MAGIC

    other = tmp_path / "other"
    code, out, err = run_main(capsys, "eval", "--model", str(run_dir / "checkpoints" / "last.pt"), "--sets",
                              str(LFW_MINI), "--no-flip", "--out", str(other), "--no-plots")
    assert code == 0, err
    assert "lfw_mini" in out and "acc" in out.split()  # the console table (short headers: it is wide)
    assert not list(other.glob("*.png")) and load_report(other)["eval"]["lfw_mini"]["flip"] is False

    code, out, err = run_main(capsys, "eval", "--compare", str(run_dir), str(other), "--json")
    assert code == 0, err
    cmp = strict_json(out)
    row = cmp["sets"]["lfw_mini"]["accuracy"]
    assert row["b"] == pytest.approx(results["lfw_mini"]["noflip"]["accuracy"])
    assert row["diff"] == pytest.approx(row["b"] - row["a"])
    assert cmp["sets"]["synthetic"]["accuracy"]["b"] is None


@needs_lfw_mini
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed (int8 path)")
def test_eval_cli_compiled_int8_and_fp32_are_recorded_and_close_to_fp32(run_dir, tmp_path, capsys):
    runs = {}
    for name, extra in (("fp32", []), ("int8", ["--precision", "int8"]), ("compiled", ["--compile"])):
        code, out, err = run_main(capsys, "eval", "--model", str(run_dir / "checkpoints" / "last.pt"), "--sets",
                                  str(LFW_MINI), "--batch-size", "8", "--out", str(tmp_path / name),
                                  "--no-plots", "--json", *extra)
        assert code == 0, err
        runs[name] = strict_json(out)["lfw_mini"]
    recorded = {name: (load_report(tmp_path / name)["eval_precision"], load_report(tmp_path / name)["eval_compiled"])
                for name in runs}
    assert recorded == {"fp32": ("fp32", False), "int8": ("int8", True), "compiled": ("fp32", True)}
    for key in ("pos_mean", "neg_mean"):  # the same fp32 function, compiled: only rounding differs
        assert runs["compiled"][key] == pytest.approx(runs["fp32"][key], abs=1e-4), key
    for key in ("pos_mean", "neg_mean"):  # int8 moves the mean cosines a little, not a lot
        assert runs["int8"][key] != runs["fp32"][key]
        assert abs(runs["int8"][key] - runs["fp32"][key]) < 0.05, key


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "x"], "needs --model and --sets"),
    (["eval", "--compare", "a", "b", "--model", "m"], "takes no --model/--sets"),
    (["eval", "--compare", "/nonexistent/a", "/nonexistent/b"], "no report.json"),
    (["eval", "--model", "/nonexistent/run", "--sets", "x.bin"], "not found"),
])
def test_eval_cli_errors_are_one_line(capsys, argv, message):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
