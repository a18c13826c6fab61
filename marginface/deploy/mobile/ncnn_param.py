"""NCNN export (``.param`` + ``.bin``) through pnnx, run with the ``ncnn`` Python binding.

Export: the BN-folded model is traced to TorchScript and handed to the pnnx binary (pip ``pnnx``)
in a private temporary folder, since pnnx writes its intermediates (``.pnnx.param``, ``.pnnx.bin``,
``.pnnx.onnx``, ``_pnnx.py``, ``_ncnn.py``) beside its input; only the NCNN pair is copied out, each
file atomically (the ``.bin`` first, so a ``.param`` never appears without its weights).
``fp32`` keeps 32-bit weights; ``fp16`` stores them as half floats (``fp16=1``: half the file).
int8 is not offered: the pip ``ncnn`` and ``pnnx`` packages do not ship ncnn's calibration and
quantisation tools (``ncnn2table``, ``ncnn2int8``).

Run: ``ncnn.Net`` with ``opt.num_threads``; an fp32 file runs with every fp16/bf16 option off
(NCNN turns fp16 storage/arithmetic on by default on CPUs that have it, which would break parity
with PyTorch); an fp16 file runs with fp16 storage and packing, fp32 arithmetic. NCNN's program
does not record the input size (the sidecar does; 112×112 without one); the embedding size is
what one probe image gives at load time, which also proves the pair loads and runs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from marginface.deploy.mobile import RuntimeEmbedder, check_companions_free, export_hw
from marginface.deploy.modelfile import atomic_path
from marginface.errors import UserError

PARAM_MAGIC = "7767517"  # first line of every NCNN .param text file
# the 4-byte tag before a weight blob in a .bin (ncnn's ModelBinFromDataReader)
STORAGE_TAGS = {0x00000000: "fp32", 0x01306B47: "fp16", 0x000D4B38: "int8"}
PNNX_TIMEOUT_S = 1800


def _check_suffix(out: Path) -> None:
    if out.suffix.lower() != ".param":
        raise UserError(f"{out}: an NCNN export is a .param file (its weights go beside it as .bin); "
                        f"name --out like model.param")


def export(model: torch.nn.Module, out: Path, *, precision: str, calib_images: Optional[np.ndarray],
           metadata: dict) -> dict:
    """Trace ``model``, convert it with pnnx and write ``out`` (.param) and ``out``.bin atomically."""
    import pnnx  # deferred: optional extra (marginface[ncnn]); this module is imported only once it is there

    del calib_images  # fp32/fp16 only: nothing to calibrate
    out = Path(out)
    _check_suffix(out)
    check_companions_free(out)
    if precision not in ("fp32", "fp16"):
        raise UserError(f"--format ncnn takes --precision fp32 or fp16, got {precision}")
    h, w = export_hw(metadata, model)
    example = torch.zeros(1, 3, h, w)
    with tempfile.TemporaryDirectory(prefix="marginface-ncnn-") as work:
        work_dir = Path(work)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python values in the graph
            traced = torch.jit.trace(model.eval(), example, check_trace=False)
        traced.save(str(work_dir / "model.pt"))
        command = [pnnx.EXEC_PATH, "model.pt", f"inputshape=[1,3,{h},{w}]f32", f"fp16={int(precision == 'fp16')}",
                   "ncnnparam=model.ncnn.param", "ncnnbin=model.ncnn.bin"]
        try:
            done = subprocess.run(command, cwd=work_dir, capture_output=True, text=True, timeout=PNNX_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserError(f"{out}: pnnx could not run ({str(exc).splitlines()[0][:200]})") from None
        param, weights = work_dir / "model.ncnn.param", work_dir / "model.ncnn.bin"
        if done.returncode != 0 or not param.is_file() or not weights.is_file():
            last = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1]
            raise UserError(f"{out}: pnnx could not convert the model ({last[:200]})")
        with atomic_path(out.with_suffix(".bin")) as tmp:
            shutil.copyfile(weights, tmp)
        with atomic_path(out) as tmp:
            shutil.copyfile(param, tmp)
    return {"converter": f"pnnx {getattr(pnnx, '__version__', 'unknown')}", "companions": [str(out.with_suffix(".bin"))],
            "weights": precision, "bin_mb": round(out.with_suffix(".bin").stat().st_size / 2**20, 3)}


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list]:
    """File descriptor 2 into a list of lines while NCNN loads: its C++ code prints errors there,
    and the CLI's contract is one ``error:`` line."""
    sys.stderr.flush()
    saved = os.dup(2)
    lines: list = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line for line in sink.read().decode("utf-8", "replace").splitlines() if line.strip())


