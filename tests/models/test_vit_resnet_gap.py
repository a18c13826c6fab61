"""The backbones of issue 17: FaceID's ResNet-50 with global average pooling (``resnet50_gap``) and
arcface_torch's Vision Transformers (``vit_t``, ``vit_s``, ``vit_b``): published sizes, the
training-only token masking and drop path, arcface_torch's tensor names, torchvision weights,
recognition from a plain state dict, and ``train --dry-run``."""
from __future__ import annotations

import json

import pytest
import torch

from marginface import cli
from marginface.errors import UserError
from marginface.models import build_backbone, count_macs, count_parameters
from marginface.models.insightface import recognise
from marginface.models.pretrained import load_pretrained
from marginface.models.vit import VIT_CONFIGS, DropPath

from tests.models.test_models import torchvision_resnet50_state_dict


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def on_meta(name: str, **kwargs):
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


TORCHVISION_TRUNK = 25_557_032 - (1000 * 2048 + 1000)  # torchvision's ResNet-50 less its ImageNet fc


@pytest.mark.parametrize("input_size", [112, 224, 64])
def test_resnet50_gap_size_does_not_depend_on_the_input(input_size):
    model = on_meta("resnet50_gap", input_size=input_size)
    assert count_parameters(model) == TORCHVISION_TRUNK + 2048 * 512 + 512 == 24_557_120
    assert model(torch.empty(2, 3, input_size, input_size, device="meta")).shape == (2, 512)
    # the flattening resnet50 is a different network: 229M parameters at 224 px
    assert count_parameters(on_meta("resnet50", input_size=224)) > 200e6


def test_resnet50_gap_macs_are_torchvisions():
    assert abs(count_macs(on_meta("resnet50_gap", input_size=224)) - 4.09e9) < 0.05e9  # ResNet-50 "4.1 GFLOPs"


def test_resnet50_gap_loads_torchvision_weights(tmp_path):
    state = torchvision_resnet50_state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    model = build_backbone("resnet50_gap", input_size=64, pretrained=str(path))
    loaded = model.state_dict()
    for key in ("conv1.weight", "layer4.2.conv3.weight", "layer2.0.downsample.1.running_mean"):
        assert torch.equal(loaded[key], state[key]), key
    assert model.embedding.weight.shape == (512, 2048)  # new, not the 1000-class fc
    # model.pretrained takes the same file for this backbone
    fresh = build_backbone("resnet50_gap", input_size=64)
    load_pretrained(fresh, path, "resnet50_gap")
    assert torch.equal(fresh.state_dict()["layer3.5.bn2.weight"], state["layer3.5.bn2.weight"])
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, broken)
    with pytest.raises(UserError, match=r"do not fit resnet50_gap: 264 of 265 .*missing \(1\): layer1.0.conv1.weight"):
        build_backbone("resnet50_gap", pretrained=str(broken))


@pytest.mark.parametrize("name, params, gmacs", [
    # parameters: arcface_torch's VisionTransformer at 112 px, 512-d, counted from its layer shapes
    # (per block 12·C² + 10·C; patch conv, pos_embed, mask token, final LayerNorm, feature head);
    # MACs: its README's "ViT-T-1.5G" and "ViT-B-11G" (vit_s is not in that table)
    ("vit_t", 19_137_792, 1.5e9),
    ("vit_s", 76_023_296, None),
    ("vit_b", 113_833_472, 11e9),
])
def test_vit_published_sizes(name, params, gmacs):
    width, depth, heads = VIT_CONFIGS[name]
    tokens = 12 * 12
    by_hand = (depth * (12 * width * width + 10 * width) + (3 * 81 * width + width) + tokens * width + width
               + 2 * width + tokens * width * width + 2 * width + width * 512 + 2 * 512)
    model = on_meta(name)
    assert count_parameters(model) == by_hand == params
    macs = count_macs(model)
    if gmacs is not None:
        assert abs(macs - gmacs) <= 0.05 * gmacs, macs
    attention = depth * 2 * tokens * tokens * width  # Q·Kᵀ and A·V are counted too
    linear_only = depth * 12 * width * width * tokens + 3 * 81 * width * tokens + tokens * width * width + width * 512
    assert macs == linear_only + attention


