"""Pixel conventions: RGB uint8 HxWx3 arrays until the last step, then normalised float tensors.

The field's normalisation is (x - 127.5) / 127.5 on RGB; `imagenet` is RGB/255 with the ImageNet
mean/std (some exported models expect it).
"""
from __future__ import annotations

import numpy as np
import torch

NORMALIZATIONS = {
    # name: (mean, std) applied to RGB values in [0, 255]
    "arcface": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}


def to_tensor(images: np.ndarray, normalize: str = "arcface") -> torch.Tensor:
    """RGB uint8 ``N×H×W×3`` (or one ``H×W×3``) -> float32 ``N×3×H×W`` normalised tensor."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {normalize!r}; choose from {sorted(NORMALIZATIONS)}")
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected N×H×W×3 RGB images, got shape {arr.shape}")
    mean, std = NORMALIZATIONS[normalize]
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def hflip(images: np.ndarray) -> np.ndarray:
    """Horizontal flip of ``N×H×W×C`` or ``H×W×C`` uint8 images (a view-free copy)."""
    return np.ascontiguousarray(images[..., ::-1, :])
