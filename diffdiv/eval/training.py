"""Scores of a finished training run: sample a model, compare with its data (digits FD, mixture modes), draw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffdiv.data.config import Dataset
from diffdiv.models.base import Denoiser


def evaluate_model(model: Denoiser, data: Dataset, n: int, steps: int, sampler: str, out: Path,
                   kind: str = "diffusion", tag: str = "") -> dict[str, float]:
    """Sample, score against the data (digits FID or mixture mode stats/MMD), write samples.png."""
    from diffdiv.sampling import sample

    model.eval()
    x = sample(model, n, steps, seed=0, sampler=sampler, kind=kind)
    return score_samples(model, x, data, out, tag, title=f"{kind} {steps} steps")


def evaluate_model_steps(model: Denoiser, data: Dataset | None, n: int, steps: int, out: Path, kind: str,
                         tag: str = "", times: list[float] | None = None, cond: Any = None) -> dict[str, float]:
    """Few-step sample + score (digits FID, mixture stats, or just a grid for other data)."""
    from diffdiv.sampling import sample

    model.eval()
    x = sample(model, n, steps, seed=0, kind=kind, times=times, cond=cond)
    return score_samples(model, x, data, out, tag, title=f"student {steps} step(s)")


def score_samples(model: Denoiser, x: Tensor, data: Dataset | None, out: Path, tag: str = "",
                  title: str = "") -> dict[str, float]:
    """Metrics of drawn samples against the data (mixture mode stats + MMD, digits FID) and a picture."""
    from diffdiv.data.images import save_image_grid

    suffix = f"_{tag}" if tag else ""
    metrics: dict[str, float] = {}
    if data is not None and data.mixture is not None:
        from diffdiv.eval.mixture import mmd_rbf, mode_stats
        from diffdiv.eval.plots import scatter_2d

        st = mode_stats(x, data.mixture)
        ref = data.all(len(x))
        metrics.update({f"mmd{suffix}": mmd_rbf(ref[:2000], x[:2000]), f"mode_recall{suffix}": st["recall"],
                        f"far_fraction{suffix}": st["far_fraction"],
                        f"max_rel_mass_error{suffix}": st["max_rel_error"]})
        if x.shape[1] == 2:
            scatter_2d(x, out / f"samples{suffix}.png", data.mixture.means, ref, title=title)
        return metrics
    with torch.no_grad():
        images = model.decode(x[:64]) if hasattr(model, "decode") else x[:64]
    save_image_grid(images, out / f"samples{suffix}.png")
    if data is not None and data.cfg.kind == "digits" and x.shape[1:] == (1, 8, 8):
        from diffdiv.data.digits import load_digits_tensor
        from diffdiv.eval.fid import digits_fid

        metrics[f"fid_vs_train{suffix}"] = digits_fid(load_digits_tensor("train"), x)
        metrics[f"fid_vs_test{suffix}"] = digits_fid(load_digits_tensor("test"), x)
    return metrics
