"""Training batches whose order is a pure function of (seed, step), so resume continues exactly.

Epoch ``e`` visits a permutation seeded by ``(seed, e)``; step ``k`` takes slice ``k mod
steps_per_epoch`` of it (the last partial batch is dropped, as the field does). Flips are drawn
per step from ``(seed, step)`` and applied to the uint8 batch, so they too survive a resume.
With several ranks each rank takes its own contiguous part of every global batch.
With ``identities_per_batch`` style sampling (``samples_per_identity`` K > 0) a global batch is
P = batch/K identities x K images each, drawn from ``(seed, step)``: pair losses need positives.

Two loaders share that order:
- ``InMemoryBatches``: sources that hold their decoded images in one array (synthetic): a
  gather per step, no worker processes (on a 2-core machine workers only compete with compute).
- ``LoaderBatches``: any source through ``FaceDataset`` and a torch ``DataLoader`` with workers.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class BatchOrder:
    """Indices and flip flags of every step, for one rank of ``world_size``."""

    def __init__(self, num_images: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 flip: bool = True, labels: np.ndarray | None = None, samples_per_identity: int = 0):
        self.num_images = num_images
        self.global_batch = batch_size * world_size
        if num_images < self.global_batch:
            raise ValueError(f"{num_images} training images are fewer than one global batch ({self.global_batch})")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.flip = flip
        self.steps_per_epoch = num_images // self.global_batch
        self._perm_epoch = -1
        self._perm = np.empty(0, np.int64)
        self.samples_per_identity = samples_per_identity
        if samples_per_identity:
            if labels is None or self.global_batch % samples_per_identity:
                raise ValueError(f"P x K batches need labels and a global batch ({self.global_batch}) divisible "
                                 f"by samples_per_identity ({samples_per_identity})")
            order = np.argsort(labels, kind="stable")
            classes, starts = np.unique(np.asarray(labels)[order], return_index=True)
            if len(classes) < self.global_batch // samples_per_identity:
                raise ValueError(f"{len(classes)} identities are fewer than the "
                                 f"{self.global_batch // samples_per_identity} a P x K batch needs")
            self._by_identity = np.split(order, starts[1:])

    def _pk_batch(self, step: int) -> np.ndarray:
        """P random identities x K random images of each (with repeats when an identity has fewer)."""
        rng = np.random.default_rng([self.seed, step, 9])
        k = self.samples_per_identity
        chosen = rng.choice(len(self._by_identity), self.global_batch // k, replace=False)
        picks = [rng.choice(self._by_identity[c], k, replace=len(self._by_identity[c]) < k) for c in chosen]
        return np.concatenate(picks)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 3]).permutation(self.num_images)
            self._perm_epoch = epoch
        return self._perm

    def step(self, step: int) -> tuple:
        """(indices, flip mask) of this rank's share of global step ``step``."""
        if self.samples_per_identity:
            idx = self._pk_batch(step)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        else:
            epoch, k = divmod(step, self.steps_per_epoch)
            start = k * self.global_batch + self.rank * self.batch_size
            idx = self._permutation(epoch)[start:start + self.batch_size]
        if self.flip:
            flips = np.random.default_rng([self.seed, step, 5]).random(self.global_batch)
            flips = flips[self.rank * self.batch_size:(self.rank + 1) * self.batch_size] < 0.5
        else:
            flips = np.zeros(self.batch_size, bool)
        return idx, flips


def _apply_flips(batch: torch.Tensor, flips: np.ndarray) -> torch.Tensor:
    if flips.any():
        mask = torch.from_numpy(flips)
        batch[mask] = batch[mask].flip(-1)
    return batch


class InMemoryBatches:
    """uint8 ``N×3×H×W`` batches gathered from an in-memory ``N×H×W×3`` image array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, order: BatchOrder):
        # one transpose up front: per-step work is then a gather and an optional flip
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(np.asarray(labels, np.int64))
        self.order = order

    def iterate(self, start_step: int) -> Iterator[tuple]:
        step = start_step
        while True:
            idx, flips = self.order.step(step)
            t = torch.from_numpy(idx)
            yield _apply_flips(self.images[t], flips), self.labels[t]
            step += 1


class _StepSampler(torch.utils.data.Sampler):
    """Yields the index lists of steps ``start, start+1, ...`` for a DataLoader's batch_sampler."""

    def __init__(self, order: BatchOrder, start_step: int):
        self.order = order
        self.start_step = start_step

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.order.step(step)[0].tolist()
            step += 1

    def __len__(self):  # infinite in practice; DataLoader only needs a number
        return 1 << 62


class LoaderBatches:
    """uint8 batches through ``FaceDataset`` (decode, resize, optional augment) in worker processes."""

    def __init__(self, dataset, order: BatchOrder, num_workers: int):
        self.dataset = dataset
        self.order = order
        self.num_workers = num_workers

    def iterate(self, start_step: int) -> Iterator[tuple]:
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_StepSampler(self.order, start_step), num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None)
        step = start_step
        for images, labels in loader:
            _, flips = self.order.step(step)
            yield _apply_flips(images, flips), labels
            step += 1
