"""marginface viz: 2-D features of softmax vs softmax + center loss, written as PNGs (and GIFs)."""
import json

import numpy as np
import pytest
import torch

from marginface import cli
from marginface.errors import UserError
from marginface.viz import VizOptions, compactness

# 8 identities x 12 images at 32 px, 60 steps: a few seconds per run on one core
SMALL = ["--identities", "8", "--images", "12", "--steps", "60", "--batch-size", "32"]


def test_compactness_is_scale_free_and_orders_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (5, 2))
    labels = np.repeat(np.arange(5), 20)
    tight = centres[labels] + rng.normal(0, 0.5, (100, 2))
    loose = centres[labels] + rng.normal(0, 3.0, (100, 2))
    assert compactness(tight, labels) < compactness(loose, labels)
    assert compactness(7.0 * tight, labels) == pytest.approx(compactness(tight, labels))
    with pytest.raises(UserError, match="2 classes"):
        compactness(tight[:20], labels[:20])


def test_viz_writes_pngs_and_gifs_and_center_loss_is_tighter(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "viz"
    assert cli.main(["viz", "--out", str(out), *SMALL, "--gif", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for name in ("softmax.png", "softmax_center.png", "comparison.png", "softmax.gif", "softmax_center.gif"):
        data = (out / name).read_bytes()
        assert len(data) > 2000, name
        assert data[:4] in (b"\x89PNG", b"GIF8"), name
    runs = summary["runs"]
    assert runs["softmax_center"]["compactness"] < 0.9 * runs["softmax"]["compactness"], runs
    assert json.loads((out / "viz.json").read_text())["runs"] == runs
    assert summary["options"]["identities"] == 8


def test_viz_bad_options_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["viz", "--out", str(tmp_path), "--identities", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: viz: identities") and "\n" not in err
    with pytest.raises(UserError, match="center weight"):
        VizOptions(center_weight=0).check()
