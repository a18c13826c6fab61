"""The inference contract (`marginface.inference`): ModelInfo / EmbedOptions validation, and that
every loader returns an object whose ``.info`` says what it is."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from marginface.errors import UserError
from marginface.inference import DEFAULT_INPUT_SIZE, EmbedOptions, Embedder, ModelInfo, as_hw

# ---------------------------------------------------------------------------------------------- ModelInfo


def test_model_info_canonical_forms():
    info = ModelInfo(input_size=32, embedding_size="128", threshold="0.25", threshold_source="synthetic")
    assert info.input_size == (32, 32) and info.embedding_size == 128 and info.threshold == 0.25
    assert info.normalize == "arcface" and info.kind == "module" and info.precision == "fp32"
    assert ModelInfo(input_size=[112, 96]).input_size == (112, 96)
    assert ModelInfo(input_size="112,96").input_size == (112, 96)
    assert ModelInfo(input_size=None).image_size == DEFAULT_INPUT_SIZE
    # no threshold: no source either; "none" as our ONNX metadata writes it is no threshold
    assert ModelInfo(threshold="none", threshold_source="none").threshold_source is None
    assert ModelInfo(threshold=float("nan"), threshold_source="lfw").threshold is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.normalize = "imagenet"


def test_model_info_rejects_bad_values():
    with pytest.raises(UserError, match="normalize must be one of arcface, imagenet, got 'bgr'"):
        ModelInfo(normalize="bgr")
    for bad in ((0, 0), (1, 2, 3), "big", 5000, True, 32.5):
        with pytest.raises(UserError, match="input_size"):
            ModelInfo(input_size=bad)
    with pytest.raises(UserError, match="embedding_size"):
        ModelInfo(embedding_size=0)
    with pytest.raises(UserError, match="threshold"):
        ModelInfo(threshold="high")
    with pytest.raises(UserError, match="model kind"):
        ModelInfo(kind="coreml")
    with pytest.raises(UserError, match="precision"):
        ModelInfo(precision="int4")
    assert as_hw(None) is None


def test_model_info_replace_validates_and_with_normalize():
    info = ModelInfo(input_size=64)
    assert info.with_normalize(None) is info and info.with_normalize("imagenet").normalize == "imagenet"
    with pytest.raises(UserError, match="'rgb'"):
        info.with_normalize("rgb")
    assert info.to_dict()["input_size"] == [64, 64]


def test_model_info_of_legacy_objects():
    class Legacy:  # what wrappers carried before ModelInfo
        input_size, embedding_size, normalize, threshold, threshold_source = 48, 8, "imagenet", 0.4, "lfw"
        model_path = "/m.onnx"

        def __call__(self, x):
            return x.flatten(1)[:, :8]

    info = ModelInfo.of(Legacy())
    assert (info.input_size, info.embedding_size, info.normalize) == ((48, 48), 8, "imagenet")
    assert (info.threshold, info.threshold_source, info.source) == (0.4, "lfw", "/m.onnx")
    bare = ModelInfo.of(lambda x: x)  # says nothing: images are taken at the size they come
    assert bare.input_size is None and bare.normalize == "arcface" and bare.threshold is None
    given = ModelInfo(input_size=16, kind="random")
    holder = Legacy()
    holder.info = given
    assert ModelInfo.of(holder) is given
    assert isinstance(holder, Embedder) and not isinstance(Legacy(), Embedder)


# ---------------------------------------------------------------------------------------------- EmbedOptions


def test_embed_options():
    options = EmbedOptions()
    assert (options.flip, options.batch_size, options.device, options.normalize, options.amp_dtype) == \
        (True, 64, "cpu", None, None)
    assert options.precision == "fp32"
    assert EmbedOptions(amp_dtype="bf16").amp_dtype is torch.bfloat16
    assert EmbedOptions(amp_dtype=torch.bfloat16).precision == "bf16"
    assert EmbedOptions(normalize="imagenet").normalize_for(ModelInfo()) == "imagenet"
    assert EmbedOptions().normalize_for(ModelInfo(normalize="imagenet")) == "imagenet"
    made = EmbedOptions.make(EmbedOptions(batch_size=8), flip=False, normalize=None)
    assert (made.flip, made.batch_size, made.normalize) == (False, 8, None)
    with pytest.raises(UserError, match="normalize must be one of arcface, imagenet, got 'bgr'"):
        EmbedOptions(normalize="bgr")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UserError, match="batch_size"):
            EmbedOptions(batch_size=bad)
    with pytest.raises(UserError, match="autocast"):
        EmbedOptions(amp_dtype="int8")
    with pytest.raises(UserError, match="device"):
        EmbedOptions(device="abacus")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.flip = False


# ---------------------------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as training writes it (config, weights, last_eval) of a tiny random mbf."""
    from marginface.config import to_dict
    from marginface.train.runconfig import load_config
    from marginface.train.setup import build_model

    cfg = load_config(None, ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=64",
                             "data.input_norm=imagenet", "model.pretrained=null"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"config": to_dict(cfg), "model": model.state_dict(),
                "last_eval": {"synthetic": {"threshold": 0.37, "accuracy": 0.9}}}, path)
    return path


