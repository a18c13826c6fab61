"""The recipes of docs/recipes.md end to end, each on a small stand-in for its data.

Every ``configs/recipe_*.yaml`` trains here through the real command line (``marginface.cli.main``
in-process, so no interpreter start-up per run) on synthetic identities written in that recipe's
own data format: a RecordIO pack, a VGGFace2 tree with landmark CSVs, image folders, a
``label.txt`` list, insightface ``.bin`` verification files, an LFW directory with ``pairs.txt``
and ``landmarks.txt``. Only the data paths and the size of the run are overridden (``--set``); the
recipe's model family, loss, optimiser, schedule, validation protocol and best-checkpoint metric
are used as written. The real accuracies need the real data sets: see docs/recipes.md.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from marginface import cli
from marginface.train.runconfig import load_config
from marginface.data.align import ARCFACE_TEMPLATE_112
from marginface.data.synthetic import HELD_OUT_OFFSET, SyntheticSource, write_synthetic
from marginface.data.verification import pairs_from_identities
from marginface.evaluate.report import SHORT_HEADERS
from marginface.train.checkpoint import load_checkpoint
from shared_data import shared_data  # noqa: E402  (tests/shared_data.py)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("recipe_*.yaml"))
SHARED = shared_data()  # tests/shared_data.py: $MARGINFACE_SHARED_DATA or ../shared/data

# the size of a test run: 32 px, a quarter-width network, 32-d embeddings, batches of 16, fp32
SMALL = ["model.input_size=32", "model.embedding_size=32", "train.batch_size=16", "train.amp=none",
         "train.log_every=2", "train.checkpoint_every=1000", "data.num_workers=0", "eval.batch_size=64"]
QUARTER = ["model.width_mult=0.25"]


def console_table(text: str) -> tuple[list, list]:
    """The eval console table's columns (full names; a table wider than 100 columns has short
    headers and continues in blocks that repeat the set names) and its set names."""
    lines = text.splitlines()
    full = {short: name for name, short in SHORT_HEADERS.items()}
    header, rows = [], []
    for i, line in enumerate(lines[:-1]):
        if line.startswith("set ") and set(lines[i + 1].replace(" ", "")) == {"-"}:
            header += [full.get(c, c) for c in line.split()[1:]]
            block = []
            for row in lines[i + 2:]:
                if not row.strip() or row.startswith(("report:", "note:")):
                    break
                block.append(row.split()[0])
            rows = rows or block
    return header, rows



@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def run(*args: str) -> int:
    return cli.main([str(a) for a in args])


def train(config: str, out: Path, *sets: str, resume: bool = False) -> dict:
    """``marginface train --config configs/<config>.yaml --out OUT --set ...``; returns report.json."""
    argv = ["train", "--config", ROOT / "configs" / f"{config}.yaml", "--out", out, "--set", *sets]
    if resume:
        argv.append("--resume")
    assert run(*argv) == 0
    return json.loads((out / "report.json").read_text())


def log_records(run_dir: Path, kind: str = "train") -> list:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ------------------------------------------------------------------------------- stand-in writers
def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])


def loose_photo(face: np.ndarray, rng: np.random.Generator, canvas: int) -> tuple:
    """A 112x112 template-aligned face placed, rotated and scaled at random in a larger noisy photo
    (as LFW's 250x250 images and VGGFace2's loose crops are); returns (photo, its 5 landmarks)."""
    angle = np.deg2rad(rng.uniform(-12, 12))
    scale = rng.uniform(0.9, 1.3)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = np.array([canvas / 2, canvas / 2]) - rot @ np.array([56.0, 60.0]) + rng.uniform(-10, 10, 2)
    m = np.hstack([rot, shift[:, None]])
    background = rng.integers(60, 200, (canvas, canvas, 3)).astype(np.uint8)
    photo = cv2.warpAffine(face, m, (canvas, canvas), borderMode=cv2.BORDER_TRANSPARENT, dst=background)
    landmarks = ARCFACE_TEMPLATE_112 @ rot.T + shift
    return photo, landmarks


def held_out(identities: int, images: int, seed: int = 0, size: int = 112) -> SyntheticSource:
    """Faces of identities never used for training (the held-out id range)."""
    return SyntheticSource(identities, images, image_size=size, seed=seed, identity_offset=HELD_OUT_OFFSET)


def write_lfw_dir(root: Path, identities: int = 6, images: int = 4, per_fold: int = 8) -> tuple:
    """LFW layout: root/<Name>/<Name>_0001.jpg (250x250, unaligned), pairs.txt (2 folds of
    ``per_fold`` same + ``per_fold`` different pairs, the official format) and landmarks.txt."""
    src = held_out(identities, images)
    rng = np.random.default_rng(0)
    names = [f"Person_{k:02d}" for k in range(identities)]
    lines = []
    for i in range(len(src)):
        k, j = divmod(i, images)
        rel = f"{names[k]}/{names[k]}_{j + 1:04d}.jpg"
        photo, pts = loose_photo(src.read(i), rng, 250)
        write_jpeg(root / rel, photo)
        lines.append(rel + " " + " ".join(f"{v:.2f}" for v in pts.reshape(-1)))
    (root / "landmarks.txt").write_text("\n".join(lines) + "\n")
    pairs = [f"2\t{per_fold}"]
    for fold in range(2):
        for p in range(per_fold):
            name = names[(fold * per_fold + p) % identities]
            a, b = rng.choice(images, 2, replace=False) + 1
            pairs.append(f"{name}\t{a}\t{b}")
        for p in range(per_fold):
            k1, k2 = rng.choice(identities, 2, replace=False)
            pairs.append(f"{names[k1]}\t{rng.integers(images) + 1}\t{names[k2]}\t{rng.integers(images) + 1}")
    (root / "pairs.txt").write_text("\n".join(pairs) + "\n")
    return root, src


def write_bin(path: Path, seed: int, pairs: int = 40, identities: int = 8, images: int = 4) -> Path:
    """An insightface verification .bin (pickle of (JPEG bytes list, issame list); pair i = images
    2i, 2i+1) over held-out faces."""
    src = held_out(identities, images, seed=seed)
    ps = pairs_from_identities(src.images, src.labels, pairs, seed)
    blobs = [cv2.imencode(".jpg", np.ascontiguousarray(ps.images[k][..., ::-1]))[1].tobytes()
             for pair in ps.pairs for k in pair]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump((blobs, [bool(s) for s in ps.issame]), f, protocol=2)
    return path


def write_vggface2(root: Path, identities: int = 16, images: int = 5) -> Path:
    """VGGFace2 as distributed: train_list.txt, train/n00000k/000j_01.jpg (loose crops) and
    bb_landmark/loose_landmark_train.csv (NAME_ID,P1X,P1Y,...,P5X,P5Y)."""
    src = SyntheticSource(identities, images, image_size=112, seed=3)
    rng = np.random.default_rng(1)
    listing, rows = [], ["NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y"]
    for i in range(len(src)):
        k, j = divmod(i, images)
        name_id = f"n{k:06d}/{j + 1:04d}_01"
        photo, pts = loose_photo(src.read(i), rng, 160)
        write_jpeg(root / "train" / f"{name_id}.jpg", photo)
        listing.append(f"{name_id}.jpg")
        rows.append(f'"{name_id}",' + ",".join(f"{v:.2f}" for v in pts.reshape(-1)))
    (root / "train_list.txt").write_text("\n".join(listing) + "\n")
    (root / "bb_landmark").mkdir()
    (root / "bb_landmark" / "loose_landmark_train.csv").write_text("\n".join(rows) + "\n")
    return root


def write_label_list(root: Path, identities: int = 24, images: int = 6) -> Path:
    """arcface_paddle's layout: root/label.txt (``images/xxxxxxxx.bin<TAB>label``) whose .bin files
    hold the encoded images (decoded by content, not by extension)."""
    src = SyntheticSource(identities, images, image_size=112, seed=4)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(len(src)):
        rel = f"images/{i:08d}.bin"
        (root / rel).write_bytes(cv2.imencode(".jpg", np.ascontiguousarray(src.read(i)[..., ::-1]))[1].tobytes())
        lines.append(f"{rel}\t{src.labels[i]}")
    (root / "label.txt").write_text("\n".join(lines) + "\n")
    return root / "label.txt"


def write_torchvision_resnet50(path: Path) -> dict:
    """Random ImageNet-style weights under torchvision's ResNet-50 names (the trunk of our resnet50,
    whose parameter names are torchvision's, plus a 1000-class fc), as a plain state_dict file."""
    from marginface.models import build_backbone

    gen = torch.Generator().manual_seed(0)
    model = build_backbone("resnet50", embedding_size=8, input_size=32)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("head.") or key.endswith("num_batches_tracked"):
            continue
        t = torch.randn(value.shape, generator=gen) * 0.05
        state[key] = t.abs() + 0.5 if key.endswith("running_var") else t
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048, generator=gen) * 0.01, torch.zeros(1000)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Every stand-in, written once for the module."""
    root = tmp_path_factory.mktemp("recipe-data")
    d = {}
    d["rec"] = Path(write_synthetic(str(root / "ms1m-retinaface-t1"), identities=24, images_per_identity=6,
                                    image_size=112, fmt="rec")["path"])
    d["lfw"], d["lfw_faces"] = write_lfw_dir(root / "lfw")
    d["vggface2"] = write_vggface2(root / "vggface2")
    d["casia"] = Path(write_synthetic(str(root / "CASIA-WebFace-112x112"), identities=24, images_per_identity=6,
                                      image_size=112)["path"])
    bins = root / "bins"
    d["bins"] = [write_bin(bins / f"{name}.bin", seed) for seed, name in enumerate(["lfw", "cfp_fp", "agedb_30"], 5)]
    d["label_txt"] = write_label_list(root / "MS1M_bin")
    d["faceid_train"] = Path(write_synthetic(str(root / "faceid" / "train"), identities=12, images_per_identity=6,
                                             image_size=112, seed=7)["path"])
    d["faceid_val"] = Path(write_synthetic(str(root / "faceid" / "val"), identities=10, images_per_identity=5,
                                           image_size=112, seed=8)["path"])
    d["resnet50_weights"] = root / "resnet50_imagenet.pth"
    d["resnet50_state"] = write_torchvision_resnet50(d["resnet50_weights"])
    return d


def stand_in_sets(name: str, d: dict) -> list:
    """--set overrides pointing recipe ``name``'s /data paths at the stand-ins."""
    bins = "[" + ",".join(str(p) for p in d["bins"]) + "]"
    return {
        "recipe_mobilefacenet_lfw": [f"data.train={d['rec']}", f"data.val=[{d['lfw']}]"],
        "recipe_vggface2_margins": [f"data.train={d['vggface2']}", f"data.val=[{d['lfw']}]"],
        "recipe_casia_benchmark": [f"data.train={d['casia']}", f"data.val={bins}"],
        "recipe_paddle_mbf128": [f"data.train={d['label_txt']}", f"data.val={bins}"],
        "recipe_finetune_resnet50": [f"data.train={d['faceid_train']}", f"data.val=[{d['faceid_val']}]",
                                     f"model.pretrained={d['resnet50_weights']}", "data.val_sample_pairs=200"],
    }[name]


