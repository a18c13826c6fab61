"""Backbones: published sizes, shapes, argument errors, pretrained loading, AMP/trace/ONNX, checkpointing.

Big models are built on the "meta" device (shapes only, no memory, no compute) to keep this fast.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marginface.errors import UserError
from marginface.models import build_backbone, count_macs, count_parameters, list_backbones
from marginface.models.registry import BACKBONES, OPTION_CHECKS

@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These models are tiny per test; with 2 threads on a busy 2-core box, OpenMP spin-waiting
    makes them 10-50× slower, one thread is immune to that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DEFAULT_EMBEDDING = {"mobilefacenet": 128, "mobilefacenet_se": 256}
REAL_FORWARD_AT_112 = {"mobilefacenet", "mobilefacenet_se", "mbf", "iresnet18"}


def build_on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


def within(measured: float, published: float, tolerance: float = 0.05) -> bool:
    return abs(measured - published) <= tolerance * published


@pytest.mark.parametrize("name, embedding_size, params, macs", [
    ("mobilefacenet", 128, 0.99e6, 221e6),  # Chen et al. 2018, Table 2
    ("mbf", 512, 2.06e6, 0.44e9),  # insightface arcface_torch "MobileFaceNet 0.45G"
    ("iresnet50", 512, 43.6e6, None),
    ("iresnet100", 512, 65.2e6, None),
])
def test_published_sizes(name, embedding_size, params, macs):
    if macs is None:  # parameters only: no forward for the big ones
        model = build_on_meta(name, embedding_size=embedding_size)
    else:
        model = build_backbone(name, embedding_size=embedding_size)
        assert within(count_macs(model, 112), macs), count_macs(model, 112)
    assert within(count_parameters(model), params), count_parameters(model)


def test_every_option_has_a_check():
    options = {option for entry in BACKBONES.values() for option in entry.option_names()}
    assert options <= set(OPTION_CHECKS)


@pytest.mark.parametrize("name", list_backbones())
def test_output_shape_at_112(name):
    embedding_size = DEFAULT_EMBEDDING.get(name, 512)
    if name in REAL_FORWARD_AT_112:
        torch.manual_seed(0)
        model = build_backbone(name).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 112, 112))
        assert torch.isfinite(out).all()
    else:
        model = build_on_meta(name)
        out = model(torch.empty(2, 3, 112, 112, device="meta"))
    assert out.shape == (2, embedding_size)
    assert model.embedding_size == embedding_size and model.input_size == 112


@pytest.mark.parametrize("input_size", [56, 64])
def test_mbf_small_inputs(input_size):
    model = build_backbone("mbf", embedding_size=256, input_size=input_size, width_mult=0.5).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, input_size, input_size))
    assert out.shape == (3, 256) and torch.isfinite(out).all()
    assert model.input_size == input_size
    assert count_macs(model) == count_macs(model, input_size)  # defaults to the model's own size


@pytest.mark.parametrize("name", ["iresnet18", "resnet50", "mobilefacenet"])
def test_fc_input_follows_input_size(name):
    model = build_on_meta(name, input_size=56)
    assert model(torch.empty(2, 3, 56, 56, device="meta")).shape[1] == model.embedding_size


def test_width_mult_scales_channels_to_multiples_of_8():
    full, half = build_on_meta("mbf"), build_on_meta("mbf", width_mult=0.5)
    assert count_parameters(half) < 0.4 * count_parameters(full)
    convs = [m for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.out_channels % 8 == 0 for conv in convs)
    assert count_parameters(build_on_meta("iresnet18", width_mult=0.5)) < count_parameters(build_on_meta("iresnet18"))


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as info:
        build_backbone("mobilefacenett")
    message = str(info.value)
    assert "'mobilefacenett'" in message and "\n" not in message
    assert all(name in message for name in list_backbones())


@pytest.mark.parametrize("input_size", [100, 60, 8, 0, 112.0, True])
def test_bad_input_size(input_size):
    with pytest.raises(UserError, match="input_size"):
        build_backbone("mbf", input_size=input_size)


@pytest.mark.parametrize("name, options, needle", [
    ("mbf", {"depth": 3}, "depth"),
    ("mbf", {"pretrained": "x.pth"}, "pretrained"),
    ("mbf", {"width_mult": 0}, "width_mult"),
    ("iresnet18", {"dropout": 1.0}, "dropout"),
    ("iresnet18", {"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
    ("resnet50", {"pretrained": 3}, "pretrained"),
    ("mbf", {"embedding_size": 0}, "embedding_size"),
])
def test_bad_options(name, options, needle):
    with pytest.raises(UserError, match=needle):
        build_backbone(name, **options)


def torchvision_resnet50_state_dict() -> dict[str, torch.Tensor]:
    """Random weights under torchvision's ResNet-50 names (old format: no num_batches_tracked)."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def add_bn(prefix: str, channels: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{suffix}"] = (channels,)

    add_bn("bn1", 64)
    in_channels = 64
    for layer, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (planes, in_channels, 1, 1)
            add_bn(f"{prefix}.bn1", planes)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            add_bn(f"{prefix}.bn2", planes)
            shapes[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
            add_bn(f"{prefix}.bn3", planes * 4)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (planes * 4, in_channels, 1, 1)
                add_bn(f"{prefix}.downsample.1", planes * 4)
            in_channels = planes * 4
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 2048), (1000,)
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    for key in state:
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 0.5
    learnt = sum(t.numel() for key, t in state.items() if "running_" not in key)
    assert learnt == 25_557_032  # torchvision's published ResNet-50 parameter count
    return state


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    state = torchvision_resnet50_state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(state, path)
    return path, state


