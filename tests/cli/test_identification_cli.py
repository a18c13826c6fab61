"""`marginface identify`: identity folders -> rank-r and TPIR@FPIR, checked with a model whose
embeddings are known by hand (mean colour), a random projection on synthetic faces against a
direct computation, the real pretrained ONNX embedder on the johns photos, and bad input."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marginface.cli import main
from marginface.data.synthetic import write_synthetic
from marginface.data.transforms import hflip, to_tensor
from marginface.evaluate.identification import identification_metrics
from shared_data import need  # tests/shared_data.py

torch.set_num_threads(1)
FOREIGN = "weights/mobilefacenet_onnx/MobileFaceNet.onnx"
JSON_KEYS = {"rank_1", "cmc", "tpir_at_fpir", "fpir_thresholds", "fpir_targets", "probes", "mated_probes",
             "non_mated_probes", "gallery_identities", "gallery_images", "distractors", "flip", "sources"}


class MeanColour(torch.nn.Module):
    """Embedding = the mean normalised colour, so a uniform image of colour c embeds as c/127.5 - 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class PooledProjection(torch.nn.Module):
    """4x4 average pooling and a fixed random projection: a tiny, deterministic random model."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        self.register_buffer("projection", torch.randn(48, dim, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.projection


def save_torchscript(module: torch.nn.Module, path: Path, input_size: int) -> Path:
    """A model file `load_model` reads (with trust_code: TorchScript runs code), with the metadata our exports carry."""
    meta = {"input_size": [input_size, input_size], "normalize": "arcface"}
    with warnings.catch_warnings():  # torch deprecates TorchScript; load_model still reads it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path), _extra_files={"marginface.json": json.dumps(meta)})
    return path


def write_png(path: Path, rgb, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size, size, 3), rgb[::-1], np.uint8))  # PNG: lossless, so colours are exact


def colour_feature(rgb) -> np.ndarray:
    return np.asarray(rgb, np.float64) / 127.5 - 1.0


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------- known embeddings
GALLERY = {"ann": (255, 0, 0), "bob": (0, 255, 0), "cat": (0, 0, 255), "dan": (255, 255, 0)}
STRANGERS = {"eve": (0, 255, 255), "fay": (255, 0, 255)}  # probe identities without a gallery folder
GREYS = [(200, 200, 200), (60, 60, 60), (120, 200, 40)]


@pytest.fixture
def colour_world(tmp_path):
    """Gallery: two images per identity (its colour and a slightly shifted one); probes: one image
    per gallery identity and per stranger; distractors: a nested folder of 3 images and a .npy whose
    first row is exactly ann's probe feature (it outscores ann's template: ann's mate drops to rank 2)."""
    model = save_torchscript(MeanColour(), tmp_path / "mean_colour.pt", input_size=16)
    gallery_feats, gallery_ids, probe_feats, probe_ids = [], [], [], []
    for name, rgb in GALLERY.items():
        shifted = tuple(min(255, c + 20) if c < 128 else c - 20 for c in rgb)
        for k, colour in enumerate([rgb, shifted]):
            write_png(tmp_path / "gallery" / name / f"{k}.png", colour, size=24)  # resized to 16 on reading
            gallery_feats.append(colour_feature(colour))
            gallery_ids.append(name)
    for name, rgb in {**GALLERY, **STRANGERS}.items():
        write_png(tmp_path / "probes" / name / "0.png", rgb)
        probe_feats.append(colour_feature(rgb))
        probe_ids.append(name)
    for k, rgb in enumerate(GREYS):
        write_png(tmp_path / "distractors" / f"part{k % 2}" / f"{k}.png", rgb)
    npy_rows = np.stack([colour_feature(GALLERY["ann"]), colour_feature((30, 90, 150))]).astype(np.float32)
    np.save(tmp_path / "more.npy", npy_rows)
    distractor_feats = np.concatenate([np.stack([colour_feature(c) for c in GREYS]), npy_rows])
    expected = dict(probe_features=np.stack(probe_feats), probe_ids=probe_ids, gallery_features=np.stack(gallery_feats),
                    gallery_ids=gallery_ids, distractors=distractor_feats)
    return tmp_path, model, expected


