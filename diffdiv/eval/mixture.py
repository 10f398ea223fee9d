"""Metrics for samples of a known Gaussian mixture: per-mode mass and recall, MMD."""

from __future__ import annotations

import torch
from torch import Tensor

from diffdiv.models.gmm import GaussianMixture


def assign_modes(x: Tensor, mix: GaussianMixture) -> Tensor:
    """Most responsible component of each sample (exact posterior at noise level 0)."""
    return mix.responsibilities(x.reshape(len(x), -1).double()).argmax(-1)


def mode_stats(x: Tensor, mix: GaussianMixture, near: float = 3.0) -> dict[str, list[float] | float]:
    """Per-mode mass (fraction of samples), mass relative to the true weight, recall and far fraction.

    A sample counts for a mode only if within `near` component stds of its mean; a mode is
    recalled if it receives at least 25% of its expected share.
    """
    x = x.reshape(len(x), -1).double()
    k = assign_modes(x, mix)
    dist = ((x - mix.means[k]) / mix.stds[k]).norm(dim=-1) / mix.dim**0.5
    close = dist < near
    K = mix.num_components
    counts = torch.bincount(k[close], minlength=K).double()
    mass = counts / len(x)
    w = mix.weights
    rel = mass / w
    recalled = rel >= 0.25
    return {
        "mass": mass.tolist(),
        "weights": w.tolist(),
        "relative_mass": rel.tolist(),
        "recall": float(recalled.double().mean()),
        "far_fraction": float(1 - close.double().mean()),
        "max_rel_error": float((rel - 1).abs().max()),
    }


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0), paired: bool = False) -> float:
    """Unbiased squared MMD (Gretton et al. 2012, Eq. 3) with a sum of RBF kernels exp(-d^2 / 2h^2).

    `paired=True` (x_i and y_i drawn together, e.g. two models from the same noise; needs len(x) == len(y)) also
    drops the cross pairs k(x_i, y_i): the U-statistic over i != j of k(x_i,x_j) + k(y_i,y_j) - k(x_i,y_j) - k(x_j,y_i),
    unbiased whether or not the pairs are dependent (the plain estimator is biased for dependent pairs).
    """
    x = x.reshape(len(x), -1).double()
    y = y.reshape(len(y), -1).double()

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h**2)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    if paired:
        if n != m:
            raise ValueError(f"paired MMD needs equal sizes, got {n} and {m}")
        sxy = (kxy.sum() - kxy.diagonal().sum()) / (n * (n - 1))
        return float(sxx + syy - 2 * sxy)
    return float(sxx + syy - 2 * kxy.mean())