# ------------------------------------------------------------------------------- every recipe
def test_every_recipe_has_stand_ins_and_a_docs_section():
    names = [p.stem for p in RECIPES]
    assert len(names) == 5, names
    doc = (ROOT / "docs" / "recipes.md").read_text()
    for name in names:
        stand_in_sets(name, {"rec": "", "lfw": "", "vggface2": "", "casia": "", "bins": [], "label_txt": "",
                             "faceid_train": "", "faceid_val": "", "resnet50_weights": ""})
        assert f"marginface train --config configs/{name}.yaml" in doc, f"docs/recipes.md has no command for {name}"
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        assert cfg["name"] == name, "a recipe's name is its file name (runs/<name>)"
        # every /data path in the recipe is one the stand-ins replace
        paths = [cfg["data"]["train"], *cfg["data"]["val"], cfg["model"].get("pretrained") or ""]
        assert all(p.startswith("/data/") for p in paths if p), paths
    for section in re.split(r"\n## ", doc)[1:]:
        if section.startswith("Recipe"):
            assert re.search(r"Published:", section), f"recipe section without published figures: {section[:60]}"


@pytest.mark.parametrize("recipe", [p.stem for p in RECIPES])
def test_dry_run_with_the_recipes_own_model(recipe, data, capsys):
    """--dry-run of the recipe as written (full-size network, 112 px), data replaced by stand-ins (and the
    batch by one they hold: --dry-run refuses a batch larger than the data, as training would)."""
    assert run("train", "--config", ROOT / "configs" / f"{recipe}.yaml", "--dry-run", "--json",
               "--set", *stand_in_sets(recipe, data), "train.batch_size=16") == 0
    summary = json.loads(capsys.readouterr().out)
    cfg = load_config(str(ROOT / "configs" / f"{recipe}.yaml"))
    assert summary["config"]["model"]["backbone"] == cfg.model.backbone
    n = summary["first_batch"]["images"][0]
    assert summary["first_batch"] == {"images": [n, 3, 112, 112], "embeddings": [n, cfg.model.embedding_size]}
    assert summary["identities"] > 1 and summary["backbone_params"] > 0