def _storage(weights: Path) -> Optional[str]:
    """The precision the first weight blob of a .bin is stored in (None: not a tag we know, e.g.
    a model whose first weights are untagged BatchNorm data)."""
    with open(weights, "rb") as f:
        head = f.read(4)
    return STORAGE_TAGS.get(struct.unpack("<I", head)[0]) if len(head) == 4 else None


class Embedder(RuntimeEmbedder):
    """An NCNN ``.param`` + ``.bin`` pair run by the ``ncnn`` Python binding, one image at a time."""

    kind = "ncnn"
    fixed_batch = 1

    def __init__(self, path, normalize=None, *, threads: Optional[int] = None):
        import ncnn  # deferred: optional extra (marginface[ncnn])

        path = Path(path)
        weights = path.with_suffix(".bin")
        try:
            with open(path, "rb") as f:
                first = f.readline(64).strip()
            stored = _storage(weights)
        except OSError as exc:
            raise UserError(f"{path}: could not read the NCNN model ({exc.strerror or exc})") from None
        if first != PARAM_MAGIC.encode():
            raise UserError(f"{path}: not an NCNN .param file (it does not start with {PARAM_MAGIC})")
        self._set_info(path, normalize, precision="fp32")  # the sidecar's input size and normalisation first
        meta_precision = str(self.metadata.get("quantization", "none"))
        precision = stored or (meta_precision if meta_precision in ("fp16", "int8") else "fp32")
        net = ncnn.Net()
        half = precision == "fp16"
        net.opt.use_fp16_storage = half
        net.opt.use_fp16_packed = half
        net.opt.use_fp16_arithmetic = False  # fp32 sums: parity with the PyTorch model
        net.opt.use_bf16_storage = False
        if hasattr(net.opt, "use_bf16_packed"):
            net.opt.use_bf16_packed = False
        net.opt.use_vulkan_compute = False
        if threads:
            net.opt.num_threads = int(threads)
        with _captured_stderr() as said:
            param_rc = net.load_param(str(path))
            model_rc = net.load_model(str(weights)) if param_rc == 0 else -1
        reason = f" ({said[-1][:200]})" if said else ""
        if param_rc != 0:
            raise UserError(f"{path}: not a readable NCNN .param file{reason}")
        if model_rc != 0:
            raise UserError(f"{weights}: truncated, or not the weights of {path.name}{reason}")
        inputs, outputs = list(net.input_names()), list(net.output_names())
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{path}: expected one input and one output blob, found {inputs} and {outputs}")
        self._ncnn, self._net, self._input, self._output = ncnn, net, inputs[0], outputs[0]
        h, w = self.info.input_size
        with _captured_stderr() as said:
            try:
                probe = self._run(np.zeros((1, 3, h, w), np.float32))
            except UserError:
                raise UserError(f"{path}: does not run on a 1×3×{h}×{w} input"
                                f"{' (' + said[-1][:200] + ')' if said else ''}") from None
        self._set_info(path, normalize, input_size=(h, w), embedding_size=int(probe.size), precision=precision)

    def _run(self, x: np.ndarray) -> np.ndarray:
        image = np.array(x[0], dtype=np.float32, order="C")  # our own copy: the Mat wraps its memory
        ex = self._net.create_extractor()
        rc = ex.input(self._input, self._ncnn.Mat(image))
        if rc == 0:
            rc, out = ex.extract(self._output)
        if rc != 0:
            raise UserError(f"{self.path}: NCNN could not run the model (code {rc})")
        return np.array(out, dtype=np.float32).reshape(1, -1)
