"""Inference speed and size of a model across runtimes: ``marginface bench`` and
``benchmarks/inference_latency.py`` share this module.

A *runtime* is a name plus a builder that turns a `BenchContext` into a function running one
normalised ``N×3×H×W`` float32 numpy batch. ``DEFAULT_RUNTIMES`` (what ``marginface bench``
reports) are ``torch`` (eager fp32), ``onnxruntime`` (our fp32 export, all graph optimisations)
and ``onnxruntime-int8`` (static int8, the default `QuantOptions`); ``EXTRA_RUNTIMES`` are the
alternatives the benchmark script compares (TorchScript frozen, ``optimize_for_inference``,
bf16 + channels_last, TorchInductor-compiled fp32 / bf16 / x86 int8, ``torch-compiled-auto``
(`deploy.autoprecision`: every compiled path checked and timed, the fastest checked one run; the
result's ``precision_auto`` shows them all), other ONNX int8 schemes, dynamic int8).

``--backbone`` models get trained-looking weights (`deploy.load.trained_looking`) unless
``weights="fresh"``: a fresh network's identity BatchNorms time differently from any real model.

Every runtime also embeds the same 16 synthetic faces; ``min_cosine_vs_first`` is the smallest
cosine to the first runtime's embeddings (a fast runtime that computes something else shows up).
Latency is measured at batch 1 (warm-up runs, then up to ``runs`` timed runs, median and p90),
throughput at batch 32 (images per second from the median batch time). Timings on a shared
machine are noisy: the JSON records the thread count and the load average at the start.

``device="cuda"`` (``bench --device cuda``) times the PyTorch model on the GPU instead, with the
same JSON shape: ``CUDA_RUNTIMES`` are ``torch-cuda`` (fp32 eager), ``torch-cuda-fp16`` and
``torch-cuda-bf16`` (autocast). Each timed call includes copying the batch to the GPU and the
embeddings back, which waits for the GPU to finish (so the time is the GPU's, not the launch's);
``device`` names the GPU. Without CUDA it is one error line.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from marginface import hardware, malloc
from marginface.data.transforms import to_tensor
from marginface.deploy import mobile
from marginface.deploy.autoprecision import EAGER, choose_precision
from marginface.deploy.compiled import CompiledEmbedder
from marginface.deploy.export import build_metadata, export_onnx, file_mb, load_source, parity_images
from marginface.deploy.fold import fold_batchnorm
from marginface.deploy.load import load_model, model_files, trained_looking
from marginface.deploy.onnx_model import OnnxEmbedder, load_onnx_proto
from marginface.deploy.quantize import QuantOptions, quantize_onnx
from marginface.errors import UserError
from marginface.inference import ModelInfo, resolve_device
from marginface.io.trust import COMPILED, code_kind, refuse_untrusted
from marginface.models import count_macs, count_parameters

Runner = Callable[[np.ndarray], object]
# what ``bench(backbone=..., weights=...)`` times, as its text output says it
WEIGHTS = {"trained-looking": "random trained-looking weights: BN statistics and PReLU slopes from trained ranges",
           "fresh": "freshly initialised random weights"}


def default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_runs(fn: Runner, x: np.ndarray, *, warmup: int, runs: int, max_seconds: float, min_runs: int = 5) -> np.ndarray:
    """Seconds per call of ``fn(x)`` after ``warmup`` calls; stops early after ``max_seconds``."""
    for _ in range(warmup):
        fn(x)
    times = []
    start = time.perf_counter()
    for i in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
        if i + 1 >= min_runs and time.perf_counter() - start > max_seconds:
            break
    return np.asarray(times)


def latency_stats(times: np.ndarray) -> dict:
    return {"median": round(float(np.median(times)) * 1000, 3), "p90": round(float(np.percentile(times, 90)) * 1000, 3),
            "runs": int(len(times))}


# ---------------------------------------------------------------------------------------------- context
@dataclass
class BenchContext:
    """What the runtime builders need; exported/quantised files are made on first use."""

    input_size: tuple[int, int]
    threads: int
    workdir: Path
    model: Optional[torch.nn.Module] = None  # torch source (run dir / checkpoint / --backbone)
    onnx_path: Optional[Path] = None  # fp32 ONNX (given or exported)
    given_onnx: Optional[Path] = None  # the user's ONNX file when MODEL is one
    normalize: str = "arcface"
    device: str = "cpu"  # the CUDA runtimes' device
    _quantized: dict = field(default_factory=dict)
    mobile_files: dict = field(default_factory=dict)  # runtime name -> its exported file (`mobile_file`)
    auto_choice: object = None  # the `PrecisionChoice` of the torch-compiled-auto runtime, once built

    def fp32_onnx(self) -> Path:
        if self.onnx_path is None:
            if self.model is None:
                raise RuntimeError("no model to export")
            self.onnx_path = self.workdir / "fp32.onnx"
            export_onnx(self.model, self.onnx_path)
        return self.onnx_path

    def int8_onnx(self, options=None) -> Path:
        options = options or QuantOptions()
        key = options.describe()
        if key not in self._quantized:
            path = self.workdir / f"{key}.onnx"
            quantize_onnx(self.fp32_onnx(), path, parity_images(self.input_size, 32, seed=1),
                          options=options, normalize=self.normalize)
            self._quantized[key] = path
        return self._quantized[key]

    def mobile_file(self, fmt: str, precision: str) -> Path:
        """The torch model exported to a mobile format (`deploy.mobile`); int8 calibrated on the same
        32 synthetic faces as the ONNX int8 runtime."""
        key = mobile_runtime_name(fmt, precision)
        if key not in self.mobile_files:
            model = _need_torch(self)
            suffix = mobile.MOBILE_FORMATS[fmt].suffixes[0]
            path = self.workdir / f"{key}{suffix}"
            calib = parity_images(self.input_size, 32, seed=1) if precision == "int8" else None
            folded = fold_batchnorm(model.eval())
            mobile.export(fmt, folded, path, precision=precision, calib_images=calib,
                          metadata=build_metadata(model, quantization="none" if precision == "fp32" else precision))
            self.mobile_files[key] = path
        return self.mobile_files[key]

    def dynamic_int8_onnx(self) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = self.workdir / "dynamic-int8.onnx"
        if not path.exists():
            quantize_dynamic(str(self.fp32_onnx()), str(path), weight_type=QuantType.QInt8)
        return path


# ---------------------------------------------------------------------------------------------- runtimes
def _ort_runner(path: Path, threads: int, optimization: str = "all") -> Runner:
    model = OnnxEmbedder(path, threads=threads, optimization=optimization)
    return model.run_numpy


def _need_torch(ctx: BenchContext) -> torch.nn.Module:
    if ctx.model is None:
        raise LookupError("needs a PyTorch model (MODEL is an ONNX file)")
    return ctx.model.eval()


def _torch_eager(ctx: BenchContext) -> Runner:
    model = _need_torch(ctx)

    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x))
    return run


def _torch_jit_frozen(ctx: BenchContext) -> Runner:
    folded = fold_batchnorm(_need_torch(ctx))
    example = torch.zeros((1, 3) + ctx.input_size)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(folded, example, check_trace=False).eval())

    def run(x):
        with torch.inference_mode():
            return frozen(torch.from_numpy(x))
    return run


def _torch_optimize_for_inference(ctx: BenchContext) -> Runner:
    example = torch.zeros((1, 3) + ctx.input_size)
    with torch.no_grad():
        scripted = torch.jit.trace(_need_torch(ctx), example, check_trace=False).eval()
        optimized = torch.jit.optimize_for_inference(torch.jit.freeze(scripted))

    def run(x):
        with torch.inference_mode():
            return optimized(torch.from_numpy(x))
    return run


def _torch_bf16_channels_last(ctx: BenchContext) -> Runner:
    model = fold_batchnorm(_need_torch(ctx)).to(memory_format=torch.channels_last)

    def run(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).float()
    return run


def _torch_channels_last(ctx: BenchContext) -> Runner:
    model = fold_batchnorm(_need_torch(ctx)).to(memory_format=torch.channels_last)

    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
    return run


def torch_int8_fx(model: torch.nn.Module, calibration: np.ndarray) -> torch.nn.Module:
    """PyTorch's own static int8 (FX graph mode, x86 backend: fbgemm/oneDNN, per-channel weights).
    Unlike ONNX Runtime it has an int8 PReLU kernel, so the whole network stays in int8."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"),
                              (torch.from_numpy(calibration[:1]),))
        with torch.no_grad():
            for start in range(0, len(calibration), 16):
                prepared(torch.from_numpy(calibration[start : start + 16]))
        return convert_fx(prepared)


