"""The CPU training speed levers keep the numbers: fast PReLU, bf16 + channels_last, torch.compile,
the glibc keep-memory setting. Speed itself is measured in benchmarks/train_throughput.py, not here."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from marginface.train.runconfig import load_config
from marginface.data.synthetic import synthetic_pair_set
from marginface.data.transforms import to_tensor
from marginface.models import build_backbone
from marginface.models.layers import Conv2d as FastConv2d
from marginface.models.layers import PReLU, _PReLUFunction, regrouped_weight, set_fast_prelu
from marginface import malloc
from marginface.train.trainer import Trainer

TINY = ["model.input_size=32", "model.width_mult=0.25", "model.embedding_size=128",
        "data.synthetic.identities=60", "data.synthetic.images_per_identity=10",
        "data.synthetic.val_identities=60", "data.synthetic.val_images_per_identity=4",
        "data.synthetic.val_pairs=600", "train.batch_size=64", "train.max_steps=100",
        "schedule.warmup_steps=10", "eval.every=0", "train.log_every=1000"]
PLAIN = ["train.amp=none", "train.channels_last=false", "train.fast_layers=false", "train.cpu_keep_memory=false"]
OPTIMISED = ["train.amp=bf16", "train.channels_last=true", "train.fast_layers=true", "train.cpu_keep_memory=true"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stock_copy(model: nn.Module) -> nn.Module:
    stock = copy.deepcopy(model)
    set_fast_prelu(stock, False)
    return stock


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).min())


# ------------------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize("shape,channels", [((3, 4, 5, 5), 4), ((3, 4), 4), ((3, 1, 5, 5), 1), ((3, 4, 5, 5), 1)])
def test_fast_prelu_gradients_are_exact(shape, channels):
    torch.manual_seed(0)
    weight = torch.empty(channels, dtype=torch.double).uniform_(-1.5, 1.5).requires_grad_()
    x = torch.randn(shape, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_PReLUFunction.apply, (x, weight))
    x.data.view(-1)[:3] = 0.0  # PReLU's rule at exactly 0 (slope side), as the stock kernel
    fast, stock = PReLU(channels).double(), nn.PReLU(channels).double()
    fast.weight.data.copy_(weight.data)
    stock.weight.data.copy_(weight.data)
    g = torch.randn(shape, dtype=torch.double)
    got = torch.autograd.grad(fast(x), (x, fast.weight), g)
    want = torch.autograd.grad(stock(x), (x, stock.weight), g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_prelu_matches_stock_in_fp32_and_bf16(channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(8, 16, 12, 12).contiguous(memory_format=fmt)
    g = torch.randn(8, 16, 12, 12).contiguous(memory_format=fmt)
    fast, stock = PReLU(16), nn.PReLU(16)
    fast.weight.data.uniform_(0, 0.5)
    stock.weight.data.copy_(fast.weight.data)
    for dtype in (torch.float32, torch.bfloat16):
        out = {}
        for name, m in (("fast", fast), ("stock", stock)):
            xi = x.detach().clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y = m(xi.to(dtype))
            gx, gw = torch.autograd.grad(y, (xi, m.weight), g.to(y.dtype))
            out[name] = (y.float(), gx.float(), gw.float(), y.dtype, gw.dtype)
            if channels_last:
                assert gx.is_contiguous(memory_format=torch.channels_last)
        (y1, gx1, gw1, ty1, tw1), (y2, gx2, gw2, ty2, tw2) = out["fast"], out["stock"]
        assert ty1 == ty2 and tw1 == tw2 == torch.float32
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert torch.allclose(y1, y2, rtol=tol, atol=tol) and torch.allclose(gx1, gx2, rtol=tol, atol=tol)
        # the fast path sums the slope gradient in fp32 even for bf16 maps, the stock one in bf16
        assert torch.allclose(gw1, gw2, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)


def test_fast_prelu_is_a_drop_in_for_checkpoints_and_deploy():
    model = build_backbone("mbf", input_size=32, width_mult=0.25)
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert prelus and all(type(m) is PReLU for m in prelus)  # the fast layer is the default
    stock = _stock_copy(model)
    assert all(type(m) is nn.PReLU for m in stock.modules() if isinstance(m, nn.PReLU))
    assert list(model.state_dict()) == list(stock.state_dict())  # same keys: `...weight`
    stock.load_state_dict(model.state_dict())
    assert set_fast_prelu(stock, True) == len(prelus) and set_fast_prelu(stock, True) == 0
    from marginface.deploy.fold import MaxFormPReLU, count_batchnorm, fold_batchnorm, rewrite_prelu

    rewritten = rewrite_prelu(copy.deepcopy(model))
    assert sum(isinstance(m, MaxFormPReLU) for m in rewritten.modules()) == len(prelus)
    # torch.fx sees the fast layers as leaf modules (call_module), so every BN still folds
    model.eval()
    folded = fold_batchnorm(model)
    assert count_batchnorm(folded) == 0
    calls = {n.target for n in folded.graph.nodes if n.op == "call_module"}
    assert "stem.0.2" in calls and "stem.0.0" in calls  # the first PReLU and conv, as nodes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), rtol=1e-4, atol=1e-4)
    iresnet = build_backbone("iresnet18", input_size=32, width_mult=0.25)
    assert type(iresnet.prelu) is PReLU and "prelu.weight" in iresnet.state_dict()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fast_path_only_when_a_gradient_is_wanted():
    calls = []
    original = _PReLUFunction.forward

    def spy(ctx, x, w):
        calls.append(1)
        return original(ctx, x, w)

    m = PReLU(4)
    x = torch.randn(2, 4, 3, 3)
    _PReLUFunction.forward = staticmethod(spy)
    try:
        with torch.no_grad():
            m(x)
        m.weight.requires_grad_(False)
        m(x)  # nothing needs a gradient
        traced = torch.jit.trace(m, x)  # tracing sees the stock op
        assert not calls
        m.weight.requires_grad_(True)
        m(x).sum().backward()
        assert calls
    finally:
        _PReLUFunction.forward = original
    assert "prelu" in str(traced.graph)
    scripted = torch.jit.script(PReLU(4))
    assert torch.allclose(scripted(x), torch.nn.functional.prelu(x, scripted.weight))


def test_onnx_export_of_the_fast_layer_is_a_native_prelu(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from marginface.deploy.export import export_onnx

    torch.manual_seed(0)
    model = build_backbone("mbf", input_size=32, width_mult=0.25).eval()
    out = export_onnx(model, tmp_path / "m.onnx", prelu="native")
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "PRelu" in ops
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert _min_cosine(ref, torch.from_numpy(got)) > 0.9999


# ------------------------------------------------------------------------------------------ thin-group conv
@pytest.mark.parametrize("in_ch, groups, width, expect_groups", [(16, 8, 8, 2), (12, 4, 8, 4), (24, 8, 6, 4)])
def test_regrouped_weight_is_the_same_function_and_gradient(in_ch, groups, width, expect_groups):
    """In float64 the wide weight gives the thin conv's outputs and its gradient lands exactly on
    the thin weight; (12, 4, 8): 3 channels per group do not divide 8, so nothing changes."""
    g = torch.Generator().manual_seed(0)
    thin = torch.randn(in_ch, in_ch // groups, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, in_ch, 9, 9, generator=g, dtype=torch.float64)
    wide, new_groups = regrouped_weight(thin, groups, width)
    assert new_groups == expect_groups
    a = torch.nn.functional.conv2d(x, thin, padding=1, groups=groups)
    b = torch.nn.functional.conv2d(x, wide, padding=1, groups=new_groups)
    assert torch.allclose(a, b, atol=1e-12)
    upstream = torch.randn(a.shape, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad(a, thin, upstream)
    (gb,) = torch.autograd.grad(b, thin, upstream)
    assert torch.allclose(ga, gb, atol=1e-12)
    if new_groups != groups:  # the zero blocks hold exactly zero
        assert (wide == 0).sum().item() == wide.numel() - thin.numel()


def test_fast_conv_under_bf16_autocast_regroups_thin_groups_and_keeps_strided_depthwise_fp32():
    torch.manual_seed(0)
    thin = FastConv2d(32, 32, 3, padding=1, groups=16, bias=False)  # mbf's stem: 2 channels per group
    strided_dw = FastConv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False)
    x = torch.randn(4, 32, 12, 12, requires_grad=True)
    for conv, dtype in ((thin, torch.bfloat16), (strided_dw, torch.float32)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        assert y.dtype == dtype  # bf16 = the regrouped bf16 path; fp32 = the fp32 fallback
        ref = torch.nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding, 1, conv.groups)
        assert _min_cosine(y.float().flatten(1), ref.flatten(1)) > 0.999
        (gw,) = torch.autograd.grad(y.float().square().sum(), conv.weight)
        (gw_ref,) = torch.autograd.grad(ref.square().sum(), conv.weight)
        assert gw.shape == conv.weight.shape  # the gradient reaches the thin weight only
        assert _min_cosine(gw.flatten()[None], gw_ref.flatten()[None]) > 0.999


# ------------------------------------------------------------------------------------------ whole network
def test_one_training_step_is_the_same_with_the_fast_layer():
    torch.manual_seed(0)
    fast = build_backbone("mbf", input_size=32, width_mult=0.5)
    stock = _stock_copy(fast)
    x = torch.randn(16, 3, 32, 32)
    grads = []
    for model in (fast, stock):
        model.train()
        model(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6 * grads[1].abs().max().item())


@pytest.fixture(scope="module")
def trained_plain(tmp_path_factory):
    """A tiny mbf trained with every lever off (plain fp32 eager) and its held-out accuracy."""
    run = tmp_path_factory.mktemp("plain")
    report = Trainer(load_config(None, TINY + PLAIN), run, console=False).fit()
    from marginface.train.checkpoint import load_backbone

    return load_backbone(str(run)), report["eval"]["synthetic"]["accuracy"]


def _faces(n: int = 64) -> torch.Tensor:
    ps = synthetic_pair_set(32, 2, 64, image_size=32, seed=3)
    return to_tensor(ps.images[:n])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_optimised_embeddings_agree_with_plain(trained_plain, mode):
    """bf16 autocast + channels_last + fast PReLU vs plain fp32: every embedding within cosine 0.999
    (eval: running BN statistics; train: batch statistics, as in a training step)."""
    model, _ = trained_plain
    plain = _stock_copy(model).train(mode == "train")
    fast = copy.deepcopy(model).train(mode == "train")
    set_fast_prelu(fast, True)
    fast.to(memory_format=torch.channels_last)
    x = _faces()
    with torch.no_grad() if mode == "eval" else torch.enable_grad():
        ref = plain(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(x.contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.bfloat16
    assert _min_cosine(ref, got.float()) > 0.999


@pytest.mark.slow
def test_compiled_backbone_agrees_with_plain(trained_plain, request):
    """train.compile (inductor, generated C++): the forward of training mode and its gradients."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("compiles the backbone: 1-2 min on 2 CPU cores; run with -m slow")
    if not _has_compiler():
        pytest.skip("no C++ compiler for inductor")
    model, _ = trained_plain
    plain = _stock_copy(model).train()
    fast = copy.deepcopy(model).train()
    compiled = torch.compile(fast)
    x = _faces(32)
    ref = plain(x)
    got = compiled(x)
    assert _min_cosine(ref, got) > 0.9999
    ref.square().mean().backward()
    got.square().mean().backward()
    g_ref = torch.cat([p.grad.flatten() for p in plain.parameters()])
    g_got = torch.cat([p.grad.flatten() for p in fast.parameters()])
    assert _min_cosine(g_ref[None], g_got[None]) > 0.999


