"""Compiled PyTorch inference (AOTInductor): fp32, bf16 and x86 int8 for servers and evaluation.

Why this exists next to the ONNX export: ONNX Runtime has no int8 PReLU, so in an int8 ``mbf``
every PReLU round-trips through float (about a third of its int8 time). PyTorch's PT2E
int8 flow (``torchao``'s X86InductorQuantizer: static, per-channel weights, per-tensor uint8
activations) compiled by Inductor runs the convolutions as oneDNN int8 kernels (VNNI / AMX) and
fuses each ``dequantize -> PReLU -> quantize`` between them into one vectorised C++ loop. With
``freezing`` Inductor also folds BatchNorm into the convolutions and prepacks the weights. The
graph is compiled ahead of time into a shared library called from C++ (no Python or Dynamo
guards per call). The figures are in docs/deployment.md (``benchmarks/inference_latency.py``).

Inductor specialises on the input shape and on the thread count at compile time, so an embedder
runs every call in chunks of one fixed ``batch_size`` (padding the last chunk), and should be
built under the thread setting it will run with. On the CPU small chunks are faster per image:
their activations stay in the caches (mbf int8 embeds 12,000 images with flip in ~65 s in chunks
of 16 vs ~85 s in chunks of 128 on the 2-core VM; ``benchmarks/eval_speed.py --compile-batch``).
The first call compiles (15-30 s on 2 cores). int8 is calibrated on ``calibration`` or, when that
is None, on the whole first batch it is given.

Known quirk (torch 2.13 + torchao 0.18, cause not found): quantising another model in the same
process makes an int8 embedder built *before* it run ~2x slower (no recompilation is logged; the
newest one is unaffected). Build one int8 embedder per process and reuse it, as ``eval`` does.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Optional, Union

import torch

from marginface.deploy.fold import regroup_thin_convs
from marginface.deploy.modelfile import atomic_path
from marginface.errors import UserError
from marginface.inference import DEFAULT_NORMALIZE, InfoAttributes, ModelInfo, PRECISIONS as INFERENCE_PRECISIONS
from marginface.hardware import has_int8_dot_product, int8_weight_range, missing_features
from marginface.io.trust import COMPILED, WHY
from marginface.models.layers import set_fast_layers

PRECISIONS = tuple(p for p in INFERENCE_PRECISIONS if p != "fp16")  # the compiled subset of inference.PRECISIONS
PACKAGE_METADATA = "marginface"  # key of our JSON in a .pt2 package's metadata
DEFAULT_CHUNK = {"cpu": 16, "cuda": 128}  # images per compiled call when batch_size is None
# the `ModelInfo` fields a package records (in its metadata, under these names since the first packages)
_COPIED_ATTRIBUTES = ("input_size", "embedding_size", "normalize", "threshold", "threshold_source", "model_path")


def _inference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy with the stock ``nn.Conv2d``/``nn.PReLU`` classes (the quantizer matches
    layers by class, and the fast layers' autograd tricks are training-only anyway) and thin-group
    convs regrouped (`deploy.fold.regroup_thin_convs`: mbf int8 3.7 vs 5.0 ms at batch 1)."""
    stock = copy.deepcopy(model).eval()
    set_fast_layers(stock, False)
    return regroup_thin_convs(stock)


def _import_torchao():
    # torchao logs on import: its optional CUDA kernels missing, an Enum registration torch deprecates
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.pt2e import move_exported_model_to_eval
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
            import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401  registers the int8 fusions
    except ImportError as exc:
        raise UserError(f"int8 PyTorch inference needs torchao ({exc}); pip install 'marginface[int8]'") from exc
    return prepare_pt2e, convert_pt2e, move_exported_model_to_eval, x86


