"""Margins against their papers' formulas, written out here in numpy (float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marginface.errors import UserError
from marginface.heads import MARGINS, build_margin

# Targets from theta = 0 to theta = pi (row 8 has its class outside the columns: label -1).
TARGETS = [1.0, 0.99999, 0.7, 0.2, -0.3, -0.9, -0.99999, -1.0, 0.5]
LABELS = [0, 1, 2, 3, 0, 1, 2, 3, -1]
NORMS = [5.0, 10.0, 15.0, 25.0, 40.0, 60.0, 110.0, 150.0, 30.0]
BOUNDARY = [0, 1, 6, 7]  # theta within ~5e-3 of 0 or pi: fp32 input / the ±(1-eps) clamp


def make_cos() -> torch.Tensor:
    rng = np.random.default_rng(0)
    cos = rng.uniform(-0.95, 0.95, size=(len(LABELS), 4))
    cos[2, 0] = 0.8  # a negative above its row's target (support vector / hard example)
    cos[3, 1] = 0.1
    cos[0, 3] = -1.0  # exact -1 in a non-target column
    for i, (y, t) in enumerate(zip(LABELS, TARGETS)):
        if y >= 0:
            cos[i, y] = t
    return torch.tensor(cos, dtype=torch.float32)


COS = make_cos()
LAB = torch.tensor(LABELS)
NRM = torch.tensor(NORMS)


def ref_logits(cos: torch.Tensor, labels, target_fn, neg_fn=None) -> np.ndarray:
    """Unscaled reference: f(theta_y) in the target column, neg_fn (default identity) elsewhere."""
    c = cos.double().numpy()
    out = c.copy()
    for i, y in enumerate(labels):
        if y < 0:
            continue
        f = target_fn(c[i, y], i)
        if neg_fn is not None:
            for j in range(c.shape[1]):
                if j != y:
                    out[i, j] = neg_fn(c[i, j], f)
        out[i, y] = f
    return out


def check(out: torch.Tensor, ref: np.ndarray, s: float) -> None:
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    got = out.detach().double().numpy() / s
    inner = [i for i in range(len(LABELS)) if i not in BOUNDARY]
    np.testing.assert_allclose(got[inner], ref[inner], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got[BOUNDARY], ref[BOUNDARY], atol=1e-3)
    # label -1 row: plain s * cos everywhere
    np.testing.assert_allclose(got[8], COS[8].double().numpy(), atol=1e-6)


def arc_ref(c: float, m: float) -> float:
    th = math.acos(c)
    return math.cos(th + m) if th + m <= math.pi else c - m * math.sin(m)


# -- formulas -----------------------------------------------------------------------------------
def test_softmax():
    check(build_margin("softmax", s=30.0)(COS, LAB), ref_logits(COS, LABELS, lambda c, i: c), 30.0)


@pytest.mark.parametrize("m", [0.5, 0.3])
def test_arcface(m):
    out = build_margin("arcface", m=m)(COS, LAB)
    check(out, ref_logits(COS, LABELS, lambda c, i: arc_ref(c, m)), 64.0)
    # the fallback branch was exercised (theta + m > pi for the last targets)
    assert math.acos(TARGETS[5]) + m > math.pi or math.acos(TARGETS[6]) + m > math.pi


def test_arcface_easy_margin():
    out = build_margin("arcface", easy_margin=True)(COS, LAB)
    ref = ref_logits(COS, LABELS, lambda c, i: math.cos(math.acos(c) + 0.5) if c > 0 else c)
    check(out, ref, 64.0)


def test_cosface():
    out = build_margin("cosface")(COS, LAB)
    check(out, ref_logits(COS, LABELS, lambda c, i: c - 0.35), 64.0)


def sphere_lambda(it: int, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0) -> float:
    return max(lambda_min, base * (1 + gamma * it) ** (-power))


def sphere_ref(c: float, lam: float, m: int = 4) -> float:
    theta = math.acos(c)
    k = min(int(math.floor(m * theta / math.pi)), m - 1)
    psi = (-1) ** k * math.cos(m * theta) - 2 * k
    return (lam * c + psi) / (1 + lam)


@pytest.mark.parametrize("it", [0, 10, 5000])
def test_sphereface(it):
    margin = build_margin("sphereface").eval()
    margin.iteration.fill_(it)
    lam = sphere_lambda(it)
    check(margin(COS, LAB), ref_logits(COS, LABELS, lambda c, i: sphere_ref(c, lam)), 64.0)
    assert margin.iteration.item() == it  # eval mode does not count


def test_sphereface_lambda_schedule():
    margin = build_margin("sphereface")
    assert float(margin.lambda_at(0)) == pytest.approx(1000.0)
    assert float(margin.lambda_at(1)) == pytest.approx(1000.0 / 1.12)
    assert float(margin.lambda_at(100)) == pytest.approx(1000.0 / 13.0)
    assert float(margin.lambda_at(1658)) > 5.0  # floor reached at 1 + 0.12 it >= 200
    assert float(margin.lambda_at(1659)) == pytest.approx(5.0)
    assert float(margin.lambda_at(10 ** 6)) == pytest.approx(5.0)
    # every training forward counts first, then anneals (as the official Caffe layer)
    margin.train()
    for step in range(1, 4):
        out = margin(COS, LAB)
        assert margin.iteration.item() == step
    ref = ref_logits(COS, LABELS, lambda c, i: sphere_ref(c, sphere_lambda(3)))
    check(out, ref, 64.0)
    assert margin.stats()["sphereface_lambda"] == pytest.approx(sphere_lambda(3))


def test_sphereface_other_m():
    margin = build_margin("sphereface", m=3, base=0.0, lambda_min=0.0).eval()
    check(margin(COS, LAB), ref_logits(COS, LABELS, lambda c, i: sphere_ref(c, 0.0, 3)), 64.0)


def combined_ref(c, m1, m2, m3):
    theta = math.acos(c)
    th = (math.pi - m2) / m1
    if theta <= th:
        return math.cos(m1 * theta + m2) - m3
    return c - math.cos(th) - 1 - m3


@pytest.mark.parametrize("ms", [(1.0, 0.3, 0.2), (0.9, 0.4, 0.15), (1.35, 0.0, 0.0)])
def test_combined(ms):
    out = build_margin("combined", m1=ms[0], m2=ms[1], m3=ms[2])(COS, LAB)
    check(out, ref_logits(COS, LABELS, lambda c, i: combined_ref(c, *ms)), 64.0)


def test_combined_special_cases_and_continuity():
    cos_m = build_margin("combined", m1=1.0, m2=0.0, m3=0.35)(COS, LAB)
    torch.testing.assert_close(cos_m, build_margin("cosface", m=0.35)(COS, LAB))
    # arcface agrees wherever theta + m <= pi
    inner = torch.tensor([1, 2, 3, 4])
    a = build_margin("combined", m1=1.0, m2=0.5, m3=0.0)(COS, LAB)
    torch.testing.assert_close(a[inner], build_margin("arcface")(COS, LAB)[inner])
    # the fallback is continuous and monotonic around theta_th
    margin = build_margin("combined", m1=1.0, m2=0.3, m3=0.2)
    th = math.pi - 0.3
    c = torch.tensor([[math.cos(th - 1e-3)], [math.cos(th + 1e-3)], [math.cos(th + 0.1)]])
    f = margin(c, torch.zeros(3, dtype=torch.long)).squeeze(1) / 64
    assert abs(float(f[0] - f[1])) < 5e-3 and f[0] > f[1] > f[2]


@pytest.mark.parametrize("base,m", [("softmax", None), ("cosface", 0.35), ("arcface", 0.5)])
def test_sv_softmax(base, m):
    t = 1.2
    f = {"softmax": lambda c, i: c, "cosface": lambda c, i: c - 0.35,
         "arcface": lambda c, i: arc_ref(c, 0.5)}[base]
    kw = {} if m is None else {"m": m}
    out = build_margin("sv_softmax", base=base, t=t, **kw)(COS, LAB)
    # the paper's h(t, theta_k, I_k) = cos + (t - 1)(cos + 1) I_k,  I_k = [cos_k > f(theta_y)]
    ref = ref_logits(COS, LABELS, f, lambda c, fy: c + (t - 1) * (c + 1) * (c > fy))
    check(out, ref, 32.0)  # the default scale of SV-Softmax
    # support vectors exist in this data and t = 1 reduces to the base margin
    assert not np.allclose(ref, ref_logits(COS, LABELS, f))
    plain = build_margin("sv_softmax", base=base, t=1.0, **kw)(COS, LAB)
    check(plain, ref_logits(COS, LABELS, f), 32.0)


def test_curricularface():
    margin = build_margin("curricularface")
    valid = [i for i, y in enumerate(LABELS) if y >= 0]
    mean_cos_y = np.mean([TARGETS[i] for i in valid])
    t1 = 0.01 * mean_cos_y  # t_0 = 0, updated before use
    out = margin(COS, LAB)
    assert margin.t.item() == pytest.approx(t1, abs=1e-6)
    ref = ref_logits(COS, LABELS, lambda c, i: arc_ref(c, 0.5),
                     lambda c, fy: c * (t1 + c) if c > fy else c)
    check(out, ref, 64.0)
    out2 = margin(COS, LAB)
    t2 = 0.01 * mean_cos_y + 0.99 * t1
    assert margin.t.item() == pytest.approx(t2, abs=1e-6)
    check(out2, ref_logits(COS, LABELS, lambda c, i: arc_ref(c, 0.5),
                           lambda c, fy: c * (t2 + c) if c > fy else c), 64.0)
    # eval: no update, current t used
    margin.eval()
    margin(COS, LAB)
    assert margin.t.item() == pytest.approx(t2, abs=1e-6)
    assert margin.stats()["curricular_t"] == pytest.approx(t2, abs=1e-6)


def adaface_ref(c, norm, mu, sd, m=0.4, h=0.333, eps=1e-3):
    norm = min(max(norm, 0.001), 100.0)  # the official code's "safe_norms"
    z = float(np.clip((norm - mu) / (sd + eps) * h, -1, 1))
    g_angle, g_add = -m * z, m * z + m
    theta = float(np.clip(math.acos(c) + g_angle, eps, math.pi - eps))
    return math.cos(theta) - g_add


def test_adaface():
    margin = build_margin("adaface")
    norms = np.clip(np.array(NORMS), 0.001, 100.0)  # official safe_norms
    mu = 0.01 * norms.mean() + 0.99 * 20.0
    sd = 0.01 * norms.std(ddof=1) + 0.99 * 100.0
    out = margin(COS, LAB, NRM)
    assert margin.batch_mean.item() == pytest.approx(mu, rel=1e-6)
    assert margin.batch_std.item() == pytest.approx(sd, rel=1e-6)
    check(out, ref_logits(COS, LABELS, lambda c, i: adaface_ref(c, NORMS[i], mu, sd)), 64.0)
    # eval mode: buffers frozen
    margin.eval()
    out_eval = margin(COS, LAB, NRM)
    assert margin.batch_mean.item() == pytest.approx(mu, rel=1e-6)
    torch.testing.assert_close(out_eval, out)


def test_adaface_margin_direction():
    # high norm (good quality) -> z -> +1: more angular margin; low norm -> z -> -1: less
    margin = build_margin("adaface", t_alpha=0.0).eval()  # keep mu=20, sd=100
    c = torch.full((2, 2), 0.3)
    c[:, 0] = 0.7
    out = margin(c, torch.zeros(2, dtype=torch.long), torch.tensor([400.0, 1.0])) / 64
    assert adaface_ref(0.7, 100.0, 20.0, 100.0) == pytest.approx(float(out[0, 0]), abs=1e-5)
    assert adaface_ref(0.7, 1.0, 20.0, 100.0) == pytest.approx(float(out[1, 0]), abs=1e-5)


def magface_m(norm, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8):
    a = min(max(norm, l_a), u_a)
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def test_magface():
    margin = build_margin("magface")
    out = margin(COS, LAB, NRM)
    check(out, ref_logits(COS, LABELS, lambda c, i: arc_ref(c, magface_m(NORMS[i]))), 64.0)
    a = np.clip(np.array(NORMS), 10.0, 110.0)
    g = np.mean(a / 110.0 ** 2 + 1.0 / a)
    assert float(margin.extra_loss(NRM)) == pytest.approx(35.0 * g, rel=1e-6)
    assert magface_m(10.0) == pytest.approx(0.45) and magface_m(110.0) == pytest.approx(0.8)


def test_magface_gradient_reaches_norms():
    norms = NRM.clone().requires_grad_(True)
    margin = build_margin("magface")
    (margin(COS, LAB, norms).sum() + margin.extra_loss(norms)).backward()
    assert torch.isfinite(norms.grad).all()
    inside = (norms >= 10) & (norms <= 110)
    assert (norms.grad[inside] != 0).all() and (norms.grad[~inside] == 0).all()


def test_margins_need_norms():
    for name in ("adaface", "magface"):
        with pytest.raises(ValueError, match="norms"):
            build_margin(name)(COS, LAB)


# -- properties shared by every margin ----------------------------------------------------------
def all_margins():
    yield from MARGINS
    yield "sv_softmax_arc"


def make(name: str):
    if name == "sv_softmax_arc":
        return build_margin("sv_softmax", base="arcface")
    return build_margin(name)


@pytest.mark.parametrize("name", list(all_margins()))
def test_finite_gradients_at_plus_minus_one(name):
    cos = torch.tensor([[1.0, -1.0, 0.2], [-1.0, 1.0, 1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]],
                       requires_grad=True)
    labels = torch.tensor([0, 0, 2, -1])
    norms = torch.tensor([20.0, 50.0, 5.0, 120.0], requires_grad=True)
    margin = make(name)
    out = margin(cos, labels, norms)
    loss = torch.nn.functional.cross_entropy(out[:3], labels[:3]) + out[3].sum()
    extra = margin.extra_loss(norms)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(cos.grad).all()
    assert norms.grad is None or torch.isfinite(norms.grad).all()


@pytest.mark.parametrize("name", list(all_margins()))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(name, dtype):
    low = COS.to(dtype)
    out = make(name)(low, LAB, NRM.to(dtype))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # computed in fp32: identical to feeding the same values as fp32
    torch.testing.assert_close(out, make(name)(low.float(), LAB, NRM.to(dtype).float()))
    # and close to the original fp32 input away from theta = 0 / pi
    inner = torch.tensor([2, 3, 4, 5, 8])
    ref = make(name)(COS, LAB, NRM)
    tol = 0.05 if dtype == torch.float16 else 0.6
    torch.testing.assert_close(out[inner], ref[inner], atol=tol, rtol=0)


@pytest.mark.parametrize("name", list(all_margins()))
def test_inputs_untouched_and_label_minus_one(name):
    cos = COS.clone().requires_grad_(True)
    before = cos.detach().clone()
    margin = make(name)
    out = margin(cos, LAB, NRM)
    out.sum().backward()
    torch.testing.assert_close(cos.detach(), before, rtol=0, atol=0)
    # a row whose class is not among the columns gets no margin at all
    torch.testing.assert_close(out[8], margin.s * COS[8], rtol=0, atol=1e-5)
    all_minus = margin(COS, torch.full((len(LABELS),), -1), NRM)
    torch.testing.assert_close(all_minus, margin.s * COS, rtol=0, atol=1e-5)


def test_buffers_in_state_dict_and_eval_mode():
    for name, keys in (("sphereface", {"iteration"}), ("curricularface", {"t"}),
                       ("adaface", {"batch_mean", "batch_std"})):
        trained = build_margin(name)
        for _ in range(3):
            trained(COS, LAB, NRM)
        assert keys <= set(trained.state_dict())
        fresh = build_margin(name)
        fresh.load_state_dict(trained.state_dict())
        fresh.eval()
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        torch.testing.assert_close(fresh(COS, LAB, NRM), trained.eval()(COS, LAB, NRM))
        for k, v in fresh.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    for name in ("softmax", "arcface", "cosface", "combined", "sv_softmax", "magface"):
        assert dict(build_margin(name).state_dict()) == {}


# -- build_margin errors -----------------------------------------------------------------------
def test_unknown_margin_names_the_valid_ones():
    with pytest.raises(UserError, match="'arcfce'.*arcface.*cosface"):
        build_margin("arcfce")


def test_unknown_parameter_names_key_and_valid_ones():
    with pytest.raises(UserError) as err:
        build_margin("arcface", margin=0.5)
    msg = str(err.value)
    assert "'margin'" in msg and "easy_margin" in msg and "s, m" in msg and "\n" not in msg


@pytest.mark.parametrize("name,params,key", [
    ("arcface", {"m": -0.1}, "m"), ("arcface", {"s": 0}, "s"), ("cosface", {"m": "big"}, "m"),
    ("arcface", {"easy_margin": "yes"}, "easy_margin"), ("sphereface", {"m": 2.5}, "m"),
    ("sv_softmax", {"base": "sphereface"}, "base"), ("sv_softmax", {"m": 0.3}, "m"),
    ("sv_softmax", {"t": 0.5}, "t"), ("magface", {"u_a": 5.0}, "u_a"),
    ("combined", {"m1": 0.0}, "m1"), ("adaface", {"t_alpha": 2.0}, "t_alpha"),
])
def test_invalid_values(name, params, key):
    with pytest.raises(UserError, match=rf"{name}.*\b{key}\b"):
        build_margin(name, **params)


def test_every_margin_documented():
    for name, cls in MARGINS.items():
        assert cls.__doc__ and "Params" in cls.__doc__, name
        for p in cls.param_names():
            assert p in cls.__doc__, (name, p)