def _has_compiler() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("g++", "gcc", "c++", "clang++"))


def test_short_training_run_reaches_the_same_accuracy(trained_plain, tmp_path):
    """The optimised CPU defaults (bf16 + channels_last + fast PReLU + kept memory) train as well as
    plain fp32 eager: the same held-out accuracy within noise (seed-to-seed spread is ~0.02)."""
    _, plain_acc = trained_plain
    report = Trainer(load_config(None, TINY + OPTIMISED), tmp_path, console=False).fit()
    acc = report["eval"]["synthetic"]["accuracy"]
    assert report["train"]["bad_steps"] == 0 and report["train"]["amp"] == "bfloat16"
    assert plain_acc >= 0.75 and acc >= 0.75, (plain_acc, acc)
    assert abs(acc - plain_acc) < 0.05, (plain_acc, acc)
    assert not malloc.is_keeping()  # the trainer put glibc's defaults back


# ------------------------------------------------------------------------------------------ memory setting
def test_keep_freed_memory_toggles():
    if malloc._glibc() is None:
        pytest.skip("not glibc")
    try:
        assert malloc.keep_freed_memory(True) and malloc.is_keeping()
        a = np.ones(64 << 20, np.uint8)  # 64 MiB: from the heap now, not mmap
        del a
    finally:
        assert malloc.restore_default()
    assert not malloc.is_keeping()