def test_vit_has_arcface_torch_tensor_names():
    names = list(on_meta("vit_t").state_dict())
    assert names[:3] == ["pos_embed", "mask_token", "patch_embed.proj.weight"]
    assert {"blocks.11.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "feature.0.weight",
            "feature.3.running_var"} <= set(names)
    assert "blocks.0.attn.qkv.bias" not in names  # qkv without bias
    assert len([n for n in names if n.startswith("blocks.")]) == 12 * 11


def test_vit_masking_and_drop_path_act_only_in_training():
    torch.manual_seed(0)
    model = build_backbone("vit_t", input_size=64, mask_ratio=0.25, drop_path=0.5)
    x = torch.randn(3, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b) and a.shape == (3, 512)  # deterministic at inference
    # training: a random quarter of the 49 tokens is replaced by the mask token after the blocks
    seen = {}

    def keep(_module, _inputs, output):
        seen["tokens"] = output.shape[1]

    handle = model.blocks[0].register_forward_hook(keep)
    model.train()
    out = model(x)
    handle.remove()
    assert seen["tokens"] == int(49 * 0.75) == 36
    out.square().sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    # drop path: rates rise linearly over the blocks, from 0 to the option's value
    rates = [block.drop_path.rate for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    path = DropPath(0.5).train()
    y = path(torch.ones(1000, 4))
    kept = (y != 0).all(dim=1)
    assert torch.equal(y[kept], torch.full_like(y[kept], 2.0)) and 350 < int(kept.sum()) < 650
    no_mask = build_backbone("vit_t", input_size=64, mask_ratio=0.0).train()
    handle = no_mask.blocks[0].register_forward_hook(keep)
    no_mask(x)
    handle.remove()
    assert seen["tokens"] == 49


@pytest.mark.parametrize("options, needle", [({"mask_ratio": 1.0}, "mask_ratio"), ({"drop_path": -0.1}, "drop_path"),
                                             ({"width_mult": 0.5}, "width_mult")])
def test_vit_bad_options(options, needle):
    with pytest.raises(UserError, match=needle):
        build_backbone("vit_s", **options)


@pytest.mark.parametrize("name, size", [("vit_t", 112), ("vit_s", 64), ("vit_b", 112), ("resnet50_gap", 112)])
def test_recognised_from_a_plain_state_dict(name, size):
    state = on_meta(name, embedding_size=256, input_size=size).state_dict()
    found = recognise(state)
    assert (found.name, found.embedding_size, found.input_size) == (name, 256, size)


def test_vit_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_backbone("vit_t", input_size=32, mask_ratio=0.0, drop_path=0.0)
    ckpt = build_backbone("vit_t", input_size=32, mask_ratio=0.0, drop_path=0.0, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, ckpt):
        model.train()
        model(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backbone", ["vit_t", "resnet50_gap"])
def test_train_dry_run_builds_them(backbone, tmp_path, capsys):
    rc = cli.main(["train", "--dry-run", "--json", "--out", str(tmp_path / "run"), "--set",
                   f"model.backbone={backbone}", "model.input_size=112", "model.width_mult=1.0",
                   "data.train=synthetic", "data.val=[]", "data.synthetic.identities=4",
                   "data.synthetic.images_per_identity=2", "train.batch_size=8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(out)
    assert summary["config"]["model"]["backbone"] == backbone
    assert summary["backbone_params"] == count_parameters(on_meta(backbone))
    assert summary["first_batch"] == {"images": [8, 3, 112, 112], "embeddings": [8, 512]}


def test_vit_exports_to_onnx_opset_13_and_matches_eager(tmp_path):
    pytest.importorskip("onnxruntime", reason="the ONNX export check needs onnxruntime: pip install 'marginface[onnx]'")
    from marginface.deploy.export import export_onnx
    from marginface.deploy.load import load_model

    torch.manual_seed(0)
    model = build_backbone("vit_t", input_size=32).eval()
    path = export_onnx(model, tmp_path / "vit_t.onnx")  # BatchNorm folded, opset 13, dynamic batch
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    got = torch.as_tensor(load_model(path)(x))
    assert torch.nn.functional.cosine_similarity(got, expected).min() > 0.9999
