"""Phone and edge runtimes (ExecuTorch, LiteRT, NCNN, OpenVINO): one registry, one metadata sidecar,
one embedder base.

Each format lives in its own module here (``marginface.deploy.mobile.<module>``), imported only when
that format is used (its converter and runtime are optional extras), and provides:

- ``export(model, out, *, precision, calib_images, metadata) -> dict``: write the model file(s) for
  the BatchNorm-folded eval-mode ``model`` atomically (``calib_images``: ``N×H×W×3`` uint8 RGB
  aligned crops for int8, else None; ``metadata``: `deploy.export.build_metadata`'s dict, written
  beside the model by the caller as `write_sidecar`); returns what the report should add
  (converter versions, quantisation scheme, companion files);
- ``Embedder(path, normalize=None, *, threads=None)``: a `RuntimeEmbedder` running the file with
  the format's own runtime (so accuracy is measured with the code that ships, not with PyTorch).

`export_model`, `load_model` and `bench` find formats through `MOBILE_FORMATS` only.
"""
from __future__ import annotations

import abc
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from marginface.errors import UserError
from marginface.inference import DEFAULT_NORMALIZE, NORMALIZE_NAMES, InfoAttributes, ModelInfo, as_hw
from marginface.io.atomic import atomic_write_text

SIDECAR_SUFFIX = ".json"  # ``mbf.tflite`` -> ``mbf.tflite.json``: the metadata every format carries


@dataclass(frozen=True)
class MobileFormat:
    """A mobile/edge export format: ``name`` (``--format``, ``ModelInfo.kind``), the file suffixes
    `load_model` recognises, its module, the pip extra, the import names its runtime (to load) and
    its converter (to export) need, and the ``--precision`` values its exporter takes."""

    name: str
    suffixes: tuple[str, ...]
    module: str
    extra: str
    runtime: tuple[str, ...]
    converter: tuple[str, ...]
    precisions: tuple[str, ...] = ("fp32", "int8")
    companions: tuple[str, ...] = ()  # suffixes of files that must sit beside the model (NCNN's .bin)

    def load_module(self, purpose: str = "runtime"):
        """The format's module once the packages ``purpose`` ("runtime" or "converter") needs import;
        a missing one is one line naming the extra that installs it."""
        for package in getattr(self, purpose):
            try:
                importlib.import_module(package)
            except ImportError:
                raise UserError(f"{self.name} models need the Python package {package!r}: "
                                f"pip install 'marginface[{self.extra}]'") from None
        return importlib.import_module(f"marginface.deploy.mobile.{self.module}")


# name -> format: the one list `export --format`, `load_model` and `bench` read
MOBILE_FORMATS: dict[str, MobileFormat] = {f.name: f for f in (
    MobileFormat("executorch", (".pte",), "executorch_pte", "executorch", runtime=("executorch",),
                 converter=("executorch",)),
    MobileFormat("tflite", (".tflite",), "litert_tflite", "litert", runtime=("ai_edge_litert",),
                 converter=("litert_torch", "ai_edge_quantizer", "ai_edge_litert")),
    MobileFormat("ncnn", (".param",), "ncnn_param", "ncnn", runtime=("ncnn",), converter=("pnnx",),
                 precisions=("fp32", "fp16"), companions=(".bin",)),
    MobileFormat("openvino", (".xml",), "openvino_ir", "openvino", runtime=("openvino",), converter=("openvino",),
                 precisions=("fp32", "fp16", "int8"), companions=(".bin",)),  # int8 also needs nncf
)}


def format_of(path: Union[str, Path]) -> Optional[MobileFormat]:
    """The mobile format a model file's suffix names, or None."""
    suffix = Path(path).suffix.lower()
    return next((f for f in MOBILE_FORMATS.values() if suffix in f.suffixes), None)


