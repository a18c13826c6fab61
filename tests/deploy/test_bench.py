"""marginface.deploy.bench: what `bench --backbone` times, and the precision-auto runtime."""
import functools

import pytest
import torch

from marginface import hardware
from marginface.deploy import bench as bench_module
from marginface.deploy.autoprecision import choice_lines, choose_precision
from marginface.deploy.bench import WEIGHTS, bench
from marginface.errors import UserError

QUICK = dict(input_size=32, threads=1, runs=3, throughput_runs=3, max_seconds=1, throughput_batch=4)


@pytest.fixture
def spy_trained_looking(monkeypatch):
    calls = []
    real = bench_module.trained_looking

    def spy(model, *a, **kw):
        calls.append(model)
        return real(model, *a, **kw)
    monkeypatch.setattr(bench_module, "trained_looking", spy)
    return calls


def test_backbone_is_timed_with_trained_looking_weights_and_says_so(spy_trained_looking):
    result = bench(backbone="mobilefacenet", runtimes=["torch"], **QUICK)
    assert len(spy_trained_looking) == 1
    bns = [m for m in spy_trained_looking[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not torch.allclose(bns[0].running_var, torch.ones_like(bns[0].running_var))  # not the init
    assert result["weights"] == "trained-looking" and "trained-looking" in result["model"]
    assert result["model"] == f"mobilefacenet ({WEIGHTS['trained-looking']})"
    assert result["flush_denormals"] is hardware.denormals_flushed()
    assert result["latency_ms"]["torch"]["median"] > 0


def test_fresh_weights_on_request_and_bad_values(spy_trained_looking):
    result = bench(backbone="mobilefacenet", runtimes=["torch"], weights="fresh", **QUICK)
    assert spy_trained_looking == [] and result["weights"] == "fresh" and "freshly initialised" in result["model"]
    with pytest.raises(UserError, match="weights must be one of"):
        bench(backbone="mobilefacenet", runtimes=["torch"], weights="pretrained", **QUICK)


def test_bench_reports_flush_off_when_switched_off(monkeypatch):
    monkeypatch.setattr(hardware, "_flush_choice", None)
    monkeypatch.setenv(hardware.FLUSH_DENORMALS_ENV, "0")
    try:
        result = bench(backbone="mobilefacenet", runtimes=["torch"], **QUICK)
        assert result["flush_denormals"] is False and not hardware.denormals_flushed()
    finally:
        monkeypatch.delenv(hardware.FLUSH_DENORMALS_ENV)
        hardware.flush_denormals()


def test_precision_auto_runtime_shows_every_path_and_the_choice(monkeypatch):
    """Real compiles, fp32 and bf16 only (int8 is covered by tests/test_autoprecision.py)."""
    monkeypatch.setattr(bench_module, "choose_precision",
                        functools.partial(choose_precision, precisions=("fp32", "bf16"), rounds=1, runs=3))
    # throughput at batch 1 too: the batch-1 embedder auto built is reused, no third compile
    result = bench(backbone="mobilefacenet", runtimes=["torch", "torch-compiled-auto"], **{**QUICK, "throughput_batch": 1})
    auto = result["precision_auto"]
    assert set(auto["paths"]) == {"fp32", "bf16"} and auto["precision"] in ("fp32", "bf16")
    assert all(p["status"] == "ok" and p["latency_ms"] > 0 for p in auto["paths"].values())
    assert auto["eager_ms"] > 0 and auto["speedup_vs_eager"] > 0
    assert "torch-compiled-auto" in result["latency_ms"]
    assert result["min_cosine_vs_first"]["torch-compiled-auto"] > 0.99
    text = "\n".join(choice_lines(auto))
    assert "<- auto" in text and "compiled fp32" in text and "compiled bf16" in text
