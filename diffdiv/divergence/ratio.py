"""Density ratio r = p/q from a discriminator, its per-noise-level normalization, and GAN losses.

Follows f-distill (Xu et al. 2025, arXiv 2502.15681, section 4 and its NVIDIA reference code):
r = exp(clamp(mean logit, -10, 10)) detached and clipped to [0.1, 20]; optionally divided by an EMA of
its mean in the sample's noise-level bin; h(r) is then normalized by its all-reduced batch mean.
Everything is computed in fp32 whatever the autocast dtype; statistics are all-reduced across
processes when torch.distributed is initialized.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum a tensor over all processes (no-op without an initialized process group); returns t."""
    if _distributed():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _per_sample_mean(x: Tensor) -> Tensor:
    x = x.float()
    return x.reshape(x.shape[0], -1).mean(1) if x.ndim > 1 else x


def ratio_from_logits(logits: Tensor, clamp: float = 10.0,
                      clip: tuple[float, float] | None = (0.1, 20.0)) -> Tensor:
    """r = clip(exp(clamp(mean logit))) per sample, detached fp32 (B,); logit = log(p/q) at the optimum."""
    with _no_autocast(logits.device):
        logit = _per_sample_mean(logits.detach())  # mean over heads / spatial logits
        r = torch.exp(logit.clamp(-clamp, clamp))
        if clip is not None:
            r = r.clamp(clip[0], clip[1])
    return r


def normalize_batch_mean(h: Tensor, eps: float = 1e-6) -> Tensor:
    """h / mean(h), the mean taken over the global batch (all-reduced); fp32, detached."""
    with _no_autocast(h.device):
        h = h.detach().float()
        stats = torch.stack([h.sum(), torch.tensor(float(h.numel()), device=h.device)])
        all_reduce_sum(stats)
        mean = stats[0] / stats[1].clamp_min(1.0)
        return h / mean.clamp_min(eps)


def discriminator_loss(logit_real: Tensor, logit_fake: Tensor) -> Tensor:
    """Per-sample logistic GAN loss softplus(-l_real) + softplus(l_fake) (B,), fp32.

    Real = samples of p (noised data or teacher samples), fake = generator samples; the optimal logit
    is log p/q. Logits of shape (B, ...) are averaged per sample after the softplus.
    """
    with _no_autocast(logit_real.device):
        lr, lf = logit_real.float(), logit_fake.float()
        return _per_sample_mean(F.softplus(-lr)) + _per_sample_mean(F.softplus(lf))


def gan_generator_loss(logit_fake: Tensor) -> Tensor:
    """Per-sample non-saturating generator loss softplus(-l_fake) (B,), fp32."""
    with _no_autocast(logit_fake.device):
        return _per_sample_mean(F.softplus(-logit_fake.float()))


class RatioBinNormalizer(nn.Module):
    """Per-noise-level normalization of r: t in [t_min, t_max] is split into `num_bins` equal bins and
    r is divided by an EMA of the bin's mean ratio (f-distill reference; decay 0 = last batch mean).

    `update(r, t)` folds the (all-reduced) bin means of a batch into the EMA; `__call__(r, t)` divides
    by the current EMA without updating. The reference order is `update` then `__call__`
    (`update_and_normalize`). The EMA lives in persistent fp32 buffers, so `state_dict` /
    `load_state_dict` (and accelerate checkpoints) resume it exactly.
    """

    def __init__(self, num_bins: int = 10, decay: float = 0.0, t_min: float = 0.0, t_max: float = 1.0,
                 eps: float = 1e-6):
        super().__init__()
        if num_bins < 1:
            raise ValueError("num_bins must be >= 1")
        if not 0.0 <= decay < 1.0:
            raise ValueError("decay must be in [0, 1)")
        if not t_max > t_min:
            raise ValueError("t_max must be greater than t_min")
        self.num_bins, self.decay, self.eps = int(num_bins), float(decay), float(eps)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.register_buffer("ema", torch.ones(self.num_bins, dtype=torch.float32))
        self.register_buffer("count", torch.zeros(self.num_bins, dtype=torch.float64))

    def bin_index(self, t: Tensor) -> Tensor:
        """Bin of each time value (B,) long; out-of-range times go to the end bins."""
        width = (self.t_max - self.t_min) / self.num_bins
        return ((t.detach().double() - self.t_min) / width).floor().long().clamp(0, self.num_bins - 1)

    @torch.no_grad()
    def update(self, r: Tensor, t: Tensor) -> None:
        """EMA update of each bin's mean ratio from this step's global batch (all-reduced)."""
        with _no_autocast(r.device):
            idx = self.bin_index(t).to(r.device)
            stats = torch.stack([
                torch.bincount(idx, minlength=self.num_bins).double(),
                torch.bincount(idx, weights=r.detach().double().reshape(-1), minlength=self.num_bins),
            ])
            all_reduce_sum(stats)
            cnt, tot = stats[0].to(self.ema.device), stats[1].to(self.ema.device)
            valid = cnt > 0
            mean = (tot / cnt.clamp_min(1.0)).float()
            new = self.decay * self.ema + (1.0 - self.decay) * mean
            self.ema.copy_(torch.where(valid, new, self.ema))
            self.count += cnt

    def forward(self, r: Tensor, t: Tensor) -> Tensor:
        """r divided by its bin's EMA mean (fp32, detached)."""
        with _no_autocast(r.device):
            idx = self.bin_index(t).to(self.ema.device)
            return r.detach().float() / (self.ema[idx].to(r.device) + self.eps)

    def update_and_normalize(self, r: Tensor, t: Tensor) -> Tensor:
        """The reference order: update the EMA with this batch, then normalize."""
        self.update(r, t)
        return self(r, t)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, decay={self.decay}, t=[{self.t_min}, {self.t_max}]"