# ------------------------------------------------------------------------------- 1: mobile ArcFace
def test_recipe_1_mobilefacenet_recordio_raw_lfw(data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    report = train("recipe_mobilefacenet_lfw", out, *stand_in_sets("recipe_mobilefacenet_lfw", data), *SMALL,
                   *QUARTER, "train.max_steps=6", "eval.every=3")
    assert report["best"]["metric"] == "lfw/auc" and report["best"]["step"] in (3, 6)
    lfw = report["eval"]["lfw"]
    assert lfw["pairs"] == 32 and 0.0 <= lfw["auc"] <= 1.0
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "report.md").is_file()
    # the TensorBoard curves the Lightning-style project logged
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/mean_target_cosine", "train/lr", "eval/lfw/auc", "eval/lfw/pos_mean",
                "eval/lfw/neg_mean", "eval/lfw/accuracy"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("eval/lfw/auc")] == [3, 6]
    assert "input/first_batch" in acc.Tags()["images"]


def test_recipe_1_lfw_faces_are_aligned_by_landmarks_txt(data):
    """The 250x250 LFW stand-in photos come back as the template-aligned faces they were made from."""
    from marginface.data.verification import load_pair_set

    ps = load_pair_set(data["lfw"], image_size=112)
    faces = data["lfw_faces"]
    # images are stored in order of first use in pairs.txt; match each to its rendered original
    originals = faces.images.astype(np.float32)
    errors = [np.abs(originals - img.astype(np.float32)).mean(axis=(1, 2, 3)).min() for img in ps.images]
    assert max(errors) < 12.0, errors  # JPEG + resampling only (an unaligned resize is > 40 off)


