"""Pair-set readers on the shared real samples and on broken copies built in tmp_path."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from marginface.data.verification import (
    PairList,
    PairSet,
    load_bin,
    load_lfw_dir,
    load_pair_set,
    load_pairs_csv,
    pairs_from_identities,
    read_pair_list_csv,
)
from marginface.errors import UserError
from tests.shared_data import need, shared_data

DATA = shared_data()  # $MARGINFACE_SHARED_DATA, else ../shared/data beside the checkout
VERIFICATION = DATA / "verification"
BIN = VERIFICATION / "lfw_head20.bin"
LFW_MINI = VERIFICATION / "lfw_mini"
LFW_PAIRS = VERIFICATION / "lfw_pairs.txt"
DEEPFACE_CSV = DATA / "photos" / "deepface" / "pairs.csv"

needs_verification_data = pytest.mark.skipif(
    not (BIN.is_file() and LFW_MINI.is_dir() and LFW_PAIRS.is_file()),
    reason=f"shared verification samples not found under {VERIFICATION}",
)
needs_deepface = pytest.mark.skipif(not DEEPFACE_CSV.is_file(), reason=f"{DEEPFACE_CSV} not found")


def jpeg_bytes(image_rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image_rgb[:, :, ::-1]))
    assert ok
    return buf.tobytes()


def write_bin(path: Path, bins, issame, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
    return path


# --- insightface .bin ---------------------------------------------------------------------------


@needs_verification_data
def test_load_real_bin():
    ps = load_bin(BIN)
    assert ps.name == "lfw_head20"
    assert len(ps) == 10 and ps.issame.all()
    # 20 slots, 3 repeated JPEGs (LFW reuses images across pairs) -> 17 distinct, like lfw_mini
    assert ps.images.shape == (17, 112, 112, 3) and ps.images.dtype == np.uint8
    assert ps.pairs.shape == (10, 2) and ps.pairs.dtype == np.int64


@needs_verification_data
def test_bin_resizes_on_request():
    ps = load_bin(BIN, image_size=56)
    assert ps.images.shape == (17, 56, 56, 3)


@needs_verification_data
def test_bin_pixels_match_lfw_directory():
    """The .bin's 10 pairs are the first 10 of LFW fold 1; lfw_mini holds the same files."""
    ps = load_bin(BIN)
    lines = LFW_PAIRS.read_text().splitlines()[1:11]
    for k, line in enumerate(lines):
        name, n1, n2 = line.split()
        for j, number in enumerate((n1, n2)):
            file = LFW_MINI / name / f"{name}_{int(number):04d}.jpg"
            reference = cv2.imread(str(file))[:, :, ::-1]  # RGB
            diff = np.abs(ps.images[ps.pairs[k, j]].astype(int) - reference.astype(int)).mean()
            assert diff < 3.0, f"pair {k} image {j} ({file.name}) differs by {diff:.2f} levels"


def test_bin_with_python3_bytes_entries(tmp_path):
    # Python 3 writes bytes in protocol 2 via _codecs.encode; the reader admits that global.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    path = write_bin(tmp_path / "tiny.bin", [jpeg_bytes(im) for im in images], [True, False])
    ps = load_bin(path)
    assert ps.images.shape == (4, 16, 16, 3) and ps.issame.tolist() == [True, False]
    assert ps.pairs.tolist() == [[0, 1], [2, 3]]


class _RunsCommand:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func", [os.system, subprocess.call, eval], ids=["os.system", "subprocess", "eval"])
def test_bin_refuses_code_execution(tmp_path, func):
    marker = tmp_path / "pwned"
    if func is eval:
        payload = _RunsCommand(eval, (f"open({str(marker)!r}, 'w').close()",))
    elif func is subprocess.call:
        payload = _RunsCommand(subprocess.call, (["touch", str(marker)],))
    else:
        payload = _RunsCommand(os.system, (f"touch {marker}",))
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([payload, b"x"], [True]), protocol=2))
    with pytest.raises(UserError, match="refuses to load global") as err:
        load_bin(path)
    assert str(path) in str(err.value)
    assert func.__name__ in str(err.value)
    assert not marker.exists()


def test_bin_truncated(tmp_path):
    full = pickle.dumps(([jpeg_bytes(np.zeros((8, 8, 3), np.uint8))] * 2, [True]), protocol=2)
    path = tmp_path / "cut.bin"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError, match="truncated or not a pickle"):
        load_bin(path)


