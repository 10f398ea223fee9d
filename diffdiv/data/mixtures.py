"""Embedded 2-D (or any-D) Gaussian mixtures: ring, grid, or explicit means/stds/weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffdiv.config import check
from diffdiv.models.gmm import GaussianMixture


@dataclass
class MixtureConfig:
    """A Gaussian mixture: `kind` ring/grid, or custom with explicit means/stds/weights."""

    kind: str = "ring"  # ring | grid | custom
    num_modes: int = 8
    radius: float = 2.0
    std: float = 0.1
    spacing: float = 1.0
    means: list[list[float]] | None = None
    stds: list[float] | None = None
    weights: list[float] | None = None
    labels: list[int] | None = None

    def validate(self) -> None:
        check(self.kind in ("ring", "grid", "custom"), f"mixture.kind: '{self.kind}' is not ring, grid or custom")
        check(self.std > 0, "mixture.std must be > 0")
        if self.kind == "custom":
            check(self.means is not None and len(self.means) > 0, "mixture.means: empty (custom needs means)")
        else:
            check(self.num_modes > 0, "mixture.num_modes must be > 0")
        k = len(self.means) if self.means else self.num_modes
        if self.means:
            d = len(self.means[0])
            check(d > 0 and all(len(m) == d for m in self.means), "mixture.means: rows of unequal length")
        if self.weights is not None:
            check(len(self.weights) == k, f"mixture.weights: {len(self.weights)} weights for {k} components")
            check(len(self.weights) > 0, "mixture.weights: empty")
            check(all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
                  "mixture.weights: must be non-negative with a positive sum")
        if self.stds is not None:
            check(len(self.stds) == k, f"mixture.stds: {len(self.stds)} stds for {k} components")
            check(all(s > 0 for s in self.stds), "mixture.stds: must be > 0")
        if self.labels is not None:
            check(len(self.labels) == k, f"mixture.labels: {len(self.labels)} labels for {k} components")


def ring_means(num_modes: int, radius: float) -> torch.Tensor:
    ang = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    return torch.stack([radius * torch.cos(ang), radius * torch.sin(ang)], dim=1)


def grid_means(num_modes: int, spacing: float) -> torch.Tensor:
    side = int(math.ceil(math.sqrt(num_modes)))
    pts = [(i, j) for i in range(side) for j in range(side)][:num_modes]
    m = torch.tensor(pts, dtype=torch.float64) * spacing
    return m - m.mean(0, keepdim=True)


def build_mixture(cfg: MixtureConfig) -> GaussianMixture:
    """MixtureConfig -> GaussianMixture."""
    if cfg.kind == "ring":
        means = ring_means(cfg.num_modes, cfg.radius)
    elif cfg.kind == "grid":
        means = grid_means(cfg.num_modes, cfg.spacing)
    else:
        means = torch.tensor(cfg.means, dtype=torch.float64)
    k = means.shape[0]
    stds = torch.tensor(cfg.stds, dtype=torch.float64) if cfg.stds is not None else torch.full((k,), cfg.std)
    return GaussianMixture(means, stds, cfg.weights, cfg.labels)


def mixture_sigma_data(mix: GaussianMixture) -> float:
    """Overall data std (root mean per-dimension variance) of a mixture."""
    w = mix.weights[:, None]
    mean = (w * mix.means).sum(0)
    second = (w * (mix.means**2 + mix.stds**2)).sum(0)
    return float((second - mean**2).mean().sqrt())

