"""One-call helpers behind ``marginface.verify``, ``marginface.embed`` and ``marginface.evaluate_model``.

    import marginface
    r = marginface.verify("a.jpg", "b.jpg", model="model.onnx")   # the fields of `verify --json`
    v = marginface.embed("a.jpg", model="model.onnx")             # unit vector of the largest face

The model is loaded once per (model file, options) and kept (the last `CACHE_SIZE` of them), so a
loop of calls pays for loading once; a model file changed on disk is loaded again.
`clear_cache()` drops them. ``model`` may also be an already built `FaceEmbedder` or a loaded model.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from marginface.deploy.embedder import FaceEmbedder, ImageLike, face_info
from marginface.deploy.load import load_model
from marginface.deploy.verify import verify_images
from marginface.evaluate.report import evaluate_suite
from marginface.inference import EmbedOptions, ModelInfo

CACHE_SIZE = 4
_cache: "OrderedDict[tuple, FaceEmbedder]" = OrderedDict()
_lock = threading.Lock()


def _file_stamp(path: Path) -> tuple:
    """What tells a rewritten model file from the one cached: size and mtime of the file(s)."""
    try:
        files = [path] if path.is_file() else sorted(path.rglob("*.pt"))[:8]
        return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except OSError:
        return ()


def face_embedder(model, *, normalize: Optional[str] = None, threshold: Optional[float] = None,
                  detector_weights: Union[str, Path, None] = None, flip: bool = True,
                  trust_code: bool = False) -> FaceEmbedder:
    """The `FaceEmbedder` for ``model`` with these options, built once and cached (see module doc).
    A `FaceEmbedder` is returned as it is; any other loaded model is wrapped (not cached)."""
    if isinstance(model, FaceEmbedder):
        return model
    if not isinstance(model, (str, Path)):
        return FaceEmbedder(model, normalize=normalize, threshold=threshold, detector_weights=detector_weights,
                            flip=flip)
    path = Path(model).expanduser()
    key = (str(path.resolve()), _file_stamp(path), normalize, threshold,
           None if detector_weights is None else str(Path(detector_weights).expanduser().resolve()), bool(flip),
           bool(trust_code))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    fe = FaceEmbedder(path, normalize=normalize, threshold=threshold, detector_weights=detector_weights,
                      flip=flip, trust_code=trust_code)
    with _lock:
        _cache[key] = fe
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return fe


def clear_cache() -> None:
    """Forget every model the one-call helpers loaded."""
    with _lock:
        _cache.clear()


def verify(img_a: ImageLike, img_b: ImageLike, *, model, face_a: Union[str, int] = "largest",
           face_b: Union[str, int] = "largest", **options) -> dict:
    """Are the faces in two photos the same person? ``{"similarity", "same", "threshold",
    "threshold_source"}`` (as ``marginface verify A B --json``) plus ``a``, ``b`` and ``face_a`` /
    ``face_b`` (which face of each photo was used: index, box, score, faces found).

    Images are paths or RGB ``H×W×3`` uint8 arrays. ``options``: ``normalize``, ``threshold``,
    ``detector_weights``, ``flip``, ``trust_code`` (as `FaceEmbedder`)."""
    return verify_images(face_embedder(model, **options), img_a, img_b, face_a=face_a, face_b=face_b)


def embed(img: ImageLike, *, model, face: Union[str, int] = "largest", return_face: bool = False, **options):
    """The unit embedding (float32, ``D``) of one face of a photo (the largest, or ``face`` = an
    index, 0 = largest). With ``return_face=True``: ``(embedding, face_info)`` where ``face_info``
    says which face was used (``{"face", "box", "score", "faces"}``). ``options`` as `verify`."""
    fe = face_embedder(model, **options)
    index, found, count = fe.pick_face(img, face)
    vector = fe.embed_crops(found.crop[None])[0]
    return (vector, face_info(index, found, count)) if return_face else vector


def faces(img: ImageLike, *, model, **options) -> list[dict]:
    """Every face of a photo, largest first: ``{"face", "box", "landmarks", "score", "embedding"}``
    each (JSON-ready; `FaceEmbedder.faces` gives the same as objects with numpy embeddings)."""
    return [f.to_dict(embedding=True) for f in face_embedder(model, **options).faces(img)]


def evaluate(model, sets: Union[str, Path, Sequence[Union[str, Path]]], *, normalize: Optional[str] = None,
             flip: bool = True, batch_size: int = 128, device: Optional[str] = None, trust_code: bool = False,
             nfolds: Optional[int] = None) -> dict:
    """Evaluate a model on verification sets (``.bin``, LFW directory, pairs ``.txt``/``.csv`` of
    aligned crops, IJB directory): ``{set name: metrics}``, the ``eval`` object of
    ``marginface eval --json`` (accuracy, accuracy_std, threshold, auc, eer, tar_at_far, ...).

    ``model``: a path (run directory, checkpoint, ONNX, ...) or a loaded model. ``nfolds``: the
    k-fold split (default: what a pairs file declares, else 10)."""
    if isinstance(sets, (str, Path)):
        sets = [sets]
    if isinstance(model, (str, Path)):
        model = load_model(model, normalize, trust_code=trust_code)
    elif isinstance(model, FaceEmbedder):
        model = model.model
    if device is not None and isinstance(model, torch.nn.Module):
        model.to(device)  # a model this call loaded, or the caller's, which asked for this device
    options = EmbedOptions(flip=flip, batch_size=int(batch_size), device=device or "cpu",
                           normalize=normalize or ModelInfo.of(model).normalize)
    kw = {} if nfolds is None else {"nfolds": int(nfolds)}
    results, _, _ = evaluate_suite(model, list(sets), options=options, **kw)
    return results


__all__ = ["verify", "embed", "faces", "evaluate", "face_embedder", "clear_cache"]