def _torch_int8_fx(ctx: BenchContext) -> Runner:
    calibration = to_tensor(parity_images(ctx.input_size, 32, seed=1), ctx.normalize).numpy()
    quantized = torch_int8_fx(_need_torch(ctx), calibration)

    def run(x):
        with torch.inference_mode():
            return quantized(torch.from_numpy(x))
    return run


def _torch_compiled(precision: str, batch1=None) -> Callable[[BenchContext], Runner]:
    """AOTInductor at ``precision`` (`marginface.deploy.compiled`); int8 calibrated on synthetic faces.
    Inductor specialises on the batch size: an embedder compiled for batch 1 (latency) or, for
    larger batches, one that runs them in its default chunks (16 images on the CPU: faster per
    image than one big call). Only the latest one is kept and a change of kind
    builds anew: an int8 embedder built earlier in the process runs ~2x slower once another has
    been quantised (see `marginface.deploy.compiled`)."""
    def build(ctx: BenchContext) -> Runner:
        model = _need_torch(ctx)
        calibration = to_tensor(parity_images(ctx.input_size, 32, seed=1), ctx.normalize)
        current: dict = {} if batch1 is None else {"size": 1, "embedder": batch1}

        def run(x):
            size = 1 if len(x) == 1 else None
            if current.get("size", "none yet") != size:
                current.clear()
                current.update(size=size, embedder=CompiledEmbedder(
                    model, precision, batch_size=size, calibration=calibration))
            return current["embedder"](torch.from_numpy(x))
        return run
    return build


