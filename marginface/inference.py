"""The inference contract: what a loaded model is (`ModelInfo`), what calling it means (`Embedder`)
and how a set of images is embedded with it (`EmbedOptions`).

Every loader in `marginface.deploy.load` returns an object that is an `Embedder`: calling it on a
normalised float ``N×3×H×W`` tensor gives ``N×D`` (un-normalised) embeddings, and its ``.info`` is
a frozen `ModelInfo` resolved once, when the model was loaded. Readers (evaluation, export, the
photo pipeline, the command line) use ``info.<field>``; this module and ``deploy/load.py`` are the
only places that pick defaults. `ModelInfo.of` turns an object without ``.info`` (a bare backbone
from training, a test's callable) into one, reading the attributes such objects used to carry.

Imports only torch, the standard library and `marginface.errors` (a low-level module).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union, runtime_checkable

import torch

from marginface.errors import UserError

NORMALIZE_NAMES = ("arcface", "imagenet")
DEFAULT_NORMALIZE = "arcface"  # the field's convention (insightface-style models)
DEFAULT_INPUT_SIZE = (112, 112)  # the ArcFace crop, used where a model does not say its size
KINDS = ("checkpoint", "state_dict", "onnx", "torchscript", "compiled", "random", "module",
         "executorch", "tflite", "ncnn", "openvino")  # the last four: phone/edge runtimes (deploy.mobile)
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SIDE = 4096  # an input side beyond this is not a face crop


def resolve_device(name: Union[str, "torch.device"], where: str = "device") -> "torch.device":
    """The one device resolver (training's ``train.device``, ``eval --device``, ...): ``"auto"`` is
    CUDA when available, else the CPU; anything else must be a torch device that exists here.
    Errors are one line starting with ``where`` (the config key or flag that named it)."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{where} is not a device: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{where} asks for {name} but CUDA is not available")
    return device

def check_normalize(name: Optional[str], where: str = "normalize") -> Optional[str]:
    """``name`` if it is a normalisation marginface knows (or None); else a `UserError` naming it."""
    if name is not None and name not in NORMALIZE_NAMES:
        raise UserError(f"{where} must be one of {', '.join(NORMALIZE_NAMES)}, got {name!r}")
    return name


def as_hw(size: Any, where: str = "input_size") -> Optional[tuple[int, int]]:
    """An input size as ``(H, W)``: an int ``s`` means ``(s, s)``; a pair or a ``"H,W"`` string stays
    as it is; None stays None. Anything else (or a side outside 1..4096) is a `UserError`."""
    if size is None:
        return None
    if isinstance(size, str):
        size = [part.strip() for part in size.split(",")]
        size = size[0] if len(size) == 1 else size
    if isinstance(size, bool):
        raise UserError(f"{where}: expected an int or (H, W), got {size!r}")
    try:
        if isinstance(size, (int, float, str)) or (torch.is_tensor(size) and size.ndim == 0):
            height = width = size
        else:
            height, width = size
        hw = (int(height), int(width))
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected an int or (H, W), got {size!r}") from None
    if not all(1 <= v <= MAX_SIDE for v in hw) or any(float(v) != float(o) for v, o in zip(hw, (height, width))):
        raise UserError(f"{where}: expected whole sides in 1..{MAX_SIDE}, got {size!r}")
    return hw