def test_bin_wrong_structure(tmp_path):
    path = tmp_path / "dict.bin"
    path.write_bytes(pickle.dumps({"bins": [], "issame": []}, protocol=2))
    with pytest.raises(UserError, match=r"expected a pickled \(images, issame\) pair, got dict"):
        load_bin(path)


def test_bin_odd_image_count_and_label_mismatch(tmp_path):
    jpg = jpeg_bytes(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="3 images, an odd count"):
        load_bin(write_bin(tmp_path / "odd.bin", [jpg] * 3, [True]))
    with pytest.raises(UserError, match="4 images for 1 labels"):
        load_bin(write_bin(tmp_path / "mismatch.bin", [jpg] * 4, [True]))


def test_bin_undecodable_image_names_index(tmp_path):
    jpg = jpeg_bytes(np.zeros((8, 8, 3), np.uint8))
    path = write_bin(tmp_path / "bad.bin", [jpg, jpg, b"not a jpeg", jpg], [True, False])
    with pytest.raises(UserError, match=r"image 2 \(pair 1\): not a readable image"):
        load_bin(path)


def test_bin_mixed_sizes_need_image_size(tmp_path):
    bins = [jpeg_bytes(np.zeros((8, 8, 3), np.uint8)), jpeg_bytes(np.full((10, 8, 3), 9, np.uint8))]
    path = write_bin(tmp_path / "sizes.bin", bins, [False])
    with pytest.raises(UserError, match="image 1 is 8x10.*image_size"):
        load_bin(path)
    assert load_bin(path, image_size=(12, 6)).images.shape == (2, 12, 6, 3)


# --- LFW directory --------------------------------------------------------------------------------


