"""Backbones by name: `build_backbone("mbf", embedding_size=512, input_size=112, width_mult=0.5)`.

All arguments are checked here, so a bad name, size or option is one UserError line instead of a
stack trace from deep inside a constructor.
"""
from __future__ import annotations

import inspect
import numbers
import os
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Callable

from torch import nn

from marginface.errors import UserError
from marginface.models.iresnet import IRESNET_LAYERS, build_iresnet
from marginface.models.mobilefacenet import MBF, MOBILEFACENET, MOBILEFACENET_SE, build_mobilefacenet
from marginface.models.resnet import build_resnet50, build_resnet50_gap
from marginface.models.vit import VIT_CONFIGS, build_vit

# Input sides must be multiples of 8: the first three stride-2 steps then divide exactly and the
# last one rounds up (56 -> 4×4 final map), which keeps 56 usable for fast CPU recipes.
INPUT_SIZE_MULTIPLE = 8
MIN_INPUT_SIZE = 16


@dataclass(frozen=True)
class BackboneEntry:
    build: Callable[..., nn.Module]  # (embedding_size, input_size, **options) -> model
    default_embedding_size: int

    def option_names(self) -> tuple[str, ...]:
        params = inspect.signature(self.build).parameters
        fixed = getattr(self.build, "keywords", {})  # options a registry entry binds (e.g. squeeze_excite)
        return tuple(name for name in params if name not in ("embedding_size", "input_size", *fixed))


BACKBONES = MappingProxyType({
    "mobilefacenet": BackboneEntry(partial(build_mobilefacenet, MOBILEFACENET), 128),
    "mobilefacenet_se": BackboneEntry(partial(build_mobilefacenet, MOBILEFACENET_SE), 256),
    "mbf": BackboneEntry(partial(build_mobilefacenet, MBF), 512),
    **{f"iresnet{depth}": BackboneEntry(partial(build_iresnet, depth), 512) for depth in IRESNET_LAYERS},
    # SE-IResNet ("SEResNet50-IR" of Face_Pytorch / face.evoLVe's IR-SE): squeeze-excitation per block
    **{f"iresnet{depth}_se": BackboneEntry(partial(build_iresnet, depth, squeeze_excite=True), 512)
       for depth in (50, 100)},
    "resnet50": BackboneEntry(build_resnet50, 512),
    # torchvision's ResNet-50 with global average pooling + one Linear (FaceID's): 24.6M params at any size
    "resnet50_gap": BackboneEntry(build_resnet50_gap, 512),
    # arcface_torch's ViTs: 9x9 patches, token masking and drop path in training
    **{name: BackboneEntry(partial(build_vit, name), 512) for name in VIT_CONFIGS},
})


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# option -> (is the value valid?, what a valid value is)
OPTION_CHECKS: MappingProxyType[str, tuple[Callable[[Any], bool], str]] = MappingProxyType({
    "width_mult": (lambda v: _is_number(v) and 0 < v <= 4, "a number in (0, 4]"),
    "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "gradient_checkpointing": (lambda v: isinstance(v, bool), "true or false"),
    "squeeze_excite": (lambda v: isinstance(v, bool), "true or false"),
    "pretrained": (lambda v: v is None or isinstance(v, (str, os.PathLike)), "a file path or null"),
    "drop_path": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "mask_ratio": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
})


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(name: str, embedding_size: int | None = None, input_size: int = 112,
                   **options: Any) -> nn.Module:
    """Build backbone `name`: float N×3×input_size×input_size -> un-normalised N×embedding_size.

    `embedding_size` defaults to the model's published size (128 mobilefacenet, 256
    mobilefacenet_se, 512 otherwise). Options per backbone: mobilefacenet*/mbf `width_mult`;
    iresnet* `dropout`, `gradient_checkpointing`, `width_mult`; resnet50 and resnet50_gap `dropout`,
    `pretrained`; vit_t/vit_s/vit_b `drop_path`, `mask_ratio` (training only), `gradient_checkpointing`.
    """
    entry = BACKBONES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise UserError(f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}")
    if embedding_size is None:
        embedding_size = entry.default_embedding_size
    if not isinstance(embedding_size, int) or isinstance(embedding_size, bool) or embedding_size < 1:
        raise UserError(f"backbone {name}: embedding_size={embedding_size!r} must be a positive integer")
    if (not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < MIN_INPUT_SIZE
            or input_size % INPUT_SIZE_MULTIPLE):
        raise UserError(f"backbone {name}: input_size={input_size!r} must be a multiple of "
                        f"{INPUT_SIZE_MULTIPLE} and at least {MIN_INPUT_SIZE} (e.g. 112, 64, 56)")
    allowed = entry.option_names()
    for key, value in options.items():
        if key not in allowed:
            valid = f"its options are: {', '.join(allowed)}" if allowed else "it takes no options"
            raise UserError(f"backbone {name} has no option {key!r}; {valid}")
        is_valid, expected = OPTION_CHECKS[key]
        if not is_valid(value):
            raise UserError(f"backbone {name}: {key}={value!r} is invalid; expected {expected}")
    return entry.build(embedding_size=embedding_size, input_size=input_size, **options)
