"""sklearn's bundled digits (1797 8x8 images) scaled to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch


def load_digits_tensor(split: str = "all", test_fraction: float = 0.2, seed: int = 0,
                       return_labels: bool = False):
    """Digits as (N, 1, 8, 8) float32 in [-1, 1]; split = all | train | test (fixed stratified split)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    if split != "all":
        if split not in ("train", "test"):
            raise ValueError(f"split must be all, train or test, got {split!r}")
        rng = np.random.default_rng(seed)
        test_idx = []
        for c in range(10):
            idx = np.flatnonzero(d.target == c)
            rng.shuffle(idx)
            test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
        mask = np.zeros(len(y), dtype=bool)
        mask[np.array(test_idx)] = True
        sel = torch.from_numpy(mask if split == "test" else ~mask)
        x, y = x[sel], y[sel]
    return (x, y) if return_labels else x
