"""Uni-Instruct (Wang et al. 2025, arXiv 2505.20755): the diffusion-expanded f-divergence and its tractable loss.

Notation (docs/math.md#notation): x_t = alpha x0 + sigma eps, x0 = G_theta(z); p_t teacher, q_t student,
r = p_t/q_t, s = score, u = s_p - s_q = alpha (D_p - D_q)/sigma^2, h(r) = r^2 f''(r) (diffdiv.divergence.fdiv),
D_f(p||q) = E_q[f(p/q)]. A "unit factor" k turns denoiser differences into the chosen units:
k = 1 ("x0" space) or k = alpha/sigma^2 ("score" space); u_k = k (D_p - D_q), v_k = k (D_q - x0)
(= s_q - grad log q(x_t|x0) in k units).

Theorem 3.1 (diffusion expansion; derived here, checked by quadrature in tests/test_uni_instruct.py).
Both densities follow the same forward SDE, so d/dt D_f(p_t||q_t) = -(g^2/2) E_{q_t}[h(r) ||u||^2]; in
log-SNR lambda = log(alpha^2/sigma^2) this reads, for any (alpha, sigma) schedule,

    D_f(p_0 || q_0) = int (e^lambda / 2) E_{q_lambda}[ h(r) ||D_p - D_q||^2 ] dlambda        (lambda: -inf..inf)

Theorem 3.2 (gradient equivalence, per noise level; derived here). Let F_t(theta) = E_{q_t}[h(r) ||u_k||^2]
(everything, including the sampling law q_t, r and D_q, depends on theta). Then

    grad F_t = grad E_{z,eps}[ (h - r h') ||u_k||^2  +  2 h u_k . v_k  +  sg(c alpha u) . x_t ],
    c = -r^2 h''(r) ||u_k||^2 + 2 r h'(r) u_k . v_k,

with h, h', h'' at sg(r) and D_p(x_t), D_q(x_t) evaluated with frozen network weights on an x_t that carries
the generator graph. Proof: differentiate F = E_q[h(r)||u_k||^2] under the integral (score-function term
E_q[l (h - r h') ||u_k||^2], l = d log q/d theta, plus the D_q term -2 E_q[h u_k . k dD_q]); replace the D_q term
with the Tweedie identity E_q[w . D_q] = E[w(x_t) . x0], valid for every theta (SIM's trick, arXiv
2410.16794); write each E_q[l phi] as the reparameterized derivative of E[sg(phi)(x_t)]; and move the
derivative of the detached ratio onto the DI-like term with grad_x r = r u. So the loss is a SIM-like term
(weight 2h), a Fisher-type term (weight h - r h', the "FGM" term) and a DI-like term (weight c). The
paper's public code drops the 2 r h' u.v part of c (it detaches r inside the SIM weight) and uses an
un-squared norm in the DI weight; `paper_variant=True` reproduces the first omission. Practical note: the
omitted part 2 r h'(r) (u_k.v_k) u has zero mean given x_t (E[v_k|x_t] = 0 for an exact fake score) and only
matters through the correlation of v_k with dx0/dtheta, but it carries the factor alpha^2/sigma^2 and on the
digits teacher its per-sample gradient norm is 10-200x that of the SIM-like term at low noise; with a
GAN-estimated r, the exact loss is therefore much noisier than the paper's variant (which is biased, see
tests/test_uni_instruct.py::test_public_code_variant_is_biased).

Special cases (identities tested in tests/test_uni_instruct.py):
- rkl (h = 1): loss = fgm ||u_k||^2 + 2 u_k.v_k = N * sim_loss(l2, full_gradient=(fgm == 1)) and, in x0
  space, = 2 * sid_loss(alpha_sid = 1 - fgm/2): the expanded reverse KL is SIM's Fisher divergence, SiD with
  alpha = 0.5 follows it exactly, alpha = 1 (fgm = 0) is SIM's frozen-sampling gradient.
- The DI-like term with c = 1 is Diff-Instruct's gradient (vsd_loss(normalize=False)); with DMD2's
  normalizer it is DMD. No f makes the expanded divergence's gradient equal DI's exactly (DI's gradient
  E_q[l log(q/p)] depends on r alone, the expanded one has Fisher terms for every f), so DI/DMD are exposed
  as config presets of the DI branch rather than as a choice of f.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffdiv.divergence.fdiv import parse_divergence
from diffdiv.divergence.losses import denoiser_normalizer

_NORM_EPS = 1e-5


def _flat32(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).to(torch.promote_types(x.dtype, torch.float32))


def _col(c: Tensor | float, like: Tensor) -> Tensor:
    """Scalar or per-sample (B,) coefficient -> (B, 1) in like's dtype/device."""
    c = torch.as_tensor(c, device=like.device).to(like.dtype)
    return c.expand(like.shape[0])[:, None] if c.ndim == 0 else c.reshape(-1, 1)