@pytest.mark.skipif(not (SHARED / "weights" / "mtcnn" / "pnet.pt").is_file(), reason="shared MTCNN weights absent")
def test_recipe_1_val_align_detect_on_real_lfw_faces(monkeypatch):
    """data.val_align=detect: LFW faces aligned by MTCNN instead of a landmark file."""
    from marginface.train import setup

    monkeypatch.setenv("MARGINFACE_DETECTOR_DIR", str(SHARED / "weights"))
    cfg = load_config(str(ROOT / "configs" / "recipe_mobilefacenet_lfw.yaml"),
                      [f"data.val=[{SHARED / 'verification' / 'lfw_mini'}]", "data.val_align=detect"])
    (ps,) = setup.build_val_sets(cfg.data, 56)
    assert len(ps) == 20 and ps.images.shape[1:] == (56, 56, 3)
    cfg.data.val_align = "auto"  # no landmarks.txt there: the crops as they are, resized
    (plain,) = setup.build_val_sets(cfg.data, 56)
    assert not np.array_equal(ps.images, plain.images), "the detector did not align anything"


# ------------------------------------------------------------------------------- 2: margin experiments
def test_recipe_2_vggface2_cosface_then_eval_prints_the_openvino_figures(data, tmp_path, capsys):
    out = tmp_path / "cosface"
    report = train("recipe_vggface2_margins", out, *stand_in_sets("recipe_vggface2_margins", data), *SMALL,
                   *QUARTER, "train.max_steps=4")
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["backbone"] == "mobilefacenet_se"
    assert resolved["head"] == {**resolved["head"], "loss": "cosface", "params": {"s": 30.0, "m": 0.35}}
    assert report["model"]["num_classes"] == 16 and "lfw" in report["eval"]
    capsys.readouterr()
    assert run("eval", "--model", out, "--sets", data["lfw"], "--no-plots") == 0
    table = capsys.readouterr().out
    header, rows = console_table(table)
    for column in ("accuracy_same", "accuracy_diff", "accuracy", "accuracy_std", "auc", "threshold"):
        assert column in header, (column, header)
    assert rows == ["lfw"]


