"""Compiled inference (marginface.deploy.compiled): Inductor fp32 / bf16 / x86 int8 embed like eager."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from marginface.deploy.compiled import DEFAULT_CHUNK, CompiledEmbedder, quantize_x86
from marginface.deploy.load import trained_looking
from marginface.errors import UserError
from marginface.models import build_backbone
from marginface.models.layers import Conv2d as FastConv2d

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao not installed (pip install 'marginface[int8]')")


@pytest.fixture(scope="module")
def model():
    """A small mbf whose BatchNorm statistics and PReLU slopes look trained."""
    torch.manual_seed(0)
    return trained_looking(build_backbone("mbf", embedding_size=64, input_size=64, width_mult=0.25))


@pytest.fixture(scope="module")
def batch():
    return torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(model, batch):
    with torch.no_grad():
        return model(batch)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double()).min().item()


def test_fp32_matches_eager_in_padded_chunks_and_leaves_the_model_alone(model, batch, reference):
    embedder = CompiledEmbedder(model, "fp32", batch_size=4)  # 5 images: a full chunk + a padded one
    assert embedder.info.input_size == (model.input_size,) * 2 and embedder.info.embedding_size == 64
    assert (embedder.info.kind, embedder.info.precision) == ("compiled", "fp32")
    out = embedder(batch)
    assert out.shape == (5, 64) and out.dtype == torch.float32
    assert min_cosine(out, reference) > 0.9999
    assert (out - reference).abs().max().item() < 1e-3 * reference.abs().max().item()
    again = embedder(batch[:3])  # another size reuses the same compiled batch-4 graph (padded)
    assert torch.allclose(again, out[:3], atol=1e-5)
    assert any(type(m) is FastConv2d for m in model.modules())  # the caller's model keeps its fast layers


def test_bf16_is_close_to_fp32(model, batch, reference):
    out = CompiledEmbedder(model, "bf16", batch_size=8)(batch)
    assert out.dtype == torch.float32 and 0.995 < min_cosine(out, reference) < 1.0 - 1e-9  # close, not identical


@needs_torchao
def test_int8_quantises_every_layer_and_stays_close(model, batch, reference):
    quantized = quantize_x86(model, batch)
    weight_quant = [n for n in quantized.graph.nodes if "dequantize_per_channel" in str(n.target)]
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(weight_quant) == len(layers)  # every conv and the linear head carry int8 weights
    out = CompiledEmbedder(model, "int8", batch_size=8)(batch)  # calibrated on this first batch
    cos = min_cosine(out, reference)
    assert 0.98 < cos < 0.99999, cos  # int8 rounding is visible but small


@needs_torchao
def test_int8_calibrated_on_a_single_image_still_runs_any_batch(model, batch):
    embedder = CompiledEmbedder(model, "int8", batch_size=1)
    first = embedder(batch[:1])  # calibration = this one image
    assert first.shape == (1, 64) and embedder(batch).shape == (5, 64)


@needs_torchao
def test_default_chunk_and_calibration_on_the_whole_first_batch(model):
    x = torch.randn(20, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    auto = CompiledEmbedder(model, "int8")  # CPU default: chunks of 16 (cache-sized, faster per image)
    assert auto.batch_size == DEFAULT_CHUNK["cpu"] == 16
    out = auto(x)  # calibrated on all 20, run as 16 + 4 padded
    assert out.shape == (20, 64)
    assert torch.equal(out, CompiledEmbedder(model, "int8", calibration=x)(x))
    assert not torch.equal(out, CompiledEmbedder(model, "int8", calibration=x[:16])(x))


@pytest.mark.parametrize("kwargs,message", [
    ({"precision": "fp16"}, "precision must be one of"),
    ({"precision": "fp32", "batch_size": 0}, "batch_size must be >= 1"),
    ({"precision": "int8", "device": "cuda"}, "x86 CPU path"),
])
def test_bad_settings_are_one_line_errors(model, kwargs, message):
    with pytest.raises(UserError, match=message):
        CompiledEmbedder(model, **kwargs)


def test_needs_a_pytorch_model():
    with pytest.raises(UserError, match="needs a PyTorch model"):
        CompiledEmbedder(lambda x: x, "fp32")


@needs_torchao
def test_a_model_that_cannot_be_exported_is_a_one_line_error():
    class Branchy(torch.nn.Module):  # data-dependent control flow: torch.export refuses it
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x).mean((2, 3))
            return y if y.sum() > 0 else -y

    with pytest.raises(UserError, match="compiling the model for int8 inference failed: .+") as info:
        CompiledEmbedder(Branchy().eval(), "int8", batch_size=2)(torch.randn(2, 3, 8, 8))
    assert "\n" not in str(info.value)


@needs_torchao
def test_compiled_int8_computes_its_quantised_graph_on_this_cpu(model, batch):
    """oneDNN's int8 kernels equal the quantised graph run op by op (a reference in float), on any
    x86 CPU: without VNNI 8-bit weights saturate its int16 sums (cosine 0.92 on an AVX2 EPYC), so
    the weight range follows the CPU (marginface.hardware.int8_weight_range)."""
    quantized = quantize_x86(model, batch)
    with torch.no_grad():
        reference = quantized(batch)
    compiled = CompiledEmbedder(model, "int8", batch_size=8)(batch)
    assert min_cosine(compiled, reference) > 0.999


@needs_torchao
def test_an_8bit_package_is_refused_where_int8_would_saturate(model, batch, tmp_path, monkeypatch):
    from marginface.deploy import compiled as C

    embedder = CompiledEmbedder(model, "int8", batch_size=2)
    monkeypatch.setattr(C, "int8_weight_range", lambda: (-128, 127))
    embedder(batch[:2])
    path = embedder.save(tmp_path / "m.pt2")
    monkeypatch.setattr(C, "has_int8_dot_product", lambda: True)
    assert CompiledEmbedder.load(path, trust_code=True).metadata["int8_weight_range"] == [-128, 127]
    monkeypatch.setattr(C, "has_int8_dot_product", lambda: False)
    with pytest.raises(UserError, match="8-bit weights.*no VNNI.*export it again"):
        CompiledEmbedder.load(path, trust_code=True)
