"""FaceEmbedder and `marginface verify`: image reading, bad model files, the fixed-batch foreign
ONNX model, huge images, no-face errors, and the real-photo acceptance figures."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from marginface.cli import main
from marginface.deploy.embedder import FaceEmbedder, as_rgb, read_rgb
from marginface.deploy.load import load_model
from marginface.errors import UserError

FOREIGN = "weights/mobilefacenet_onnx/MobileFaceNet.onnx"


from shared_data import need  # noqa: E402  (tests/shared_data.py)




@pytest.fixture(scope="module")
def embedder():
    """The pretrained MobileFaceNet ONNX (fixed batch 1, ImageNet normalisation) + MTCNN."""
    return FaceEmbedder(need(FOREIGN), normalize="imagenet", detector_weights=need("weights/mtcnn"), threads=1)


def model_args():
    return ["--model", str(need(FOREIGN)), "--normalize", "imagenet", "--detector-weights",
            str(need("weights/mtcnn")), "--threads", "1"]


def one_error_line(capsys, needle: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], captured.err
    assert captured.out == ""
    return lines[0]


# ---------------------------------------------------------------------------------------------- images
def test_read_rgb_converts_gray_alpha_and_16_bit(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (20, 1))
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    out = read_rgb(tmp_path / "gray.png")
    assert out.shape == (20, 64, 3) and out.dtype == np.uint8 and np.array_equal(out[..., 0], gray)

    bgra = np.zeros((10, 10, 4), np.uint8)
    bgra[..., 2] = 200  # red
    bgra[:5, :, 3] = 255  # top half opaque, bottom half transparent
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    out = read_rgb(tmp_path / "rgba.png")
    assert out.shape == (10, 10, 3)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[9, 9]) == (255, 255, 255)  # composited on white

    deep = (np.ones((8, 8, 3)) * 40000).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    assert read_rgb(tmp_path / "deep.png").dtype == np.uint8

    assert as_rgb(gray).shape == (20, 64, 3)
    with pytest.raises(UserError, match="expected an H×W"):
        as_rgb(np.zeros((4, 4, 2)))


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"not an image at all", "not a readable image")])
def test_read_rgb_bad_files(tmp_path, content, needle):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(UserError, match=needle) as info:
        read_rgb(path)
    assert str(path) in str(info.value)
    with pytest.raises(UserError, match="cannot read"):
        read_rgb(tmp_path / "missing.jpg")


# ---------------------------------------------------------------------------------------------- model files
def _tiny_onnx(path: Path, in_shape, out_shape) -> Path:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_model_files_that_are_not_what_they_claim(tmp_path):
    jpeg = tmp_path / "photo.onnx"
    cv2.imwrite(str(tmp_path / "p.jpg"), np.zeros((8, 8, 3), np.uint8))
    shutil.copy(tmp_path / "p.jpg", jpeg)
    with pytest.raises(UserError, match="not an ONNX model"):
        load_model(jpeg)
    with pytest.raises(UserError, match="not a face-embedding model"):
        load_model(_tiny_onnx(tmp_path / "vec.onnx", ["N", 10], ["N", 10]))
    with pytest.raises(UserError, match="not a face-embedding model"):
        load_model(_tiny_onnx(tmp_path / "img.onnx", ["N", 3, 112, 112], ["N", 3, 112, 112]))
    fake_pt = tmp_path / "model.pt"
    fake_pt.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="not a readable marginface checkpoint"):
        load_model(fake_pt)
    with pytest.raises(UserError, match="model not found"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(UserError, match="--normalize"):
        load_model(fake_pt, normalize="bgr")


def test_onnx_without_its_external_data(tmp_path):
    from marginface.deploy.export import export_onnx
    from marginface.deploy.load import random_backbone

    export_onnx(random_backbone("mobilefacenet", input_size=32, width_mult=0.25), tmp_path / "inline.onnx")
    proto = onnx.load(str(tmp_path / "inline.onnx"))
    onnx.save_model(proto, str(tmp_path / "split.onnx"), save_as_external_data=True,
                    location="split.onnx.data", size_threshold=0)
    assert load_model(tmp_path / "split.onnx", threads=1).embedding_size == 128  # together: fine
    (tmp_path / "split.onnx.data").unlink()
    with pytest.raises(UserError, match="side by side"):
        load_model(tmp_path / "split.onnx")


def test_foreign_fixed_batch_model_is_rebatched():
    model = load_model(need(FOREIGN), normalize="imagenet", threads=1)
    assert model.fixed_batch == 1 and model.input_size == (112, 112) and model.embedding_size == 128
    assert model.normalize == "imagenet" and model.threshold is None
    x = torch.randn(3, 3, 112, 112)
    together = model(x).numpy()
    alone = np.concatenate([model(x[i : i + 1]).numpy() for i in range(3)])
    assert together.shape == (3, 128) and np.allclose(together, alone, atol=1e-5)
    assert model.describe()["rebatched"]


# ---------------------------------------------------------------------------------------------- the pipeline
def test_flip_sum_and_unit_embeddings(embedder):
    face = embedder.largest_face(need("photos/deepface/img1.jpg"))
    assert face.crop.shape == (112, 112, 3) and face.landmarks.shape == (5, 2)
    unit = embedder.embed_crops(face.crop[None])[0]
    assert abs(np.linalg.norm(unit) - 1) < 1e-5
    from marginface.data.transforms import to_tensor

    raw = embedder.model(to_tensor(np.stack([face.crop, face.crop[:, ::-1]]), "imagenet")).numpy()
    expected = raw[0] + raw[1]  # flip-sum of raw embeddings, then L2
    assert np.allclose(unit, expected / np.linalg.norm(expected), atol=1e-5)


def test_huge_image_keeps_original_coordinates(embedder, tmp_path):
    image = read_rgb(need("photos/deepface/img5.jpg"))  # 330x512
    small = embedder.largest_face(image)
    big = cv2.resize(image, None, fx=8, fy=8, interpolation=cv2.INTER_LINEAR)  # 2640x4096
    assert max(big.shape) > embedder.max_detect_side
    face = embedder.largest_face(big)
    # original-image pixels (a downscaled frame would be off by 8x); detections at different scales
    # differ by a few pixels, so allow 5% of the face width
    width = small.box[2] - small.box[0]
    assert np.abs(face.landmarks / 8 - small.landmarks).max() < 0.05 * width
    assert face.box[2] - face.box[0] == pytest.approx(8 * width, rel=0.1)
    sim = float(embedder.embed_crops(face.crop[None])[0] @ embedder.embed_crops(small.crop[None])[0])
    assert sim > 0.9


def test_no_face_is_a_clear_error(embedder, tmp_path, capsys):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((200, 300, 3), 180, np.uint8))
    with pytest.raises(UserError, match="no face found") as info:
        embedder.embed(blank)
    assert str(blank) in str(info.value)
    face = need("photos/deepface/img1.jpg")
    assert main(["verify", str(face), str(blank), *model_args()]) == 2
    one_error_line(capsys, f"{blank}: no face found")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    assert main(["verify", str(face), str(broken), *model_args()]) == 2
    one_error_line(capsys, f"{broken}: not a readable image")


def test_verify_cli_two_images(capsys):
    a, b = need("photos/deepface/img1.jpg"), need("photos/deepface/img2.jpg")
    assert main(["verify", str(a), str(b), *model_args(), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result) >= {"similarity", "same", "threshold"}
    assert result["threshold"] == 0.3 and result["threshold_source"] == "default"
    assert "no verification threshold" in captured.err  # said so, on stderr
    assert main(["verify", str(a), str(b), *model_args(), "--threshold", "0.99", "--json"]) == 0
    strict = json.loads(capsys.readouterr().out)
    assert strict["threshold"] == 0.99 and strict["same"] is False
    assert strict["similarity"] == pytest.approx(result["similarity"], abs=1e-6)


@pytest.mark.parametrize("argv,needle", [
    (["verify", "a.jpg"], "expected two images"),
    (["verify", "a.jpg", "b.jpg", "--pairs", "p.csv"], "not both"),
])
def test_verify_cli_usage_errors(argv, needle, capsys):
    assert main([*argv, "--model", "m.onnx"]) == 2
    one_error_line(capsys, needle)


def test_photo_pairs_acceptance(capsys):
    """All 300 labelled pairs of the deepface photos: every face found, AUC >= 0.99."""
    pairs = need("photos/deepface/pairs.csv")
    assert main(["verify", "--pairs", str(pairs), *model_args(), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["pairs"]) == 300
    assert {"a", "b", "similarity"} <= set(result["pairs"][0])
    ev = result["eval"]
    with capsys.disabled():
        print(f"\n[deepface pairs] AUC {ev['auc']:.4f}, accuracy {ev['accuracy']:.4f}, best threshold "
              f"{ev['threshold']:.3f}, pos_mean {ev['pos_mean']:.3f}, neg_mean {ev['neg_mean']:.3f}")
    assert ev["auc"] >= 0.99 and ev["pairs"] == 300


def test_foreign_onnx_eval_lfw_head20(capsys):
    """`marginface eval` on an aligned .bin through load_model: ImageNet normalisation must be used."""
    bin_path = need("verification/lfw_head20.bin")
    assert main(["eval", "--model", str(need(FOREIGN)), "--normalize", "imagenet", "--sets", str(bin_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["lfw_head20"]
    with capsys.disabled():
        print(f"\n[lfw_head20] pos_mean {result['pos_mean']:.4f} over {result['pairs']} positive pairs")
    assert result["pos_mean"] >= 0.70
    assert main(["eval", "--model", str(need(FOREIGN)), "--sets", str(bin_path), "--json"]) == 0
    wrong = json.loads(capsys.readouterr().out)["lfw_head20"]
    assert wrong["pos_mean"] < result["pos_mean"]  # arcface normalisation is the wrong one for it


def test_embedder_with_our_export(tmp_path):
    """Our own export (random mbf at 112) in the photo pipeline: metadata gives the preprocessing."""
    from marginface.deploy.export import export_onnx
    from marginface.deploy.load import random_backbone

    model = random_backbone("mbf", input_size=112, width_mult=0.25)
    model.info = model.info.replace(threshold=0.42, threshold_source="synthetic")  # what export records
    export_onnx(model, tmp_path / "m.onnx")
    fe = FaceEmbedder(tmp_path / "m.onnx", detector_weights=need("weights/mtcnn"), threads=1)
    assert fe.threshold == pytest.approx(0.42) and fe.normalize == "arcface"
    emb = fe.embed_many([need("photos/deepface/img1.jpg"), need("photos/deepface/img1.jpg")])
    assert emb.shape == (2, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
