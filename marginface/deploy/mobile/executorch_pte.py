"""ExecuTorch: ``torch.export`` -> XNNPACK-delegated ``.pte`` (fp32, or static int8 through PT2E with
the XNNPACK quantizer), run by ExecuTorch's own C++ runtime through its Python bindings.

Export: the BatchNorm-folded model with the stock ``nn.Conv2d``/``nn.PReLU`` classes (the fast
layers' autograd tricks are training-only and do not export) is exported at batch 1 (a phone
embeds one face at a time; the program's input shape is fixed) and lowered with
``to_edge_transform_and_lower`` + ``XnnpackPartitioner``; every node of our backbones lands in the
one XNNPACK delegate (the report counts delegated and non-delegated nodes). int8: the XNNPACK
quantizer's symmetric config (``get_symmetric_quantization_config(is_per_channel=True)``): int8
weights symmetric per output channel, int8 activations affine per tensor with histogram observers,
calibrated on the given aligned crops, then ``convert_pt2e`` and the same lowering. XNNPACK runs
PReLU in float only, so each PReLU of an int8 ``mbf`` sits between a dequantize and a quantize
inside the delegate.

Runtime: ``executorch.extension.pybindings`` (the C++ runtime ``executorch.runtime.Runtime``
wraps); we import its compiled module directly, because ``portable_lib`` and ``executorch.runtime``
first import ``executorch.exir`` and torchao (about 4 s of CPU at start-up and log noise). The program
is verified (``Verification.InternalConsistency``) when it is loaded, so a truncated or foreign
file is one error line at load time. ``threads``: XNNPACK's thread pool is one per process
(``_unsafe_reset_threadpool``); an embedder built with ``threads=N`` resizes it to N before each
call when another embedder left it at another size (None: the runtime's default, one thread per
core). The runtime's C++ log lines (thread pool, cpuinfo, loader errors) go to the process's
stderr; they are captured while we load and resize, and a loader error becomes our one line.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from marginface.data.transforms import to_tensor
from marginface.deploy.mobile import RuntimeEmbedder
from marginface.deploy.modelfile import atomic_path
from marginface.errors import UserError
from marginface.inference import ModelInfo
from marginface.models.layers import set_fast_layers

try:  # the compiled bindings alone; see the module docstring
    from executorch.extension.pybindings import _C as _bindings
except ImportError:  # a release that renamed it: the public module re-exports the same names
    try:
        from executorch.extension.pybindings import portable_lib as _bindings
    except ImportError as exc:  # e.g. bindings built for another torch (undefined symbols)
        raise UserError(f"ExecuTorch's runtime does not load ({str(exc).splitlines()[0][:200]}); "
                        f"pip install 'marginface[executorch]' (executorch 1.5.x for torch 2.13)") from None

METHOD = "forward"
CALIBRATION_CHUNK = 32  # images per calibration call (histogram observers are per call, not per image)
FLOAT = 6  # ExecuTorch ScalarType::Float, as MethodMeta's TensorInfo.dtype() reports it
_LOG_LINE = re.compile(r"^\[[\w.]+:\d+\] ")  # an ExecuTorch C++ log line: "[program.cpp:168] ..."


def _version() -> str:
    try:
        from importlib.metadata import version  # deferred: only for the export report

        return version("executorch")
    except Exception:  # an unusual install without metadata still exports
        return "unknown"


# ---------------------------------------------------------------------------------------------- export
def _quiet_converter() -> None:
    # torchao (imported by executorch.exir) logs its missing optional CUDA kernels; torch deprecates
    # an Enum registration it makes
    for name in ("torchao", "torch.utils._pytree", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _stock(model: torch.nn.Module) -> torch.nn.Module:
    net = copy.deepcopy(model).eval()
    set_fast_layers(net, False)
    return net


def _quantize(net: torch.nn.Module, calibration: torch.Tensor) -> torch.nn.Module:
    """Static int8 (PT2E, XNNPACK quantizer) of ``net``, calibrated on the normalised batch."""
    # deferred: converter packages, imported only when exporting (several seconds, torchao)
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                           get_symmetric_quantization_config)
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                is_dynamic=False))
    # a dynamic batch axis lets the observers see the calibration set in a few large calls
    batch = torch.export.Dim("batch", min=1, max=max(2, CALIBRATION_CHUNK, len(calibration)))
    example = calibration[:2] if len(calibration) > 1 else calibration.repeat(2, 1, 1, 1)
    graph = torch.export.export(net, (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for chunk in calibration.split(CALIBRATION_CHUNK):
            prepared(chunk)
    quantized = convert_pt2e(prepared)
    move_exported_model_to_eval(quantized)
    return quantized


def export(model: torch.nn.Module, out: Path, *, precision: str, calib_images: Optional[np.ndarray],
           metadata: dict) -> dict:
    """Write ``model`` (eval mode, BatchNorm folded) as an XNNPACK-delegated ``.pte`` at ``out``."""
    _quiet_converter()
    # deferred: converter packages, imported only when exporting (several seconds, torchao)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    h, w = ModelInfo.of(model).image_size
    net = _stock(model)
    report = {"converter": f"executorch {_version()}", "delegate": "XnnpackBackend", "batch": 1,
              "input_shape": [1, 3, h, w]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export/pytree deprecation chatter, once per node
        if precision == "int8":
            if calib_images is None or len(calib_images) == 0:
                raise UserError("--precision int8 needs calibration images (--calib DIR)")
            net = _quantize(net, to_tensor(calib_images, metadata.get("normalize", "arcface")))
            report["quantization"] = ("PT2E XNNPACKQuantizer static int8: weights symmetric per output channel, "
                                      "activations affine per tensor (histogram observers)")
            report["calibration_images"] = int(len(calib_images))
        with torch.no_grad():
            program = torch.export.export(net, (torch.zeros(1, 3, h, w),))
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            delegation = get_delegation_info(edge.exported_program().graph_module)
            executorch_program = edge.to_executorch()
    report["delegated_nodes"] = int(delegation.num_delegated_nodes)
    report["non_delegated_nodes"] = int(delegation.num_non_delegated_nodes)
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        executorch_program.write_to_file(handle)
    return report


# ---------------------------------------------------------------------------------------------- runtime
@contextlib.contextmanager
def _native_stderr() -> Iterator[list]:
    """Capture what the runtime logs while the block runs, into the yielded list of lines: its C
    code writes to file descriptor 2, and the bindings send C++ stream output to ``sys.stderr``.
    Lines that are not the runtime's log lines are written back to ``sys.stderr``."""
    lines: list[str] = []
    python_side = io.StringIO()
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (a daemon): capture the Python side only
        saved = None
    with tempfile.TemporaryFile() as sink:
        if saved is not None:
            os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_side):
                yield lines
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace") + python_side.getvalue()
            lines.extend(line for line in text.splitlines() if line.strip())
            other = [line for line in lines if not _LOG_LINE.match(line)]
            if other:
                sys.stderr.write("\n".join(other) + "\n")


