"""What the console and log.jsonl show during training, as Arcface-Paddle users read it: per set
XNorm, accuracy +- std (Flip), the highest accuracy so far, the step and the epoch; the epoch on
every training log line."""
import json
import re

import torch

from marginface.train.checkpoint import load_checkpoint
from marginface.train.runconfig import load_config
from marginface.train.trainer import Trainer

# 40 identities x 8 images / batch 32 = 10 steps per epoch
TINY = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=64",
        "data.synthetic.identities=40", "data.synthetic.images_per_identity=8",
        "data.synthetic.val_identities=20", "data.synthetic.val_images_per_identity=4",
        "data.synthetic.val_pairs=60", "train.batch_size=32", "train.log_every=4", "train.amp=none",
        "train.deterministic=true", "schedule.warmup_steps=2"]
LINE = re.compile(r"^\[synthetic\]\[step (\d+), epoch (\d+)\] XNorm: ([0-9.]+)  (Accuracy(?:-Flip)?): ([0-9.]+)\+-([0-9.]+)"
                  r"  Accuracy-Highest: ([0-9.]+)  AUC: ", re.M)


def test_eval_lines_show_xnorm_accuracy_std_highest_and_epoch(tmp_path, capsys):
    torch.set_num_threads(1)
    Trainer(load_config(None, TINY + ["train.max_steps=12", "eval.every=4"]), tmp_path).fit()
    err = capsys.readouterr().err
    found = LINE.findall(err)
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [int(f[0]) for f in found] == [r["step"] for r in evals] == [4, 8, 12]
    assert [int(f[1]) for f in found] == [r["epoch"] for r in evals] == [1, 1, 2]
    highest = 0.0
    for f, r in zip(found, evals):
        m = r["eval"]["synthetic"]
        assert f[3] == "Accuracy-Flip" and m["flip"] is True
        assert float(f[2]) == round(m["xnorm"], 5) and float(f[4]) == round(m["accuracy"], 5)
        assert float(f[5]) == round(m["accuracy_std"], 5)
        highest = max(highest, m["accuracy"])
        assert float(f[6]) == round(highest, 5) and r["highest_accuracy"]["synthetic"] == highest
    assert "eval @ step 12 (epoch 2): best synthetic/accuracy = " in err
    # every training line carries the epoch: the console's and the log's
    train = [r for r in records if r["kind"] == "train"]
    assert [(r["step"], r["epoch"]) for r in train] == [(4, 1), (8, 1), (12, 2)]
    assert re.search(r"^step 12/12 .*epoch 2/2$", err, re.M)
    # the highest accuracy survives a resume
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["highest_accuracy"] == {"synthetic": highest}
    resumed = Trainer(load_config(None, TINY + ["train.max_steps=13", "eval.every=4"]), tmp_path, resume=True,
                      console=False)
    resumed.fit()
    assert resumed.highest_accuracy["synthetic"] >= highest


def test_without_flip_the_line_says_accuracy(tmp_path, capsys):
    torch.set_num_threads(1)
    Trainer(load_config(None, TINY + ["train.max_steps=2", "eval.flip=false"]), tmp_path).fit()
    found = LINE.findall(capsys.readouterr().err)
    assert [(f[0], f[3]) for f in found] == [("2", "Accuracy")]