@pytest.mark.parametrize("loss", [
    ["head.loss=arcface", "head.params={s: 30, m: 0.5}"],
    ["head.loss=sphereface", "head.params={s: 30, m: 4}"],
    ["head.loss=sv_softmax", "head.params={s: 30, t: 1.2, base: cosface, m: 0.35}"],
    ["head.focal_gamma=2"],
], ids=["arcface", "sphereface", "sv_softmax", "focal"])
def test_recipe_2_loss_switched_from_the_command_line(loss, data, tmp_path):
    out = tmp_path / "run"
    report = train("recipe_vggface2_margins", out, *stand_in_sets("recipe_vggface2_margins", data), *SMALL,
                   *QUARTER, "train.max_steps=2", "data.val=[]", *loss)
    resolved = load_config(str(out / "config.yaml"))
    for item in loss:
        key, value = item.split("=", 1)
        section, field = key.split(".")
        assert getattr(getattr(resolved, section), field) == yaml.safe_load(value), item
    assert report["train"]["steps"] == 2 and report["train"]["bad_steps"] == 0
    assert all(np.isfinite(r["loss"]) for r in log_records(out))


# ------------------------------------------------------------------------------- 3: benchmark table
def test_recipe_3_casia_folder_three_bins_and_identification(data, tmp_path):
    out = tmp_path / "run"
    report = train("recipe_casia_benchmark", out, *stand_in_sets("recipe_casia_benchmark", data), *SMALL,
                   *QUARTER, "train.max_steps=4")
    assert set(report["eval"]) == {"lfw", "agedb_30", "cfp_fp"}
    assert report["model"]["backbone"] == "mobilefacenet" and report["model"]["num_classes"] == 24
    # the MegaFace-style identification snippet of docs/recipes.md, on a held-out stand-in
    probes, distractors = tmp_path / "facescrub", tmp_path / "distractors"
    write_synthetic(str(probes), identities=6, images_per_identity=3, image_size=112, seed=11)
    write_synthetic(str(distractors), identities=5, images_per_identity=2, image_size=112, seed=12)
    code = doc_python_block("MegaFace-style identification")
    code = code.replace("runs/recipe_casia_benchmark", str(out)).replace("/data/megaface/facescrub_112", str(probes))
    code = code.replace("/data/megaface/distractors_112", str(distractors))
    scope: dict = {}
    exec(compile(code, "docs/recipes.md", "exec"), scope)
    result = scope["result"]
    assert result["probes"] == 12 and result["gallery_identities"] == 6 and result["distractors"] == 10
    assert 0.0 <= result["rank_1"] <= 1.0


def test_recipe_3_softmax_plus_center_loss_row(data, tmp_path):
    out = tmp_path / "run"
    train("recipe_casia_benchmark", out, *stand_in_sets("recipe_casia_benchmark", data), *SMALL, *QUARTER,
          "train.max_steps=2", "data.val=[]", "head.loss=softmax", "head.params={s: 64}", "head.center_weight=0.003")
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["center"]["centers"].shape == (24, 32) and ckpt["center"]["centers"].abs().sum() > 0