def test_known_embeddings_json_files_and_text(colour_world, capsys):
    root, model, expected = colour_world
    argv = ["identify", "--model", model, "--trust-code", "--gallery", root / "gallery", "--probes", root / "probes",
            "--distractors", root / "distractors", root / "more.npy", "--top", "2", "--fpir", "0.5", "1",
            "--chunk-size", "2", "--out", root / "report"]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    result = json.loads(out)  # exactly one JSON object on stdout
    assert JSON_KEYS | {"rank_2"} <= set(result)
    assert (result["gallery_identities"], result["gallery_images"], result["distractors"]) == (4, 8, 5)
    assert (result["probes"], result["mated_probes"], result["non_mated_probes"]) == (6, 4, 2)
    assert result["rank_1"] == 0.75 and result["rank_2"] == 1.0  # ann's probe loses to its copy in more.npy
    assert result["flip"] is True and result["sources"]["distractors"] == [str(root / "distractors"), str(root / "more.npy")]

    reference = identification_metrics(**expected, ranks=(1, 2), fpir_targets=(0.5, 1.0))
    assert result["cmc"] == pytest.approx(reference["cmc"])
    assert set(result["tpir_at_fpir"]) == {"5e-1", "1e0"} == set(reference["tpir_at_fpir"])
    for key in reference["tpir_at_fpir"]:
        assert result["tpir_at_fpir"][key] == pytest.approx(reference["tpir_at_fpir"][key])
    # FPIR 1: every non-mated probe may be returned, so no threshold (-inf, written as null)
    assert result["fpir_thresholds"]["1e0"] is None
    assert result["fpir_thresholds"]["5e-1"] == pytest.approx(reference["fpir_thresholds"]["5e-1"], abs=1e-5)

    assert sorted(p.name for p in (root / "report").iterdir()) == ["identification.json", "identification.md"]
    assert json.loads((root / "report" / "identification.json").read_text()) == result
    md = (root / "report" / "identification.md").read_text()
    assert "| rank-1 | 0.7500 |" in md and "TPIR@FPIR=5e-1" in md

    code, out, err = run(capsys, *argv[:-2], "--no-flip")  # console text, progress on stderr
    assert code == 0, err
    assert "rank-1 0.7500  rank-2 1.0000" in out and "4 identities (8 images)" in out and "no flip" in out
    assert "embedding gallery: 8 images" in err


def test_embed_writes_features_identify_accepts_as_distractors(colour_world, capsys):
    root, model, expected = colour_world
    feats = root / "feats" / "distractors.npy"
    code, out, err = run(capsys, "embed", "--model", model, "--trust-code", "--images", root / "distractors", "--out", feats,
                         "--batch-size", "2", "--json")
    assert code == 0, err
    written = json.loads(out)
    assert (written["images"], written["dim"], written["flip"], written["precision"]) == (3, 3, True, "fp32")
    rows = np.load(feats)
    assert rows.dtype == np.float32 and rows.shape == (3, 3)
    listed = (root / "feats" / "distractors.txt").read_text().splitlines()
    assert [Path(p).name for p in listed] == ["0.png", "2.png", "1.png"]  # part0/0, part0/2, part1/1: row order
    # flip-sum of a uniform colour is twice its feature; row order follows the listing
    by_name = {f"{k}.png": colour_feature(c) for k, c in enumerate(GREYS)}
    assert np.allclose(rows, 2 * np.stack([by_name[Path(p).name] for p in listed]), atol=1e-5)
    assert not list((root / "feats").glob("*.tmp"))

    base = ["identify", "--model", model, "--trust-code", "--gallery", root / "gallery", "--probes", root / "probes", "--json"]
    code, out_npy, err = run(capsys, *base, "--distractors", feats)
    assert code == 0, err
    code, out_dir, err = run(capsys, *base, "--distractors", root / "distractors")
    assert code == 0, err
    a, b = json.loads(out_npy), json.loads(out_dir)
    assert a["cmc"] == b["cmc"] and a["distractors"] == b["distractors"] == 3