def _embeds(model, info: ModelInfo) -> None:
    out = model(torch.zeros(2, 3, *info.input_size))
    assert tuple(out.shape) == (2, info.embedding_size)


def test_checkpoint_and_random_backbone_info(checkpoint):
    from marginface.deploy.load import load_model, random_backbone

    model = load_model(checkpoint)
    info = model.info
    assert isinstance(model, Embedder) and info == ModelInfo(
        input_size=(32, 32), embedding_size=64, normalize="imagenet", threshold=0.37, threshold_source="synthetic",
        source=str(checkpoint), kind="checkpoint", precision="fp32", backbone="mbf")
    _embeds(model, info)
    assert load_model(checkpoint, normalize="arcface").info.normalize == "arcface"
    with pytest.raises(UserError, match="'bgr'"):
        load_model(checkpoint, normalize="bgr")
    from marginface.train.checkpoint import load_backbone  # the training side's loader: the same info

    assert load_backbone(str(checkpoint)).info == info
    rnd = random_backbone("mbf", embedding_size=32, input_size=48, width_mult=0.25)
    assert rnd.info == ModelInfo(input_size=(48, 48), embedding_size=32, kind="random", backbone="mbf")
    _embeds(rnd, rnd.info)


def test_onnx_torchscript_and_compiled_info(checkpoint, tmp_path):
    from marginface.deploy.compiled import CompiledEmbedder
    from marginface.deploy.export import export_onnx, export_torchscript
    from marginface.deploy.load import load_model

    source = load_model(checkpoint)
    export_onnx(source, tmp_path / "m.onnx")
    onnx = load_model(tmp_path / "m.onnx", threads=1)
    expected = dict(input_size=(32, 32), embedding_size=64, normalize="imagenet", threshold=pytest.approx(0.37),
                    threshold_source="synthetic", backbone="mbf")
    assert {k: getattr(onnx.info, k) for k in expected} == expected
    assert (onnx.info.kind, onnx.info.source, onnx.info.precision) == ("onnx", str(tmp_path / "m.onnx"), "fp32")
    assert (onnx.input_size, onnx.normalize, onnx.model_path) == ((32, 32), "imagenet", str(tmp_path / "m.onnx"))
    _embeds(onnx, onnx.info)
    assert load_model(tmp_path / "m.onnx", "arcface", threads=1).info.normalize == "arcface"

    export_torchscript(source, tmp_path / "m.ts")
    with pytest.raises(UserError, match="--trust-code"):
        load_model(tmp_path / "m.ts")
    ts = load_model(tmp_path / "m.ts", trust_code=True)
    assert {k: getattr(ts.info, k) for k in expected} == expected
    assert (ts.info.kind, ts.info.source) == ("torchscript", str(tmp_path / "m.ts"))
    _embeds(ts, ts.info)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert np.allclose(ts(x).numpy(), source(x).numpy(), atol=1e-4)

    compiled = CompiledEmbedder(source, "bf16")  # compiles on its first call only: not here
    assert compiled.info == source.info.replace(kind="compiled", precision="bf16")
    assert source.info.kind == "checkpoint"  # the source model is untouched


def test_face_embedder_leaves_the_callers_model_alone():
    from marginface.deploy.embedder import FaceEmbedder
    from marginface.deploy.load import random_backbone
    from marginface.evaluate.runner import embed_images, l2_normalize

    model = random_backbone("mbf", embedding_size=16, input_size=32, width_mult=0.25).train()
    before = (model.info, model.normalize, model.training)
    fe = FaceEmbedder(model, normalize="imagenet", detector=object(), options=EmbedOptions(batch_size=3))
    assert (model.info, model.normalize, model.training) == before
    assert fe.info.normalize == fe.normalize == "imagenet" and fe.input_size == (32, 32)
    assert (fe.flip, fe.batch_size, fe.options.normalize) == (True, 3, "imagenet")
    crops = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    got = fe.embed_crops(crops)
    want = l2_normalize(embed_images(model, crops, normalize="imagenet").astype(np.float64))
    assert np.allclose(got, want, atol=1e-5) and model.training  # eval only during the call
    assert not np.allclose(got, l2_normalize(embed_images(model, crops).astype(np.float64)), atol=1e-3)
    assert FaceEmbedder(model, detector=object(), flip=False, batch_size=0).options == \
        EmbedOptions(flip=False, batch_size=1, normalize="arcface")
