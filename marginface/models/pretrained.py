"""Weights files into our backbones: marginface checkpoints, plain state dicts in our names, and
insightface arcface_torch ``backbone.pth`` files (r18..r200 with our names, mbf renamed through
`marginface.models.insightface.MBF_TABLE`).

- `read_weights_file(path)`: the file's object, read with ``torch.load(weights_only=True)`` (no
  code runs: a pickle that would call anything is refused) after refusing TorchScript / compiled
  archives from their zip member names (`marginface.io.trust`).
- `state_dict_of(obj, where)`: the backbone tensors in it, in our names. Accepts a marginface
  checkpoint (``{"model": ...}``), an arcface_torch training checkpoint
  (``{"state_dict_backbone": ...}``), ``{"state_dict": ...}`` and a plain ``name -> tensor`` dict;
  ``module.`` prefixes (DataParallel / DDP saves) are dropped.
- `backbone_from_state(state, where, backbone=None)`: the architecture recognised from the
  tensors (`insightface.recognise`; ``backbone`` overrides the name), built and loaded strictly.
- `load_pretrained(model, path, backbone)`: ``model.pretrained`` for fine-tuning: strict, a shape
  mismatch names the key; a torchvision ResNet-50 file still loads into ``resnet50``'s (and
  ``resnet50_gap``'s) trunk.

Every failure is one `UserError` line naming the file and the first mismatching keys and shapes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from marginface.errors import UserError
from marginface.io.trust import read_weights
from marginface.models.insightface import Recognised, from_insightface, recognise
from marginface.models.registry import build_backbone
from marginface.models.resnet import load_torchvision_weights

STATE_DICT_KEYS = ("model", "state_dict_backbone", "state_dict")  # containers we look inside, in order
SHOWN = 3  # mismatching keys named in an error line


def read_weights_file(path: Union[str, Path]) -> Any:
    """The object a ``.pth`` / ``.pt`` file holds (tensors, numbers, strings, containers only)."""
    return read_weights(path, "marginface checkpoint or state dict",
                        "a run directory, a .pt checkpoint or a .pth state dict")


def is_marginface_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "config" in obj


def state_dict_of(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The backbone tensors of a loaded weights file, in our names (see the module docstring)."""
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{where}: expected a state dict (name -> tensor) or a marginface checkpoint, "
                        f"got {type(obj).__name__ if not isinstance(obj, dict) else 'an empty dict'}")
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise UserError(f"{where}: expected a state dict (name -> tensor), but {bad!r} holds a "
                        f"{type(obj[bad]).__name__}")
    state = {key.removeprefix("module."): value for key, value in obj.items()}
    return from_insightface(state, where=f"{where}: ")


def _mismatches(state: Mapping[str, torch.Tensor], model: nn.Module) -> list[str]:
    """What keeps ``state`` from loading strictly into ``model``: wrong shapes, missing, unexpected."""
    expected = model.state_dict()
    problems = [f"{k} {tuple(v.shape)} in the file vs {tuple(expected[k].shape)} in the model"
                for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems += [f"{k} {tuple(expected[k].shape)} missing" for k in expected
                 if k not in state and not k.endswith("num_batches_tracked")]
    problems += [f"{k} {tuple(v.shape)} unexpected" for k, v in state.items() if k not in expected]
    return problems


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, what: str) -> nn.Module:
    """``model.load_state_dict(state)`` (``num_batches_tracked`` may be absent, as in old files);
    anything else that does not fit is one `UserError` naming the first keys and shapes."""
    problems = _mismatches(state, model)
    if problems:
        shown = "; ".join(problems[:SHOWN]) + (f"; ... ({len(problems)} in all)" if len(problems) > SHOWN else "")
        raise UserError(f"{where}: weights do not fit {what}: {shown}")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"{where}: weight '{bad}' holds NaN or inf values; refusing to load it")
    model.load_state_dict(state, strict=False)  # strict in effect: only num_batches_tracked may be missing
    return model


def recognise_state(state: Mapping[str, torch.Tensor], where: str, backbone: Optional[str] = None) -> Recognised:
    """`insightface.recognise` with the file named in errors; ``backbone`` replaces the recognised name."""
    try:
        found = recognise(state)
    except UserError as exc:
        if backbone is None:
            raise UserError(f"{where}: {exc}") from None
        found = None
    if backbone is None:
        return found
    if found is None:
        return Recognised(backbone, None, 112)
    # a width found for one family means nothing for another (mbf's base width is not iresnet's)
    options = found.options if _family(backbone) == _family(found.name) else {}
    return Recognised(backbone, found.embedding_size, found.input_size, options)


def _family(name: str) -> str:
    """``iresnet50_se`` -> ``iresnet``, ``mobilefacenet_se`` -> ``mobilefacenet``, ``mbf`` -> ``mbf``."""
    return name.split("_")[0].rstrip("0123456789")


def backbone_from_state(state: Mapping[str, torch.Tensor], where: str,
                        backbone: Optional[str] = None) -> tuple[nn.Module, Recognised]:
    """The backbone ``state`` was saved from (``backbone`` overrides the recognised name), with its
    weights, in eval mode on the CPU; and what was recognised."""
    found = recognise_state(state, where, backbone)
    try:
        model = build_backbone(found.name, found.embedding_size, found.input_size, **found.options)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    size = f" (embedding {model.embedding_size}, {found.input_size}px)"
    load_strict(model, state, where, found.name + size)
    return model.eval(), found


def load_pretrained(model: nn.Module, path: Union[str, Path], backbone: str) -> nn.Module:
    """``model.pretrained``: initialise ``model`` (a freshly built ``backbone``) from ``path``, strictly.

    ``path`` is a marginface checkpoint or run's ``.pt``, a plain state dict in our names, or an
    insightface arcface_torch ``backbone.pth``; for ``resnet50`` and ``resnet50_gap`` also a torchvision ImageNet
    state dict (its trunk; the embedding head stays freshly initialised). The classification head
    is never part of this: training creates it for the new identities.
    """
    where = f"model.pretrained {path}"
    obj = read_weights_file(path)
    names = {str(k).removeprefix("module.") for k in obj} if isinstance(obj, dict) else set()
    if (backbone in ("resnet50", "resnet50_gap") and "fc.weight" in names and "head.fc.weight" not in names
            and "embedding.weight" not in names):
        load_torchvision_weights(model, path)  # torchvision ImageNet layout (reads the file itself)
        return model
    state = state_dict_of(obj, where)
    found = None
    try:
        found = recognise(state)
    except UserError:
        pass
    what = backbone + (f" (embedding {model.embedding_size})" if hasattr(model, "embedding_size") else "")
    if found is not None and found.name != backbone:
        raise UserError(f"{where}: holds {found.name} weights (embedding {found.embedding_size}, "
                        f"{found.input_size}px) but model.backbone is {backbone}; set model.backbone={found.name}")
    return load_strict(model, state, where, what)