def quantize_x86(model: torch.nn.Module, calibration: torch.Tensor,
                 weight_range: Optional[tuple[int, int]] = None) -> torch.nn.Module:
    """Static int8 (PT2E, X86InductorQuantizer defaults) of an eval-mode model, calibrated on the
    normalised ``N×3×H×W`` float ``calibration`` batch. The result runs (slowly) as it is and is
    meant for ``torch.compile`` with freezing, which lowers it to oneDNN int8 kernels.

    ``weight_range``: the symmetric int8 weight range, by default the one this CPU's oneDNN
    computes without saturating (`marginface.hardware.int8_weight_range`: 7 bits without VNNI)."""
    prepare_pt2e, convert_pt2e, to_eval, x86 = _import_torchao()
    low, high = weight_range or int8_weight_range()
    config = x86.get_default_x86_inductor_quantization_config()
    config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=low, quant_max=high))
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(config)
    batch = torch.export.Dim("batch", min=1, max=65536)
    # export specialises a batch-1 example to 1; two copies keep the batch axis dynamic
    example = calibration if len(calibration) > 1 else calibration.repeat(2, 1, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(_inference_copy(model), (example,), dynamic_shapes=({0: batch},)).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            prepared(calibration)
        quantized = convert_pt2e(prepared)
    to_eval(quantized)
    return quantized


class CompiledEmbedder(InfoAttributes):
    """``embedder(x)`` for a normalised float ``N×3×H×W`` batch -> ``N×D`` float32, compiled by Inductor.

    Its ``info`` is the source model's `ModelInfo` with ``kind="compiled"`` and this precision, so
    the evaluation runner, ``marginface bench`` and the pipeline can use it in place of the model.
    """

    # a context-manager factory wrapped around the first call's quantise + compile (the command line's
    # progress line, marginface.io.progress.Working); None: nothing is said
    build_progress = None

    def __init__(self, model: torch.nn.Module, precision: str = "fp32", *, batch_size: Optional[int] = None,
                 calibration: Optional[torch.Tensor] = None, device: Union[str, torch.device] = "cpu"):
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        if batch_size is None:
            batch_size = DEFAULT_CHUNK.get(self.device.type, DEFAULT_CHUNK["cuda"])
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if precision == "int8" and self.device.type != "cpu":
            raise UserError("int8 PyTorch inference is the x86 CPU path; use --precision bf16 on a GPU")
        # TorchScript (also inside deploy.load's wrapper) can be neither exported nor compiled
        if not isinstance(model, torch.nn.Module) or any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
            raise UserError("compiled inference needs a PyTorch model (run directory or checkpoint), not "
                            f"{type(model).__name__} (an ONNX model gets int8 from `marginface export --int8`)")
        self.info = ModelInfo.of(model).replace(kind="compiled", precision=precision)
        self.precision, self.batch_size = precision, batch_size
        self._source, self._calibration, self._compiled = model, calibration, None
        self._package: Optional[str] = None  # the compiled .pt2, once built
        self._image_shape: Optional[tuple] = None  # (3, H, W) it was compiled for

    def _build(self, first: torch.Tensor) -> None:
        if self.precision == "int8":
            calibration = self._calibration if self._calibration is not None else first
            self._weight_range = int8_weight_range()
            net = quantize_x86(self._source, calibration.float().cpu(), self._weight_range)
        else:
            net = _inference_copy(self._source).to(self.device)
            if self.precision == "bf16":
                net = net.to(torch.bfloat16)
            net = net.to(memory_format=torch.channels_last)
        self._source = self._calibration = None  # the compiled graph holds what it needs
        example = self._prepare(first[: self.batch_size], pad=True)
        # Ahead-of-time (AOTInductor): the graph becomes a shared library run from C++, with no
        # Dynamo guards or Python launcher per call (mbf int8 batch 1: 3.5-4.1 vs 4.7-4.8 ms with
        # torch.compile). freezing folds BatchNorm and prepacks the (int8) weights.
        package_dir = tempfile.mkdtemp(prefix="marginface-compiled-")
        weakref.finalize(self, shutil.rmtree, package_dir, ignore_errors=True)
        self._image_shape = tuple(example.shape[1:])
        options = {"freezing": True, "aot_inductor.metadata": {PACKAGE_METADATA: json.dumps(self._metadata())}}
        with torch._inductor.config.patch(options), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # export and Inductor's int8 lowering warn about internals
            program = torch.export.export(net, (example,))
            self._package = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(package_dir, "model.pt2"))
        self._compiled = torch._inductor.aoti_load_package(self._package)

    def _metadata(self) -> dict:
        """What `load` needs to run a saved package as this embedder ran it."""
        info = self.info.to_dict()
        meta = {name: info[name] for name in _COPIED_ATTRIBUTES if name != "model_path"}
        meta = {**meta, "backbone": info["backbone"], "precision": self.precision, "batch_size": self.batch_size, "device": self.device.type,
                "image_shape": list(self._image_shape), "torch": torch.__version__}
        if self.precision == "int8":
            meta["int8_weight_range"] = list(self._weight_range)
        return meta

    def save(self, path: Union[str, Path]) -> Path:
        """Write the compiled package (``.pt2``; atomically): `load` runs it with no recompiling,
        on a machine with the same torch version and CPU instruction sets (or CUDA)."""
        if self._package is None:
            raise UserError("nothing compiled yet: embed a batch first (compiling happens on the first call)")
        with atomic_path(path) as tmp:
            shutil.copyfile(self._package, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: Union[str, Path], normalize: Optional[str] = None, *,
             trust_code: bool = False) -> "CompiledEmbedder":
        """A package written by `save` (``marginface export --format aoti``), ready to run.

        Opening a package loads the native code in it: refused unless ``trust_code``."""
        path = Path(path)
        if not trust_code:
            raise UserError(f"{path}: {WHY[COMPILED]}; pass --trust-code if you trust this file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                runner = torch._inductor.aoti_load_package(str(path))
                meta = json.loads(runner.get_metadata().get(PACKAGE_METADATA) or "null")
            except Exception as exc:  # a zip/ABI/ISA error: one line
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise UserError(f"{path}: not a loadable compiled package ({first})") from None
        missing = missing_features(runner.get_metadata().get("AOTI_CPU_ISA", ""))
        if missing:  # running it would die on an illegal instruction, not raise
            raise UserError(f"{path}: compiled for a CPU with {', '.join(missing)}, which this one lacks; "
                            "export the package again on (a machine like) this one")
        if not isinstance(meta, dict) or meta.get("precision") not in PRECISIONS:
            raise UserError(f"{path}: a .pt2 package without marginface metadata (write it with "
                            "`marginface export --format aoti`)")
        weights = tuple(meta.get("int8_weight_range") or (-128, 127))  # packages before the field: 8 bits
        if meta["precision"] == "int8" and weights[1] > 63 and not has_int8_dot_product():
            raise UserError(f"{path}: an int8 package with 8-bit weights, which this CPU's int8 kernels (no "
                            "VNNI) would saturate into wrong embeddings; export it again on this machine "
                            "(it then uses 7-bit weights)")
        embedder = cls.__new__(cls)
        try:
            embedder.info = ModelInfo(
                input_size=meta.get("input_size") or tuple(meta["image_shape"][1:]),
                embedding_size=meta.get("embedding_size"), normalize=normalize or meta.get("normalize") or DEFAULT_NORMALIZE,
                threshold=meta.get("threshold"), threshold_source=meta.get("threshold_source"), source=str(path),
                kind="compiled", precision=meta["precision"], backbone=meta.get("backbone"))
        except (UserError, KeyError, TypeError, IndexError) as exc:
            raise UserError(f"{path}: bad marginface metadata: {exc}") from None
        embedder.metadata = meta
        embedder.precision, embedder.batch_size = meta["precision"], int(meta["batch_size"])
        embedder.device = torch.device(meta.get("device", "cpu"))
        embedder._source = embedder._calibration = None
        embedder._package, embedder._compiled = str(path), runner
        embedder._image_shape = tuple(meta["image_shape"])
        return embedder

    def _prepare(self, x: torch.Tensor, pad: bool) -> torch.Tensor:
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        if pad and len(x) < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - len(x), *x.shape[1:]))])
        return x.to(self.device, dtype).contiguous(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 4:
            raise ValueError(f"expected an N×3×H×W batch, got shape {tuple(x.shape)}")
        outputs = []
        with torch.no_grad():
            if self._compiled is None:
                try:
                    with self.build_progress() if self.build_progress is not None else contextlib.nullcontext():
                        self._build(x)
                except UserError:
                    raise
                except Exception as exc:  # export/quantise/compile failures: one line, not a 200-line trace
                    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                    raise UserError(f"compiling the model for {self.precision} inference failed: "
                                    f"{type(exc).__name__}: {first}") from exc
            if tuple(x.shape[1:]) != self._image_shape:  # the compiled code does not check shapes itself
                raise ValueError(f"this compiled model takes {self._image_shape[0]}×{self._image_shape[1]}×"
                                 f"{self._image_shape[2]} images, got {tuple(x.shape[1:])}")
            for start in range(0, len(x), self.batch_size):
                chunk = x[start : start + self.batch_size]
                out = self._compiled(self._prepare(chunk, pad=True))
                outputs.append(out[: len(chunk)].float())
        return torch.cat(outputs).to(x.device)

