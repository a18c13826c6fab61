"""``FaceDataset``: source -> ``(uint8 3×H×W tensor, label)``, plus ``normalize_batch``.

Samples leave the workers as uint8: a quarter of the bytes of float32 through the DataLoader's
shared-memory queues, and normalisation runs once per batch (on the GPU when the batch is there)
instead of once per image. ``normalize_batch`` is the one place training batches are normalised.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from marginface.data.sources import source_item_name
from marginface.data.transforms import NORMALIZATIONS
from marginface.errors import UserError

log = logging.getLogger(__name__)

AugmentFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def normalize_batch(batch: torch.Tensor, normalize: str = "arcface", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``N×3×H×W`` (any device) -> normalised float ``N×3×H×W`` on the same device.

    Uses the constants of ``marginface.data.transforms.NORMALIZATIONS`` (``arcface``:
    ``(x - 127.5) / 127.5``), so training matches evaluation and export.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {normalize!r}; choose from {sorted(NORMALIZATIONS)}")
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected a uint8 N×3×H×W batch, got {tuple(batch.shape)} {batch.dtype}")
    mean, std = NORMALIZATIONS[normalize]
    mean_t = torch.tensor(mean, dtype=dtype, device=batch.device).view(1, 3, 1, 1)
    inv_std = torch.tensor([1.0 / s for s in std], dtype=dtype, device=batch.device).view(1, 3, 1, 1)
    return batch.to(dtype).sub_(mean_t).mul_(inv_std)


@dataclass(frozen=True)
class Augment:
    """Optional training augmentations (numpy/cv2, all off by default).

    color_jitter: max relative change of brightness, contrast and saturation (e.g. 0.2).
    random_resized_crop: smallest area fraction a random crop keeps before resizing back (e.g. 0.8;
        0 = off). Aspect ratio is kept: aligned faces should stay faces.
    grayscale: probability of turning the image grey (3 equal channels).
    blur: probability of a Gaussian blur with sigma in [0.5, 1.5].
    """

    color_jitter: float = 0.0
    random_resized_crop: float = 0.0
    grayscale: float = 0.0
    blur: float = 0.0

    @classmethod
    def from_config(cls, value: "Augment | Mapping[str, float] | AugmentFn | None") -> "Augment | AugmentFn | None":
        """``None``, an ``Augment``, a callable ``(image, rng) -> image``, or a dict of the fields above."""
        if value is None or isinstance(value, cls) or callable(value):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise UserError(f"augment: unknown option(s) {unknown}; known: {sorted(known)}")
            return cls(**{k: float(v) for k, v in value.items()})
        raise UserError(f"augment: expected a mapping of {[f.name for f in fields(cls)]}, got {type(value).__name__}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.random_resized_crop > 0 and rng.random() < 0.5:
            h, w = image.shape[:2]
            side = np.sqrt(rng.uniform(self.random_resized_crop, 1.0))
            ch, cw = max(1, int(h * side)), max(1, int(w * side))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            image = cv2.resize(image[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_LINEAR)
        if self.color_jitter > 0:
            image = _color_jitter(image, self.color_jitter, rng)
        if self.grayscale > 0 and rng.random() < self.grayscale:
            image = np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
        if self.blur > 0 and rng.random() < self.blur:
            image = cv2.GaussianBlur(image, (0, 0), sigmaX=float(rng.uniform(0.5, 1.5)))
        return image


def _color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    x = image.astype(np.float32) * brightness
    x = (x - x.mean()) * contrast + x.mean()
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = (x - grey[..., None]) * saturation + grey[..., None]
    return np.clip(x, 0, 255).astype(np.uint8)


class FaceDataset(Dataset):
    """Wraps a source: decode, resize to ``image_size``, augment, random flip -> uint8 ``3×H×W``.

    ``skip_bad=True`` replaces an unreadable image by a random other one and logs a warning naming
    it, so a corrupt file never stops an epoch. ``bad_images()`` counts them across DataLoader
    workers through a small shared-memory tensor (one slot per worker, so no locking).
    """

    _MAX_TRIES = 50

    def __init__(
        self,
        source: Any,
        *,
        image_size: int | tuple[int, int] = 112,
        flip: bool = True,
        augment: "Augment | Mapping[str, float] | AugmentFn | None" = None,
        skip_bad: bool = True,
        max_workers: int = 128,
    ):
        if len(source) == 0:
            raise UserError(f"{source.describe()}: source has no images")
        self.source = source
        if np.ndim(image_size) == 0:
            self.size_hw = (int(image_size), int(image_size))  # type: ignore[arg-type]
        else:
            self.size_hw = (int(image_size[0]), int(image_size[1]))  # type: ignore[index]
        self.flip = flip
        self.augment = Augment.from_config(augment)
        self.skip_bad = skip_bad
        self.labels = np.asarray(source.labels, dtype=np.int64)
        self.num_classes = int(source.num_classes)
        self._bad_counts = torch.zeros(max_workers + 1, dtype=torch.int64).share_memory_()
        self._known_bad: set[int] = set()  # per process: skip without re-reading, warn once
        self._rng_owner: tuple[int, int] | None = None
        self._rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.source)

    def bad_images(self) -> int:
        """Unreadable images met so far, summed over the main process and all workers."""
        return int(self._bad_counts.sum())

    def _generator(self) -> np.random.Generator:
        # torch seeds each DataLoader worker differently (base_seed + worker id); follow it so runs
        # seeded with torch.manual_seed are reproducible and workers never share a stream.
        owner = (os.getpid(), torch.initial_seed())
        if self._rng is None or self._rng_owner != owner:
            self._rng = np.random.default_rng(owner[1])
            self._rng_owner = owner
        return self._rng

    def _count_bad(self) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (len(self._bad_counts) - 1)
        self._bad_counts[slot] += 1

    def _read(self, index: int) -> tuple[np.ndarray, int]:
        rng = self._generator()
        for _ in range(self._MAX_TRIES):
            if index not in self._known_bad:
                try:
                    return self.source.read(index), index
                except UserError as e:
                    if not self.skip_bad:
                        raise
                    self._known_bad.add(index)
                    self._count_bad()
                    log.warning("skipping unreadable image (replaced by a random other one): %s", e)
            index = int(rng.integers(len(self.source)))
        raise UserError(
            f"{self.source.describe()}: {self._MAX_TRIES} unreadable images in a row "
            f"(last: {source_item_name(self.source, index)}); check the data"
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, index = self._read(int(index))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(
                f"{source_item_name(self.source, index)}: expected RGB uint8 H×W×3, got {image.shape} {image.dtype}"
            )
        h, w = self.size_hw
        if image.shape[:2] != (h, w):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        rng = self._generator()
        if self.augment is not None:
            image = self.augment(image, rng)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.labels[index])