@needs_verification_data
def test_load_lfw_mini():
    ps = load_lfw_dir(LFW_MINI)
    assert ps.name == "lfw_mini"
    assert ps.images.shape == (17, 112, 112, 3)
    assert ps.issame.tolist() == ([True] * 5 + [False] * 5) * 2
    # line 7 of pairs.txt: "Abel_Pacheco 1 Angela_Bassett 4"
    a = cv2.imread(str(LFW_MINI / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg"))[:, :, ::-1]
    b = cv2.imread(str(LFW_MINI / "Angela_Bassett" / "Angela_Bassett_0004.jpg"))[:, :, ::-1]
    np.testing.assert_array_equal(ps.images[ps.pairs[6, 0]], a)
    np.testing.assert_array_equal(ps.images[ps.pairs[6, 1]], b)


@pytest.fixture
def lfw_copy(tmp_path) -> Path:
    if not LFW_MINI.is_dir():
        pytest.skip(f"{LFW_MINI} not found")
    return Path(shutil.copytree(LFW_MINI, tmp_path / "lfw_copy"))


def _edit_pairs(root: Path, edit) -> None:
    lines = (root / "pairs.txt").read_text().splitlines()
    (root / "pairs.txt").write_text("\n".join(edit(lines)) + "\n")


def test_lfw_missing_image_names_line(lfw_copy):
    (lfw_copy / "Ann_Veneman" / "Ann_Veneman_0005.jpg").unlink()
    with pytest.raises(UserError, match=r"line 16: image .*Ann_Veneman_0005.jpg does not exist"):
        load_lfw_dir(lfw_copy)


def test_lfw_malformed_line(lfw_copy):
    _edit_pairs(lfw_copy, lambda lines: lines[:3] + ["Akhmed_Zakayev\tone\t3"] + lines[4:])
    with pytest.raises(UserError, match=r"line 4: expected 'name n1 n2'"):
        load_lfw_dir(lfw_copy)


def test_lfw_header_count_mismatch(lfw_copy):
    _edit_pairs(lfw_copy, lambda lines: lines[:-1])
    with pytest.raises(UserError, match="promises 20 pairs, found 19"):
        load_lfw_dir(lfw_copy)
    _edit_pairs(lfw_copy, lambda lines: ["two\tfive"] + lines[1:])
    with pytest.raises(UserError, match="line 1: expected a header"):
        load_lfw_dir(lfw_copy)


def test_lfw_resize_and_separate_pairs_file(lfw_copy, tmp_path):
    pairs_file = tmp_path / "my_pairs.txt"
    pairs_file.write_text("1\nAbel_Pacheco 1 4\nAbel_Pacheco 1 Ann_Veneman 3\n")  # View-1 style header
    ps = load_lfw_dir(lfw_copy, pairs_file=pairs_file, image_size=64)
    assert ps.images.shape == (3, 64, 64, 3) and ps.issame.tolist() == [True, False]


# --- CSV -----------------------------------------------------------------------------------------


@needs_deepface
def test_deepface_csv_parses():
    pair_list = read_pair_list_csv(DEEPFACE_CSV)
    assert isinstance(pair_list, PairList) and pair_list.name == "pairs"
    assert len(pair_list) == 300 and int(pair_list.issame.sum()) == 38
    assert pair_list.paths_a[0] == DEEPFACE_CSV.parent / "img20.jpg"
    assert all(p.is_file() for p in pair_list.paths_a + pair_list.paths_b)


@needs_verification_data
def test_csv_with_and_without_labels(tmp_path):
    a = os.path.relpath(LFW_MINI / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg", tmp_path)
    b = os.path.relpath(LFW_MINI / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg", tmp_path)
    c = LFW_MINI / "Ann_Veneman" / "Ann_Veneman_0003.jpg"  # absolute paths work too
    (tmp_path / "labelled.csv").write_text(f"file_x,file_y,same\n{a},{b},1\n{a},{c},0\n")
    ps = load_pairs_csv(tmp_path / "labelled.csv")
    assert ps.images.shape == (3, 112, 112, 3) and ps.issame.tolist() == [True, False]
    assert ps.pairs.tolist() == [[0, 1], [0, 2]]
    (tmp_path / "plain.csv").write_text(f"file_x,file_y\n{a},{b}\n")
    unlabelled = load_pair_set(tmp_path / "plain.csv")
    assert unlabelled.issame is None and not unlabelled.labelled


def test_csv_errors(tmp_path):
    (tmp_path / "cols.csv").write_text("img1,img2\na.jpg,b.jpg\n")
    with pytest.raises(UserError, match="missing column"):
        read_pair_list_csv(tmp_path / "cols.csv")
    (tmp_path / "label.csv").write_text("file_x,file_y,Decision\na.jpg,b.jpg,Yes\na.jpg,c.jpg,maybe\n")
    with pytest.raises(UserError, match="line 3: Decision must be Yes/No"):
        read_pair_list_csv(tmp_path / "label.csv")
    (tmp_path / "missing.csv").write_text("file_x,file_y\na.jpg,b.jpg\n")
    with pytest.raises(UserError, match=r"pair 1: image .*a.jpg does not exist"):
        load_pairs_csv(tmp_path / "missing.csv")


# --- dispatch -------------------------------------------------------------------------------------


@needs_verification_data
def test_load_pair_set_dispatch():
    assert load_pair_set(BIN).name == "lfw_head20"
    assert len(load_pair_set(LFW_MINI)) == 20
    assert len(load_pair_set(LFW_MINI / "pairs.txt")) == 20


def test_load_pair_set_rejects_unknown(tmp_path):
    (tmp_path / "x.rec").write_bytes(b"")
    with pytest.raises(UserError, match="unknown pair-set format"):
        load_pair_set(tmp_path / "x.rec")
    with pytest.raises(UserError, match="no pairs.txt"):
        load_pair_set(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_pair_set(tmp_path / "absent.bin")


# --- sampling from identities ---------------------------------------------------------------------


def _tagged_images(n: int) -> np.ndarray:
    """Images whose first pixel encodes their index, so pairs can be traced back."""
    images = np.zeros((n, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return images


@pytest.mark.parametrize("n_pairs", [20, 41])
def test_pairs_from_identities_balanced_and_seeded(n_pairs):
    labels = np.repeat(np.arange(12), 4)  # 12 identities x 4 images: 72 same pairs possible
    images = _tagged_images(len(labels))
    ps = pairs_from_identities(images, labels, n_pairs, seed=3)
    assert len(ps) == n_pairs and ps.issame.sum() == n_pairs // 2
    assert ps.issame[:4].tolist() == [True, False, True, False]  # interleaved for k-fold
    original = ps.images[:, 0, 0, 0].astype(int)[ps.pairs]  # back to the input indices
    assert ((labels[original[:, 0]] == labels[original[:, 1]]) == ps.issame).all()
    assert (original[:, 0] != original[:, 1]).all()
    assert len({tuple(sorted(p)) for p in original.tolist()}) == n_pairs
    again = pairs_from_identities(images, labels, n_pairs, seed=3)
    np.testing.assert_array_equal(again.pairs, ps.pairs)
    np.testing.assert_array_equal(again.images, ps.images)
    other = pairs_from_identities(images, labels, n_pairs, seed=4)
    assert not np.array_equal(other.images[:, 0, 0, 0][other.pairs], ps.images[:, 0, 0, 0][ps.pairs])


def test_pairs_from_identities_errors():
    images = _tagged_images(6)
    with pytest.raises(UserError, match="at least 2 identities"):
        pairs_from_identities(images, [0] * 6, 4, seed=0)
    with pytest.raises(UserError, match="no identity has 2 images"):
        pairs_from_identities(images, list(range(6)), 4, seed=0)
    with pytest.raises(UserError, match="only 2 same"):
        pairs_from_identities(images, [0, 0, 1, 1, 2, 3], 10, seed=0)


# --- PairSet validation ---------------------------------------------------------------------------


def test_pairset_validation():
    images = np.zeros((3, 4, 4, 3), np.uint8)
    ps = PairSet("ok", images, [[0, 1], [1, 2]], [1, 0])
    assert len(ps) == 2 and ps.issame.dtype == bool and ps.pairs.dtype == np.int64
    with pytest.raises(ValueError, match="uint8"):
        PairSet("bad", images.astype(np.float32), [[0, 1]], [True])
    with pytest.raises(ValueError, match="outside"):
        PairSet("bad", images, [[0, 3]], [True])
    with pytest.raises(ValueError, match="2 pairs but 1 labels"):
        PairSet("bad", images, [[0, 1], [1, 2]], [True])


def test_eval_refuses_unaligned_photos_in_a_pairs_csv(capsys):
    """The deepface photos are whole unaligned photos: evaluating them as crops squashed each to
    112x112 (AUC 0.567, silently). Now one line names the photo and the command that aligns."""
    csv_path = need("photos/deepface/pairs.csv")
    with pytest.raises(UserError) as err:
        load_pair_set(csv_path, image_size=112)
    message = str(err.value)
    assert "\n" not in message and "img" in message and "not an aligned 112x112 face crop" in message
    assert "marginface verify --pairs" in message
    from marginface.cli import main

    model = need("weights/mobilefacenet_onnx/MobileFaceNet.onnx")
    assert main(["eval", "--model", str(model), "--normalize", "imagenet", "--sets", str(csv_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "verify --pairs" in err[0]
    # the escape hatch keeps the old behaviour for callers who mean it
    squashed = load_pairs_csv(csv_path, image_size=112, allow_unaligned=True)
    assert squashed.images.shape[1:] == (112, 112, 3)


def test_pairs_csv_photos_are_aligned_by_a_detector(tmp_path):
    from marginface.data.detect import MTCNNDetector

    photos = need("photos/deepface")
    (tmp_path / "p.csv").write_text(f"file_x,file_y,Decision\n{photos}/img1.jpg,{photos}/img2.jpg,Yes\n"
                                    f"{photos}/img1.jpg,{photos}/img3.jpg,No\n")
    ps = load_pair_set(tmp_path / "p.csv", image_size=112, detector=MTCNNDetector(need("weights/mtcnn")))
    assert ps.images.shape == (3, 112, 112, 3) and ps.issame.tolist() == [True, False]


def test_aligned_crops_in_a_pairs_csv_still_load(tmp_path):
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((112, 112, 3), 50 * i, np.uint8))
    (tmp_path / "p.csv").write_text("file_x,file_y,same\n0.png,1.png,0\n")
    assert load_pair_set(tmp_path / "p.csv", image_size=64).images.shape == (2, 64, 64, 3)  # 112 crops, 64 model
    assert load_pair_set(tmp_path / "p.csv", image_size=112).images.shape == (2, 112, 112, 3)


@needs_verification_data
def test_lfw_pairs_file_declares_its_folds(tmp_path):
    """lfw_mini's pairs.txt says '2 5' (2 folds x 5 same + 5 different): evaluation splits its 20
    pairs into those 2 folds, not 10 folds of 2 pairs."""
    ps = load_pair_set(LFW_MINI)
    assert ps.n_folds == 2 and ps.folds_for() == 2 and ps.folds_for(10) == 2
    assert load_bin(BIN).n_folds is None and load_bin(BIN).folds_for() == 10
    # a header that declares no folds: one number (View 1)
    shutil.copytree(LFW_MINI, tmp_path / "mini")
    lines = (tmp_path / "mini" / "pairs.txt").read_text().splitlines()
    (tmp_path / "mini" / "pairs.txt").write_text("\n".join(["10"] + lines[1:]) + "\n")  # 10 same + 10 different
    assert load_pair_set(tmp_path / "mini").n_folds is None
