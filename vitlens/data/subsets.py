"""Which items a selection keeps: the fixed hold-out split of data without an official one, and the seeded,
stratified ``num_images`` subset.
"""

from __future__ import annotations

import numpy as np

# Data without an official split gets a fixed, stratified 80/20 hold-out, independent of the user's --seed so
# that "train" and "test" never overlap across runs with different seeds.
_HOLDOUT_FRACTION = 0.2
_HOLDOUT_SEED = 0


def _holdout_is_test(labels: np.ndarray) -> np.ndarray:
    """Fixed stratified 80/20 split: ``round(0.2 * n_c)`` random members of each class go to test.

    Written out rather than sklearn's ``train_test_split(stratify=...)``, which refuses classes with a single
    image, common in a user's ImageFolder; here such an image simply stays in train.
    """
    rng = np.random.default_rng(_HOLDOUT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = round(_HOLDOUT_FRACTION * len(members))
        is_test[rng.permutation(members)[:n_test]] = True
    return is_test


def _split_mask(is_test: np.ndarray, split: str) -> np.ndarray:
    if split == "all":
        return np.ones_like(is_test)
    return is_test if split == "test" else ~is_test


def _stratified_quota(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """How many of ``n`` to take from each class: proportional to ``counts``, summing exactly to ``n``.

    Every non-empty class gets at least one image when ``n`` allows it (a class absent from the subset would
    silently vanish from per-class results); the rest is shared by largest remainder, ties broken by a seeded
    shuffle rather than by class order.
    """
    present = counts > 0
    base = present.astype(np.int64) if n >= present.sum() else np.zeros_like(counts)
    room = counts - base
    share = (n - base.sum()) * room / room.sum()
    quota = base + np.floor(share).astype(np.int64)
    tiebreak = rng.permutation(len(counts))
    order = np.lexsort((tiebreak, -(share - np.floor(share))))  # largest remainder first
    for c in order:
        if quota.sum() == n:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
    return quota


def _subset(labels: np.ndarray | None, total: int, n: int, seed: int) -> np.ndarray:
    """Indices (sorted, so the original order is kept) of a seeded ``n``-subset, stratified when labelled."""
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(total, size=n, replace=False))
    counts = np.bincount(labels, minlength=int(labels.max()) + 1)
    quota = _stratified_quota(counts, n, rng)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in enumerate(quota) if q]
    return np.sort(np.concatenate(chosen))