def _torch_compiled_auto(ctx: BenchContext) -> Runner:
    """``--precision auto`` (`deploy.autoprecision.choose_precision`, measured here, not read from a
    cache): every compiled path built, checked against eager fp32 on the calibration faces and timed at
    batch 1; the runtime is the one it took (its batch-1 embedder reused). ``bench`` reports all of it
    under ``precision_auto``."""
    model = _need_torch(ctx)
    calibration = to_tensor(parity_images(ctx.input_size, 32, seed=1), ctx.normalize)
    choice = choose_precision(model, calibration)
    ctx.auto_choice = choice
    if choice.precision == EAGER:
        return _torch_eager(ctx)
    return _torch_compiled(choice.precision, choice.embedders.get(choice.precision))(ctx)


def _torch_cuda(dtype: Optional[torch.dtype] = None) -> Callable[[BenchContext], Runner]:
    """Eager PyTorch on ``ctx.device`` (a copy of the model), fp32 or under CUDA autocast at ``dtype``.
    The ``.cpu()`` of the result waits for the GPU, so a timed call is the whole round trip."""
    def build(ctx: BenchContext) -> Runner:
        device = torch.device(ctx.device)
        if device.type != "cuda":
            raise LookupError(f"runs on a CUDA device, not {ctx.device} (use bench --device cuda)")
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise LookupError(f"{torch.cuda.get_device_name(device)} has no bf16")
        model = copy.deepcopy(_need_torch(ctx)).to(device).eval()

        def run(x):
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
                return model(torch.from_numpy(x).to(device, non_blocking=False)).float().cpu()
        return run
    return build


