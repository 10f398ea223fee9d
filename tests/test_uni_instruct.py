"""Uni-Instruct math on the analytic case (docs/math.md#analytic): Theorem 3.1 (diffusion expansion) and the
gradient equivalence of the tractable loss (Theorem 3.2 as derived in diffdiv/methods/uni_instruct.py).

Teacher: 2-D Gaussian mixture (exact p_t, D_p, r). Generator x0 = A z + b (exact Gaussian q_t, D_q). The Monte
Carlo gradient of the loss w.r.t. (A, b), on a batch mixing three noise levels with the exact fake score
(weights frozen, gradients through x_t) and the exact ratio, is compared with the gradient of the expanded
integrand F_t = E_{q_t}[h(r) ||D_p - D_q||^2] computed by 2-D quadrature. Tolerance from the sample count: the
Mahalanobis distance of the error under the sample covariance of the per-sample gradients must stay below the
chi^2_6 quantile at 1 - 1e-5.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from scipy.stats import chi2

from diffdiv.divergence import exact, f_weight, sid_loss, sim_loss, vsd_loss
from diffdiv.methods.uni_instruct import (
    expanded_integrand_quadrature,
    expansion_quadrature,
    time_weight,
    uni_instruct_loss,
    weight_derivatives,
)
from diffdiv.models.gmm import GaussianMixture
from diffdiv.param import FlowSchedule

DT = torch.float64
MIX = GaussianMixture([[-0.8, 0.3], [0.8, -0.2], [0.1, 0.9]], 0.5, [0.3, 0.3, 0.4])
A0 = torch.tensor([[0.7, 0.15], [-0.1, 0.6]], dtype=DT)
B0 = torch.tensor([0.25, -0.15], dtype=DT)
LEVELS = tuple((a, math.sqrt(1 - a * a)) for a in (0.8, 0.6, 0.4))
N_EL = 2
N_MC = 2**15
GRID = 121
CHI2_LIMIT = float(chi2.ppf(1 - 1e-5, 6))
DIVS = ("rkl", "fkl", "js", "jeffreys", "hellinger", "pearson", "alpha:-0.5")


@functools.cache
def exact_grad(name: str, space: str = "x0") -> torch.Tensor:
    """Mean over the three levels of grad_(A,b) F_t / N (quadrature)."""
    out = torch.zeros(6, dtype=DT)
    for a, s in LEVELS:
        _, gA, gb = exact.value_and_grad(
            lambda A, b, a=a, s=s: expanded_integrand_quadrature(MIX, A, b, a, s, name, space, n_grid=GRID), A0, B0)
        out += torch.cat([gA.reshape(-1), gb]) / (len(LEVELS) * N_EL)
    return out


@functools.cache
def _batch(N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, 2, generator=g, dtype=DT)
    eps = torch.randn(N, 2, generator=g, dtype=DT)
    lev = torch.arange(N) % len(LEVELS)
    al = torch.tensor([a for a, _ in LEVELS], dtype=DT)[lev]
    si = torch.tensor([s for _, s in LEVELS], dtype=DT)[lev]
    return z, eps, lev, al, si


def _forward(N: int, seed: int = 0):
    """x0 (leaf), x_t, exact D_p and D_q with graph to x_t (fake-score parameters frozen), exact r."""
    z, eps, lev, al, si = _batch(N, seed)
    x0 = (z @ A0.T + B0).requires_grad_(True)
    x_t = al[:, None] * x0 + si[:, None] * eps
    dp, dq = torch.zeros_like(x_t), torch.zeros_like(x_t)
    r = torch.empty(N, dtype=DT)
    for k, (a, s) in enumerate(LEVELS):
        m = lev == k
        dp = dp.index_put((m,), MIX.posterior_mean(x_t[m], a, s))
        dq = dq.index_put((m,), exact.affine_posterior_mean(x_t[m], A0, B0, a, s))
        r[m] = exact.exact_ratio(MIX, x_t[m].detach(), A0, B0, a, s)
    return z, x0, dp, dq, r, al, si


def estimate(name: str, space: str = "x0", paper_variant: bool = False, N: int = N_MC):
    """(mean per-sample gradient (6,), covariance of that mean)."""
    z, x0, dp, dq, r, al, si = _forward(N)
    loss = uni_instruct_loss(x0, dp, dq, r, al, si, name, space=space, paper_variant=paper_variant)
    assert loss.shape == (N,) and loss.dtype == DT
    (G,) = torch.autograd.grad(loss.sum(), x0)
    per = torch.cat([(G[:, :, None] * z[:, None, :]).reshape(N, -1), G], 1)
    return per.mean(0), torch.cov(per.T) / N


def _chi2(est, cov, ex) -> float:
    d = est - ex
    return float(d @ torch.linalg.solve(cov, d))


# ----------------------------------------------------------------------------------------------


def test_weight_derivatives_match_autograd():
    r = torch.tensor([0.07, 0.4, 1.0, 2.5, 13.0], dtype=DT)
    for name in DIVS + ("srkl", "neyman", "alpha:0.5", "alpha:2"):
        h, h1, h2 = weight_derivatives(r, name)
        rr = r.clone().requires_grad_(True)
        hh = f_weight(rr, name) + 0 * rr  # (rkl: constant)
        (g1,) = torch.autograd.grad(hh.sum(), rr, create_graph=True)
        g2 = torch.autograd.grad(g1.sum(), rr, allow_unused=True)[0] if g1.requires_grad else None
        g2 = torch.zeros_like(r) if g2 is None else g2
        torch.testing.assert_close(h, hh.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h1, g1.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h2, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ("rkl", "fkl", "js", "pearson"))
def test_theorem_3_1_expansion(name):
    # D_f(p_0||q_0) = int (e^lambda/2) E_q[h(r)||D_p - D_q||^2] dlambda, both sides by quadrature
    lhs = float(exact.f_divergence_quadrature(MIX, A0, B0, 1.0, 0.0, name, n_grid=241))
    rhs = float(expansion_quadrature(MIX, A0, B0, name, n_lambda=61, n_grid=121))
    assert lhs > 0.05
    assert abs(rhs - lhs) < 1e-5 * lhs, (lhs, rhs)


@pytest.mark.parametrize("name", DIVS)
def test_gradient_matches_expanded_divergence(name):
    est, cov = estimate(name)
    ex = exact_grad(name)
    assert _chi2(est, cov, ex) < CHI2_LIMIT, (name, est, ex)
    assert float(cov.trace().sqrt() / ex.norm()) < 0.05  # the exact gradient is resolved


def test_gradient_in_score_units():
    est, cov = estimate("js", space="score")
    assert _chi2(est, cov, exact_grad("js", "score")) < CHI2_LIMIT


def test_public_code_variant_is_biased():
    # detaching r inside the SIM weight (as the paper's public code does) misses a term: the bias is
    # far outside the Monte Carlo error for fkl, and it sits in A's gradient (d/db is unaffected)
    est, cov = estimate("fkl", paper_variant=True)
    ex = exact_grad("fkl")
    assert _chi2(est, cov, ex) > 10 * CHI2_LIMIT
    d = est - ex
    se = cov.diagonal().sqrt()
    assert (d[4:].abs() < 5 * se[4:]).all()


def test_rkl_is_sim_and_sid():
    # algebraic identities on one batch: values and per-sample gradients (different code paths)
    _, x0, dp, dq, r, al, si = _forward(257, seed=1)

    def grad(loss):
        return torch.autograd.grad(loss.sum(), x0, retain_graph=True)[0]

    for space in ("x0", "score"):
        ui = uni_instruct_loss(x0, dp, dq, r, al, si, "rkl", space=space)
        full = sim_loss(x0, dp, dq, al, si, "l2", space=space, full_gradient=True)
        torch.testing.assert_close(ui, full)
        torch.testing.assert_close(grad(ui), grad(full))
        frozen = sim_loss(x0, dp, dq, al, si, "l2", space=space)
        ui0 = uni_instruct_loss(x0, dp, dq, r, al, si, "rkl", space=space, fgm_weight=0.0)
        torch.testing.assert_close(grad(ui0), grad(frozen))
    for lam in (0.0, 1.0, 1.6):  # SiD alpha = 1 - lambda/2
        ui = uni_instruct_loss(x0, dp, dq, r, al, si, "rkl", fgm_weight=lam)
        sid = sid_loss(x0, dp, dq, 1 - lam / 2, normalize=False)
        torch.testing.assert_close(ui, 2 * sid)
        torch.testing.assert_close(grad(ui), grad(2 * sid))


def test_di_branch_is_diff_instruct():
    # with unit DI weight the DI-like term of the loss is Diff-Instruct's VSD gradient, and no f makes the
    # expanded divergence's gradient equal it: the exact expanded chi^2 (Pearson) gradient differs from DI's
    _, x0, dp, dq, r, al, si = _forward(257, seed=2)
    g = (al**2 / si**2)[:, None] * (dp - dq).detach()  # c = 1 in the DI-like term
    di_term = (g * (x0 - x0.detach())).sum(1) / N_EL
    g_ui = torch.autograd.grad(di_term.sum(), x0)[0]
    g_vsd = torch.autograd.grad(vsd_loss(x0, dp, dq, normalize=False).sum(), x0)[0]
    # vsd's gradient is (D_q - D_p)/N = -(dp - dq)/N; the DI-like term carries alpha^2/sigma^2 (score units)
    torch.testing.assert_close(g_ui, -g_vsd * (al**2 / si**2)[:, None])
    di = torch.zeros(6, dtype=DT)
    for a, s in LEVELS:
        _, gA, gb = exact.value_and_grad(
            lambda A, b, a=a, s=s: exact.f_divergence_quadrature(MIX, A, b, a, s, "rkl", n_grid=GRID), A0, B0)
        di += torch.cat([gA.reshape(-1), gb])
    chi = exact_grad("pearson")
    cos = float(di @ chi / (di.norm() * chi.norm()))
    assert cos < 0.99, cos


def test_expansion_time_weight_is_theorem_3_1_density():
    """Rectified flow (alpha = 1 - t, sigma = t): e^lambda/2 |dlambda/dt| = (1-t)^2/(2 t^2) 2/(t (1-t)) = (1-t)/t^3."""
    t = torch.tensor([0.2, 0.35, 0.5, 0.65, 0.8])
    exact = (1 - t.double()) / t.double() ** 3
    w = time_weight(t, FlowSchedule(), "expansion")
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), exact / exact.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(time_weight(t, FlowSchedule(), "uniform"), torch.ones(5))
    with pytest.raises(ValueError, match="time weighting"):
        time_weight(t, FlowSchedule(), "log")