def test_resnet50_loads_torchvision_weights(torchvision_file):
    path, state = torchvision_file
    model = build_backbone("resnet50", input_size=56, pretrained=str(path))
    loaded = model.state_dict()
    for key in ("conv1.weight", "layer3.2.conv2.weight", "layer4.0.downsample.1.running_var", "bn1.bias"):
        assert torch.equal(loaded[key], state[key]), key
    assert model.head.fc.weight.shape == (512, 2048 * 4 * 4)  # the head is new, not the 1000-class fc


def test_resnet50_pretrained_errors(torchvision_file, tmp_path):
    path, state = torchvision_file
    with pytest.raises(UserError, match="missing.pth"):
        build_on_meta("resnet50", pretrained=str(tmp_path / "missing.pth"))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        build_on_meta("resnet50", pretrained=str(garbage))

    small_stem = tmp_path / "stem3x3.pth"
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, small_stem)
    with pytest.raises(UserError, match=r"stem3x3.pth.*264 of 265.*conv1.weight") as info:
        build_backbone("resnet50", input_size=56, pretrained=str(small_stem))
    assert "\n" not in str(info.value)

    deeper = tmp_path / "deeper.pth"
    torch.save({**state, "layer3.6.conv1.weight": torch.zeros(256, 1024, 1, 1)}, deeper)
    with pytest.raises(UserError, match=r"unexpected \(1\): layer3.6.conv1.weight"):
        build_backbone("resnet50", input_size=56, pretrained=str(deeper))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=1)


@pytest.mark.parametrize("name, input_size", [("mbf", 112), ("iresnet18", 56), ("resnet50", 32)])
def test_channels_last_bf16_autocast_matches_fp32(name, input_size):
    torch.manual_seed(0)
    model = build_backbone(name, input_size=input_size).eval()
    x = torch.randn(2, 3, input_size, input_size)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.to(memory_format=torch.channels_last))
    assert torch.isfinite(out.float()).all()
    assert (cosine(out, reference) > 0.99).all()


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    import marginface.models.iresnet as iresnet

    calls = []
    real_checkpoint = iresnet.checkpoint
    monkeypatch.setattr(iresnet, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))

    torch.manual_seed(0)
    plain = build_backbone("iresnet18", input_size=32, width_mult=0.25)
    checkpointed = build_backbone("iresnet18", input_size=32, width_mult=0.25, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, checkpointed):
        model.train()
        model(x).square().sum().backward()
    assert len(calls) == 4  # one per stage, only for the checkpointed model
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["mbf", "iresnet18"])
def test_jit_trace_matches_eager(name):
    model = build_backbone(name, input_size=32, width_mult=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x))


def test_onnx_export_matches_eager(tmp_path):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = build_backbone("mbf", input_size=56, width_mult=0.5).eval()
    path = tmp_path / "mbf.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 56, 56),), path, input_names=["input"],
                      output_names=["embedding"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 56, 56)  # another batch size than the export's
    (out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-3, atol=1e-4)


def test_count_macs_restores_training_mode():
    model = build_backbone("mobilefacenet", input_size=56).train()
    count_macs(model)
    assert all(module.training for module in model.modules())


def test_se_iresnet_adds_squeeze_excitation_to_every_block():
    plain, se = build_backbone("iresnet50"), build_backbone("iresnet50_se")
    blocks = [m for m in se.modules() if type(m).__name__ == "IBasicBlock"]
    assert len(blocks) == 24 and all(type(b.se).__name__ == "SqueezeExcite" for b in blocks)
    # SE adds two 1x1 convs of C -> C/16 -> C per block: ~0.2M parameters on top of 43.6M
    extra = count_parameters(se) - count_parameters(plain)
    assert 150_000 < extra < 300_000, extra
    small = build_backbone("iresnet50_se", input_size=32, width_mult=0.25)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 512)
