"""Fréchet distance through torchmetrics with pluggable feature modules."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance


def make_fid(features: nn.Module) -> FrechetInceptionDistance:
    """torchmetrics FID over a custom feature module (inputs passed through unchanged); local to the calling
    process (no sync: evaluation runs on rank 0 only, a sync would wait for ranks that never join)."""
    fid = FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=False,
                                   sync_on_compute=False)
    return fid


@torch.no_grad()
def frechet_distance(real: Tensor, fake: Tensor, features: nn.Module, batch_size: int = 500) -> float:
    """FID between two image sets in the given feature space."""
    fid = make_fid(features)
    for i in range(0, len(real), batch_size):
        fid.update(real[i:i + batch_size], real=True)
    for i in range(0, len(fake), batch_size):
        fid.update(fake[i:i + batch_size], real=False)
    return float(fid.compute())


def digits_fid(real: Tensor, fake: Tensor) -> float:
    """FID in the digits-CNN feature space (images (N, 1, 8, 8) in [-1, 1])."""
    from diffdiv.eval.digits_cnn import DigitsFeatures, load_digits_cnn

    return frechet_distance(real, fake, DigitsFeatures(load_digits_cnn()))
