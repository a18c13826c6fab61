"""Margin registry: `build_margin(name, **params)` and `MARGINS` (name -> class).

Every margin is an ``nn.Module`` with ``forward(cosine N×C, labels N, norms N | None) -> logits``
(fp32, already multiplied by the scale ``s``); ``labels == -1`` rows get no margin. The one
exception, ``plain_softmax`` (``takes_cosines = False``), gets the un-normalised logits. See
docs/losses.md for the formulas, defaults and papers.
"""
from __future__ import annotations

from marginface.errors import UserError
from marginface.heads.margins.adaface import AdaFace
from marginface.heads.margins.arcface import ArcFace
from marginface.heads.margins.base import Margin
from marginface.heads.margins.combined import CombinedMargin
from marginface.heads.margins.cosface import CosFace
from marginface.heads.margins.curricularface import CurricularFace
from marginface.heads.margins.magface import MagFace
from marginface.heads.margins.plain_softmax import PlainSoftmax
from marginface.heads.margins.softmax import Softmax
from marginface.heads.margins.sphereface import SphereFace
from marginface.heads.margins.sv_softmax import SVSoftmax

MARGINS: dict[str, type[Margin]] = {
    cls.name: cls
    for cls in (Softmax, ArcFace, CosFace, SphereFace, CombinedMargin, SVSoftmax, CurricularFace,
                AdaFace, MagFace, PlainSoftmax)
}


def build_margin(name: str, **params: object) -> Margin:
    """The margin called `name` with `params` (its keyword arguments; the rest take defaults).

    Raises UserError (one line) for an unknown name, an unknown parameter or an invalid value.
    """
    if name not in MARGINS:
        raise UserError(f"unknown margin {name!r}; valid margins: {', '.join(MARGINS)}")
    cls = MARGINS[name]
    valid = cls.param_names()
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise UserError(f"margin {name!r} has no parameter {unknown[0]!r}; "
                        f"valid parameters: {', '.join(valid)}")
    return cls(**params)


__all__ = ["MARGINS", "Margin", "build_margin", "Softmax", "ArcFace", "CosFace", "SphereFace",
           "CombinedMargin", "SVSoftmax", "CurricularFace", "AdaFace", "MagFace", "PlainSoftmax"]
