"""`marginface bench --device cuda`: GPU latency and throughput with the CPU bench's JSON shape; one
error line where CUDA is missing or the request cannot run on a GPU."""
import json

import pytest
import torch

from marginface import cli
from marginface.deploy.bench import CUDA_RUNTIMES, DEFAULT_RUNTIMES, bench
from marginface.errors import UserError

QUICK = dict(input_size=32, threads=1, runs=5, throughput_runs=3, max_seconds=1, throughput_batch=4)
HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(HAS_CUDA, reason="checks the error of a machine without CUDA; this one has a GPU")
def test_without_cuda_it_is_one_error_line(capsys):
    rc = cli.main(["bench", "--backbone", "mobilefacenet", "--device", "cuda", "--json"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err == "error: --device asks for cuda but CUDA is not available\n"


def test_requests_a_gpu_cannot_serve_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend, to reach the checks after it
    with pytest.raises(UserError, match=r"--device cuda times torch-cuda, torch-cuda-fp16, torch-cuda-bf16; not torch, onnxruntime"):
        bench(backbone="mobilefacenet", runtimes=["torch", "onnxruntime"], device="cuda", **QUICK)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    with pytest.raises(UserError, match=r"bench times PyTorch models on the GPU .* is a \.onnx file"):
        bench(str(model), device="cuda", **QUICK)
    with pytest.raises(UserError, match="--device is not a device: 'gpu'"):
        bench(backbone="mobilefacenet", device="gpu", **QUICK)
    assert set(CUDA_RUNTIMES).isdisjoint(DEFAULT_RUNTIMES)


def test_bench_help_names_the_device_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "--device" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the real GPU timing)")
def test_gpu_latency_and_throughput_have_the_cpu_shape(capsys):
    cpu = bench(backbone="mobilefacenet", runtimes=["torch"], **QUICK)
    gpu = bench(backbone="mobilefacenet", device="cuda", **QUICK)
    assert set(cpu) - {"skipped"} <= set(gpu) and gpu["device"].startswith("cuda")
    timed = set(gpu["latency_ms"])
    assert {"torch-cuda", "torch-cuda-fp16"} <= timed <= set(CUDA_RUNTIMES)
    for name in timed:
        assert gpu["latency_ms"][name]["median"] > 0 and gpu["throughput_ips"][name] > 0
        assert gpu["min_cosine_vs_first"][name] > 0.99  # fp16/bf16 embed the same faces alike
    assert gpu["params"] == cpu["params"] and gpu["gmacs"] == cpu["gmacs"]
    assert cli.main(["bench", "--backbone", "mobilefacenet", "--input-size", "32", "--runs", "5",
                     "--device", "cuda", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"params", "file_mb", "gmacs", "latency_ms", "throughput_ips", "device"} <= set(out)
