"""MegaFace protocol: rank-1/CMC per distractor-set size and TAR@FAR on a tiny gallery whose answers
are worked out by hand, against a brute-force count on random features, the devkit's list and
noise formats, and `marginface eval-megaface` end to end with a model whose embeddings are known."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from marginface.cli import main
from marginface.errors import UserError
from marginface.evaluate.metrics import far_key
from marginface.evaluate.megaface import (megaface_metrics, noise_mask, read_devkit_list, read_noise_list,
                                          write_megaface_report)


def at(*degrees) -> np.ndarray:
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], axis=1)


# identity A at 0° and 20°, B at 90° and 95°; distractors in list order at 10°, 300°, 92°
PROBES, IDS = at(0, 20, 90, 95), ["A", "A", "B", "B"]
DISTRACTORS = at(10, 300, 92)


def test_identification_by_hand():
    r = megaface_metrics(PROBES, IDS, DISTRACTORS, sizes=[1, 2, 3, 10], max_rank=3, far_targets=[])
    # size 1 ({10°}): 10° beats both A mates (cos 10° > cos 20°), B's pairs (5° apart) win
    assert r["identification"]["1"]["cmc"] == [0.5, 1.0, 1.0]
    assert r["rank_1"] == {"1": 0.5, "2": 0.5, "3": 0.0}  # 92° then beats B's mates too (2° and 3° away)
    assert r["identification"]["3"]["cmc"] == [0.0, 1.0, 1.0]
    assert r["identification"]["3"]["distractors"] == 3 and r["sizes_skipped"] == [10]
    assert (r["probes"], r["probe_identities"], r["mate_pairs"]) == (4, 2, 4)


def test_verification_by_hand():
    r = megaface_metrics(PROBES, IDS, DISTRACTORS, sizes=[3], far_targets=[0.25, 0.5, 1 / 12, 1e-6])
    ver = r["verification"]
    assert (ver["genuine_pairs"], ver["impostor_pairs"], ver["distractors"]) == (2, 12, 3)
    # 12 impostor cosines; FAR 1/4 allows 3 above the threshold: the 4th highest, cos 10° (A vs 10°)
    assert ver["thresholds"][far_key(0.25)] == pytest.approx(math.cos(math.radians(10)))
    assert ver["tar_at_far"][far_key(0.25)] == 0.5  # cos 5° (B) is above it, cos 20° (A) is not
    assert ver["tar_at_far"]["5e-1"] == 1.0  # threshold: the 7th highest, cos 80°
    assert ver["thresholds"]["5e-1"] == pytest.approx(math.cos(math.radians(80)))
    assert ver["tar_at_far"][far_key(1 / 12)] == 0.0  # threshold cos 3° (95° vs 92°) is above cos 5°
    assert "1e-6" not in ver["tar_at_far"]  # 12 impostor pairs cannot measure a FAR of 1e-6


def test_noisy_distractors_are_left_out_of_each_subset():
    keep = np.array([False, True, True])  # 10° is noise
    r = megaface_metrics(PROBES, IDS, DISTRACTORS, sizes=[1, 3], max_rank=2, distractor_keep=keep, far_targets=[])
    assert r["identification"]["1"] == {"rank_1": 1.0, "cmc": [1.0, 1.0], "distractors": 0}
    assert r["rank_1"]["3"] == 0.5  # A's mates win now, B's still lose to 92°


def brute_force_rank1(probes, ids, distractors):
    p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    d = distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
    hits = total = 0
    for j in range(len(p)):
        for i in range(len(p)):
            if i != j and ids[i] == ids[j]:
                mate = p[j] @ p[i]
                hits += int(np.sum(d @ p[j] >= mate) == 0)
                total += 1
    return hits / total


def test_matches_a_brute_force_count_with_small_chunks():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8))
    ids = [k for k in range(6) for _ in range(4)]
    probes = centres[ids] + 0.6 * rng.normal(size=(24, 8))
    distractors = rng.normal(size=(300, 8))
    r = megaface_metrics(probes, ids, distractors, sizes=[10, 100, 300], max_rank=5, chunk_size=7,
                         far_targets=[1e-2])
    for size in (10, 100, 300):
        assert r["rank_1"][str(size)] == pytest.approx(brute_force_rank1(probes, ids, distractors[:size]))
    assert r["rank_1"]["10"] >= r["rank_1"]["100"] >= r["rank_1"]["300"]
    cmc = r["identification"]["300"]["cmc"]
    assert cmc == sorted(cmc) and len(cmc) == 5
    # the threshold: the 73rd highest of the 24 x 300 impostor cosines (floor(0.01 * 7200) = 72 above it)
    pn = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    dn = distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
    impostors = np.sort((pn @ dn.T).ravel())[::-1]
    assert r["verification"]["thresholds"]["1e-2"] == pytest.approx(impostors[72], abs=1e-6)


def test_devkit_lists_and_noise_formats(tmp_path):
    facescrub = tmp_path / "facescrub_features_list.json"
    facescrub.write_text(json.dumps({"path": ["Aaron_Eckhart/Aaron_Eckhart_1.png", "Aaron_Eckhart/Aaron_Eckhart_2.png"],
                                     "id": ["Aaron_Eckhart", "Aaron_Eckhart"]}))
    paths, ids = read_devkit_list(facescrub, with_ids=True)
    assert ids == ["Aaron_Eckhart"] * 2 and paths[1].endswith("_2.png")
    mega = tmp_path / "megaface_features_list.json_10_1"
    mega.write_text(json.dumps({"path": ["123/45678@N00/1.jpg", "123/45678@N00/2.jpg"]}))
    assert read_devkit_list(mega, with_ids=False) == (["123/45678@N00/1.jpg", "123/45678@N00/2.jpg"], None)
    noises = tmp_path / "megaface_noises.txt"
    noises.write_text("# megaface noises\n0\t123/45678@N00/2.jpg\n\n")
    fs_noises = tmp_path / "facescrub_noises.txt"
    fs_noises.write_text("Aaron_Eckhart_2.png\n")
    assert noise_mask(["root/123/45678@N00/1.jpg", "123/45678@N00/2.jpg"], read_noise_list(noises)).tolist() == [False, True]
    assert noise_mask(paths, read_noise_list(fs_noises)).tolist() == [False, True]
    broken = tmp_path / "broken.json"
    broken.write_text('{"path": ')
    with pytest.raises(UserError, match="broken.json: not a MegaFace devkit JSON list"):
        read_devkit_list(broken, with_ids=False)
    with pytest.raises(UserError, match='needs "id" beside "path"'):
        read_devkit_list(mega, with_ids=True)
    with pytest.raises(UserError, match="no probe identity has two images"):
        megaface_metrics(at(0, 90), ["A", "B"], DISTRACTORS)


def test_report_writes_json_and_a_cmc_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the CMC plot needs matplotlib: pip install 'marginface[plots]'")
    r = megaface_metrics(PROBES, IDS, DISTRACTORS, sizes=[1, 3], max_rank=3, far_targets=[])
    written = write_megaface_report(tmp_path, r)
    assert json.loads(Path(written["json"]).read_text())["rank_1"] == {"1": 0.5, "3": 0.0}
    assert Path(written["cmc_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- the command
class MeanColour(torch.nn.Module):
    """Embedding = the mean normalised colour: a uniform image of colour c embeds as c / 127.5 - 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def write_png(path: Path, rgb) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((16, 16, 3), rgb[::-1], np.uint8))
    return str(path)


