"""DPOK (Fan et al. 2023, arXiv 2305.16381): the DDIM chain as a Gaussian policy, policy gradient with
clipped importance ratios and a per-step KL regularizer to the pretrained model.

A DDIM step with eta > 0 from time t to s < t is the Gaussian transition
    x_s ~ N(mu(x_t), std^2 I),  mu = c_x0 x0(x_t) + c_eps eps(x_t),  eps = (x_t - alpha_t x0)/sigma_t,
with std^2 = eta^2 (sigma_s^2/sigma_t^2) (sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2), c_x0 = alpha_s and
c_eps = sqrt(sigma_s^2 - std^2) (Song et al. 2021, eq. 12, written for any (alpha, sigma) schedule).
So the mean is affine in the denoiser output: mu = k x0 + (c_eps/sigma_t) x_t with k = c_x0 - c_eps alpha_t/sigma_t,
and two models at the same x_t differ in mean by k (x0_a - x0_b).

Reductions over the N elements of a sample (`reduce`):
- "sum": the exact log-density of the transition and the exact KL of the two Gaussians;
- "mean": both divided by N (what the reference implementations of DDPO/DPOK do for log-probs); the
  importance ratio exp(mean log-ratio) is then a per-element geometric mean, not the exact ratio.
The DPOK loss of one transition is  reward_weight * PPO(ratio, A) + div_weight * KL_t  with both terms
reduced the same way, so div_weight means the same thing relative to the policy-gradient term either way.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch import Tensor

from diffdiv.param import bcast

REDUCTIONS = ("mean", "sum")


def _reduce(per_elem: Tensor, reduce: str) -> Tensor:
    flat = per_elem.reshape(per_elem.shape[0], -1)
    if reduce == "sum":
        return flat.sum(1)
    if reduce == "mean":
        return flat.mean(1)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def ddim_step_coeffs(alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor,
                     eta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(c_x0, c_eps, std) of the DDIM step t -> s (Song et al. 2021, eq. 12 and 16; any alpha, sigma)."""
    var = eta**2 * (sigma_s**2 / sigma_t**2) * (sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2)
    var = var.clamp_min(0.0)
    c_eps = (sigma_s**2 - var).clamp_min(0.0).sqrt()
    return alpha_s, c_eps, var.sqrt()


def ddim_step_mean(x_t: Tensor, x0: Tensor, alpha_t: Tensor, sigma_t: Tensor, c_x0: Tensor,
                   c_eps: Tensor) -> Tensor:
    """mu = c_x0 x0 + c_eps eps(x_t, x0) (DDIM eq. 12 without the noise term)."""
    eps = (x_t - bcast(alpha_t, x_t) * x0) / bcast(sigma_t, x_t)
    return bcast(c_x0, x_t) * x0 + bcast(c_eps, x_t) * eps


def ddim_mean_x0_coef(alpha_t: Tensor, sigma_t: Tensor, c_x0: Tensor, c_eps: Tensor) -> Tensor:
    """k with mu_a - mu_b = k (x0_a - x0_b) for two models at the same x_t."""
    return c_x0 - c_eps * alpha_t / sigma_t


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float, reduce: str = "mean") -> Tensor:
    """log N(x; mean, std^2 I) per sample (B,), summed or averaged over elements; std per sample or scalar."""
    s = bcast(torch.as_tensor(std, dtype=mean.dtype, device=mean.device), mean)
    per = -((x - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return _reduce(per, reduce)


def gaussian_kl_same_std(mean_a: Tensor, mean_b: Tensor, std: Tensor | float, reduce: str = "mean") -> Tensor:
    """KL(N(mean_a, std^2 I) || N(mean_b, std^2 I)) = ||mean_a - mean_b||^2 / (2 std^2), per sample."""
    s = bcast(torch.as_tensor(std, dtype=mean_a.dtype, device=mean_a.device), mean_a)
    return _reduce((mean_a - mean_b) ** 2 / (2 * s**2), reduce)


def step_kl_from_x0(x0_a: Tensor, x0_b: Tensor, k: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """Per-step KL of two DDIM transitions at the same x_t: k^2 ||x0_a - x0_b||^2 / (2 std^2) (DPOK eq. 7)."""
    kk = bcast(torch.as_tensor(k, dtype=x0_a.dtype, device=x0_a.device), x0_a)
    return gaussian_kl_same_std(kk * x0_a, kk * x0_b, std, reduce)


def ppo_clipped_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """Clipped surrogate max(-A rho, -A clip(rho, 1-eps, 1+eps)), rho = exp(logp - logp_old) (PPO eq. 7)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def dpok_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, kl: Tensor, clip_range: float,
              reward_weight: float, div_weight: float) -> tuple[Tensor, dict[str, float]]:
    """DPOK per-transition loss, batch mean: reward_weight * PPO + div_weight * KL_t (Algorithm 1)."""
    pg = ppo_clipped_loss(log_prob, old_log_prob, advantages, clip_range)
    loss = reward_weight * pg.mean() + div_weight * kl.mean()
    with torch.no_grad():
        ratio = torch.exp(log_prob - old_log_prob)
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, {"pg": float(pg.mean().detach()), "kl": float(kl.mean().detach()),
                  "clipfrac": float(clipfrac), "approx_kl_old": float((old_log_prob - log_prob).mean().detach())}


# ----------------------------------------------------------------------------------------------
# Reward normalization
# ----------------------------------------------------------------------------------------------


def normalize_by_group(rewards: Tensor, groups: list[Any] | None, eps: float = 1e-6) -> Tensor:
    """(r - mean) / (std + eps) within each group (e.g. prompt); one group when groups is None."""
    out = torch.empty_like(rewards)
    keys = [None] * len(rewards) if groups is None else list(groups)
    for key in dict.fromkeys(keys):
        idx = torch.tensor([i for i, k in enumerate(keys) if k == key], device=rewards.device)
        r = rewards[idx]
        std = r.std(unbiased=False) if len(r) > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        out[idx] = (r - r.mean()) / (std + eps)
    return out


class PerPromptStatTracker:
    """Per-prompt running reward statistics over the last `buffer_size` rewards (DDPO's tracker).

    A prompt seen fewer than `min_count` times is normalized with the statistics of the whole batch.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = int(buffer_size), int(min_count), float(eps)
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Record rewards and return them normalized per prompt (same shape, same device)."""
        r64 = rewards.detach().double().cpu()
        out = torch.empty_like(r64)
        batch_mean, batch_std = r64.mean(), r64.std(unbiased=False)
        for p in dict.fromkeys(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            buf = self.stats.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(r64[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                t = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = t.mean(), t.std(unbiased=False)
            out[idx] = (r64[idx] - mean) / (std + self.eps)
        return out.to(rewards.device, rewards.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in sd.get("stats", {}).items()}
