"""Embed pair-set images with a model and compute verification metrics (insightface protocol).

The model is any callable mapping a normalised float ``N×3×H×W`` tensor to ``N×D`` embeddings:
an ``nn.Module`` (put in eval mode for the call and restored afterwards) or e.g. an ONNX wrapper.
It must already live on ``device``; only the inputs are moved. A tuple/list output counts by its
first element (models that also return feature norms). What the model is comes from its ``.info``
(`marginface.inference.ModelInfo.of`): images are resized to ``info.input_size`` and normalised
with ``info.normalize`` unless `EmbedOptions` says otherwise.

How to embed is one `EmbedOptions` (``options=``); the loose keywords ``flip``, ``batch_size``,
``device``, ``normalize`` and ``amp_dtype`` still work and override it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional, Union

import cv2
import numpy as np
import torch

from marginface import hardware, malloc
from marginface.data.transforms import hflip, to_tensor
from marginface.data.verification import PairSet
from marginface.errors import UserError
from marginface.evaluate.metrics import verification_metrics
from marginface.inference import EmbedOptions, ModelInfo
from marginface.models.fold import fold_batchnorm, regroup_thin_convs  # shared with export

Model = Callable[[torch.Tensor], torch.Tensor]


class EvaluationStopped(Exception):
    """The ``stop`` callable of an evaluation said stop (checked between batches)."""


def _target_hw(model: Model) -> Optional[tuple[int, int]]:
    return ModelInfo.of(model).input_size


def _fit_to_model(images: np.ndarray, target: Optional[tuple[int, int]]) -> np.ndarray:
    if target is None or images.shape[1:3] == target:
        return images
    height, width = target
    return np.stack([cv2.resize(im, (width, height), interpolation=cv2.INTER_AREA) for im in images])


@contextlib.contextmanager
def _eval_mode(model: Model):
    """Eval mode for the duration (BN statistics, no dropout); the previous mode comes back."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _autocast(device: Union[str, torch.device], amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)


def _inference_model(model: Model) -> tuple[Model, bool]:
    """The fast eval path: ``(model to call, whether to feed it channels_last inputs)``.

    For an ``nn.Module`` (already in eval mode): a torch.fx copy with every Conv+BatchNorm folded
    into one convolution and thin-group convolutions regrouped (`deploy.fold.regroup_thin_convs`;
    the same function up to float rounding; the caller's model is untouched) fed with channels_last
    inputs, which oneDNN/cuDNN run faster for depthwise-heavy nets such as MobileFaceNet
    (figures: docs/performance.md, ``benchmarks/eval_speed.py``). A module that cannot be folded runs as it
    is; other callables (ONNX wrappers) get plain contiguous inputs.
    """
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.jit.ScriptModule):
        return model, False
    try:
        with torch.no_grad():
            folded = fold_batchnorm(model)
            on_cpu = all(p.device.type == "cpu" for p in folded.parameters())
            return (regroup_thin_convs(folded) if on_cpu else folded), True  # measured on oneDNN only
    except Exception:  # untraceable control flow, exotic modules: the plain model is always right
        return model, True