def weight_derivatives(r: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """(h, h', h'') with h(r) = r^2 f''(r) of the named divergence (closed forms, elementwise, r > 0)."""
    kind, a = parse_divergence(name, need_weight=True)
    r = torch.as_tensor(r)
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    one, zero = torch.ones_like(r), torch.zeros_like(r)
    if kind == "rkl":  # h = 1
        return one, zero, zero
    if kind == "fkl":  # h = r
        return r.clone(), one, zero
    if kind == "js":  # h = r / (2 (1 + r))
        return r / (2 * (1 + r)), 1 / (2 * (1 + r) ** 2), -1 / (1 + r) ** 3
    if kind == "hellinger":  # h = sqrt(r) / 2
        sq = torch.sqrt(r)
        return 0.5 * sq, 0.25 / sq, -0.125 / (r * sq)
    if kind == "jeffreys":  # h = 1 + r
        return 1 + r, one, zero
    if kind == "srkl":  # h = 1 / (1 + r)
        return 1 / (1 + r), -1 / (1 + r) ** 2, 2 / (1 + r) ** 3
    if kind == "pearson":  # h = 2 r^2
        return 2 * r**2, 4 * r, 4 * one
    if kind == "neyman":  # h = 2 / r
        return 2 / r, -2 / r**2, 4 / r**3
    assert a is not None  # alpha family: h = r^a
    return r**a, a * r ** (a - 1), a * (a - 1) * r ** (a - 2)


def uni_instruct_loss(x0: Tensor, d_p: Tensor, d_q: Tensor, r: Tensor | float, alpha: Tensor | float,
                      sigma: Tensor | float, divergence: str, *, fgm_weight: float = 1.0, space: str = "x0",
                      paper_variant: bool = False, normalize: bool = False, eps: float = _NORM_EPS,
                      reduction: str = "mean") -> Tensor:
    """Uni-Instruct tractable generator loss per sample (B,) (module docstring, Theorem 3.2).

    x0 carries the generator graph; d_p, d_q are the teacher / fake denoisers at x_t = alpha x0 + sigma eps
    evaluated with frozen weights on x_t *with* graph; r is the (detached) density ratio p_t/q_t at x_t.
    With fgm_weight=1, normalize=False its expected gradient is grad E_{q_t}[h(r) ||u_k||^2] / N (N elements
    per sample; reduction="sum" drops the 1/N). normalize divides by n = sg(mean|x0 - D_p|) (SiD / DMD2).
    """
    x, p, q = _flat32(x0), _flat32(d_p), _flat32(d_q)
    N = x.shape[1]
    a_, s_ = _col(alpha, x), _col(sigma, x)
    if space == "x0":
        k = torch.ones_like(a_)
    elif space == "score":
        k = a_ / s_**2
    else:
        raise ValueError(f"space must be 'x0' or 'score', got {space!r}")
    r = _col(torch.as_tensor(r, device=x.device).detach(), x)
    h, h1, h2 = weight_derivatives(r, divergence)
    u = k * (p - q)  # u_k = k (D_p - D_q)
    v = k * (q - x)  # v_k = k (D_q - x0) = s_q - grad log q(x_t|x0) in k units
    uu = (u * u).sum(1, keepdim=True)
    uv = (u * v).sum(1, keepdim=True)
    # Thm 3.2: Fisher-type ("FGM") term + SIM-like term, graphs through x_t into D_p, D_q and x0
    per = fgm_weight * (h - r * h1) * uu + 2 * h * uv
    # Thm 3.2 DI-like term: grad_x r = r u, u = alpha (D_p - D_q)/sigma^2, dx_t/dx0 = alpha
    with torch.no_grad():
        c = fgm_weight * (-(r**2) * h2 * uu)
        if not paper_variant:  # the public code detaches r inside the SIM weight and loses this part
            c = c + 2 * r * h1 * uv
        g = c * a_**2 / s_**2 * (p - q)
    per = per + (g * (x - x.detach())).sum(1, keepdim=True)
    per = per[:, 0]
    if normalize:
        per = per / denoiser_normalizer(x0, d_p, eps)
    if reduction == "mean":
        return per / N
    if reduction == "sum":
        return per
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def expanded_integrand(d_p: Tensor, d_q: Tensor, r: Tensor, divergence: str, alpha: Tensor | float = 1.0,
                       sigma: Tensor | float = 1.0, space: str = "x0") -> Tensor:
    """Per-sample Monte Carlo estimate h(r) ||u_k||^2 / N of the expanded integrand F_t / N (for logging)."""
    p, q = _flat32(d_p.detach()), _flat32(d_q.detach())
    k = torch.ones(p.shape[0], 1, dtype=p.dtype, device=p.device) if space == "x0" else \
        _col(alpha, p) / _col(sigma, p) ** 2
    h, _, _ = weight_derivatives(_col(torch.as_tensor(r, device=p.device).detach(), p), divergence)
    return (h * (k * (p - q)) ** 2).sum(1) / p.shape[1]


def expansion_weight(alpha: Tensor, sigma: Tensor) -> Tensor:
    """Theorem 3.1 weight per unit log-SNR on the x0-space integrand: e^lambda / 2 = alpha^2 / (2 sigma^2)."""
    return alpha**2 / (2 * sigma**2)


TIME_WEIGHTINGS = ("uniform", "expansion")


# Theorem 3.1: D_f = int (e^lambda / 2) F dlambda, i.e. weight e^lambda/2 |dlambda/dt| per unit model time
def time_weight(t: Tensor, schedule, weighting: str = "expansion", rel_dt: float = 1e-3) -> Tensor:
    """Per-sample weight over noise levels (B,) fp32: 1 ("uniform"), or e^lambda/2 |dlambda/dt| ("expansion")
    normalized to batch mean 1 (scale-free), dlambda/dt by central differences of half-width
    rel_dt (t_max - t_min), clamped to the schedule's range."""
    if weighting == "uniform":
        return torch.ones_like(t, dtype=torch.float32)
    if weighting != "expansion":
        raise ValueError(f"unknown time weighting {weighting!r}; valid: {', '.join(TIME_WEIGHTINGS)}")
    dt = rel_dt * (schedule.t_max - schedule.t_min)
    tt = t.detach().double()
    lo, hi = (tt - dt).clamp(min=schedule.t_min), (tt + dt).clamp(max=schedule.t_max)
    dlam = (schedule.logsnr(hi) - schedule.logsnr(lo)).abs() / (hi - lo)
    a, s = schedule.alpha_sigma(tt)
    w = expansion_weight(a, s) * dlam
    return (w / w.mean().clamp_min(1e-12)).float()


# ----------------------------------------------------------------------------------------------
# Exact references on the analytic case (2-D mixture teacher, affine generator x0 = A z + b)
# ----------------------------------------------------------------------------------------------


def expanded_integrand_quadrature(mixture, A: Tensor, b: Tensor, alpha: float, sigma: float, divergence: str,
                                  space: str = "x0", n_grid: int = 201, half_width: float = 9.0) -> Tensor:
    """F_t = int q_t h(p_t/q_t) ||k (D_p - D_q)||^2 dx by 2-D quadrature, differentiable in (A, b)."""
    from diffdiv.divergence import exact
    from diffdiv.divergence.fdiv import f_weight

    mean, cov = exact.affine_qt(A, b, alpha, sigma)
    x, area = exact._grid(mixture, mean, cov, alpha, sigma, n_grid, half_width)
    logq = exact.gaussian_log_prob(x, mean, cov)
    r = torch.exp(mixture.log_prob(x, alpha, sigma) - logq)
    k = 1.0 if space == "x0" else alpha / sigma**2
    delta = k * (mixture.posterior_mean(x, alpha, sigma) - exact.affine_posterior_mean(x, A, b, alpha, sigma))
    return (torch.exp(logq) * f_weight(r, divergence) * (delta**2).sum(1)).sum() * area


def expansion_quadrature(mixture, A: Tensor, b: Tensor, divergence: str, lam_lo: float = -14.0,
                         lam_hi: float = 16.0, n_lambda: int = 121, n_grid: int = 161) -> Tensor:
    """Right side of Theorem 3.1, int (e^lambda/2) F_lambda dlambda + D_f(p_lo || q_lo), by quadrature.

    The tail below lam_lo is added exactly as D_f at that noise level; above lam_hi the integrand is O(e^-lambda).
    """
    from diffdiv.divergence import exact

    lams = torch.linspace(lam_lo, lam_hi, n_lambda, dtype=A.dtype)
    vals = []
    for lam in lams.tolist():
        a = math.sqrt(1 / (1 + math.exp(-lam)))
        s = math.sqrt(1 / (1 + math.exp(lam)))
        vals.append(a * a / (2 * s * s) * expanded_integrand_quadrature(mixture, A, b, a, s, divergence,
                                                                          n_grid=n_grid))
    vals = torch.stack(vals)
    dl = lams[1] - lams[0]
    integral = dl * (vals.sum() - 0.5 * (vals[0] + vals[-1]))  # trapezoid
    a0 = math.sqrt(1 / (1 + math.exp(-lam_lo)))
    s0 = math.sqrt(1 / (1 + math.exp(lam_lo)))
    return integral + exact.f_divergence_quadrature(mixture, A, b, a0, s0, divergence, n_grid=n_grid)