# ---------------------------------------------------------------------------------------------- sidecar
def sidecar_path(path: Union[str, Path]) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: Union[str, Path], metadata: dict) -> Path:
    """Our metadata (`deploy.export.METADATA_KEYS`) as JSON beside the model file, atomically."""
    target = sidecar_path(path)
    atomic_write_text(target, json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return target


def read_sidecar(path: Union[str, Path]) -> dict:
    """The sidecar's metadata, ``{}`` when there is none (a model converted elsewhere); a sidecar
    that is not a JSON object is a one-line error naming it."""
    target = sidecar_path(path)
    if not target.is_file():
        return {}
    try:
        meta = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{target}: not a marginface metadata file ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{target}: not a marginface metadata file (expected a JSON object)")
    return meta


# ---------------------------------------------------------------------------------------------- embedder
class RuntimeEmbedder(InfoAttributes, abc.ABC):
    """Base of the mobile runtimes' embedders (an `marginface.inference.Embedder`): ``info`` from the
    sidecar (input size, normalisation, threshold...) with the runtime's own input/output shapes
    taking precedence; calls go through ``run_numpy`` (normalised ``N×3×H×W`` float32 -> ``N×D``),
    one image at a time when the runtime's program has a fixed batch of 1.

    Subclasses set ``self.fixed_batch`` (None: any batch) and implement ``_run(x)`` for one
    batch the program accepts, after calling ``_set_info``."""

    kind = "module"
    fixed_batch: Optional[int] = 1

    def _set_info(self, path: Path, normalize: Optional[str], *, input_size=None, embedding_size=None,
                  precision: str = "fp32") -> None:
        self.path = Path(path)
        self.metadata = read_sidecar(self.path)
        meta = self.metadata
        recorded = meta.get("normalize")
        if normalize is None and recorded is not None and recorded not in NORMALIZE_NAMES:
            raise UserError(f"{sidecar_path(self.path)}: asks for normalisation {recorded!r}, which marginface "
                            f"does not know; pass --normalize arcface or imagenet")
        size = meta.get("embedding_size")
        try:
            self.info = ModelInfo(
                input_size=input_size or as_hw(meta.get("input_size")) or (112, 112),
                embedding_size=embedding_size or (int(size) if str(size or "").isdigit() else None),
                normalize=normalize or recorded or DEFAULT_NORMALIZE,
                threshold=meta.get("threshold"), threshold_source=meta.get("threshold_source"),
                source=str(self.path), kind=self.kind, precision=precision, backbone=meta.get("backbone"))
        except UserError as exc:
            raise UserError(f"{self.path}: bad marginface metadata: {exc}") from None

    @abc.abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray:
        """One batch the program accepts (``N×3×H×W`` float32) -> its output."""

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        """``N×3×H×W`` float32 (already normalised) -> ``N×D`` float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"{self.path.name}: expected N×3×{self.input_size[0]}×{self.input_size[1]} input, "
                             f"got {tuple(x.shape)}")
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            out = self._run(x)
        elif self.fixed_batch == 1:
            out = np.concatenate([self._run(x[i : i + 1]) for i in range(len(x))]) if len(x) else \
                np.zeros((0, self.embedding_size or 0), np.float32)
        else:
            raise ValueError(f"{self.path.name}: program has a fixed batch of {self.fixed_batch}; got {len(x)}")
        return np.asarray(out, dtype=np.float32).reshape(len(x), -1)

    def __call__(self, x) -> torch.Tensor:
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return torch.from_numpy(self.run_numpy(arr))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}, {self.info.precision})"


def export_hw(metadata: dict, model: torch.nn.Module) -> tuple[int, int]:
    """The ``(H, W)`` an exporter traces at: the metadata's ``input_size``, else the model's (112 by default)."""
    return as_hw(metadata.get("input_size")) or as_hw(getattr(model, "input_size", None)) or (112, 112)


def check_companions_free(out: Union[str, Path]) -> None:
    """Refuse an export whose companion file belongs to another model beside it: NCNN's ``m.param``
    and OpenVINO's ``m.xml`` both keep their weights in ``m.bin``, and writing one must not break
    the other."""
    out = Path(out)
    fmt = format_of(out)
    for suffix in (fmt.companions if fmt else ()):
        for other in MOBILE_FORMATS.values():
            owner = out.with_suffix(other.suffixes[0])
            if other is not fmt and suffix in other.companions and owner.is_file():
                raise UserError(f"{out}: its {suffix} file {owner.with_suffix(suffix).name} would replace the "
                                f"weights of {owner.name} ({other.name}); choose another name")


def load(path: Union[str, Path], normalize: Optional[str] = None, *, threads: Optional[int] = None):
    """The embedder for a mobile model file (`format_of` must name its format)."""
    path = Path(path)
    fmt = format_of(path)
    if fmt is None:
        raise UserError(f"{path}: not a mobile model file ({', '.join(s for f in MOBILE_FORMATS.values() for s in f.suffixes)})")
    for suffix in fmt.companions:
        companion = path.with_suffix(suffix)
        if not companion.is_file():
            raise UserError(f"{path}: its {suffix} file {companion.name} is missing; keep them side by side")
    return fmt.load_module().Embedder(path, normalize, threads=threads)


def export(name: str, model: torch.nn.Module, out: Union[str, Path], *, precision: str,
           calib_images: Optional[np.ndarray], metadata: dict) -> dict:
    """Write ``model`` as format ``name`` to ``out`` plus the metadata sidecar; the format's report."""
    fmt = MOBILE_FORMATS[name]
    if precision not in fmt.precisions:
        raise UserError(f"--format {name} takes --precision {' or '.join(fmt.precisions)}, got {precision}")
    module = fmt.load_module("converter")
    report = module.export(model, Path(out), precision=precision, calib_images=calib_images, metadata=metadata)
    report["sidecar"] = str(write_sidecar(out, metadata))
    return report