def _reason(exc: Exception, log: list) -> str:
    """The runtime's own words for a failed load: its last log line, else the exception."""
    logged = [_LOG_LINE.sub("", line) for line in log if _LOG_LINE.match(line) and "cpuinfo" not in line]
    text = logged[-1] if logged else (str(exc).splitlines() or [type(exc).__name__])[0]
    return text.strip()[:300]


def _set_threads(threads: Optional[int]) -> None:
    """Resize the process's thread pool to ``threads`` (None: only create it, as the first call
    would: its creation logs the CPU probing, captured here)."""
    with _native_stderr():
        if _bindings._threadpool_get_thread_count() != threads and threads is not None:
            _bindings._unsafe_reset_threadpool(threads)


class Embedder(RuntimeEmbedder):
    """A ``.pte`` program run by ExecuTorch's runtime (`RuntimeEmbedder`); its input shape (batch
    included) and embedding size come from the program's method metadata."""

    kind = "executorch"

    def __init__(self, path, normalize: Optional[str] = None, *, threads: Optional[int] = None):
        path = Path(path)
        if threads is not None and threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        _set_threads(threads)
        failure: Optional[Exception] = None
        with _native_stderr() as log:
            try:
                self._program = _bindings._load_program(
                    str(path), enable_etdump=False, debug_buffer_size=0,
                    program_verification=_bindings.Verification.InternalConsistency)
                names = [self._program.get_method_name(i) for i in range(self._program.num_methods())]
                if METHOD in names:
                    self._method = self._program.load_method(METHOD)
                    meta = self._method.method_meta()
            except Exception as exc:  # the bindings raise RuntimeError; the C++ log (read below) says why
                failure = exc
        if failure is not None:
            raise UserError(f"{path}: not a loadable ExecuTorch program ({_reason(failure, log)})")
        if METHOD not in names:
            raise UserError(f"{path}: ExecuTorch program has no {METHOD!r} method (it has {', '.join(names) or 'none'})")
        if meta.num_inputs() != 1 or meta.num_outputs() != 1:
            raise UserError(f"{path}: expected a program with 1 input and 1 output, got "
                            f"{meta.num_inputs()} and {meta.num_outputs()}")
        inp, outp = meta.input_tensor_meta(0), meta.output_tensor_meta(0)
        shape, out_shape = tuple(inp.sizes()), tuple(outp.sizes())
        if len(shape) != 4 or shape[1] != 3 or inp.dtype() != FLOAT or len(out_shape) != 2 or outp.dtype() != FLOAT:
            raise UserError(f"{path}: not a face embedder (input {list(shape)}, output {list(out_shape)}; "
                            f"expected float N×3×H×W -> N×D)")
        self.fixed_batch = int(shape[0])
        self._set_info(path, normalize, input_size=(int(shape[2]), int(shape[3])), embedding_size=int(out_shape[1]),
                       precision="fp32")
        quantization = self.metadata.get("quantization")
        if quantization in ("int8", "fp16"):  # the program itself does not say; our sidecar does
            self.info = self.info.replace(precision=quantization)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.threads is not None and _bindings._threadpool_get_thread_count() != self.threads:
            _set_threads(self.threads)  # another embedder resized the process's pool
        return self._method([torch.from_numpy(x)])[0].numpy()
