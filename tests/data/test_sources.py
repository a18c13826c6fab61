"""Folder, list and VGGFace2 sources, open_source dispatch, FaceDataset, tools on real sample data."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from marginface.data.align import ARCFACE_TEMPLATE_112
from marginface.data.dataset import Augment, FaceDataset, normalize_batch
from marginface.data.recordio import RecordIOSource
from marginface.data.sources import (
    FolderSource,
    ListSource,
    VGGFace2Source,
    open_source,
    split_by_identity,
)
from marginface.data.tools import convert, inspect_path
from marginface.data.transforms import to_tensor
from marginface.errors import UserError
from shared_data import shared_data  # tests/shared_data.py


def need(rel: str) -> Path:
    path = shared_data() / rel
    if not path.exists():
        pytest.skip(f"shared sample data {path} is absent (set MARGINFACE_SHARED_DATA)")
    return path


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def blob(seed: int, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)


# ------------------------------------------------------------------------------------- real data


def test_johns_folder() -> None:
    root = need("identities/johns")
    source = open_source(root)
    assert isinstance(source, FolderSource)
    assert len(source) == 55 and source.num_classes == 5
    assert source.identities[0] == "John_Salley" and np.bincount(source.labels).tolist() == [11] * 5
    assert source.read(0).shape == (150, 150, 3)
    image, label = FaceDataset(source)[54]
    assert image.shape == (3, 112, 112) and image.dtype == torch.uint8 and label == 4


def test_ms1m_sample_list() -> None:
    label_txt = need("identities/ms1m_sample/label.txt")
    source = open_source(label_txt)
    assert isinstance(source, ListSource)
    assert len(source) == 10 and source.num_classes == 10 and source.labels.tolist() == list(range(10))
    image = source.read(3)
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8
    batch = torch.stack([FaceDataset(source, flip=False)[i][0] for i in range(4)])
    np.testing.assert_allclose(normalize_batch(batch).numpy(), to_tensor(batch.permute(0, 2, 3, 1).numpy()).numpy(), atol=1e-6)


def test_inspect_and_convert_real_samples(tmp_path: Path) -> None:
    info = inspect_path(need("identities/johns"))
    assert (info["format"], info["identities"], info["images"], info["pairs"], info["unreadable"]) == ("folder", 5, 55, None, [])
    assert info["images_per_identity"]["histogram"] == {"10-19": 5} and info["image_sizes"] == {"150x150": 55}
    info = inspect_path(need("identities/ms1m_sample/label.txt"))
    assert (info["format"], info["identities"], info["images"]) == ("list", 10, 10)
    # list -> RecordIO pack keeps the JPEG bytes; pack -> folder gives the same images back
    out = convert(need("identities/ms1m_sample/label.txt"), tmp_path / "pack")
    assert out["images"] == 10 and out["copied_unchanged"] == 10
    pack = open_source(tmp_path / "pack")
    assert isinstance(pack, RecordIOSource) and pack.labels.tolist() == list(range(10))
    convert(tmp_path / "pack", tmp_path / "folder")
    back = open_source(tmp_path / "folder")
    np.testing.assert_array_equal(back.read(7), ListSource(need("identities/ms1m_sample/label.txt")).read(7))


def test_inspect_and_convert_verification_bin(tmp_path: Path) -> None:
    bin_path = need("verification/lfw_head20.bin")
    info = inspect_path(bin_path)
    assert info["format"] == "pairs-bin" and info["pairs"] == 10 and info["positive_pairs"] == 10
    out = convert(bin_path, tmp_path / "lfw")
    assert out["pairs"] == 10
    assert inspect_path(tmp_path / "lfw" / "pairs.csv")["pairs"] == 10


# ----------------------------------------------------------------------------------- list errors


def test_list_file_parsing_and_errors(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / "img" / f"{i}.jpg", blob(i))
    good = tmp_path / "good.txt"
    good.write_text("img/0.jpg\t0\n\n   \nimg/1.jpg 2\nimg/2.jpg\t1\n")  # blank lines, space separated
    source = ListSource(good)
    assert source.labels.tolist() == [0, 2, 1] and source.num_classes == 3
    bad_label = tmp_path / "bad_label.txt"
    bad_label.write_text("img/0.jpg\t0\nimg/1.jpg\tfoo\n")
    with pytest.raises(UserError, match=r"bad_label\.txt:2: label 'foo' is not an integer"):
        ListSource(bad_label)
    missing = tmp_path / "missing.txt"
    missing.write_text("img/0.jpg\t0\n\nimg/9.jpg\t1\n")
    with pytest.raises(UserError, match=r"missing\.txt:3: image img/9\.jpg not found"):
        open_source(missing)
    one_field = tmp_path / "one.txt"
    one_field.write_text("img/0.jpg\n")
    with pytest.raises(UserError, match=r"one\.txt:1: expected 'path<TAB>label'"):
        ListSource(one_field)


def test_folder_errors_and_open_source_dispatch(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no images found"):
        open_source(tmp_path / "empty")
    (tmp_path / "no_images" / "alice").mkdir(parents=True)
    (tmp_path / "no_images" / "alice" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no_images: no images found"):
        FolderSource(tmp_path / "no_images")
    with pytest.raises(UserError, match="nothing_here: no such file"):
        open_source(tmp_path / "nothing_here")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match=r"weights\.bin: not a training source"):
        open_source(tmp_path / "weights.bin")
    synthetic = open_source("synthetic", num_identities=3, images_per_identity=2)
    assert len(synthetic) == 6 and synthetic.num_classes == 3


def test_split_by_identity(tmp_path: Path) -> None:
    for person in range(10):
        for k in range(2):
            write_image(tmp_path / f"p{person}" / f"{k}.png", blob(person * 10 + k, 32))
    source = FolderSource(tmp_path)
    train, val = split_by_identity(source, 0.3, seed=1)
    assert (train.num_classes, val.num_classes) == (7, 3) and len(train) + len(val) == 20
    assert set(train.classes) & set(val.classes) == set()
    assert sorted(set(train.labels.tolist())) == list(range(7))
    np.testing.assert_array_equal(val.read(0), source.read(int(val.indices[0])))
    with pytest.raises(UserError, match="val_fraction"):
        split_by_identity(source, 1.5)


# --------------------------------------------------------------------------- FaceDataset details


def test_corrupt_jpeg_skip_or_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for k in range(4):
        write_image(tmp_path / "a" / f"{k}.jpg", blob(k))
    bad = tmp_path / "a" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:150])  # truncated JPEG
    source = FolderSource(tmp_path)
    with pytest.raises(UserError, match=r"2\.jpg: not a readable image"):
        FaceDataset(source, skip_bad=False)[2]
    dataset = FaceDataset(source, skip_bad=True)
    with caplog.at_level("WARNING"):
        assert dataset[2][0].shape == (3, 112, 112)
    assert dataset.bad_images() == 1 and "2.jpg" in caplog.text
    # DataLoader workers are other processes: the shared counter still sees their bad images
    dataset = FaceDataset(source, skip_bad=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    assert sum(len(labels) for _, labels in loader) == 4
    assert dataset.bad_images() == 1


def test_flip_resize_and_augment(tmp_path: Path) -> None:
    image = blob(3, 96)
    write_image(tmp_path / "x" / "0.png", image)
    source = FolderSource(tmp_path)
    flipping = FaceDataset(source, image_size=96)
    flipped = {flipping[0][0][:, :, 0].sum().item() for _ in range(20)}
    assert len(flipped) == 2  # both orientations appear with p=0.5
    same = FaceDataset(source, image_size=96, flip=False)[0][0]
    np.testing.assert_array_equal(same.permute(1, 2, 0).numpy(), image)
    assert FaceDataset(source, image_size=(112, 96))[0][0].shape == (3, 112, 96)
    strong = Augment(color_jitter=0.3, random_resized_crop=0.7, grayscale=0.5, blur=0.5)
    ds = FaceDataset(source, augment=strong)
    for _ in range(10):
        out, _ = ds[0]
        assert out.shape == (3, 112, 112) and out.dtype == torch.uint8
    assert isinstance(FaceDataset(source, augment={"blur": 1.0}).augment, Augment)
    with pytest.raises(UserError, match="unknown option"):
        FaceDataset(source, augment={"rotate": 1.0})


def test_normalize_batch() -> None:
    batch = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1).repeat(2, 1, 2, 2)
    out = normalize_batch(batch)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), [-1.0, -0.5 / 127.5, 1.0], atol=1e-6)
    with pytest.raises(ValueError):
        normalize_batch(batch.float())


# ------------------------------------------------------------------------------------- VGGFace2


def test_vggface2_layout_aligns_from_landmarks(tmp_path: Path) -> None:
    """Images with dots at known landmark positions; the source must put the dots on the template."""
    root = tmp_path / "vggface2"
    rows, listing = [], []
    rng = np.random.default_rng(0)
    for person, name in [(0, "n000002/0001_01.jpg"), (0, "n000002/0002_01.jpg"), (1, "n000017/0001_01.jpg")]:
        canvas = np.full((200, 180, 3), 40, np.uint8)
        angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(1.1, 1.5)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = (ARCFACE_TEMPLATE_112 - 56) @ rot.T + [90, 100]
        for x, y in points:
            cv2.circle(canvas, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1, lineType=cv2.LINE_AA)
        write_image(root / "train" / name, canvas)
        listing.append(name)
        rows.append(name[:-4] + "," + ",".join(f"{v:.2f}" for v in points.ravel()))
    (root / "train_list.txt").write_text("\n".join(listing) + "\n")
    (root / "bb_landmark").mkdir()
    (root / "bb_landmark" / "loose_landmark_train.csv").write_text(
        "NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y\n" + "\n".join(rows) + "\n"
    )
    source = open_source(root)
    assert isinstance(source, VGGFace2Source)
    assert source.labels.tolist() == [0, 0, 1] and source.identities == ["n000002", "n000017"]
    crop = source.read(2)
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE_112:  # each template point sits on a bright dot
        assert crop[int(round(y)), int(round(x))].mean() > 150
    # an image listed without landmarks falls back to a square crop of its loose box
    write_image(root / "train" / "n000017" / "0002_01.jpg", np.full((90, 60, 3), 200, np.uint8))
    (root / "train_list.txt").write_text("\n".join(listing + ["n000017/0002_01.jpg"]) + "\n")
    (root / "bb_landmark" / "loose_bb_train.csv").write_text("NAME_ID,X,Y,W,H\nn000017/0002_01,10,20,40,50\n")
    source = VGGFace2Source(root)
    assert len(source) == 4 and source.read(3).shape == (112, 112, 3) and source.read(3)[56, 56].mean() == 200
    (root / "bb_landmark" / "loose_landmark_train.csv").write_text("NAME_ID,P1X\nn000002/0001_01,zz\n")
    with pytest.raises(UserError, match=r"loose_landmark_train\.csv:2"):
        VGGFace2Source(root)


def test_paddle_folder_is_read_as_its_label_list(capsys) -> None:
    """arcface_paddle's layout (label.txt beside images/) is a list of 10 identities, not an image
    folder of one identity called 'images'."""
    from marginface.data.tools import inspect_path

    root = need("identities/ms1m_sample")
    source = open_source(root)
    assert isinstance(source, ListSource) and source.num_classes == 10 and len(source) == 10
    info = inspect_path(root)
    assert info["format"] == "list" and info["identities"] == 10 and info["warnings"] == []
    assert "warning" not in capsys.readouterr().err


def test_fewer_than_two_identities_warns_once(tmp_path, capsys) -> None:
    from marginface.data.tools import inspect_path

    for i in range(3):
        write_image(tmp_path / "only" / "ann" / f"{i}.jpg", blob(i))
    source = open_source(tmp_path / "only")
    assert source.num_classes == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "only 1 identity" in err[0]
    assert "root/<identity>/*.jpg" in err[0]
    info = inspect_path(tmp_path / "only")
    assert len(info["warnings"]) == 1 and "at least 2" in info["warnings"][0]
    open_source(tmp_path / "only", warn=False)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # inspect's line; warn=False adds none


def test_convert_summary_is_readable(tmp_path) -> None:
    """`data convert` printed the raw result dict; `format_convert_summary` is the text instead."""
    from marginface.data.tools import convert, format_convert_summary

    for ident in range(2):
        for i in range(3):
            write_image(tmp_path / "f" / f"id{ident}" / f"{i}.jpg", blob(10 * ident + i))
    (tmp_path / "f" / "id1" / "broken.jpg").write_bytes(b"not a jpeg")
    info = convert(tmp_path / "f", tmp_path / "pack")
    text = format_convert_summary(tmp_path / "f", info)
    first = text.splitlines()[0]
    assert first == (f"converted {tmp_path / 'f'} -> {tmp_path / 'pack'} (RecordIO pack): 6 images of 2 identities, "
                     f"6 copied without re-encoding, 1 unreadable skipped")
    assert "{" not in text and "broken.jpg" in text.splitlines()[1]
    many = format_convert_summary("x", {**info, "skipped": [f"f{i}.jpg: bad" for i in range(8)]}, max_skipped=5)
    assert many.splitlines()[-1] == "  ... and 3 more (--json lists them all)"