def doc_python_block(heading: str) -> str:
    """The first ```python block after the line containing ``heading`` in docs/recipes.md."""
    doc = (ROOT / "docs" / "recipes.md").read_text()
    start = doc.index(heading)
    match = re.search(r"```python\n(.*?)```", doc[start:], re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


# ------------------------------------------------------------------------------- 4: Paddle MBF-128
def test_recipe_4_label_list_resume_and_flip_xnorm_eval(data, tmp_path, capsys):
    out = tmp_path / "run"
    common = [*stand_in_sets("recipe_paddle_mbf128", data), *SMALL, *QUARTER, "head.sample_rate=0.5", "eval.every=0"]
    train("recipe_paddle_mbf128", out, *common, "train.max_steps=4")
    progress = capsys.readouterr().err
    assert re.search(r"step 4/4 .* img/s +eta ", progress), progress  # samples/s and remaining time
    first = load_checkpoint(out / "checkpoints" / "last.pt")
    assert first["step"] == 4 and first["head_shards"], "Partial FC checkpoints hold classifier shards"
    report = train("recipe_paddle_mbf128", out, *common, "train.max_steps=8", resume=True)
    assert report["train"]["steps"] == 8
    assert [r["step"] for r in log_records(out)] == [2, 4, 6, 8]
    assert set(report["eval"]) == {"lfw", "cfp_fp", "agedb_30"}
    capsys.readouterr()
    assert run("eval", "--model", out, "--sets", *data["bins"], "--no-plots") == 0
    header, rows = console_table(capsys.readouterr().out)
    assert {"accuracy", "accuracy_noflip", "xnorm"} <= set(header), header
    assert sorted(rows) == ["agedb_30", "cfp_fp", "lfw"]


# ------------------------------------------------------------------------------- 5: FaceID fine-tuning
def test_recipe_5_finetune_pretrained_frozen_then_unfrozen(data, tmp_path):
    out = tmp_path / "run"
    # 72 images / 16 = 4 steps per epoch: the recipe's freeze_backbone_epochs=1 freezes steps 1-4
    common = [*stand_in_sets("recipe_finetune_resnet50", data), *SMALL, "eval.every=0"]
    train("recipe_finetune_resnet50", out, *common, "train.max_steps=2")
    state = data["resnet50_state"]
    model = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    for key, value in state.items():  # frozen: the ImageNet trunk (and its BN statistics) untouched
        if not key.startswith("fc."):
            torch.testing.assert_close(model[key], value, rtol=0, atol=0, msg=key)
    report = train("recipe_finetune_resnet50", out, *common, "train.max_steps=8", resume=True)
    records = log_records(out)
    lr_backbone = {r["step"]: r["lr_backbone"] for r in records}
    assert lr_backbone[2] == lr_backbone[4] == 0.0 and lr_backbone[6] > 0 and lr_backbone[8] > 0
    assert lr_backbone[6] == pytest.approx(0.1 * next(r["lr"] for r in records if r["step"] == 6))
    model = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    assert not torch.equal(model["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
    assert report["best"]["metric"] == "val/tar@1e-2"
    val = report["eval"]["val"]
    assert val["pairs"] == 200 and {"1e-2"} <= set(val["tar_at_far"])
    assert {"accuracy", "threshold", "auc"} <= set(val)


def test_recipe_5_pair_bce_mode(data, tmp_path):
    out = tmp_path / "run"
    report = train("recipe_finetune_resnet50", out, *stand_in_sets("recipe_finetune_resnet50", data), *SMALL,
                   "train.max_steps=3", "train.freeze_backbone_epochs=0", "head.loss=pair_bce", "head.params={}",
                   "data.samples_per_identity=4")
    assert report["train"]["steps"] == 3 and report["best"]["metric"] == "val/tar@1e-2"
    assert {"mean_negative_cosine", "pairs"} <= set(log_records(out)[0])


def test_recipe_5_cuda_switches_are_on():
    cfg = load_config(str(ROOT / "configs" / "recipe_finetune_resnet50.yaml"))
    assert (cfg.train.amp, cfg.train.tf32, cfg.train.channels_last) == ("auto", True, True)
    assert cfg.optim.clip_grad_norm > 0 and cfg.schedule.name == "cosine" and cfg.schedule.warmup_epochs > 0
    assert os.path.basename(cfg.model.pretrained).endswith(".pth")
