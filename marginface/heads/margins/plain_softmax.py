"""The plain, un-normalised softmax: logits = x . W^T + b (a linear layer with bias), cross-entropy.

No normalisation of the features or of the class weights, no scale, no margin: the baseline the
margin losses are measured against (Face_Pytorch's ``InnerProduct`` head; the "softmax" rows of the
SphereFace / CosFace / ArcFace papers). The classifier sees ``takes_cosines = False`` and hands this
"margin" the raw logits instead of cosines; it returns them unchanged (in fp32).
"""
from __future__ import annotations

from typing import Optional

import torch

from marginface.heads.margins.base import Margin, check_bool


class PlainSoftmax(Margin):
    """logits_j = x . W_j + b_j (un-normalised; nothing is added to the target).

    Params: ``bias`` = true (the classifier's per-class bias; false gives Face_Pytorch's
    bias-free ``InnerProduct``). There is no scale ``s`` (it is fixed to 1).
    """

    name = "plain_softmax"
    takes_cosines = False  # the classifier passes x . W^T + b, not cosines

    def __init__(self, bias: bool = True) -> None:
        super().__init__(1.0)
        self.bias = check_bool(self.name, "bias", bias)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor,
                norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        return cosine.float()  # the logits as they are: no margin, no scale
