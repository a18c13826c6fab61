"""One pair-set evaluation: report.json written by `marginface train` and the `eval` object of
`marginface eval` on the same set carry the same metric keys (the design's Contracts)."""
import json

from marginface.cli import main
from marginface.train.runconfig import load_config
from marginface.data.images import imwrite_rgb
from marginface.data.synthetic import render_image
from marginface.train.trainer import Trainer

CONTRACT = {"accuracy", "accuracy_std", "threshold", "auc", "eer", "tar_at_far", "pos_mean", "neg_mean", "xnorm",
            "pairs"}


def _pairs_csv(tmp_path, identities=6, per_identity=3):
    files = {}
    for i in range(identities):
        for j in range(per_identity):
            files[i, j] = imwrite_rgb(tmp_path / f"img/{i}_{j}.png", render_image(5, 100 + i, j, size=32))
    rows = ["file_x,file_y,same"]
    for i in range(identities):
        rows.append(f"img/{i}_0.png,img/{i}_1.png,1")
        rows.append(f"img/{i}_1.png,img/{i}_2.png,1")
        rows.append(f"img/{i}_0.png,img/{(i + 1) % identities}_2.png,0")
        rows.append(f"img/{i}_2.png,img/{(i + 2) % identities}_0.png,0")
    csv = tmp_path / "toy_pairs.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def _key_tree(metrics: dict) -> dict:
    return {k: (_key_tree(v) if isinstance(v, dict) else None) for k, v in metrics.items()}


def test_train_and_eval_report_the_same_keys_per_set(tmp_path, capsys):
    csv = _pairs_csv(tmp_path)
    cfg = load_config(None, ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=32",
                             "data.synthetic.identities=8", "data.synthetic.images_per_identity=4", "train.batch_size=16",
                             "train.max_steps=3", "eval.every=0", f"data.val=[{csv}]", "train.amp=none",
                             "train.log_every=1"])
    run = tmp_path / "run"
    Trainer(cfg, run, console=False).fit()
    trained = json.loads((run / "report.json").read_text())["eval"]
    assert list(trained) == ["toy_pairs"]

    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--sets", str(csv), "--json", "--no-plots"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert list(evaluated) == ["toy_pairs"]

    a, b = trained["toy_pairs"], evaluated["toy_pairs"]
    assert _key_tree(a) == _key_tree(b)
    assert CONTRACT <= set(a)
    assert a["flip"] is True and set(a["noflip"]) >= {"accuracy", "auc", "xnorm"}
    assert a["pairs"] == b["pairs"] == 24 and a["images"] == b["images"] == 18
    # the same weights (best.pt = last.pt here) and the same set give the same numbers
    assert abs(a["auc"] - b["auc"]) < 1e-6 and abs(a["accuracy"] - b["accuracy"]) < 1e-6


def test_checkpoint_written_with_the_old_key_names_still_loads(tmp_path, capsys):
    import torch

    from marginface.deploy.load import load_model
    from marginface.train.checkpoint import load_backbone

    cfg = load_config(None, ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=32",
                             "data.synthetic.identities=8", "data.synthetic.images_per_identity=4",
                             "train.batch_size=16", "train.max_steps=1", "data.val=[]", "train.amp=none",
                             "data.input_norm=imagenet", "head.loss=cosface"])
    run = tmp_path / "run"
    Trainer(cfg, run, console=False).fit()
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    saved = ckpt["config"]
    assert saved["head"]["loss"] == "cosface" and saved["data"]["input_norm"] == "imagenet"
    saved["head"]["margin"] = saved["head"].pop("loss")  # as written before the rename
    saved["data"]["normalize"] = saved["data"].pop("input_norm")
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    assert load_model(str(old)).info.normalize == "imagenet"
    assert load_backbone(str(old)).info.normalize == "imagenet"
