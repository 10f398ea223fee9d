"""Exact references for the analytic case (docs/math.md#analytic).

A generator that is an affine map of Gaussian noise, x0 = A z + b with z ~ N(0, I_k), has an exactly
Gaussian noised density q_t = N(alpha b, alpha^2 A A^T + sigma^2 I). With a Gaussian-mixture teacher
p_t (diffdiv.models.gmm.GaussianMixture), the ratio r = p_t/q_t, every f-divergence, every score
divergence and their gradients w.r.t. (A, b) are computable independently of the training losses:
by quadrature on a grid in 2-D (deterministic) or by Monte Carlo with exact densities in any dimension.
All functions are differentiable w.r.t. A and b (use float64); `value_and_grad` returns the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffdiv.divergence.fdiv import f_value
from diffdiv.models.gmm import GaussianMixture

Scalar = float | Tensor


# ----------------------------------------------------------------------------------------------
# The affine generator and its exact Gaussian q_t
# ----------------------------------------------------------------------------------------------


def affine_sample(A: Tensor, b: Tensor, n: int,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """x0 = A z + b for n draws z ~ N(0, I_k) -> (x0 (n, D), z (n, k)); differentiable in A, b."""
    z = torch.randn(n, A.shape[1], generator=generator, dtype=A.dtype, device=A.device)
    return z @ A.T + b, z


def affine_qt(A: Tensor, b: Tensor, alpha: Scalar, sigma: Scalar) -> tuple[Tensor, Tensor]:
    """Mean and covariance of q_t for x0 = A z + b: N(alpha b, alpha^2 A A^T + sigma^2 I)."""
    D = A.shape[0]
    eye = torch.eye(D, dtype=A.dtype, device=A.device)
    return alpha * b, alpha**2 * (A @ A.T) + sigma**2 * eye


def gaussian_log_prob(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """log N(x; mean, cov) for x (n, D) -> (n,)."""
    L = torch.linalg.cholesky(cov)
    sol = torch.linalg.solve_triangular(L, (x - mean).T, upper=False)
    maha = (sol**2).sum(0)
    logdet = 2.0 * torch.log(torch.diagonal(L)).sum()
    return -0.5 * (maha + logdet + len(mean) * math.log(2 * math.pi))


def gaussian_score(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """grad_x log N(x; mean, cov) = -cov^{-1} (x - mean), (n, D)."""
    return -torch.linalg.solve(cov, (x - mean).T).T


def affine_posterior_mean(x_t: Tensor, A: Tensor, b: Tensor, alpha: Scalar, sigma: Scalar) -> Tensor:
    """Exact fake-score denoiser E_q[x0 | x_t] = b + alpha A A^T cov_t^{-1} (x_t - alpha b)."""
    mean, cov = affine_qt(A, b, alpha, sigma)
    gain = alpha * (A @ A.T)
    return b + (gain @ torch.linalg.solve(cov, (x_t - mean).T)).T


def gaussian_kl(m1: Tensor, S1: Tensor, m2: Tensor, S2: Tensor) -> Tensor:
    """KL(N(m1, S1) || N(m2, S2)) in closed form."""
    D = len(m1)
    sol = torch.linalg.solve(S2, S1)
    d = (m2 - m1).unsqueeze(-1)
    maha = (d.T @ torch.linalg.solve(S2, d)).squeeze()
    return 0.5 * (torch.trace(sol) + maha - D + torch.logdet(S2) - torch.logdet(S1))


# ----------------------------------------------------------------------------------------------
# Quadrature grid (2-D)
# ----------------------------------------------------------------------------------------------


def _grid(mixture: GaussianMixture, mean_q: Tensor, cov_q: Tensor, alpha: Scalar, sigma: Scalar,
          n_grid: int, half_width: float) -> tuple[Tensor, Tensor]:
    """Points (n_grid^2, 2) covering p_t and q_t to `half_width` standard deviations, and the cell area."""
    if mixture.dim != 2:
        raise ValueError("quadrature helpers are 2-D; use the Monte Carlo helpers in higher dimension")
    dt, dev = mean_q.dtype, mean_q.device
    a, s = float(alpha), float(sigma)
    mu_p = a * mixture.means.to(dev, dt)
    sd_p = torch.sqrt(a**2 * mixture.stds.to(dev, dt) ** 2 + s**2)
    sd_q = torch.sqrt(torch.diagonal(cov_q.detach()))
    lo = torch.minimum((mu_p - half_width * sd_p).min(0).values, mean_q.detach() - half_width * sd_q)
    hi = torch.maximum((mu_p + half_width * sd_p).max(0).values, mean_q.detach() + half_width * sd_q)
    axes = [torch.linspace(float(lo[d]), float(hi[d]), n_grid, dtype=dt, device=dev) for d in range(2)]
    gx, gy = torch.meshgrid(axes[0], axes[1], indexing="ij")
    area = (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), area


def f_divergence_quadrature(mixture: GaussianMixture, A: Tensor, b: Tensor, alpha: Scalar, sigma: Scalar,
                            name: str, n_grid: int = 301, half_width: float = 9.0) -> Tensor:
    """D_f(p_t || q_t) = int q_t f(p_t / q_t) dx by quadrature on a 2-D grid (differentiable in A, b)."""
    mean, cov = affine_qt(A, b, alpha, sigma)
    x, area = _grid(mixture, mean, cov, alpha, sigma, n_grid, half_width)
    logq = gaussian_log_prob(x, mean, cov)
    logp = mixture.log_prob(x, alpha, sigma)
    integrand = torch.exp(logq) * f_value(torch.exp(logp - logq), name)  # D_f = E_q[f(p/q)] (docs/math.md#f-table)
    return integrand.sum() * area


def f_divergence_mc(mixture: GaussianMixture, A: Tensor, b: Tensor, alpha: Scalar, sigma: Scalar, name: str,
                    n: int = 200_000, generator: torch.Generator | None = None) -> Tensor:
    """Monte Carlo D_f(p_t || q_t) with exact densities, any dimension; its autograd gradient w.r.t.
    (A, b) is an unbiased estimate of the exact gradient (reparameterized samples + exact log q)."""
    x0, _ = affine_sample(A, b, n, generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    x_t = alpha * x0 + sigma * eps
    mean, cov = affine_qt(A, b, alpha, sigma)
    logr = mixture.log_prob(x_t, alpha, sigma) - gaussian_log_prob(x_t, mean, cov)
    return f_value(torch.exp(logr), name).mean()


def exact_ratio(mixture: GaussianMixture, x_t: Tensor, A: Tensor, b: Tensor, alpha: Scalar,
                sigma: Scalar) -> Tensor:
    """Exact density ratio r = p_t(x_t) / q_t(x_t), (n,)."""
    mean, cov = affine_qt(A, b, alpha, sigma)
    return torch.exp(mixture.log_prob(x_t, alpha, sigma) - gaussian_log_prob(x_t, mean, cov))


# ----------------------------------------------------------------------------------------------
# Score divergences E[d(k (D_p - D_q))]  (SiD / SIM / DI*)
# ----------------------------------------------------------------------------------------------


def distance_value(y: Tensor, distance: str, c: float | None) -> Tensor:
    """d(y) per row: "l2" ||y||^2, "pseudo_huber" sqrt(||y||^2 + c^2) - c."""
    sq = (y * y).sum(-1)
    if distance == "l2":
        return sq
    if distance == "pseudo_huber":
        assert c is not None
        return torch.sqrt(sq + c * c) - c
    raise ValueError(f"unknown distance {distance!r}")


def score_divergence_quadrature(mixture: GaussianMixture, A: Tensor, b: Tensor, alpha: Scalar, sigma: Scalar,
                                distance: str = "l2", c: float | None = None, space: str = "x0",
                                frozen: bool = False, n_grid: int = 301, half_width: float = 9.0) -> Tensor:
    """int q_t(x) d(k (D_p(x) - D_q(x))) dx in 2-D, k = 1 (x0 units) or alpha/sigma^2 (score units).

    frozen=True evaluates the outer density q_t at sg(A, b) (SIM's divergence with a frozen sampling
    distribution); frozen=False lets it move with (A, b) as well.
    """
    mean, cov = affine_qt(A, b, alpha, sigma)
    x, area = _grid(mixture, mean, cov, alpha, sigma, n_grid, half_width)
    if frozen:
        mean_o, cov_o = mean.detach(), cov.detach()
    else:
        mean_o, cov_o = mean, cov
    q = torch.exp(gaussian_log_prob(x, mean_o, cov_o))
    k = 1.0 if space == "x0" else float(alpha) / float(sigma) ** 2
    delta = mixture.posterior_mean(x, alpha, sigma) - affine_posterior_mean(x, A, b, alpha, sigma)
    return (q * distance_value(k * delta, distance, c)).sum() * area


def denoiser_mse_exact(W: Tensor, c: Tensor, A: Tensor, b: Tensor, alpha: Scalar, sigma: Scalar) -> Tensor:
    """E_{x_t ~ q_t} ||W x_t + c - E_q[x0|x_t]||^2 in closed form (linear denoiser vs the exact one)."""
    mean, cov = affine_qt(A, b, alpha, sigma)
    K = alpha * (A @ A.T) @ torch.linalg.inv(cov)  # E_q[x0|x] = b + K (x - alpha b)
    M = W - K
    v = c - b + K @ mean
    return torch.trace(M @ cov @ M.T) + ((M @ mean + v) ** 2).sum()


# ----------------------------------------------------------------------------------------------


def value_and_grad(fn: Callable[..., Tensor], *params: Tensor, **kwargs) -> tuple[Tensor, ...]:
    """(value, d value / d param for each param) of fn(*params, **kwargs); params are cloned leaves."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    val = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(val, leaves)
    return (val.detach(),) + tuple(g.detach() for g in grads)
