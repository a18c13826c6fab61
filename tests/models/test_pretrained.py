"""insightface arcface_torch weights: name tables both ways, architecture recognition, loading plain
state dicts through the CLI, wrong files, and ``export --format insightface-pth``.

The reference state dicts are built here from insightface's own module layout
(``recognition/arcface_torch/backbones/iresnet.py`` and ``mobilefacenet.py``), independently of
marginface's table, and run through a functional forward written from those sources, so a wrong
name map (or a wrong layer order) shows as different embeddings, not just as a failed load.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marginface import cli
from marginface.data.images import imwrite_rgb, read_image
from marginface.data.synthetic import render_identities
from marginface.data.transforms import to_tensor
from marginface.deploy.export import export_model
from marginface.deploy.load import load_model
from marginface.errors import UserError
from marginface.models import build_backbone
from marginface.models.insightface import (MBF_TABLE, from_insightface, recognise, to_insightface)

IRESNET = {"r18": (2, 2, 2, 2), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------------------------------------- the reference
class Maker:
    """Random tensors shaped like trained ones, under insightface's names."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.state: dict[str, torch.Tensor] = {}

    def conv(self, name, out_c, in_c, k):
        fan_in = in_c * k * k
        self.state[name] = torch.randn(out_c, in_c, k, k, generator=self.g) * (2.0 / fan_in) ** 0.5

    def bn(self, prefix, c, gain=(0.5, 1.5)):
        self.state[f"{prefix}.weight"] = gain[0] + (gain[1] - gain[0]) * torch.rand(c, generator=self.g)
        self.state[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=self.g)
        self.state[f"{prefix}.running_mean"] = 0.1 * torch.randn(c, generator=self.g)
        self.state[f"{prefix}.running_var"] = 0.5 + torch.rand(c, generator=self.g)
        self.state[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    def prelu(self, name, c):
        self.state[name] = 0.05 + 0.3 * torch.rand(c, generator=self.g)

    def linear(self, prefix, out_f, in_f, bias):
        self.state[f"{prefix}.weight"] = torch.randn(out_f, in_f, generator=self.g) / in_f ** 0.5
        if bias:
            self.state[f"{prefix}.bias"] = 0.1 * torch.randn(out_f, generator=self.g)


def reference_iresnet(layers, embedding=512, seed=0) -> dict:
    """insightface IResNet: conv1/bn1/prelu, layer1..4 of IBasicBlock (bn1, conv1, bn2, prelu, conv2,
    bn3, downsample.0/1 on each stage's first, stride-2 block), bn2, fc (512*7*7 -> D), features."""
    m = Maker(seed)
    m.conv("conv1.weight", 64, 3, 3)
    m.bn("bn1", 64)
    m.prelu("prelu.weight", 64)
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512)), 1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            m.bn(f"{p}.bn1", inplanes)
            m.conv(f"{p}.conv1.weight", planes, inplanes, 3)
            m.bn(f"{p}.bn2", planes)
            m.prelu(f"{p}.prelu.weight", planes)
            m.conv(f"{p}.conv2.weight", planes, planes, 3)
            m.bn(f"{p}.bn3", planes, gain=(0.05, 0.15))  # small residual branches keep r100 in range
            if b == 0:
                m.conv(f"{p}.downsample.0.weight", planes, inplanes, 1)
                m.bn(f"{p}.downsample.1", planes)
            inplanes = planes
    m.bn("bn2", 512)
    m.linear("fc", embedding, 512 * 7 * 7, bias=True)
    m.bn("features", embedding)
    m.state["features.weight"] = torch.ones(embedding)
    return m.state


# (prefix, in, out, kernel, stride, padding, groups, prelu) of every conv unit of insightface's mbf
def _mbf_units():
    units = [("layers.0", 3, 128, 3, 2, 1, 1, True), ("layers.1", 128, 128, 3, 1, 1, 64, True)]

    def depthwise(prefix, in_c, out_c, groups, stride):
        return [(f"{prefix}.layers.0", in_c, groups, 1, 1, 0, 1, True),
                (f"{prefix}.layers.1", groups, groups, 3, stride, 1, groups, True),
                (f"{prefix}.layers.2", groups, out_c, 1, 1, 0, 1, False)]

    blocks = [("layers.2", 128, 128, 128, 2, False)]
    blocks += [(f"layers.3.layers.{i}", 128, 128, 128, 1, True) for i in range(4)]
    blocks += [("layers.4", 128, 256, 256, 2, False)]
    blocks += [(f"layers.5.layers.{i}", 256, 256, 256, 1, True) for i in range(6)]
    blocks += [("layers.6", 256, 256, 512, 2, False)]
    blocks += [(f"layers.7.layers.{i}", 256, 256, 256, 1, True) for i in range(2)]
    return units, [(p, depthwise(p, i, o, g, s), residual) for p, i, o, g, s, residual in blocks]


