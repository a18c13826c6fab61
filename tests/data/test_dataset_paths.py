"""Every file of a dataset as its own config key (issue 17): VGGFace2's list, landmark and box CSVs
(`data.train_list`, `data.train_landmarks`, `data.train_boxes`) and an LFW directory's pairs and
landmark files (`data.val_pairs`, `data.val_landmarks`) kept outside the image folder, as the
OpenVINO trainer (`--train_list .../meta/train_list.txt --train_landmarks .../bb_landmark/
--val_list pairs.txt --val_landmarks lfw_landmark.txt`) and the Lightning trainer
(`pairs_txt_path`) lay them out. A missing file names the key and the path tried."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from marginface.config import Config
from marginface.data.align import ARCFACE_TEMPLATE_112
from marginface.data.sources import ListSource, VGGFace2Source, open_source, open_train_source
from marginface.data.verification import load_lfw_dir, load_pair_set
from marginface.errors import UserError
from marginface.train.runconfig import load_config
from marginface.train.setup import build_train_source, build_val_sets
from shared_data import need, unaligned_lfw_mini

HEADER = "NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y\n"
NAMES = ["n000002/0001_01.jpg", "n000002/0002_01.jpg", "n000017/0001_01.jpg", "n000017/0003_01.jpg"]


def _vggface2_images(images: Path) -> list[str]:
    """Loose crops with bright dots where the landmarks are; returns the landmark CSV rows."""
    rows = []
    rng = np.random.default_rng(0)
    for name in NAMES:
        canvas = np.full((200, 180, 3), 40, np.uint8)
        angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(1.1, 1.5)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = (ARCFACE_TEMPLATE_112 - 56) @ rot.T + [90, 100]
        for x, y in points:
            cv2.circle(canvas, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1, lineType=cv2.LINE_AA)
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(images / name), canvas)
        rows.append(name[:-4] + "," + ",".join(f"{v:.2f}" for v in points.ravel()))
    return rows


def _dots_on_template(crop: np.ndarray) -> bool:
    return all(crop[int(round(y)), int(round(x))].mean() > 150 for x, y in ARCFACE_TEMPLATE_112)


@pytest.fixture()
def openvino_layout(tmp_path):
    """$ROOT/train/<id>/*.jpg, $ROOT/meta/train_list.txt, $ROOT/bb_landmark/loose_landmark_train.csv."""
    root = tmp_path / "vggface2"
    rows = _vggface2_images(root / "train")
    (root / "meta").mkdir()
    (root / "meta" / "train_list.txt").write_text("\n".join(NAMES) + "\n")
    (root / "bb_landmark").mkdir()
    (root / "bb_landmark" / "loose_landmark_train.csv").write_text(HEADER + "\n".join(rows) + "\n")
    return root


def _data(**keys) -> object:
    data = Config().data
    for key, value in keys.items():
        setattr(data, key, None if value is None else str(value))
    return data


def test_meta_train_list_is_a_vggface2_default(openvino_layout):
    source = open_source(openvino_layout)
    assert isinstance(source, VGGFace2Source) and source.list_path == openvino_layout / "meta" / "train_list.txt"
    assert source.labels.tolist() == [0, 0, 1, 1] and _dots_on_template(source.read(3))


def test_openvino_arguments_as_config_keys(openvino_layout):
    """data.train is the image folder itself; the list and the landmark folder are named by keys."""
    root = openvino_layout
    data = _data(train=root / "train", train_list=root / "meta" / "train_list.txt",
                 train_landmarks=root / "bb_landmark")
    source = open_train_source(data)
    assert isinstance(source, VGGFace2Source) and len(source) == 4 and source.num_classes == 2
    assert all(_dots_on_template(source.read(i)) for i in range(4))
    # the same through a resolved config and the trainer's builder
    cfg = load_config(None, [f"data.train={root / 'train'}", f"data.train_list={root / 'meta' / 'train_list.txt'}",
                             f"data.train_landmarks={root / 'bb_landmark' / 'loose_landmark_train.csv'}"])
    assert cfg.data.train_landmarks.endswith("loose_landmark_train.csv")
    assert build_train_source(cfg.data, 112).labels.tolist() == [0, 0, 1, 1]


def test_box_csv_key_and_landmark_folder_give_boxes_too(openvino_layout, tmp_path):
    root = openvino_layout
    elsewhere = tmp_path / "csvs"
    elsewhere.mkdir()
    names = NAMES + ["n000017/0009_01.jpg"]
    assert cv2.imwrite(str(root / "train" / names[-1]), np.full((90, 60, 3), 200, np.uint8))
    (root / "meta" / "train_list.txt").write_text("\n".join(names) + "\n")
    (elsewhere / "boxes.csv").write_text("NAME_ID,X,Y,W,H\nn000017/0009_01,10,20,40,50\n")
    source = open_train_source(_data(train=root, train_boxes=elsewhere / "boxes.csv"))
    assert len(source) == 5 and source.read(4)[56, 56].mean() == 200  # the box crop of the unlisted face
    # a landmark folder also supplies the box CSV beside it
    shutil.copy(elsewhere / "boxes.csv", root / "bb_landmark" / "loose_bb_train.csv")
    source = open_train_source(_data(train=root / "train", train_list=root / "meta" / "train_list.txt",
                                     train_landmarks=root / "bb_landmark"))
    assert len(source) == 5 and _dots_on_template(source.read(0))


@pytest.mark.parametrize("key", ["train_list", "train_landmarks", "train_boxes"])
def test_a_missing_file_names_its_key_and_the_path(openvino_layout, key):
    missing = openvino_layout / "nowhere" / "file.txt"
    with pytest.raises(UserError) as info:
        open_train_source(_data(train=openvino_layout, **{key: missing}))
    assert str(info.value) == f"config key 'data.{key}': {missing} not found"


def test_default_paths_tried_are_named(openvino_layout):
    (openvino_layout / "bb_landmark" / "loose_landmark_train.csv").unlink()
    with pytest.raises(UserError) as info:
        open_source(openvino_layout)
    message = str(info.value)
    assert "loose_landmark_train.csv" in message and "bb_landmark/loose_landmark_train.csv" in message
    assert "data.train_landmarks" in message and "\n" not in message
    # keys without a list to go with them: the list key is named
    (openvino_layout / "meta" / "train_list.txt").unlink()
    with pytest.raises(UserError, match=r"no train_list.txt or meta/train_list.txt .*set data.train_list"):
        open_train_source(_data(train=openvino_layout, train_landmarks=openvino_layout / "bb_landmark"))
    with pytest.raises(UserError, match="is a RecordIO pack|not an image folder"):
        open_train_source(_data(train="synthetic", train_list=openvino_layout / "bb_landmark"))


def test_a_labelled_train_list_outside_the_image_folder():
    """arcface_paddle's label.txt kept apart from its images: data.train = the image root."""
    sample = need("identities/ms1m_sample")
    source = open_train_source(_data(train=sample, train_list=sample / "label.txt"))
    assert isinstance(source, ListSource) and len(source) == 10 and source.num_classes == 10
    with pytest.raises(UserError, match="data.train_landmarks / data.train_boxes apply to VGGFace2 lists only"):
        open_train_source(_data(train=sample, train_list=sample / "label.txt", train_landmarks=sample / "label.txt"))


def test_old_configs_keep_their_meaning(openvino_layout):
    cfg = load_config(None, [f"data.train={openvino_layout}"])
    assert (cfg.data.train_list, cfg.data.train_landmarks, cfg.data.train_boxes, cfg.data.val_pairs,
            cfg.data.val_landmarks) == (None, None, None, None, None)
    assert open_train_source(cfg.data).describe() == open_source(openvino_layout).describe()


# ------------------------------------------------------------------------------------------- LFW


@pytest.fixture()
def lfw_apart(tmp_path):
    """lfw_mini's crops pasted into 250x250 canvases; pairs.txt and the landmark file kept in
    another folder (the images folder holds only identity folders), tab-separated."""
    images, meta = tmp_path / "lfw", tmp_path / "meta"
    return unaligned_lfw_mini(images, meta, sep="\t"), images, meta


def test_lfw_pairs_and_landmarks_outside_the_image_folder(lfw_apart):
    mini, images, meta = lfw_apart
    reference = load_lfw_dir(mini)
    ps = load_pair_set(images, 112, pairs_file=meta / "pairs.txt", landmarks=meta / "lfw_landmark.txt")
    assert ps.images.shape == reference.images.shape and ps.pairs.tolist() == reference.pairs.tolist()
    assert np.abs(ps.images.astype(int) - reference.images.astype(int)).mean() < 6  # aligned back
    assert ps.n_folds == 2 and ps.name == "lfw"


def test_lfw_val_keys_through_the_trainer_builder(lfw_apart):
    mini, images, meta = lfw_apart
    cfg = load_config(None, [f"data.val=[{images}]", f"data.val_pairs={meta / 'pairs.txt'}",
                             f"data.val_landmarks={meta / 'lfw_landmark.txt'}"])
    (ps,) = build_val_sets(cfg.data, 112)
    assert len(ps) == 20 and np.abs(ps.images.astype(int) - load_lfw_dir(mini).images.astype(int)).mean() < 6
    for key, good in (("val_pairs", meta / "pairs.txt"), ("val_landmarks", meta / "lfw_landmark.txt")):
        bad = load_config(None, [f"data.val=[{images}]", f"data.val_pairs={meta / 'pairs.txt'}",
                                 f"data.{key}={good}.missing"])
        with pytest.raises(UserError) as info:
            build_val_sets(bad.data, 112)
        assert str(info.value) == f"config key 'data.{key}': {good}.missing not found"


def test_landmark_entries_keyed_by_file_name_alone(lfw_apart):
    """openvino's reader looks a face up by its file name (LFW names hold the person's name)."""
    mini, images, meta = lfw_apart
    lines = (meta / "lfw_landmark.txt").read_text().splitlines()
    (meta / "by_name.txt").write_text("\n".join(line.split("/", 1)[1] for line in lines) + "\n")
    by_path = load_pair_set(images, 112, pairs_file=meta / "pairs.txt", landmarks=meta / "lfw_landmark.txt")
    by_name = load_pair_set(images, 112, pairs_file=meta / "pairs.txt", landmarks=meta / "by_name.txt")
    assert np.array_equal(by_path.images, by_name.images)