@pytest.mark.parametrize("argv_tail,message", [
    (["--images", "{root}/nope", "--out", "{root}/f.npy"], "--images: {root}/nope: not a directory"),
    (["--images", "{root}/distractors", "--out", "{root}/f.bin"], "must end in .npy"),
])
def test_embed_bad_input_is_one_error_line(colour_world, capsys, argv_tail, message):
    root, model, _ = colour_world
    tail = [a.format(root=root) for a in argv_tail]
    code, out, err = run(capsys, "embed", "--model", model, "--trust-code", *tail)
    assert code == 2 and out == ""
    assert err.startswith("error:") and message.format(root=root) in err and len(err.strip().splitlines()) == 1


def test_no_non_mated_probes_no_tpir(colour_world, capsys):
    root, model, _ = colour_world
    for name in STRANGERS:
        shutil.rmtree(root / "probes" / name)
    code, out, err = run(capsys, "identify", "--model", model, "--trust-code", "--gallery", root / "gallery", "--probes",
                         root / "probes")
    assert code == 0, err
    assert "rank-1 1.0000  rank-5 1.0000" in out
    assert "TPIR@FPIR=1e-1, 1e-2, 1e-3: not reported (0 non-mated probes" in out


# ---------------------------------------------------------------------------------------------- synthetic faces
def read_rgb(path: Path, size: int) -> np.ndarray:
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def test_synthetic_identities_match_a_direct_computation(tmp_path, capsys):
    """Rendered identities (first 2 images enrolled, the 3rd a probe), a random model at 32 px fed 40 px
    images: the CLI's numbers equal embedding the resized files by hand and calling the library."""
    write_synthetic(str(tmp_path / "gallery"), identities=6, images_per_identity=3, image_size=40, seed=3)
    for folder in sorted((tmp_path / "gallery").iterdir()):
        (tmp_path / "probes" / folder.name).mkdir(parents=True)
        (folder / "0002.jpg").rename(tmp_path / "probes" / folder.name / "0002.jpg")
    net = PooledProjection()
    model = save_torchscript(net, tmp_path / "random.pt", input_size=32)
    code, out, err = run(capsys, "identify", "--model", model, "--trust-code", "--gallery", tmp_path / "gallery", "--probes",
                         tmp_path / "probes", "--batch-size", "4", "--json")
    assert code == 0, err
    result = json.loads(out)

    def embed(files):
        images = np.stack([read_rgb(f, 32) for f in files])
        with torch.no_grad():
            return (net(to_tensor(images)) + net(to_tensor(hflip(images)))).numpy()

    gallery = sorted((tmp_path / "gallery").glob("*/*.jpg"))
    probes = sorted((tmp_path / "probes").glob("*/*.jpg"))
    reference = identification_metrics(embed(probes), [p.parent.name for p in probes], embed(gallery),
                                       [p.parent.name for p in gallery], ranks=(1, 5))
    assert (result["gallery_identities"], result["gallery_images"], result["probes"]) == (6, 12, 6)
    assert result["precision"] == "fp32"
    assert result["cmc"] == pytest.approx(reference["cmc"]) and result["rank_1"] == pytest.approx(reference["rank_1"])


# ---------------------------------------------------------------------------------------------- real photos
@pytest.fixture(scope="module")
def johns_split(tmp_path_factory):
    """johns/<id>/: the first 5 images (sorted) of each identity enrolled, the other 6 are probes."""
    root = need("identities/johns")
    split = tmp_path_factory.mktemp("johns")
    for ident in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(ident.glob("*.jpg"))
        for part, chosen in (("gallery", files[:5]), ("probes", files[5:])):
            (split / part / ident.name).mkdir(parents=True)
            for f in chosen:
                (split / part / ident.name / f.name).symlink_to(f)
    return split


