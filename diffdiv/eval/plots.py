"""Pictures: 2-D scatter of samples against mixture modes, metric-vs-steps and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_2d(samples: torch.Tensor, path: str | Path, means: torch.Tensor | None = None,
               reference: torch.Tensor | None = None, title: str = "") -> None:
    """Scatter of 2-D samples (and the reference / mode centers) saved as PNG."""
    plt = pyplot()
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
    plt = pyplot()
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


def panels_plot(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], path: str | Path,
                xlabel: str = "", title: str = "", logx: bool = False) -> None:
    """One PNG with a panel per metric; each panel holds one line per series: {panel: {series: (xs, ys)}}."""
    plt = pyplot()
    k = max(1, len(panels))
    cols = min(k, 3)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[k:]:
        ax.axis("off")
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        ticks: set[float] = set()
        for label, (xs, ys) in series.items():
            ax.plot(list(xs), list(ys), marker="o", ms=3, label=label)
            ticks.update(float(x) for x in xs)
        if logx:
            ax.set_xscale("log")
        ys_all = [float(y) for _, ys in series.values() for y in ys]
        if ys_all and min(ys_all) > 0 and max(ys_all) > 30 * min(ys_all):
            ax.set_yscale("log")  # e.g. FID from 1 to 50 steps spans orders of magnitude
        if 0 < len(ticks) <= 12:
            ax.set_xticks(sorted(ticks))
            ax.set_xticklabels([f"{t:g}" for t in sorted(ticks)])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