def _onnxruntime(ctx: BenchContext, optimization: str = "all") -> Runner:
    path = ctx.given_onnx or ctx.fp32_onnx()
    return _ort_runner(path, ctx.threads, optimization)


def _onnxruntime_int8(options=None) -> Callable[[BenchContext], Runner]:
    def build(ctx: BenchContext) -> Runner:
        return _ort_runner(ctx.int8_onnx(options), ctx.threads)
    return build


def mobile_runtime_name(fmt: str, precision: str) -> str:
    """``tflite`` (fp32), ``tflite-int8``, ``ncnn-fp16``...: a mobile format's bench runtime name."""
    return fmt if precision == "fp32" else f"{fmt}-{precision}"


def _mobile_runtime(fmt: str, precision: str) -> Callable[[BenchContext], Runner]:
    def build(ctx: BenchContext) -> Runner:
        mobile.MOBILE_FORMATS[fmt].load_module("converter")  # a missing package: skipped, with the pip line
        embedder = mobile.load(ctx.mobile_file(fmt, precision), ctx.normalize, threads=ctx.threads)
        return embedder.run_numpy
    return build


def _int8_options(**kw):
    return QuantOptions(**kw)


def _runtimes() -> dict[str, Callable[[BenchContext], Runner]]:
    return {
        "torch": _torch_eager,
        "onnxruntime": _onnxruntime,
        "onnxruntime-int8": _onnxruntime_int8(),
    }


def _extra_runtimes() -> dict[str, Callable[[BenchContext], Runner]]:
    q = _int8_options
    return {
        "torch-channels-last": _torch_channels_last,
        "torch-jit-frozen": _torch_jit_frozen,
        "torch-optimize-for-inference": _torch_optimize_for_inference,
        "torch-bf16-channels-last": _torch_bf16_channels_last,
        "torch-int8-fx-x86": _torch_int8_fx,
        "torch-compiled": _torch_compiled("fp32"),
        "torch-compiled-bf16": _torch_compiled("bf16"),
        "torch-compiled-int8": _torch_compiled("int8"),
        "torch-compiled-auto": _torch_compiled_auto,
        "onnxruntime-basic-opt": lambda ctx: _onnxruntime(ctx, "basic"),
        "onnxruntime-int8-qdq-s8s8": _onnxruntime_int8(q(fmt="qdq", activations="int8")),
        "onnxruntime-int8-qoperator-u8s8": _onnxruntime_int8(q(fmt="qoperator", activations="uint8")),
        "onnxruntime-int8-qoperator-s8s8": _onnxruntime_int8(q(fmt="qoperator", activations="int8")),
        "onnxruntime-int8-qdq-u8s8-reduce-range": _onnxruntime_int8(q(fmt="qdq", reduce_range=True)),
        "onnxruntime-int8-qdq-per-tensor": _onnxruntime_int8(q(fmt="qdq", per_channel=False)),
        "onnxruntime-int8-grouped-int8": _onnxruntime_int8(q(grouped_convs="int8")),
        "onnxruntime-dynamic-int8": lambda ctx: _ort_runner(ctx.dynamic_int8_onnx(), ctx.threads),
        **{mobile_runtime_name(name, p): _mobile_runtime(name, p)
           for name, fmt in mobile.MOBILE_FORMATS.items() for p in fmt.precisions},
    }


def _cuda_runtimes() -> dict[str, Callable[[BenchContext], Runner]]:
    return {"torch-cuda": _torch_cuda(), "torch-cuda-fp16": _torch_cuda(torch.float16),
            "torch-cuda-bf16": _torch_cuda(torch.bfloat16)}


DEFAULT_RUNTIMES = tuple(_runtimes())
EXTRA_RUNTIMES = tuple(_extra_runtimes())
CUDA_RUNTIMES = tuple(_cuda_runtimes())


