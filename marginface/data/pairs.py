"""The in-memory pair set (`PairSet`) and balanced pair sampling from labelled images
(`pairs_from_identities`; `sample_pair_indices` for the labels alone).

Both are pure numpy and sit below every reader: `marginface.data.verification` (the file
formats, which re-exports both names) and `marginface.data.synthetic` (the held-out synthetic
pair set) build on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from marginface.errors import UserError


@dataclass
class PairSet:
    """Images plus the pairs to compare.

    ``images``: ``N×H×W×3`` uint8 RGB, each distinct image once; ``pairs``: ``K×2`` int64 indices
    into ``images``; ``issame``: ``K`` bool, or ``None`` for an unlabelled set (it can be scored
    but not evaluated); ``n_folds``: the k-fold split the file declares (LFW ``pairs.txt``
    header ``n_folds n_pairs``), which evaluation uses instead of its default 10; None when the
    file declares none.
    """

    name: str
    images: np.ndarray
    pairs: np.ndarray
    issame: Optional[np.ndarray]
    n_folds: Optional[int] = None

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"pair set {self.name!r}: images must be N×H×W×3 uint8, got {images.shape} {images.dtype}"
            )
        pairs = np.asarray(self.pairs)
        if pairs.size == 0:
            pairs = pairs.reshape(0, 2)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
            raise ValueError(f"pair set {self.name!r}: pairs must be K×2 integers, got {pairs.shape} {pairs.dtype}")
        if pairs.size and (pairs.min() < 0 or pairs.max() >= len(images)):
            raise ValueError(f"pair set {self.name!r}: pair indices outside 0..{len(images) - 1}")
        self.images = images
        self.pairs = pairs.astype(np.int64, copy=False)
        if self.issame is not None:
            issame = np.asarray(self.issame).reshape(-1)
            if issame.shape[0] != len(pairs):
                raise ValueError(f"pair set {self.name!r}: {len(pairs)} pairs but {issame.shape[0]} labels")
            if issame.dtype != np.bool_ and not np.isin(issame, (0, 1)).all():
                raise ValueError(f"pair set {self.name!r}: issame must be booleans or 0/1")
            self.issame = issame.astype(bool, copy=False)
        if self.n_folds is not None:
            folds = int(self.n_folds)
            if folds < 1 or (len(pairs) and folds > len(pairs)):
                raise ValueError(f"pair set {self.name!r}: {folds} folds for {len(pairs)} pairs")
            self.n_folds = folds

    def folds_for(self, default: int = 10) -> int:
        """The number of folds to evaluate with: the declared ``n_folds``, else ``default``, never
        more than there are pairs."""
        return max(1, min(self.n_folds or default, len(self)))

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def labelled(self) -> bool:
        return self.issame is not None


def _sample_unique_pairs(rng: np.random.Generator, count: int, total: int, draw, enumerate_all) -> list[tuple[int, int]]:
    """``count`` distinct unordered pairs out of ``total`` possible ones.

    Rejection sampling while the pool is large; when most pairs are needed, enumerate them all
    and choose (rejection would stall near exhaustion).
    """
    if count > total / 2:
        everything = enumerate_all()
        chosen = rng.choice(len(everything), size=count, replace=False)
        return [everything[i] for i in chosen]
    seen: set[tuple[int, int]] = set()
    result = []
    while len(result) < count:
        a, b = draw()
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen.add(key)
            result.append(key)
    return result


def pairs_from_identities(
    images: np.ndarray,
    labels: Sequence[int],
    n_pairs: int,
    seed: int = 0,
    name: str = "identities",
) -> PairSet:
    """Sample a balanced, reproducible pair set from identity-labelled images
    (`sample_pair_indices`); only the images used are kept."""
    images = np.asarray(images)
    labels_arr = np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be N×H×W×3 uint8, got {images.shape} {images.dtype}")
    if len(labels_arr) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels_arr)} labels")
    pairs, issame = sample_pair_indices(labels_arr, n_pairs, seed)
    used, remapped = np.unique(pairs, return_inverse=True)
    return PairSet(name=name, images=images[used], pairs=remapped.reshape(-1, 2), issame=issame)


def sample_pair_indices(labels: Sequence[int], n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(pairs K×2 int64 indices into labels, issame K bool)``: a balanced, reproducible sample.

    ``n_pairs // 2`` same pairs (uniform over all distinct same-identity pairs) and the rest
    different pairs (uniform over distinct cross-identity pairs), interleaved S, D, S, D... so
    every consecutive fold of the k-fold protocol holds both classes. The same ``(labels,
    n_pairs, seed)`` always give the same pairs, so a reader can sample first and then read only
    the images it needs.
    """
    labels_arr = np.asarray(labels).reshape(-1)
    n_images = len(labels_arr)
    if n_pairs < 2:
        raise UserError(f"pair sampling: n_pairs must be >= 2, got {n_pairs}")
    identities, inverse, counts = np.unique(labels_arr, return_inverse=True, return_counts=True)
    if len(identities) < 2:
        raise UserError(f"pair sampling: need at least 2 identities, got {len(identities)}")
    if counts.max() < 2:
        raise UserError("pair sampling: no identity has 2 images, so no same pairs can be formed")

    n_same, n_diff = n_pairs // 2, n_pairs - n_pairs // 2
    members = [np.flatnonzero(inverse == c) for c in range(len(identities))]
    same_per_identity = counts * (counts - 1) // 2
    same_total = int(same_per_identity.sum())
    diff_total = n_images * (n_images - 1) // 2 - same_total
    if n_same > same_total or n_diff > diff_total:
        raise UserError(
            f"pair sampling: asked for {n_same} same + {n_diff} different pairs but only "
            f"{same_total} same and {diff_total} different pairs exist"
        )
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(same_per_identity)

    def draw_same() -> tuple[int, int]:
        # identity chosen with probability proportional to its number of same pairs
        group = members[int(np.searchsorted(cumulative, rng.integers(same_total), side="right"))]
        a, b = rng.choice(len(group), size=2, replace=False)
        return int(group[a]), int(group[b])

    def all_same() -> list[tuple[int, int]]:
        return [(int(g[i]), int(g[j])) for g in members for i in range(len(g)) for j in range(i + 1, len(g))]

    def draw_diff() -> tuple[int, int]:
        while True:
            a, b = rng.integers(n_images, size=2)
            if inverse[a] != inverse[b]:
                return int(a), int(b)

    def all_diff() -> list[tuple[int, int]]:
        return [(a, b) for a in range(n_images) for b in range(a + 1, n_images) if inverse[a] != inverse[b]]

    same = _sample_unique_pairs(rng, n_same, same_total, draw_same, all_same)
    diff = _sample_unique_pairs(rng, n_diff, diff_total, draw_diff, all_diff)

    ordered, issame = [], []
    for k in range(max(n_same, n_diff)):
        for group, flag in ((same, True), (diff, False)):
            if k < len(group):
                ordered.append(group[k])
                issame.append(flag)
    return np.asarray(ordered, dtype=np.int64).reshape(-1, 2), np.asarray(issame, dtype=bool)