def test_pretrained_onnx_on_johns(johns_split, capsys):
    pytest.importorskip("onnxruntime")
    model = need(FOREIGN)
    args = ["identify", "--model", model, "--normalize", "imagenet", "--device", "cpu", "--json"]
    code, out, err = run(capsys, *args, "--gallery", johns_split / "gallery", "--probes", johns_split / "probes")
    assert code == 0, err
    result = json.loads(out)
    assert (result["gallery_identities"], result["gallery_images"], result["probes"]) == (5, 25, 30)
    assert result["rank_1"] >= 0.9, result

    # open set: one identity leaves the gallery, its 6 probes must be rejected (FPIR 0.5 = 3 of 6)
    open_gallery = johns_split / "open_gallery"
    shutil.copytree(johns_split / "gallery", open_gallery, symlinks=True)
    shutil.rmtree(next(p for p in sorted(open_gallery.iterdir())))
    code, out, err = run(capsys, *args, "--gallery", open_gallery, "--probes", johns_split / "probes", "--fpir", "0.5")
    assert code == 0, err
    result = json.loads(out)
    assert (result["mated_probes"], result["non_mated_probes"]) == (24, 6)
    assert result["tpir_at_fpir"]["5e-1"] >= 0.8, result


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case, message", [
    ("no_gallery", "gallery: {root}/nope: not a directory"),
    ("empty_gallery", "gallery: {root}/empty: no images found"),
    ("no_probe_enrolled", "none of the 2 identities of {root}/probes"),
    ("wrong_dim_npy", "{root}/wide.npy: distractor features have 5 dimensions, the model's have 3"),
    ("flat_npy", "{root}/flat.npy: expected an N×D float feature matrix"),
    ("missing_npy", "{root}/missing.npy: distractor feature file not found"),
    ("text_distractors", "{root}/d.txt: expected a folder of images or a .npy"),
    ("no_model", "model not found"),
    ("top_zero", "--top must be >= 1"),
    ("fpir_zero", "--fpir: each target must be in (0, 1]"),
    ("int8_torchscript", "compiled inference needs a PyTorch model"),
    ("compile_torchscript", "compiled inference needs a PyTorch model"),
])
def test_bad_input_is_one_error_line(colour_world, capsys, case, message):
    root, model, _ = colour_world
    gallery, probes, extra = root / "gallery", root / "probes", []
    if case == "no_gallery":
        gallery = root / "nope"
    elif case == "empty_gallery":
        gallery = root / "empty"
        (gallery / "ann").mkdir(parents=True)
    elif case == "no_probe_enrolled":
        probes = root / "probes"
        for name in GALLERY:
            shutil.rmtree(probes / name)
    elif case == "int8_torchscript":  # the colour model is TorchScript: no x86 int8 compile for it
        extra = ["--precision", "int8"]
    elif case == "compile_torchscript":
        extra = ["--compile"]
    elif case == "wrong_dim_npy":
        np.save(root / "wide.npy", np.ones((4, 5), np.float32))
        extra = ["--distractors", root / "wide.npy"]
    elif case == "flat_npy":
        np.save(root / "flat.npy", np.ones(3, np.float32))
        extra = ["--distractors", root / "flat.npy"]
    elif case == "missing_npy":
        extra = ["--distractors", root / "missing.npy"]
    elif case == "text_distractors":
        (root / "d.txt").write_text("x")
        extra = ["--distractors", root / "d.txt"]
    elif case == "no_model":
        model = root / "nope.pt"
    elif case == "top_zero":
        extra = ["--top", "0"]
    elif case == "fpir_zero":
        extra = ["--fpir", "0"]
    code, out, err = run(capsys, "identify", "--model", model, "--trust-code", "--gallery", gallery, "--probes", probes, *extra,
                         "--json")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(root=root) in lines[0], err