def embed_views(
    model: Model,
    images_uint8: np.ndarray,
    *,
    options: Optional[EmbedOptions] = None,
    batch_size: Optional[int] = None,
    flip: Optional[bool] = None,
    device: Optional[Union[str, torch.device]] = None,
    normalize: Optional[str] = None,
    amp_dtype: Optional[torch.dtype] = None,
    optimize: bool = True,
    stop: Optional[Callable[[], bool]] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Embeddings of the images and (with ``flip``) of their mirror images, each ``N×D`` float32.

    ``optimize`` takes the fast path of `_inference_model` (fp32 throughout; ``optimize=False``
    calls the model exactly as given). ``stop`` is asked before each batch; when it returns True
    the embedding ends with `EvaluationStopped` (the trainer's stop signal).
    """
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected N×H×W×3 uint8 RGB images, got {images.shape} {images.dtype}")
    if len(images) == 0:
        raise ValueError("no images to embed")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    options = EmbedOptions.make(options, batch_size=batch_size, flip=flip, device=device, normalize=normalize,
                                amp_dtype=amp_dtype)
    hardware.flush_denormals()  # subnormal activations: 10-100x slower on x86 (docs/performance.md)
    info = ModelInfo.of(model)
    target, normalize, device = info.input_size, options.normalize_for(info), options.device
    batch_size, flip = options.batch_size, options.flip

    def run(batch: np.ndarray) -> np.ndarray:
        x = to_tensor(batch, normalize).to(device)
        out = net(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out = torch.as_tensor(out)
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise ValueError(f"model returned shape {tuple(out.shape)} for {len(batch)} images; expected N×D")
        return out.float().cpu().numpy()

    plain, mirrored = [], []
    with _eval_mode(model):
        net, channels_last = _inference_model(model) if optimize else (model, False)
    # On the CPU, glibc would mmap/munmap every large activation; the page faults cost time (docs/performance.md).
    keep_memory = malloc.kept_freed_memory(torch.device(device).type == "cpu")
    with keep_memory, _eval_mode(net), torch.inference_mode(), _autocast(device, options.amp_dtype):
        for start in range(0, len(images), batch_size):
            if stop is not None and stop():
                raise EvaluationStopped(f"stopped after {start} of {len(images)} images")
            batch = _fit_to_model(images[start : start + batch_size], target)
            plain.append(run(batch))
            if flip:
                mirrored.append(run(hflip(batch)))
    return np.concatenate(plain), (np.concatenate(mirrored) if flip else None)


def embed_images(
    model: Model,
    images_uint8: np.ndarray,
    *,
    options: Optional[EmbedOptions] = None,
    batch_size: Optional[int] = None,
    flip: Optional[bool] = None,
    device: Optional[Union[str, torch.device]] = None,
    normalize: Optional[str] = None,
    amp_dtype: Optional[torch.dtype] = None,
    optimize: bool = True,
) -> np.ndarray:
    """``N×D`` float32 embeddings, not normalised; with ``flip`` the mirror image's embedding is
    added (flip-sum, the field's test-time augmentation)."""
    plain, mirrored = embed_views(
        model, images_uint8, options=options, batch_size=batch_size, flip=flip, device=device,
        normalize=normalize, amp_dtype=amp_dtype, optimize=optimize,
    )
    return plain if mirrored is None else plain + mirrored


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Row-wise unit vectors; all-zero rows stay zero (as sklearn's ``normalize``)."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.where(norms == 0, 1.0, norms)


def pair_scores(unit_embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair ``(i, j)`` of rows of L2-normalised embeddings."""
    return np.einsum("kd,kd->k", unit_embeddings[pairs[:, 0]], unit_embeddings[pairs[:, 1]])


def score_pair_set(
    model: Model,
    pair_set: PairSet,
    *,
    options: Optional[EmbedOptions] = None,
    flip: Optional[bool] = None,
    batch_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    normalize: Optional[str] = None,
    amp_dtype: Optional[torch.dtype] = None,
    stop: Optional[Callable[[], bool]] = None,
) -> tuple[np.ndarray, float]:
    """Cosine score per pair and ``xnorm``.

    ``xnorm`` is insightface's: the mean L2 norm of the per-view embeddings (original and, with
    ``flip``, mirrored, each on its own, before the flip-sum). Embeddings are summed and
    normalised in float64, as insightface does.
    """
    plain, mirrored = embed_views(
        model, pair_set.images, options=options, batch_size=batch_size, flip=flip, device=device,
        normalize=normalize, amp_dtype=amp_dtype, stop=stop,
    )
    return _views_scores([plain] if mirrored is None else [plain, mirrored], pair_set.pairs)


def _views_scores(views: list, pairs: np.ndarray) -> tuple[np.ndarray, float]:
    """Pair scores of the sum of ``views`` (1 view: plain, 2: flip-sum) and insightface's ``xnorm``
    (mean L2 norm of each view's embeddings before summing); summed and normalised in float64, as
    insightface does."""
    as64 = [v.astype(np.float64) for v in views]
    xnorm = float(np.mean(np.concatenate([np.linalg.norm(v, axis=1) for v in as64])))
    return pair_scores(l2_normalize(np.sum(as64, axis=0)), pairs), xnorm


def _views_metrics(views: list, pairs: np.ndarray, issame: np.ndarray, nfolds: int) -> tuple[dict, np.ndarray]:
    """`verification_metrics` of the sum of ``views`` plus ``xnorm``; returns ``(metrics, scores)``."""
    scores, xnorm = _views_scores(views, pairs)
    metrics = verification_metrics(scores, issame, nfolds=min(nfolds, len(pairs)))
    metrics["xnorm"] = xnorm
    return metrics, scores


def evaluate_pair_set(
    model: Model,
    pair_set: PairSet,
    *,
    options: Optional[EmbedOptions] = None,
    flip: Optional[bool] = None,
    batch_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    normalize: Optional[str] = None,
    nfolds: Optional[int] = None,
    amp_dtype: Optional[torch.dtype] = None,
    stop: Optional[Callable[[], bool]] = None,
    return_scores: bool = False,
) -> Union[dict, tuple[dict, tuple[np.ndarray, np.ndarray]]]:
    """The one evaluation of a labelled pair set, used by training and by ``marginface eval``.

    Result (the ``eval.<set>`` object of report.json): `verification_metrics` of the flip-sum
    embedding (``flip`` on) or of the plain one (``flip`` off) at the top level, plus ``xnorm``,
    ``name``, ``images``, ``flip`` (bool) and, with ``flip``, a ``noflip`` block (the same metrics
    without the mirror view, from the same forward passes; no ``pairs``/``nfolds``).

    ``nfolds`` (default: the folds the set's file declares, else 10) is lowered to the number of
    pairs when there are fewer pairs than folds (each fold then holds one pair); the value used is
    reported as ``nfolds``. ``stop``: see `embed_views`.
    With ``return_scores`` the result is ``(metrics, (scores, issame))`` (the top-level scores).
    """
    if pair_set.issame is None:
        raise UserError(f"pair set {pair_set.name!r} has no same/different labels; it cannot be evaluated")
    if len(pair_set) == 0:
        raise UserError(f"pair set {pair_set.name!r} has no pairs")
    plain, mirrored = embed_views(
        model, pair_set.images, options=options, batch_size=batch_size, flip=flip, device=device,
        normalize=normalize, amp_dtype=amp_dtype, stop=stop,
    )
    nfolds = pair_set.folds_for() if nfolds is None else nfolds
    noflip, noflip_scores = _views_metrics([plain], pair_set.pairs, pair_set.issame, nfolds)
    if mirrored is None:
        result, scores = noflip, noflip_scores
    else:
        result, scores = _views_metrics([plain, mirrored], pair_set.pairs, pair_set.issame, nfolds)
        result["noflip"] = {k: v for k, v in noflip.items() if k not in ("pairs", "nfolds")}
    result["flip"] = mirrored is not None
    result["name"] = pair_set.name
    result["images"] = int(len(pair_set.images))
    return (result, (scores, pair_set.issame)) if return_scores else result


def evaluate_sets(model: Model, pair_sets: Iterable[PairSet], **kwargs) -> dict[str, dict]:
    """`evaluate_pair_set` for each set, keyed by set name (names must be unique)."""
    results: dict[str, dict] = {}
    for pair_set in pair_sets:
        if pair_set.name in results:
            raise ValueError(f"two pair sets are named {pair_set.name!r}")
        results[pair_set.name] = evaluate_pair_set(model, pair_set, **kwargs)
    return results
