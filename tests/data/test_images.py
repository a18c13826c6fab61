"""The one image module (`marginface.data.images`) and the fixes that came with the hostile-input
corpus: conversions that are the same for every caller, header sizes, JSON output, detectors."""
import json
import os
import re
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from marginface.data import images
from marginface.errors import UserError
from tests.shared_data import need

RGB = np.zeros((20, 30, 3), np.uint8)
RGB[..., 0], RGB[..., 1], RGB[..., 2] = 200, 100, 50


def _write_kinds(d: Path) -> dict[str, Path]:
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one transparent pixel
    frames = [Image.fromarray(RGB), Image.fromarray(255 - RGB)]
    out = {}

    def save(name, fn):
        out[name] = d / name
        fn(out[name])

    save("plain.jpg", lambda p: Image.fromarray(RGB).save(p, quality=100))
    save("cmyk.jpg", lambda p: Image.fromarray(RGB).convert("CMYK").save(p, quality=100))
    save("gray.png", lambda p: cv2.imwrite(str(p), RGB[..., 0]))
    save("deep16.png", lambda p: cv2.imwrite(str(p), RGB[..., ::-1].astype(np.uint16) * 257))
    save("rgba.png", lambda p: Image.fromarray(rgba).save(p))
    save("rgba.webp", lambda p: Image.fromarray(rgba).save(p, lossless=True))
    save("anim.gif", lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))
    save("anim.png", lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))
    save("plain.bmp", lambda p: Image.fromarray(RGB).save(p))
    save("plain.tiff", lambda p: Image.fromarray(RGB).save(p))
    return out


def test_every_kind_becomes_the_same_rgb_uint8(tmp_path):
    """Gray, 16-bit, CMYK, RGBA (onto white) and animated (first frame) files all give RGB uint8."""
    for name, path in _write_kinds(tmp_path).items():
        image = images.read_image(path)
        assert image.dtype == np.uint8 and image.shape == (20, 30, 3), name
        assert images.header_size(path.read_bytes()) == (30, 20), name
        expected = [200, 200, 200] if name.startswith("gray") else [200, 100, 50]
        assert np.abs(image[5, 5].astype(int) - expected).max() <= 2, (name, image[5, 5])
        if name.startswith("rgba"):
            assert image[0, 0].tolist() == [255, 255, 255], name  # transparent -> white, not black


def test_all_readers_are_the_one_reader(tmp_path):
    """The old entry points are the images module's functions, so their contracts cannot drift."""
    from marginface.data import recordio, sources, verification
    from marginface.deploy import embedder

    assert sources.read_image_file is images.read_image
    assert verification.read_image is images.read_image
    assert embedder.read_rgb is images.read_image
    assert embedder.as_rgb is images.as_rgb
    # and no other module decodes image files itself (synthetic.py decodes its own JPEG augmentations)
    root = Path(images.__file__).resolve().parents[1]
    decoders = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                      if re.search(r"cv2\.imdecode|cv2\.imread\(|Image\.open\(", p.read_text())
                      and p.name not in ("images.py", "synthetic.py", "viz.py"))
    assert decoders == []
    # a RecordIO payload goes through the same checks (pixel limit included)
    big = images_png_claiming(100000, 100000)
    with pytest.raises(UserError, match="record 7: PNG header claims 100000x100000"):
        recordio.decode_image(big, "pack record 7")


def images_png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0" * 4


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "a.jpg"
    cv2.imwrite(str(path), np.zeros((100, 120, 3), np.uint8))
    assert images.read_image(path).shape == (100, 120, 3)
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 120 - 1)
    decoded = []
    monkeypatch.setattr(images.cv2, "imdecode", lambda *a: decoded.append(1))
    with pytest.raises(UserError, match=r"a\.jpg: JPEG header claims 120x100 pixels"):
        images.read_image(path)
    assert decoded == []  # refused from the header alone


@pytest.mark.parametrize("make,kind", [(lambda p: os.mkfifo(p), "a FIFO"), (lambda p: p.mkdir(), "a directory"),
                                       (lambda p: p.symlink_to("/dev/null"), "a device")])
def test_only_regular_files_are_opened(tmp_path, make, kind):
    path = tmp_path / "x.jpg"
    make(path)
    with pytest.raises(UserError, match=f"x.jpg: is {kind}, not an image file"):
        images.read_image(path)


