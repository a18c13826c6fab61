"""Centre loss (Wen et al. 2016, "A Discriminative Feature Learning Approach for Deep Face
Recognition"): L_C = 1/2 * mean_i ||x_i - c_{y_i}||^2, added to a softmax-type loss as
L = L_S + center_weight * L_C.

Training knobs (trainer config): ``center_weight`` (lambda; the paper used 0.003 on faces) and
``center_lr`` (the learning rate of the ``centers`` parameter, in its own optimizer param group;
the paper's centre update rate alpha = 0.5). The paper updates centres by its own rule
c_j <- c_j - alpha * sum_{i: y_i = j}(c_j - x_i) / (1 + n_j); here the centres are an ordinary
parameter trained by gradient, whose gradient is (1/N) sum_{i: y_i = j}(c_j - x_i) * center_weight.
To keep the centre step independent of center_weight, use lr = center_lr / center_weight for the
centres' group (no weight decay on it).
"""
from __future__ import annotations

import torch
from torch import nn

from marginface.errors import UserError


class CenterLoss(nn.Module):
    """``centers`` (num_classes × D, init 0); forward(embeddings N×D, labels N) -> scalar
    1/2 * mean_i ||x_i - c_{y_i}||^2 (fp32, on the raw, un-normalised embeddings)."""

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        for key, v in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"center loss: {key} must be an integer >= 1, got {v!r}")
        self.centers = nn.Parameter(torch.zeros(num_classes, embedding_size))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        diff = embeddings.float() - self.centers.float()[labels.long()]
        return 0.5 * diff.pow(2).sum(dim=1).mean()