PROBE_COLOURS = {"ann": [(250, 10, 10), (240, 30, 20), (230, 20, 40)], "bob": [(10, 240, 10), (30, 250, 20)]}
DISTRACTOR_COLOURS = [(245, 20, 20), (20, 20, 240), (20, 245, 25), (200, 200, 200), (120, 40, 200)]


@pytest.fixture
def world(tmp_path):
    meta = {"input_size": [16, 16], "normalize": "arcface"}
    model = tmp_path / "mean.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(MeanColour().eval()), str(model), _extra_files={"marginface.json": json.dumps(meta)})
    probes, distractors = tmp_path / "facescrub", tmp_path / "megaface"
    for name, colours in PROBE_COLOURS.items():
        for k, colour in enumerate(colours):
            write_png(probes / name / f"{name}_{k}.png", colour)
    names = [f"{k // 2:03d}/{k}.png" for k in range(len(DISTRACTOR_COLOURS))]
    for name, colour in zip(names, DISTRACTOR_COLOURS):
        write_png(distractors / name, colour)
    order = [names[k] for k in (3, 0, 1, 2, 4)]  # the devkit list's order, not the folder's
    listing = tmp_path / "megaface_features_list.json_5_1"
    listing.write_text(json.dumps({"path": order}))
    return {"model": model, "probes": probes, "distractors": distractors, "list": listing, "order": order,
            "tmp": tmp_path}


