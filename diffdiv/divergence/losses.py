"""Score-difference losses in denoiser (x0) space, per sample, for any (alpha_t, sigma_t).

Notation (docs/math.md#notation): x0 = G(z) (carries the generator graph), x_t = alpha x0 + sigma eps,
D_p = teacher denoiser at x_t, D_q = fake-score denoiser at x_t, N = elements per sample.
Scores: s = (alpha D - x_t)/sigma^2, so s_q - s_p = alpha (D_q - D_p)/sigma^2.

Gradient routes (what each function differentiates):
- `vsd_loss`, `fdistill_loss`: only through x0; d_p, d_q, h are detached inside.
- `sid_loss`, `sim_loss`: through x0 *and* through d_p, d_q if they carry graph. The references
  (SiD, SIM, DI*) evaluate D_p(x_t), D_q(x_t) with frozen networks (requires_grad_(False)) on an x_t
  built from x0 with grad, so gradients flow to the generator through x_t. Computing d_p, d_q under
  no_grad instead drops that path and changes the estimator (see the `sid_loss` docstring).

Per-sample losses are means over the N elements (reduction="sum" multiplies by N), returned in fp32.
What each loss's expected gradient equals is proven on the analytic Gaussian mixture in
tests/test_losses_exact.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffdiv.divergence.kernels import weighted_score_difference

_NORM_EPS = 1e-5


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _f32(x: Tensor) -> Tensor:
    return _flat(x).to(torch.promote_types(x.dtype, torch.float32))


def _coef(c: Tensor | float, like: Tensor) -> Tensor:
    """Per-sample (B,) or scalar coefficient -> (B, 1) in like's dtype."""
    c = torch.as_tensor(c, device=like.device).to(like.dtype)
    return c.expand(like.shape[0])[:, None] if c.ndim == 0 else c.reshape(-1, 1)


