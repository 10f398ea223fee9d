"""Gaussian mixtures with exact densities, scores and denoisers at every noise level."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffdiv.models.base import Denoiser
from diffdiv.param import Schedule, VPSchedule


def _per_sample(c: Tensor | float, n: int, like: Tensor) -> Tensor:
    c = torch.as_tensor(c, dtype=like.dtype, device=like.device)
    return c.expand(n) if c.ndim == 0 else c


class GaussianMixture:
    """sum_k w_k N(mu_k, diag(std_k^2)); stds per component (K,) or per dimension (K, D).

    Noising x_t = a x0 + s eps keeps it a mixture: N(a mu_k, a^2 std_k^2 + s^2).
    """

    def __init__(self, means: Tensor | Sequence, stds: Tensor | Sequence | float,
                 weights: Tensor | Sequence | None = None,
                 labels: Tensor | Sequence | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or means.shape[0] == 0:
            raise ValueError("means must be a non-empty (K, D) array")
        K, D = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(K)
        if stds.ndim == 1:
            stds = stds[:, None].expand(K, D)
        if stds.shape != (K, D) or bool((stds <= 0).any()):
            raise ValueError("stds must be positive, shape (K,) or (K, D)")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("weights must be K non-negative numbers with a positive sum")
        self.means = means
        self.stds = stds.contiguous()
        self.weights = weights / weights.sum()
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels is not None and self.labels.shape != (K,):
            raise ValueError("labels must have one entry per component")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def _params(self, x: Tensor):
        dt = torch.promote_types(x.dtype, torch.float32)
        return (self.means.to(x.device, dt), self.stds.to(x.device, dt), self.weights.to(x.device, dt))

    def component_log_prob(self, x_t: Tensor, a: Tensor | float = 1.0, s: Tensor | float = 0.0) -> Tensor:
        """log N(x_t; a mu_k, a^2 std_k^2 + s^2) for every component: (B, K)."""
        x = x_t.reshape(x_t.shape[0], -1)
        mu, sd, _ = self._params(x)
        x = x.to(mu.dtype)
        a = _per_sample(a, x.shape[0], x)[:, None, None]
        s = _per_sample(s, x.shape[0], x)[:, None, None]
        var = a**2 * sd[None] ** 2 + s**2  # (B, K, D)
        diff = x[:, None, :] - a * mu[None]
        return -0.5 * ((diff**2 / var).sum(-1) + torch.log(var).sum(-1) + x.shape[1] * math.log(2 * math.pi))

    def responsibilities(self, x_t: Tensor, a=1.0, s=0.0, labels: Tensor | None = None) -> Tensor:
        """Posterior component probabilities given x_t (restricted to `labels` when given)."""
        lp = self.component_log_prob(x_t, a, s) + torch.log(self._params(x_t)[2])[None]
        if labels is not None:
            assert self.labels is not None, "mixture has no component labels"
            mask = self.labels.to(x_t.device)[None, :] == labels.to(x_t.device)[:, None]
            lp = lp.masked_fill(~mask, -math.inf)
        return torch.softmax(lp, dim=-1)

    def log_prob(self, x_t: Tensor, a=1.0, s=0.0, labels: Tensor | None = None) -> Tensor:
        """Exact log p_t(x_t), (B,)."""
        lw = torch.log(self._params(x_t)[2])[None]
        lp = self.component_log_prob(x_t, a, s) + lw
        if labels is not None:
            mask = self.labels.to(x_t.device)[None, :] == labels.to(x_t.device)[:, None]
            lw_c = torch.logsumexp(lw.expand_as(lp).masked_fill(~mask, -math.inf), dim=-1, keepdim=True)
            lp = lp.masked_fill(~mask, -math.inf) - lw_c
        return torch.logsumexp(lp, dim=-1)

    def posterior_mean(self, x_t: Tensor, a=1.0, s=0.0, labels: Tensor | None = None) -> Tensor:
        """Exact E[x0 | x_t] (the optimal denoiser), same shape as x_t."""
        shape = x_t.shape
        x = x_t.reshape(shape[0], -1)
        mu, sd, _ = self._params(x)
        x = x.to(mu.dtype)
        gamma = self.responsibilities(x_t, a, s, labels)  # (B, K)
        a_ = _per_sample(a, x.shape[0], x)[:, None, None]
        s_ = _per_sample(s, x.shape[0], x)[:, None, None]
        var0 = sd[None] ** 2
        gain = a_ * var0 / (a_**2 * var0 + s_**2)  # (B, K, D)
        cond_mean = mu[None] + gain * (x[:, None, :] - a_ * mu[None])
        out = (gamma[..., None] * cond_mean).sum(1)
        return out.reshape(shape).to(x_t.dtype)

    def score(self, x_t: Tensor, a=1.0, s=0.0, labels: Tensor | None = None) -> Tensor:
        """Exact grad_x log p_t(x_t)."""
        shape = x_t.shape
        x = x_t.reshape(shape[0], -1)
        mu, sd, _ = self._params(x)
        x = x.to(mu.dtype)
        gamma = self.responsibilities(x_t, a, s, labels)
        a_ = _per_sample(a, x.shape[0], x)[:, None, None]
        s_ = _per_sample(s, x.shape[0], x)[:, None, None]
        var = a_**2 * sd[None] ** 2 + s_**2
        comp = -(x[:, None, :] - a_ * mu[None]) / var
        return (gamma[..., None] * comp).sum(1).reshape(shape).to(x_t.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, labels: Tensor | None = None,
               return_components: bool = False, dtype: torch.dtype = torch.float32):
        """Draw n samples (optionally only from components with the given per-sample labels)."""
        w = self.weights
        if labels is None:
            k = torch.multinomial(w, n, replacement=True, generator=generator)
        else:
            mask = (self.labels[None, :] == labels.cpu()[:, None]).to(torch.float64)
            k = torch.multinomial(w[None] * mask, 1, generator=generator)[:, 0]
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means[k] + self.stds[k] * z).to(dtype)
        return (x, k) if return_components else x


class GaussianMixtureTeacher(Denoiser):
    """Exact denoiser of a Gaussian mixture at every noise level of any schedule.

    `sample_shape` may be any shape whose size equals the mixture dimension. With component
    labels it is class-conditional (cond = LongTensor of labels, -1 = unconditional) and supports
    classifier-free guidance.
    """

    def __init__(self, mixture: GaussianMixture, schedule: Schedule | None = None,
                 sample_shape: tuple[int, ...] | None = None, guidance_scale: float = 1.0):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule or VPSchedule.linear()
        self.sample_shape = tuple(sample_shape) if sample_shape else (mixture.dim,)
        if math.prod(self.sample_shape) != mixture.dim:
            raise ValueError("sample_shape does not match the mixture dimension")
        self.guidance_scale = guidance_scale
        self.conditional = mixture.labels is not None
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def _labels(self, cond):
        if cond is None:
            return None
        cond = torch.as_tensor(cond)
        if bool((cond < 0).all()):
            return None
        if bool((cond < 0).any()):
            raise ValueError("mix of conditional and unconditional labels; split the batch")
        return cond

    def _denoise(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        a, s = self.schedule.alpha_sigma(t)
        if cond is not None and self.conditional and bool((torch.as_tensor(cond) < 0).any()):
            cond = torch.as_tensor(cond)
            out = torch.empty_like(x_t)
            un = cond < 0
            if un.any():
                out[un] = self.mixture.posterior_mean(x_t[un], a[un], s[un])
            if (~un).any():
                out[~un] = self.mixture.posterior_mean(x_t[~un], a[~un], s[~un], cond[~un])
            return out
        return self.mixture.posterior_mean(x_t, a, s, self._labels(cond))

    def uncond_like(self, cond):
        return torch.full_like(torch.as_tensor(cond), -1)

    def cat_cond(self, a, b):
        return torch.cat([torch.as_tensor(a), torch.as_tensor(b)])

    def log_prob(self, x_t: Tensor, t: Tensor | float, cond=None) -> Tensor:
        """Exact log p_t(x_t) at the schedule's time t."""
        a, s = self.schedule.alpha_sigma(self._as_time(t, x_t))
        return self.mixture.log_prob(x_t, a, s, self._labels(cond))

    def sample_data(self, n: int, generator: torch.Generator | None = None, cond=None) -> Tensor:
        x = self.mixture.sample(n, generator, labels=self._labels(cond))
        return x.reshape(n, *self.sample_shape)