def colour(rgb) -> np.ndarray:
    return np.asarray(rgb, np.float64) / 127.5 - 1.0


def test_eval_megaface_command_matches_the_library(world, capsys):
    by_name = dict(zip([f"{k // 2:03d}/{k}.png" for k in range(5)], DISTRACTOR_COLOURS))
    noises = world["tmp"] / "megaface_noises.txt"
    noises.write_text(f"0\t{world['order'][1]}\n")  # (245, 20, 20), the distractor closest to ann
    out = world["tmp"] / "report"
    argv = ["eval-megaface", "--model", world["model"], "--trust-code", "--probes", world["probes"],
            "--distractors", world["distractors"], "--distractor-list", world["list"], "--distractor-noises", noises,
            "--sizes", 2, 5, 10, "--max-rank", 3, "--far", 0.1, "--device", "cpu", "--out", out, "--json"]
    assert main([str(a) for a in argv]) == 0
    got = json.loads(capsys.readouterr().out)
    probes = np.stack([colour(c) for cs in PROBE_COLOURS.values() for c in cs])
    ids = [name for name, cs in PROBE_COLOURS.items() for _ in cs]
    distractors = np.stack([colour(by_name[n]) for n in world["order"]])
    keep = np.array([n != world["order"][1] for n in world["order"]])
    want = megaface_metrics(probes, ids, distractors, sizes=[2, 5, 10], max_rank=3, far_targets=[0.1],
                            distractor_keep=keep)
    assert got["rank_1"] == pytest.approx(want["rank_1"]) and set(got["rank_1"]) == {"2", "5"}
    assert got["identification"]["2"]["distractors"] == 1 and got["sizes_skipped"] == [10]
    assert got["verification"]["tar_at_far"] == pytest.approx(want["verification"]["tar_at_far"])
    assert got["noises_removed"] == {"probes": 0, "distractors": 1} and got["refined"] is True
    assert (out / "megaface.json").is_file()
    # without the noise list the closest distractor takes ann's rank-1 at size 2
    argv = argv[:argv.index("--distractor-noises")] + argv[argv.index("--sizes"):]
    assert main([str(a) for a in argv]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["rank_1"]["2"] < got["rank_1"]["2"] and plain["refined"] is False


def test_eval_megaface_probe_noises_and_bad_input(world, capsys):
    noises = world["tmp"] / "facescrub_noises.txt"
    noises.write_text("bob_1.png\n")  # bob keeps one image: no pair
    argv = ["eval-megaface", "--model", world["model"], "--trust-code", "--probes", world["probes"],
            "--distractors", world["distractors"], "--probe-noises", noises, "--sizes", 5, "--device", "cpu", "--json"]
    assert main([str(a) for a in argv]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["noises_removed"]["probes"] == 1 and r["probe_identities"] == 2 and r["mate_pairs"] == 6
    for bad, needle in ((["--sizes", "0"], "--sizes must be >= 1"), (["--far", "2"], "--far: each target"),
                        (["--probe-list", str(world["tmp"] / "nope.json")], "--probe-list")):
        code = main([str(a) for a in argv[:-1]] + bad + ["--json"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, err
