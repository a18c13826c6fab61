"""`load_pair_set(align=...)` and sampled identity folders (what `marginface eval --align` and
`--sample-pairs` run on)."""
from __future__ import annotations


import cv2
import numpy as np
import pytest

from marginface.data.sources import FolderSource
from marginface.data.verification import ALIGN_MODES, load_lfw_dir, load_pair_set, pairs_from_identities, \
    resize_image, sample_pair_indices
from marginface.errors import UserError
from shared_data import need, unaligned_lfw_mini


def test_sampled_folder_is_the_whole_folder_sample():
    """Reading only the used images gives exactly the pair set sampled from all of them (the
    training behaviour of data.val_sample_pairs), half same and half different."""
    johns = need("identities/johns")
    ps = load_pair_set(johns, 112, sample_pairs=30, seed=2)
    source = FolderSource(johns)
    everything = np.stack([resize_image(source.read(i), 112) for i in range(len(source))])
    reference = pairs_from_identities(everything, source.labels, 30, seed=2)
    assert np.array_equal(ps.images, reference.images) and np.array_equal(ps.pairs, reference.pairs)
    assert ps.issame.tolist() == reference.issame.tolist() and ps.issame.sum() == 15 and ps.name == "johns"


def test_sampled_folder_reads_only_the_images_its_pairs_use(tmp_path):
    rng = np.random.default_rng(0)
    for person in range(4):
        for k in range(5):
            (tmp_path / f"p{person}").mkdir(exist_ok=True)
            assert cv2.imwrite(str(tmp_path / f"p{person}" / f"{k}.png"), rng.integers(0, 255, (112, 112, 3), np.uint8))
    source = FolderSource(tmp_path)
    pairs, _ = sample_pair_indices(source.labels, 6, seed=1)
    unused = sorted(set(range(len(source))) - set(pairs.ravel().tolist()))
    source.paths[unused[0]].write_bytes(b"not an image")
    assert len(load_pair_set(tmp_path, 112, sample_pairs=6, seed=1)) == 6
    source.paths[int(pairs[0, 0])].write_bytes(b"not an image")
    with pytest.raises(UserError, match=str(source.paths[int(pairs[0, 0])].name)):
        load_pair_set(tmp_path, 112, sample_pairs=6, seed=1)


@pytest.fixture()
def unaligned_lfw(tmp_path):
    """lfw_mini's crops in 250x250 canvases, with pairs.txt and landmarks.txt in the same folder."""
    unaligned_lfw_mini(tmp_path, tmp_path)
    (tmp_path / "lfw_landmark.txt").rename(tmp_path / "landmarks.txt")
    return tmp_path


def test_align_modes_on_an_lfw_directory(unaligned_lfw, capsys):
    by_landmarks = load_pair_set(unaligned_lfw, 112, align="landmarks")
    assert np.array_equal(by_landmarks.images, load_pair_set(unaligned_lfw, 112).images)  # auto finds the file
    as_is = load_pair_set(unaligned_lfw, 112, align="none")
    assert capsys.readouterr().err == ""  # none is asked for: no warning about unaligned faces
    canvas = cv2.cvtColor(cv2.imread(str(sorted(unaligned_lfw.rglob("*_0001.jpg"))[0])), cv2.COLOR_BGR2RGB)
    assert np.abs(as_is.images.astype(int) - by_landmarks.images.astype(int)).mean() > 10
    assert any(np.array_equal(img, resize_image(canvas, 112)) for img in as_is.images)
    (unaligned_lfw / "landmarks.txt").unlink()
    with pytest.raises(UserError, match=r"no landmarks.txt to align by"):
        load_lfw_dir(unaligned_lfw, image_size=112, align="landmarks")


def test_align_arguments_are_checked():
    assert ALIGN_MODES == ("auto", "detect", "landmarks", "none")
    csv_path = need("photos/deepface/pairs.csv")
    with pytest.raises(UserError, match="align must be one of auto, detect, landmarks, none"):
        load_pair_set(csv_path, 112, align="sideways")
    with pytest.raises(UserError, match="align='detect' needs a detector"):
        load_pair_set(csv_path, 112, align="detect")
    with pytest.raises(UserError, match="a pairs CSV has no landmark file"):
        load_pair_set(csv_path, 112, align="landmarks")
    with pytest.raises(UserError) as info:  # auto refuses whole photos, naming the option that aligns them
        load_pair_set(csv_path, 112)
    assert "Pass --align detect to `marginface eval`" in str(info.value) and "\n" not in str(info.value)
