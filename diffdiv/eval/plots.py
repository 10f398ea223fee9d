"""Pictures: 2-D scatter of samples against mixture modes, metric-vs-steps and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_2d(samples: torch.Tensor, path: str | Path, means: torch.Tensor | None = None,
               reference: torch.Tensor | None = None, title: str = "") -> None:
    """Scatter of 2-D samples (and the reference / mode centers) saved as PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if reference is not None:
        r = reference[:2000].cpu().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=2, alpha=0.3, c="tab:gray", label="data")
    x = samples[:4000].float().cpu().numpy()
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, c="tab:blue", label="samples")
    if means is not None:
        m = means.cpu().numpy()
        ax.scatter(m[:, 0], m[:, 1], marker="x", c="tab:red", s=40, label="modes")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def line_plot(xs: Sequence[float], series: dict[str, Sequence[float]], path: str | Path, xlabel: str = "",
              ylabel: str = "", title: str = "", logx: bool = False) -> None:
    """One PNG with one line per series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, ys in series.items():
        ax.plot(list(xs)[: len(ys)], list(ys), marker="o", ms=3, label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