def pick_threshold(last_eval: dict, best_metric: str = "") -> tuple[Optional[float], Optional[str]]:
    """The eval-time threshold of a checkpoint's ``last_eval``: the set named by the run's
    ``eval.best_metric`` ("<set>/<metric>") if it has one, else the first set that reports one."""
    if not isinstance(last_eval, dict) or not last_eval:
        return None, None
    preferred = best_metric.split("/", 1)[0] if best_metric else ""
    names = ([preferred] if preferred in last_eval else []) + [n for n in last_eval if n != preferred]
    for name in names:
        metrics = last_eval.get(name)
        value = metrics.get("threshold") if isinstance(metrics, dict) else None
        if isinstance(value, (int, float)) and value == value:  # not NaN
            return float(value), str(name)
    return None, None


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is, resolved once by its loader.

    ``input_size``: ``(H, W)`` of the aligned crops it takes (always a pair; None only for a legacy
    callable that never said, see `of`: it then takes images at whatever size they come);
    ``embedding_size``: D (None when the file does not tell); ``normalize``: "arcface" or
    "imagenet"; ``threshold`` / ``threshold_source``: the verification threshold (cosine) picked at
    eval time and the set it came from (None when the model carries none); ``source``: the file it
    was loaded from (None for a model built in memory); ``kind``: one of `KINDS`;
    ``precision``: "fp32", "bf16", "fp16" or "int8" (what its weights run in); ``backbone``: the
    architecture's name where known.
    """

    input_size: Optional[tuple[int, int]] = DEFAULT_INPUT_SIZE
    embedding_size: Optional[int] = None
    normalize: str = DEFAULT_NORMALIZE
    threshold: Optional[float] = None
    threshold_source: Optional[str] = None
    source: Optional[str] = None
    kind: str = "module"
    precision: str = "fp32"
    backbone: Optional[str] = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the canonical forms are set once, here
        set_(self, "input_size", as_hw(self.input_size))
        check_normalize(self.normalize)
        if self.normalize is None:
            raise UserError(f"normalize must be one of {', '.join(NORMALIZE_NAMES)}, got None")
        if self.embedding_size is not None:
            try:
                size = int(self.embedding_size)
            except (TypeError, ValueError):
                raise UserError(f"embedding_size: expected a positive int, got {self.embedding_size!r}") from None
            if size < 1:
                raise UserError(f"embedding_size: expected a positive int, got {self.embedding_size!r}")
            set_(self, "embedding_size", size)
        threshold = self.threshold
        if isinstance(threshold, str):
            threshold = None if threshold.strip().lower() in ("", "none", "null") else threshold
        if threshold is not None:
            try:
                threshold = float(threshold)
            except (TypeError, ValueError):
                raise UserError(f"threshold: expected a number, got {self.threshold!r}") from None
            threshold = threshold if math.isfinite(threshold) else None
        set_(self, "threshold", threshold)
        source = self.threshold_source if threshold is not None else None
        set_(self, "threshold_source", None if source in (None, "", "none") else str(source))
        if self.source is not None:
            set_(self, "source", str(self.source))
        if self.kind not in KINDS:
            raise UserError(f"model kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def image_size(self) -> tuple[int, int]:
        """``input_size``, or the ArcFace 112x112 for a callable that does not say (the size to
        resize or align images to)."""
        return self.input_size or DEFAULT_INPUT_SIZE

    def replace(self, **changes) -> "ModelInfo":
        """A copy with ``changes`` (validated as at construction)."""
        return dataclasses.replace(self, **changes)

    def with_normalize(self, normalize: Optional[str]) -> "ModelInfo":
        """This info with the normalisation overridden (None: unchanged)."""
        return self if normalize is None or normalize == self.normalize else self.replace(normalize=normalize)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["input_size"] = list(self.input_size) if self.input_size is not None else None
        return out

    @classmethod
    def of(cls, model: Any) -> "ModelInfo":
        """``model.info`` when it has one; otherwise one read from the attributes models carried
        before this contract (``input_size``, ``embedding_size``, ``normalize``, ``threshold``,
        ``threshold_source``, ``model_path``, ``backbone_name``), e.g. a backbone being trained.
        A callable that names no input size gets ``input_size=None`` (images are not resized)."""
        info = getattr(model, "info", None)
        if isinstance(info, ModelInfo):
            return info
        attrs = {name: getattr(model, name, None) for name in (
            "input_size", "embedding_size", "normalize", "threshold", "threshold_source", "model_path",
            "backbone_name")}
        return cls(input_size=attrs["input_size"], embedding_size=attrs["embedding_size"],
                   normalize=attrs["normalize"] or DEFAULT_NORMALIZE, threshold=attrs["threshold"],
                   threshold_source=attrs["threshold_source"], source=attrs["model_path"], kind="module",
                   backbone=attrs["backbone_name"] or (type(model).__name__ if isinstance(model, torch.nn.Module)
                                                        else None))


@runtime_checkable
class Embedder(Protocol):
    """A loaded model: ``embedder(x)`` maps a normalised float ``N×3×H×W`` tensor to ``N×D``
    embeddings (not L2-normalised); ``embedder.info`` says what it is."""

    info: ModelInfo

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class InfoAttributes:
    """The attributes wrappers carried before `ModelInfo` (``input_size`` as (H, W),
    ``embedding_size``, ``normalize``, ``threshold``, ``threshold_source``, ``model_path``), now
    read-only views of ``self.info`` so the two can never disagree."""

    info: ModelInfo

    @property
    def input_size(self) -> Optional[tuple[int, int]]:
        return self.info.input_size

    @property
    def embedding_size(self) -> Optional[int]:
        return self.info.embedding_size

    @property
    def normalize(self) -> str:
        return self.info.normalize

    @property
    def threshold(self) -> Optional[float]:
        return self.info.threshold

    @property
    def threshold_source(self) -> Optional[str]:
        return self.info.threshold_source

    @property
    def model_path(self) -> Optional[str]:
        return self.info.source


def _autocast_dtype(value: Any) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value in ("fp32", "none"):
        return None
    if value in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[value]
    raise UserError(f"autocast dtype must be a torch dtype, 'bf16', 'fp16' or None, got {value!r}")


@dataclass(frozen=True)
class EmbedOptions:
    """How to embed a set of images: ``flip`` (add the mirror image's embedding, the field's
    test-time augmentation), ``batch_size``, ``device`` (the inputs are moved there; the model must
    already live there), ``normalize`` (overrides the model's own; None: ``info.normalize``) and
    ``amp_dtype`` (autocast dtype: ``torch.bfloat16``/``torch.float16`` or "bf16"/"fp16"; None or
    "fp32": none). ``precision`` names it ("fp32", "bf16", "fp16")."""

    flip: bool = True
    batch_size: int = 64
    device: Union[str, torch.device] = "cpu"
    normalize: Optional[str] = None
    amp_dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        check_normalize(self.normalize)
        set_(self, "flip", bool(self.flip))
        set_(self, "amp_dtype", _autocast_dtype(self.amp_dtype))
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise UserError(f"device: not a torch device, got {self.device!r}") from None

    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")

    def replace(self, **changes) -> "EmbedOptions":
        return dataclasses.replace(self, **changes)

    def normalize_for(self, info: ModelInfo) -> str:
        """The normalisation to feed a model: this override, else the model's own."""
        return self.normalize or info.normalize

    @classmethod
    def make(cls, options: Optional["EmbedOptions"] = None, *, default: Optional["EmbedOptions"] = None,
             **keywords) -> "EmbedOptions":
        """``options`` (else ``default``, else the defaults) with the keywords given as not None
        laid over it: how the functions that still take loose keywords turn them into one value."""
        base = options if options is not None else (default if default is not None else cls())
        changes = {k: v for k, v in keywords.items() if v is not None}
        return base.replace(**changes) if changes else base
