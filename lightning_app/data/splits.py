"""Seeded, stratified train / val / test split of sample ids."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from lightning_app.errors import ConfigError


def stratified_split(
    labels: Sequence[int],
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split positions ``0..len(labels)-1`` per class; returns sorted (train, val, test) int64 arrays.

    Each class of ``n`` samples gives ``round(n * val_fraction)`` to val and
    ``round(n * test_fraction)`` to test (while keeping at least one sample for train), so
    class proportions are kept even for tiny classes, and the result depends only on
    ``(labels, fractions, seed)``; not on the sklearn or numpy version (``np.random.default_rng``
    with a fixed seed is stable across numpy releases).
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ConfigError(
            f"val_split={val_fraction} and test_split={test_fraction} must be in [0, 1) and sum to less than 1"
        )
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        ids = ids[rng.permutation(len(ids))]
        n = len(ids)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        while n_test + n_val > n - 1 and (n_test or n_val):  # keep >= 1 training sample per class
            if n_val >= n_test and n_val:
                n_val -= 1
            else:
                n_test -= 1
        test.append(ids[:n_test])
        val.append(ids[n_test:n_test + n_val])
        train.append(ids[n_test + n_val:])

    def _cat(parts: list) -> np.ndarray:
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)

    return _cat(train), _cat(val), _cat(test)