def _reduce(per_elem_sum: Tensor, n_elem: int, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_elem_sum / n_elem
    if reduction == "sum":
        return per_elem_sum
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def denoiser_normalizer(x0: Tensor, d_p: Tensor, eps: float = _NORM_EPS) -> Tensor:
    """n = sg(max(mean|x0 - D_p|, eps)) per sample (B,), fp32 (DMD / DMD2 normalizer, SiD weight_factor)."""
    with torch.no_grad():
        return (_f32(x0) - _f32(d_p)).abs().mean(1).clamp_min(eps)


# ----------------------------------------------------------------------------------------------
# DI / DMD (VSD) and f-distill
# ----------------------------------------------------------------------------------------------


def fdistill_loss(x0: Tensor, d_p: Tensor, d_q: Tensor, h: Tensor | float, normalize: bool = True, *,
                  eps: float = _NORM_EPS, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """f-distill generator loss (arXiv 2502.15681, docs/math.md#losses): 1/2 mean (x0 - sg(x0 - g))^2,
    g = h (D_q - D_p)/n.

    d loss_b / d x0 = g_b / N. With normalize=False and h = f_weight(r) its expected gradient is
    sigma^2 / (alpha^2 N) * grad D_f(p_t || q_t) at each sample's noise level.
    """
    _, _, loss = weighted_score_difference(x0, d_p, d_q, h, backend, normalize=normalize, eps=eps,
                                           return_g=False)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return loss * x0[0].numel() if reduction == "sum" else loss


def vsd_loss(x0: Tensor, d_p: Tensor, d_q: Tensor, normalize: bool = True, *, eps: float = _NORM_EPS,
             reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Diff-Instruct / DMD (VSD) generator loss: `fdistill_loss` with h = 1 (reverse KL).

    DMD / DMD2 (arXiv 2311.18828, 2405.14867) normalize by n = mean|x0 - D_p| (normalize=True, the default);
    Diff-Instruct (arXiv 2305.18455) uses the raw difference (normalize=False) whose expected gradient
    is sigma^2 / (alpha^2 N) * grad KL(q_t || p_t).
    """
    return fdistill_loss(x0, d_p, d_q, 1.0, normalize, eps=eps, reduction=reduction, backend=backend)


# ----------------------------------------------------------------------------------------------
# SiD and SIM / DI*
# ----------------------------------------------------------------------------------------------


def sid_loss(x0: Tensor, d_p: Tensor, d_q: Tensor, alpha_sid: float = 1.2, normalize: bool = True, *,
             eps: float = _NORM_EPS, reduction: str = "mean") -> Tensor:
    """SiD generator loss (Zhou et al. 2024, arXiv 2404.04057; alpha-weighted, official normalizer):
    (D_p - D_q)^T [(D_p - x0) - alpha_sid (D_p - D_q)] / n, per sample.

    Gradients flow through x0 and through d_p, d_q (pass them with graph to x_t, networks frozen).
    Exact statement (x0-space Fisher divergence F = E_q ||D_p - D_q||^2, normalize=False): the expected
    gradient is [(alpha_sid - 1/2) grad F_sg + (1 - alpha_sid) grad F] / N, where F moves the sampling
    distribution q_t with theta and F_sg keeps it frozen (SIM's score divergence). So alpha_sid = 0.5
    follows F exactly, alpha_sid = 1 follows F_sg (= SIM with l2), the default 1.2 mixes the two.
    """
    p, q, x = _f32(d_p), _f32(d_q), _f32(x0)
    delta = p - q
    per = (delta * ((p - x) - alpha_sid * delta)).sum(1)
    if normalize:
        per = per / denoiser_normalizer(x0, d_p, eps)
    return _reduce(per, x.shape[1], reduction)


def pseudo_huber_c(n_elem: int) -> float:
    """Default pseudo-Huber constant c = 0.00054 sqrt(N) (the consistency-model convention of iCT)."""
    return 0.00054 * math.sqrt(n_elem)


def sim_loss(x0: Tensor, d_p: Tensor, d_q: Tensor, alpha: Tensor | float, sigma: Tensor | float,
             distance: str = "pseudo_huber", c: float | None = None, *, space: str = "x0",
             full_gradient: bool = False, normalize: bool = False, eps: float = _NORM_EPS,
             reduction: str = "mean") -> Tensor:
    """Score implicit matching loss (SIM, arXiv 2410.16794, score-gradient theorem; DI*, arXiv 2410.20898):
    d'(y)^T (s_q - grad log q(x_t|x0)) in x0 units, i.e. k d'(y)^T (D_q - x0), y = k (D_p - D_q), per sample.

    space="x0": k = 1; space="score": k = alpha / sigma^2 (y is the score difference s_p - s_q).
    distance "l2": d(y) = ||y||^2; "pseudo_huber": d(y) = sqrt(||y||^2 + c^2) - c (default
    c = 0.00054 sqrt(N) in the units of y). Gradients flow through x0 and through d_p, d_q if they carry
    graph (networks frozen). The expected gradient equals grad E_{x_t ~ sg(q_t)}[d(y)] / N, the score
    divergence with a frozen sampling distribution as in SIM; full_gradient=True adds d(y) so that the
    sampling distribution moves too (grad E_{q_t}[d(y)] / N). normalize divides by n = mean|x0 - D_p|.
    """
    p, q, x = _f32(d_p), _f32(d_q), _f32(x0)
    N = x.shape[1]
    if space == "x0":
        k = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    elif space == "score":
        k = _coef(alpha, x) / _coef(sigma, x) ** 2
    else:
        raise ValueError(f"space must be 'x0' or 'score', got {space!r}")
    y = k * (p - q)
    sq = (y * y).sum(1, keepdim=True)
    if distance == "l2":
        dprime, d = 2.0 * y, sq[:, 0]
    elif distance == "pseudo_huber":
        cc = pseudo_huber_c(N) if c is None else float(c)
        root = torch.sqrt(sq + cc * cc)
        dprime, d = y / root, root[:, 0] - cc
    else:
        raise ValueError(f"distance must be 'l2' or 'pseudo_huber', got {distance!r}")
    per = (k * dprime * (q - x)).sum(1)  # d'(y)^T (s_q - grad log q(x_t|x0)) with s-differences in x0 units
    if full_gradient:
        per = per + d
    if normalize:
        per = per / denoiser_normalizer(x0, d_p, eps)
    return _reduce(per, N, reduction)


# ----------------------------------------------------------------------------------------------
# Fake-score (critic) denoising loss
# ----------------------------------------------------------------------------------------------

WEIGHTINGS = ("x0", "eps", "v", "flow", "edm")
#: the weighting whose x0-space loss equals the squared error of each model prediction type
PREDICTION_WEIGHTING = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow": "flow"}


def _real(v: Tensor | float) -> Tensor:
    if torch.is_tensor(v):
        return v.to(torch.promote_types(v.dtype, torch.float32))
    return torch.as_tensor(v, dtype=torch.float64)


def x0_loss_weight(alpha: Tensor | float, sigma: Tensor | float, weighting: str = "x0",
                   sigma_data: float = 0.5) -> Tensor:
    """Weight w(t) making w ||D - x0||^2 equal the squared error of the named prediction type.

    eps: alpha^2/sigma^2; v: ((alpha^2 + sigma^2)/sigma)^2; flow (u = eps - x0): ((alpha + sigma)/sigma)^2;
    edm (Karras et al. 2022, Table 1 loss weighting 1/c_out^2 at s = sigma/alpha):
    (s^2 + sd^2)/(s sd)^2 = (alpha^2 sd^2 + sigma^2)/(sigma sd)^2; x0: 1. Computed in the dtype of
    alpha and sigma (at least float32; float64 for Python numbers).
    """
    a, s = _real(alpha), _real(sigma)
    if weighting == "x0":
        w = torch.ones_like(a + s)
    elif weighting == "eps":
        w = (a / s) ** 2
    elif weighting == "v":
        w = ((a**2 + s**2) / s) ** 2
    elif weighting == "flow":
        w = ((a + s) / s) ** 2
    elif weighting == "edm":
        w = (a**2 * sigma_data**2 + s**2) / (s * sigma_data) ** 2
    else:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    return w


def fake_score_loss(d_q: Tensor, x0_target: Tensor, alpha: Tensor | float, sigma: Tensor | float,
                    weighting: str = "x0", *, sigma_data: float = 0.5, reduction: str = "mean") -> Tensor:
    """Denoising score matching of the fake score on sg(G(z)) samples: w(t) mean (D_q - x0)^2, per sample.

    Defaults: "x0" (unit weight). References: FastGen / DMD2 use the network's native prediction type
    ("eps", "v" or "flow" here), SiD uses "edm". Its minimizer is D_q = E_q[x0 | x_t].
    """
    dq, x = _f32(d_q), _f32(x0_target.detach())
    a, s = torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
    w = x0_loss_weight(a, s, weighting, sigma_data).to(device=dq.device, dtype=dq.dtype)
    w = w.expand(dq.shape[0]) if w.ndim == 0 else w.reshape(-1)
    return _reduce(w * ((dq - x) ** 2).sum(1), dq.shape[1], reduction)