def runtime_builders() -> dict[str, Callable[[BenchContext], Runner]]:
    return {**_runtimes(), **_extra_runtimes(), **_cuda_runtimes()}


def _check_device(device: str, model_spec, runtimes) -> Optional[torch.device]:
    """``None`` for the CPU; else the CUDA device (one error line when it is missing or unusable here)."""
    if device == "cpu":
        return None
    resolved = resolve_device(device, "--device")
    if resolved.type != "cuda":
        raise UserError(f"--device {device}: bench times the CPU (default) or a CUDA device")
    suffix = Path(model_spec).suffix.lower() if model_spec else ""
    if suffix in (".onnx", ".pt2"):
        raise UserError(f"--device {device}: bench times PyTorch models on the GPU (a run directory, checkpoint, "
                        f"state dict or --backbone); {model_spec} is a {suffix} file")
    other = [r for r in runtimes if r not in CUDA_RUNTIMES]
    if other:
        raise UserError(f"--device {device} times {', '.join(CUDA_RUNTIMES)}; not {', '.join(other)}")
    return resolved


# ---------------------------------------------------------------------------------------------- sizes
def onnx_params_and_macs(path: Path) -> tuple[int, int]:
    """Weight count and per-image multiply-accumulates of an ONNX model (Conv, Gemm, MatMul and
    their int8 forms), with the batch dimension set to 1 for shape inference."""
    import onnx
    from onnx import shape_inference

    proto = load_onnx_proto(path)
    inits = {i.name: i for i in proto.graph.initializer}
    params = 0
    for init in inits.values():
        name = init.name.lower()
        if name.endswith(("_scale", "_zero_point", "scale", "zero_point")) or init.data_type in (
                onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            continue
        params += int(np.prod(init.dims)) if len(init.dims) else 0
    graph_inputs = [i for i in proto.graph.input if i.name not in inits]
    for value in graph_inputs:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = 1
    try:
        inferred = shape_inference.infer_shapes(proto)
    except Exception:
        return params, 0
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [int(d.dim_value) for d in dims]
    for name, init in inits.items():
        shapes[name] = list(init.dims)
    macs = 0
    for node in inferred.graph.node:
        op = node.op_type
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w = node.input[3] if op == "QLinearConv" else node.input[1]
            out = node.output[0]
            if w in shapes and out in shapes:
                ws = shapes[w]
                macs += int(np.prod(shapes[out])) * int(np.prod(ws[1:]))
        elif op in ("Gemm", "MatMul", "MatMulInteger", "QGemm", "QLinearMatMul"):
            a = node.input[0]
            out = node.output[0]
            if a in shapes and out in shapes:
                k = shapes[a][-1]
                if op == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
                    k = shapes[a][0]
                macs += int(np.prod(shapes[out])) * k
    return params, macs


# ---------------------------------------------------------------------------------------------- the benchmark
def bench(model_spec=None, *, backbone: Optional[str] = None, runtimes=DEFAULT_RUNTIMES,
          threads: Optional[int] = None, runs: int = 100, throughput_runs: int = 10,
          max_seconds: float = 8.0, throughput_batch: int = 32, normalize: Optional[str] = None,
          embedding_size: Optional[int] = None, input_size: int = 112, trust_code: bool = False,
          weights: str = "trained-looking", device: str = "cpu") -> dict:
    """``{"params", "file_mb", "gmacs", "latency_ms": {rt: {"median", "p90"}}, "throughput_ips":
    {rt: ips}, "threads", ...}`` for a run dir / checkpoint / ONNX file or a random ``backbone``.

    ``file_mb`` is the size of the deployable fp32 ONNX file (the given .onnx, or our export of
    a torch model); ``sizes_mb`` adds the int8 file and, for checkpoints, the checkpoint itself.
    Runtimes that cannot run this model (torch for an ONNX file) are left out and listed under
    ``skipped`` with the reason. ``trust_code``: allow a compiled ``.pt2`` package, which runs
    native code when opened (see `load_model`).

    ``weights`` (with ``backbone``): ``"trained-looking"`` (default: BatchNorm statistics/affines and
    PReLU slopes drawn from trained ranges, `deploy.load.trained_looking`, so the timing is that of a
    real model of this architecture) or ``"fresh"`` (the initialiser's weights, as before). The result
    says which under ``"weights"``. Subnormal floats are flushed to zero as everywhere else
    (`hardware.flush_denormals`; ``MARGINFACE_FLUSH_DENORMALS=0`` to time without); ``"flush_denormals"``
    records whether it was on.

    ``device``: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``): the ``CUDA_RUNTIMES`` (all
    of them when ``runtimes`` is the CPU default) on that GPU; the result adds ``device``.
    """
    if runtimes == DEFAULT_RUNTIMES and device != "cpu":
        runtimes = CUDA_RUNTIMES
    gpu = _check_device(device, model_spec, runtimes)
    if weights not in WEIGHTS:
        raise UserError(f"bench: weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    flushed = hardware.flush_denormals()
    threads = threads or default_threads()
    builders = runtime_builders()
    unknown = [r for r in runtimes if r not in builders]
    if unknown:
        raise UserError(f"unknown runtime(s) {', '.join(unknown)}; known: {', '.join(builders)}")
    if model_spec is not None:
        if code_kind(model_spec) == COMPILED:  # TorchScript is refused by the checkpoint loader
            refuse_untrusted(model_spec, trust_code)  # before anything opens it
    with tempfile.TemporaryDirectory(prefix="marginface-bench-") as work:
        workdir = Path(work)
        result: dict = {"model": f"{backbone} ({WEIGHTS[weights]})" if backbone else str(model_spec),
                        "weights": weights if backbone else "model", "flush_denormals": flushed}
        sizes: dict = {}
        spec_path = Path(model_spec) if model_spec else None
        if spec_path is not None and spec_path.is_file() and spec_path.suffix.lower() == ".pt2":
            # a compiled package (`marginface export --format aoti`) runs only as itself
            package = load_model(spec_path, normalize, trust_code=trust_code)
            hw, ctx = tuple(package._image_shape[1:]), None
            builders = {"compiled-package": lambda _: lambda x: package(torch.from_numpy(x))}
            runtimes = ["compiled-package"]
            sizes["pt2"] = round(file_mb(spec_path), 3)
            result.update(params=None, file_mb=sizes["pt2"], gmacs=None, input_size=list(hw),
                          embedding_size=package.info.embedding_size, precision=package.info.precision,
                          compiled_batch=package.batch_size)
        elif spec_path is not None and spec_path.is_file() and mobile.format_of(spec_path) is not None:
            # a mobile export runs only in its own runtime
            exported = load_model(spec_path, normalize, threads=threads)
            hw, ctx, info = exported.info.input_size, None, exported.info
            runtimes = [mobile_runtime_name(info.kind, info.precision)]
            builders = {runtimes[0]: lambda _: exported.run_numpy}
            sizes[info.kind] = round(sum(file_mb(p) for p in model_files(exported)), 3)
            result.update(params=None, file_mb=sizes[info.kind], gmacs=None, input_size=list(hw),
                          embedding_size=info.embedding_size, precision=info.precision)
        elif spec_path is not None and spec_path.is_file() and spec_path.suffix.lower() == ".onnx":
            onnx_model = load_model(spec_path, normalize, threads=1)
            hw = onnx_model.info.input_size
            ctx = BenchContext(hw, threads, workdir, onnx_path=spec_path, given_onnx=spec_path,
                               normalize=onnx_model.info.normalize)
            if onnx_model.quantized:  # the file is int8 already: time it as such
                ctx._quantized[_int8_options().describe()] = spec_path
            params, macs = onnx_params_and_macs(spec_path)
            sizes["onnx-int8" if onnx_model.quantized else "onnx"] = round(file_mb(spec_path), 3)
            result.update(params=params, file_mb=round(file_mb(spec_path), 3), gmacs=round(macs / 1e9, 4),
                          input_size=list(hw), embedding_size=onnx_model.info.embedding_size,
                          quantized=bool(onnx_model.quantized))
            if onnx_model.quantized:
                runtimes = ["onnxruntime-int8" if r == "onnxruntime" else r for r in runtimes
                            if r != "onnxruntime-int8"] or ["onnxruntime-int8"]
        else:
            model = load_source(model_spec, backbone=backbone, embedding_size=embedding_size, input_size=input_size)
            if backbone and weights == "trained-looking":
                model = trained_looking(model)
            info = ModelInfo.of(model)
            hw = info.image_size
            ctx = BenchContext(hw, threads, workdir, model=model, normalize=info.normalize,
                               device=str(gpu) if gpu is not None else "cpu")
            if spec_path is not None and info.source:
                sizes["checkpoint"] = round(file_mb(info.source), 3)
            sizes["onnx"] = round(file_mb(ctx.fp32_onnx()), 3)
            result.update(params=count_parameters(model), file_mb=sizes["onnx"], gmacs=round(count_macs(model) / 1e9, 4),
                          input_size=list(hw), embedding_size=info.embedding_size)
        latency, throughput, skipped, agreement = {}, {}, {}, {}
        x1 = _bench_input(hw, 1)
        xb = _bench_input(hw, throughput_batch)
        reference = None  # the first runtime's embeddings of xb[:16]: do the others agree?
        # PyTorch runtimes allocate activations through glibc; kept memory spares them the page
        # faults of a fresh mmap per tensor (ONNX Runtime has its own arena), as `eval` does.
        with torch_threads(threads), malloc.kept_freed_memory() as kept:
            for name in runtimes:
                try:
                    fn = builders[name](ctx)
                except (LookupError, UserError) as exc:
                    skipped[name] = str(exc)
                    continue
                except Exception as exc:  # one runtime failing must not lose the others' numbers
                    skipped[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
                    continue
                out = np.asarray(torch.as_tensor(fn(xb[:16])).float().numpy(), np.float64)
                if reference is None:
                    reference = out
                cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1) + 1e-12)
                agreement[name] = round(float(cos.min()), 6)
                latency[name] = latency_stats(time_runs(fn, x1, warmup=10, runs=runs, max_seconds=max_seconds))
                tt = time_runs(fn, xb, warmup=2, runs=throughput_runs, max_seconds=max_seconds, min_runs=3)
                throughput[name] = round(throughput_batch / float(np.median(tt)), 1)
        for key, path in (ctx._quantized.items() if ctx else ()):
            if path != ctx.given_onnx:
                sizes[f"onnx-{key}"] = round(file_mb(path), 3)
        for key, path in (ctx.mobile_files.items() if ctx else ()):
            sizes[key] = round(sum(file_mb(p) for p in [path, *(path.with_suffix(s) for s in
                                                              mobile.format_of(path).companions)]), 3)
        result.update(latency_ms=latency, throughput_ips=throughput, threads=threads, malloc_kept=kept,
                      min_cosine_vs_first=agreement,
                      batch={"latency": 1, "throughput": throughput_batch}, sizes_mb=sizes,
                      load_average=[round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None)
        if gpu is not None:
            result["device"] = f"{gpu} ({torch.cuda.get_device_name(gpu)})"
        if skipped:
            result["skipped"] = skipped
        if ctx is not None and ctx.auto_choice is not None:
            result["precision_auto"] = ctx.auto_choice.to_dict()
        return result


def _bench_input(hw: tuple[int, int], batch: int) -> np.ndarray:
    faces = parity_images(hw, min(batch, 16), seed=2)
    reps = -(-batch // len(faces))
    return np.ascontiguousarray(to_tensor(np.concatenate([faces] * reps)[:batch]).numpy())