def reference_mbf(embedding=512, seed=0) -> dict:
    m = Maker(seed)
    stem, blocks = _mbf_units()

    def unit(prefix, in_c, out_c, k, stride, pad, groups, act):
        m.conv(f"{prefix}.layers.0.weight", out_c, in_c // groups, k)
        m.bn(f"{prefix}.layers.1", out_c)
        if act:
            m.prelu(f"{prefix}.layers.2.weight", out_c)

    for u in stem:
        unit(*u)
    for _, units, _ in blocks:
        for u in units:
            unit(*u)
    unit("conv_sep", 256, 512, 1, 1, 0, 1, True)
    unit("features.layers.0", 512, 512, 7, 1, 0, 512, False)
    m.linear("features.layers.2", embedding, 512, bias=False)
    m.bn("features.layers.3", embedding)
    return m.state


def _bn(sd, p, x):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        False, 0.0, 1e-5)


def reference_iresnet_forward(sd, x, layers):
    x = F.prelu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], padding=1)), sd["prelu.weight"])
    for stage, blocks in enumerate(layers, 1):
        for b in range(blocks):
            p, stride = f"layer{stage}.{b}", 2 if b == 0 else 1
            out = F.conv2d(_bn(sd, f"{p}.bn1", x), sd[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(_bn(sd, f"{p}.bn2", out), sd[f"{p}.prelu.weight"])
            out = _bn(sd, f"{p}.bn3", F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1))
            identity = x
            if b == 0:
                identity = _bn(sd, f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride))
            x = out + identity
    x = torch.flatten(_bn(sd, "bn2", x), 1)
    return _bn(sd, "features", F.linear(x, sd["fc.weight"], sd["fc.bias"]))


def reference_mbf_forward(sd, x):
    stem, blocks = _mbf_units()

    def unit(x, prefix, in_c, out_c, k, stride, pad, groups, act):
        x = _bn(sd, f"{prefix}.layers.1", F.conv2d(x, sd[f"{prefix}.layers.0.weight"], None, stride, pad, 1, groups))
        return F.prelu(x, sd[f"{prefix}.layers.2.weight"]) if act else x

    for u in stem:
        x = unit(x, *u)
    for _, units, residual in blocks:
        y = x
        for u in units:
            y = unit(y, *u)
        x = x + y if residual else y
    x = unit(x, "conv_sep", 256, 512, 1, 1, 0, 1, True)
    x = torch.flatten(unit(x, "features.layers.0", 512, 512, 7, 1, 0, 512, False), 1)
    return _bn(sd, "features.layers.3", F.linear(x, sd["features.layers.2.weight"]))


def reference(name, embedding=512, seed=0):
    if name == "mbf":
        return reference_mbf(embedding, seed), reference_mbf_forward
    layers = IRESNET[name]
    return reference_iresnet(layers, embedding, seed), lambda sd, x: reference_iresnet_forward(sd, x, layers)


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------- name tables
def test_mbf_table_matches_both_networks_in_order():
    theirs = list(reference_mbf())
    ours = list(build_backbone("mbf").state_dict())
    assert len(MBF_TABLE) == len(theirs) == len(ours) == 333
    assert [t for t, _ in MBF_TABLE] == theirs  # every insightface name, in its module order
    assert [o for _, o in MBF_TABLE] == ours
    assert not set(theirs) & set(ours)  # all 333 names differ


def test_tables_round_trip_both_ways():
    ref = reference_mbf(embedding=128)
    ours = from_insightface(ref)
    back = to_insightface(ours, "mbf")
    assert list(back) == list(ref) and all(back[k] is ref[k] for k in ref)
    model = build_backbone("mbf", embedding_size=128)
    model.load_state_dict(ours)  # strict
    assert list(to_insightface(model.state_dict(), "mbf")) == list(ref)
    r18 = reference_iresnet(IRESNET["r18"])
    assert list(build_backbone("iresnet18").state_dict()) == list(r18)  # IResNet: the identity table
    assert to_insightface(r18, "iresnet18") == r18 == from_insightface(r18)
    with pytest.raises(UserError, match="insightface's arcface_torch has no mobilefacenet"):
        to_insightface({}, "mobilefacenet")


@pytest.mark.parametrize("name, options, embedding, size", [
    ("mbf", {}, 512, 112), ("mbf", {"width_mult": 0.5}, 128, 64), ("mobilefacenet", {}, 128, 112),
    ("mobilefacenet_se", {}, 256, 112), ("iresnet34", {}, 512, 112), ("iresnet50_se", {}, 256, 112),
    ("iresnet18", {"width_mult": 0.5}, 64, 56), ("resnet50", {}, 512, 112), ("iresnet200", {}, 512, 112),
])
def test_recognise_every_backbone_we_build(name, options, embedding, size):
    with torch.device("meta"):  # shapes only: nothing allocated
        state = build_backbone(name, embedding, size, **options).state_dict()
    found = recognise(state)
    assert (found.name, found.embedding_size, found.options) == (name, embedding, options)
    assert found.input_size == (64 if size == 56 else size)  # 56 and 64 both end in a 4x4 map


# ---------------------------------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    for i, face in enumerate(render_identities(range(2), 1, 112, seed=3)):
        imwrite_rgb(folder / f"{i}.png", face)
    return folder