def test_decoder_chatter_stays_off_stderr(tmp_path, capfd):
    """libjpeg's "Corrupt JPEG data" lines would surround the one error line."""
    data = bytearray(cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))[1].tobytes())
    data[-40:-2] = b"\0" * 38  # damage the scan data, keep the end marker
    try:
        images.decode_image(bytes(data), "damaged.jpg")
    except UserError as exc:
        assert "damaged.jpg" in str(exc)
    assert capfd.readouterr().err == ""


def test_json_output_is_valid_json_with_nan(capsys):
    from marginface.cli import _print_json

    import torch

    _print_json({"rank_1": float("nan"), "far": [float("inf"), np.float32(0.5)], "n": np.int64(3), "p": Path("x"),
                 "t": torch.tensor([1.0, float("nan")])})
    out = capsys.readouterr().out
    assert json.loads(out) == {"rank_1": None, "far": [None, 0.5], "n": 3, "p": "x", "t": [1.0, None]}
    assert "NaN" not in out and "Infinity" not in out


def test_nan_embeddings_are_refused(tmp_path):
    import torch

    from marginface.evaluate.identification import embed_image_files

    class NanModel(torch.nn.Module):
        input_size, model_path = 32, "nan-model.pt"

        def forward(self, x):
            return torch.full((x.shape[0], 8), float("nan"))

    with pytest.raises(UserError, match="nan-model.pt: the model gave NaN/inf embeddings"):
        embed_image_files(NanModel(), lambda i: np.zeros((32, 32, 3), np.uint8), 2, flip=False)


def test_npz_loader_loads_honest_archives(tmp_path):
    from marginface.data.arrays import load_npz

    np.savez_compressed(tmp_path / "g.npz", embeddings=np.ones((100, 8), np.float32), names=np.array(["a", "b"]))
    got = load_npz(tmp_path / "g.npz")
    assert got["embeddings"].shape == (100, 8) and got["names"].tolist() == ["a", "b"]
    np.savez(tmp_path / "o.npz", objs=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="o.npz: member objs.npy: holds Python objects"):
        load_npz(tmp_path / "o.npz")


def test_data_align_with_retinaface_weights_dir(tmp_path, capsys):
    """`data align --detector retinaface --weights DIR` used to die on a TypeError (weights_dir)."""
    from marginface.cli import main

    weights = need("weights/retinaface")
    src = tmp_path / "src" / "person"
    src.mkdir(parents=True)
    (src / "a.jpg").write_bytes((need("photos/deepface") / "img1.jpg").read_bytes())
    rc = main(["data", "align", str(tmp_path / "src"), str(tmp_path / "dst"), "--detector", "retinaface",
               "--weights", str(weights), "--json"])
    assert rc == 0, capsys.readouterr().err
    assert [p.name for p in (tmp_path / "dst").rglob("*.jpg")] == ["a.jpg"]


def _lfw(root: Path, side: int) -> Path:
    for name in ("Ann", "Bob"):
        (root / name).mkdir(parents=True)
        for k in (1, 2):
            cv2.imwrite(str(root / name / f"{name}_{k:04d}.jpg"), np.full((side, side, 3), 60 * k, np.uint8))
    (root / "pairs.txt").write_text("1 1\nAnn 1 2\nAnn 1 Bob 2\n")
    return root


def test_unaligned_lfw_folder_warns(tmp_path, capsys):
    from marginface.data.verification import load_pair_set

    load_pair_set(_lfw(tmp_path / "photos", 250), image_size=112)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "unaligned" in err and "250x250" in err
    load_pair_set(_lfw(tmp_path / "crops", 112), image_size=112)  # already aligned crops: quiet
    assert capsys.readouterr().err == ""


def test_real_photos_read_as_opencv_reads_them():
    """The header parser must agree with the decoder on real files of every size and format."""
    photos = sorted(p for p in need("photos/deepface").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert len(photos) > 20
    for path in photos:
        image = images.read_image(path)
        width, height = images.header_size(path.read_bytes())
        assert image.shape[:2] in ((height, width), (width, height)), path  # EXIF may rotate
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw.ndim == 2 or raw.shape[2] == 3:  # no alpha: exactly OpenCV's RGB
            assert np.array_equal(image, cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]), path