@pytest.mark.parametrize("name", ["r18", "r50", "r100", "mbf"])
def test_insightface_state_dict_through_the_cli(name, faces, tmp_path, capsys):
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend
    state, forward = reference(name)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    images = sorted(faces.glob("*.png"))[: 1 if name == "r100" else 2]  # r100 forward on CPU: batch 1
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "f.npy"
    assert cli.main(["embed", "--model", str(path), "--images", str(folder), "--out", str(out),
                     "--no-flip", "--device", "cpu", "--json"]) == 0
    assert '"dim": 512' in capsys.readouterr().out
    x = to_tensor(np.stack([read_image(p) for p in images]))
    features = np.load(out)
    with torch.no_grad():
        expected = forward(state, x).numpy()
    assert np.abs(unit(features) - unit(expected)).max() < 1e-5  # the reference architecture itself
    if name in ("r50", "r100"):
        return  # big: one load and forward only (2 shared CPU cores)
    ours = build_backbone({"mbf": "mbf"}.get(name, f"iresnet{name[1:]}")).eval()
    ours.load_state_dict(from_insightface(state))  # our model, the same weights loaded by hand
    with torch.no_grad():
        assert np.abs(unit(features) - unit(ours(x).numpy())).max() < 1e-5
    info = load_model(path).info
    assert (info.backbone, info.embedding_size, info.input_size, info.normalize, info.kind) == (
        {"mbf": "mbf"}.get(name, f"iresnet{name[1:]}"), 512, (112, 112), "arcface", "state_dict")


def test_backbone_override_and_mismatch_lines(tmp_path):
    state = reference_iresnet(IRESNET["r18"], embedding=128)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict_backbone": {f"module.{k}": v for k, v in state.items()}}, path)  # arcface_torch ckpt, DDP
    assert load_model(path, backbone="iresnet18").info.embedding_size == 128
    with pytest.raises(UserError) as err:
        load_model(path, backbone="iresnet34")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: weights do not fit iresnet34")
    assert "layer1.2.bn1.weight (64,) missing" in message
    mbf = to_insightface(build_backbone("mbf").state_dict(), "mbf")
    mbf["conv_sep.layers.0.weight"] = torch.zeros(512, 128, 1, 1)  # a wrong shape in a known layout
    torch.save(mbf, path)
    with pytest.raises(UserError, match=r"conv_head\.0\.weight \(512, 128, 1, 1\) in the file vs \(512, 256, 1, 1\)"):
        load_model(path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["other", "truncated", "code", "partial"])
def test_wrong_files_are_one_error_line_and_run_nothing(kind, tmp_path, capsys):
    path = tmp_path / "backbone.pth"
    marker = tmp_path / "executed"
    if kind == "other":  # a detector's weights: a state dict, but no face backbone
        torch.save({"conv1.weight": torch.zeros(10, 3, 3, 3), "prelu1.weight": torch.zeros(10)}, path)
    elif kind == "truncated":
        torch.save(reference_iresnet(IRESNET["r18"]), path)
        path.write_bytes(path.read_bytes()[:100_000])
    elif kind == "code":
        with open(path, "wb") as handle:
            pickle.dump({"conv1.weight": _RunsCode(marker)}, handle, protocol=2)
    else:  # an r18 missing its last block
        torch.save({k: v for k, v in reference_iresnet(IRESNET["r18"]).items() if not k.startswith("layer4.1.")}, path)
    rc = cli.main(["eval", "--model", str(path), "--sets", "synthetic"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert not marker.exists()
    expected = {"other": "not a face backbone marginface builds", "truncated": "not a readable",
                "code": "not a readable", "partial": "IResNet with blocks per stage (2, 2, 2, 1)"}[kind]
    assert expected in err


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_export_insightface_pth_has_the_reference_names(name, tmp_path):
    state, forward = reference(name, embedding=256, seed=1)
    ours = tmp_path / "ours.pth"
    torch.save(from_insightface(state), ours)  # a plain state dict in our names
    out = tmp_path / "backbone.pth"
    report = export_model(str(ours), out, fmt="insightface-pth")
    assert report["insightface_name"] == name and report["num_features"] == 256
    assert report["parity"]["max_abs_diff"] == 0.0  # the exported file loads back to the same model
    written = torch.load(out, weights_only=True)
    # what insightface's get_model(name, num_features=256).load_state_dict() needs: its names and shapes
    assert list(written) == list(state)
    assert all(written[k].shape == state[k].shape and torch.equal(written[k], state[k]) for k in state)
    x = to_tensor(render_identities([0], 1, 112, seed=0))
    with torch.no_grad():
        assert torch.allclose(forward(written, x), load_model(ours)(x), atol=1e-5)


def test_export_insightface_pth_refuses_what_insightface_lacks(tmp_path):
    for name, options in (("mobilefacenet", {}), ("mbf", {"width_mult": 0.5})):
        path = tmp_path / f"{name}.pth"
        torch.save(build_backbone(name, **options).state_dict(), path)
        with pytest.raises(UserError, match="insightface"):
            export_model(str(path), tmp_path / "x.pth", fmt="insightface-pth")
