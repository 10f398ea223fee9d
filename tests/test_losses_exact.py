"""Exactness of every score-difference loss on the analytic case (docs/math.md#analytic).

Teacher: a 2-D Gaussian mixture (exact p_t, D_p, r). Generator: x0 = A z + b (exact Gaussian q_t, D_q).
For each loss, the Monte Carlo gradient w.r.t. (A, b) from per-sample losses on a batch that mixes three
noise levels is compared with the exact gradient of the divergence the loss claims to minimize, computed
independently by 2-D quadrature (diffdiv.divergence.exact). The tolerance comes from the sample count:
the Mahalanobis distance d^T (C/N)^{-1} d of the error, with C the sample covariance of the per-sample
gradients, must stay below the chi^2_6 quantile at 1 - 1e-5; the standard error must shrink as
1/sqrt(N) and so must the error (in aggregate over all losses).

Run `python tests/test_losses_exact.py` to print the table (and write benchmarks/results/core.exactness.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from scipy.stats import chi2

from diffdiv.divergence import exact, f_weight, fake_score_loss, fdistill_loss, sid_loss, sim_loss, vsd_loss
from diffdiv.divergence.losses import x0_loss_weight
from diffdiv.models.gmm import GaussianMixture

DT = torch.float64
MIX = GaussianMixture([[-0.8, 0.3], [0.8, -0.2], [0.1, 0.9]], 0.5, [0.3, 0.3, 0.4])
A0 = torch.tensor([[0.7, 0.15], [-0.1, 0.6]], dtype=DT)
B0 = torch.tensor([0.25, -0.15], dtype=DT)
LEVELS = tuple((a, math.sqrt(1 - a * a)) for a in (0.8, 0.6, 0.4))  # VP (alpha_t, sigma_t)
N_EL = 2  # elements per sample: per-sample losses are means over them
SIZES = (2**11, 2**15)
GRID = 121  # trapezoid on a +-9 sd box: converged to ~1e-14 (checked against 301 points)
CHI2_LIMIT = float(chi2.ppf(1 - 1e-5, 6))
# fake-score linear denoiser D_phi(x_t) = W x_t + c, away from its optimum
W0 = torch.tensor([[0.5, 0.1], [0.0, 0.4]], dtype=DT)
C0 = torch.tensor([0.1, -0.05], dtype=DT)


# ----------------------------------------------------------------------------------------------
# Exact gradients (quadrature), averaged over the three noise levels of the batch
# ----------------------------------------------------------------------------------------------


def _mean_over_levels(fn: Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor],
                      params: tuple[torch.Tensor, torch.Tensor] = (A0, B0)) -> torch.Tensor:
    out = torch.zeros(6, dtype=DT)
    for a, s in LEVELS:
        _, gA, gb = exact.value_and_grad(lambda P, q, a=a, s=s: fn(P, q, a, s), *params)
        out += torch.cat([gA.reshape(-1), gb]) / len(LEVELS)
    return out


@functools.cache
def exact_fdiv(name: str) -> torch.Tensor:
    # E grad fdistill(h = f_weight(r), normalize=False) = sigma^2/(alpha^2 N) grad D_f(p_t||q_t)
    return _mean_over_levels(lambda A, b, a, s: s**2 / (a**2 * N_EL)
                             * exact.f_divergence_quadrature(MIX, A, b, a, s, name, n_grid=GRID))


@functools.cache
def exact_score_div(distance: str, c: float | None, space: str, frozen: bool) -> torch.Tensor:
    return _mean_over_levels(lambda A, b, a, s: exact.score_divergence_quadrature(
        MIX, A, b, a, s, distance, c, space, frozen, n_grid=GRID) / N_EL)


def exact_sid(a_sid: float) -> torch.Tensor:
    # E grad sid = [(a - 1/2) grad F_sg + (1 - a) grad F] / N  (F = x0-space Fisher divergence)
    return (a_sid - 0.5) * exact_score_div("l2", None, "x0", True) + (1 - a_sid) * exact_score_div(
        "l2", None, "x0", False)


@functools.cache
def exact_fake(weighting: str) -> torch.Tensor:
    # E grad_phi w ||D_phi - x0||^2 / N = w grad_phi E_q ||D_phi - E_q[x0|x_t]||^2 / N
    def fn(W, c, a, s):
        w = float(x0_loss_weight(a, s, weighting))
        return w * exact.denoiser_mse_exact(W, c, A0, B0, a, s) / N_EL
    return _mean_over_levels(fn, (W0, C0))


# ----------------------------------------------------------------------------------------------
# Monte Carlo estimates from the losses
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    claim: str
    loss: Callable  # (x0, x_t, alpha, sigma, lev) -> per-sample loss (generator cases)
    exact: Callable[[], torch.Tensor]
    fake: bool = False
    graph: bool = False  # d_p, d_q carry the graph to x_t (SiD / SIM)


def _denoisers(x_t: torch.Tensor, lev: torch.Tensor, graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dp, dq = torch.zeros_like(x_t), torch.zeros_like(x_t)
    for k, (a, s) in enumerate(LEVELS):
        m = lev == k
        x = x_t[m] if graph else x_t[m].detach()
        dp = dp.index_put((m,), MIX.posterior_mean(x, a, s))
        dq = dq.index_put((m,), exact.affine_posterior_mean(x, A0, B0, a, s))
    return dp, dq


def _ratio(x_t: torch.Tensor, lev: torch.Tensor) -> torch.Tensor:
    r = torch.empty(len(x_t), dtype=DT)
    for k, (a, s) in enumerate(LEVELS):
        m = lev == k
        r[m] = exact.exact_ratio(MIX, x_t[m].detach(), A0, B0, a, s)
    return r


@functools.cache
def _batch(N: int):
    """Noise draws shared by all cases at a given N, with the levels mixed inside the batch."""
    g = torch.Generator().manual_seed(N)
    z = torch.randn(N, 2, generator=g, dtype=DT)
    eps = torch.randn(N, 2, generator=g, dtype=DT)
    lev = torch.arange(N) % len(LEVELS)
    al = torch.tensor([a for a, _ in LEVELS], dtype=DT)[lev]
    si = torch.tensor([s for _, s in LEVELS], dtype=DT)[lev]
    return z, eps, lev, al, si


@functools.cache
def _frozen(N: int):
    """Detached D_p, D_q and the exact ratio r at the batch's x_t (for the x0-only losses)."""
    z, eps, lev, al, si = _batch(N)
    x_t = al[:, None] * (z @ A0.T + B0) + si[:, None] * eps
    return (*_denoisers(x_t, lev, False), _ratio(x_t, lev))


def _vsd(x0, xt, al, si, lev):
    dp, dq, _ = _frozen(len(x0))
    return vsd_loss(x0, dp, dq, normalize=False)


def _fd(name):
    def loss(x0, xt, al, si, lev):
        dp, dq, r = _frozen(len(x0))
        return fdistill_loss(x0, dp, dq, f_weight(r, name), normalize=False)
    return loss


def _sid(a):
    return lambda x0, xt, al, si, lev: sid_loss(x0, *_denoisers(xt, lev, True), a, normalize=False)


def _sim(distance, c, space, full):
    def loss(x0, xt, al, si, lev):
        dp, dq = _denoisers(xt, lev, True)
        return sim_loss(x0, dp, dq, al, si, distance, c, space=space, full_gradient=full)
    return loss


FDIVS = ("fkl", "js", "hellinger", "jeffreys", "srkl", "pearson", "neyman", "alpha:0.5", "alpha:-0.5")
PH = "pseudo_huber"
CASES = [
    Case("vsd (DI/DMD, rkl)", "s^2/(a^2 N) grad KL(q_t||p_t)", _vsd, lambda: exact_fdiv("rkl")),
    *[Case(f"fdistill {n}", f"s^2/(a^2 N) grad D_{n}(p_t||q_t)", _fd(n), functools.partial(exact_fdiv, n))
      for n in FDIVS],
    *[Case(f"sid alpha={a}", "[(a-1/2) grad F_sg + (1-a) grad F]/N", _sid(a), functools.partial(exact_sid, a),
           graph=True) for a in (0.5, 1.0, 1.2)],
    Case("sim l2 (x0)", "grad E_sg(q)||D_p-D_q||^2 / N", _sim("l2", None, "x0", False),
         lambda: exact_score_div("l2", None, "x0", True), graph=True),
    Case("sim l2 full_gradient", "grad E_q||D_p-D_q||^2 / N", _sim("l2", None, "x0", True),
         lambda: exact_score_div("l2", None, "x0", False), graph=True),
    Case("sim pseudo-Huber c=0.1 (x0)", "grad E_sg(q) d_PH(D_p-D_q) / N", _sim(PH, 0.1, "x0", False),
         lambda: exact_score_div(PH, 0.1, "x0", True), graph=True),
    Case("sim pseudo-Huber c=0.5 (score)", "grad E_sg(q) d_PH(s_p-s_q) / N", _sim(PH, 0.5, "score", False),
         lambda: exact_score_div(PH, 0.5, "score", True), graph=True),
    Case("sim pseudo-Huber c=0.1 full_gradient", "grad E_q d_PH(D_p-D_q) / N", _sim(PH, 0.1, "x0", True),
         lambda: exact_score_div(PH, 0.1, "x0", False), graph=True),
    *[Case(f"fake_score {w}", "grad_phi w E_q||D_phi - E_q[x0|x_t]||^2 / N", None,
           functools.partial(exact_fake, w), fake=True) for w in ("x0", "eps", "edm")],
]
IDS = [c.name for c in CASES]


@functools.cache
def estimate(idx: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-sample gradient (6,), covariance of that mean (6, 6))."""
    case = CASES[idx]
    z, eps, lev, al, si = _batch(N)
    x0 = (z @ A0.T + B0).requires_grad_(True)
    x_t = al[:, None] * x0 + si[:, None] * eps
    if case.fake:
        x_t = x_t.detach()
        d_phi = (x_t @ W0.T + C0).requires_grad_(True)
        weighting = case.name.split()[-1]
        loss = fake_score_loss(d_phi, x0.detach(), al, si, weighting)
        (G,) = torch.autograd.grad(loss.sum(), d_phi)
        feat = x_t  # dD/dW = x_t, dD/dc = 1
    else:
        loss = case.loss(x0, x_t, al, si, lev)
        assert loss.shape == (N,) and loss.dtype == DT
        (G,) = torch.autograd.grad(loss.sum(), x0)  # per-sample losses: row i is d loss_i / d x0_i
        feat = z  # dx0/dA = z, dx0/db = 1
    per = torch.cat([(G[:, :, None] * feat[:, None, :]).reshape(N, -1), G], 1)
    mean = per.mean(0)
    cov = torch.cov(per.T) / N
    return mean, cov


def _stats(idx: int, N: int) -> dict:
    est, cov = estimate(idx, N)
    ex = CASES[idx].exact()
    d = est - ex
    return dict(est=est, exact=ex, rel=float(d.norm() / ex.norm()),
                se_rel=float(cov.trace().sqrt() / ex.norm()), chi2=float(d @ torch.linalg.solve(cov, d)))


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_quadrature_matches_closed_form_kl():
    single = GaussianMixture([[0.3, 0.4]], [[0.6, 0.4]])
    for a, s in LEVELS:
        m, S = exact.affine_qt(A0, B0, a, s)
        mp = a * torch.tensor([0.3, 0.4], dtype=DT)
        Sp = torch.diag(a**2 * torch.tensor([0.36, 0.16], dtype=DT) + s**2)
        closed = exact.gaussian_kl(m, S, mp, Sp)  # KL(q_t || p_t) = D_rkl(p_t || q_t)
        quad = exact.f_divergence_quadrature(single, A0, B0, a, s, "rkl", n_grid=GRID)
        assert abs(float(quad - closed)) < 1e-9 * max(1.0, float(closed))
        # gradients too
        _, gA, gb = exact.value_and_grad(lambda A, b, a=a, s=s, mp=mp, Sp=Sp: exact.gaussian_kl(
            *exact.affine_qt(A, b, a, s), mp, Sp), A0, B0)
        _, qA, qb = exact.value_and_grad(lambda A, b, a=a, s=s: exact.f_divergence_quadrature(
            single, A, b, a, s, "rkl", n_grid=GRID), A0, B0)
        torch.testing.assert_close(torch.cat([qA.reshape(-1), qb]), torch.cat([gA.reshape(-1), gb]),
                                   rtol=1e-7, atol=1e-9)


def test_mc_divergence_agrees_with_quadrature():
    a, s = LEVELS[0]
    g = torch.Generator().manual_seed(3)
    for name in ("js", "neyman"):
        quad = float(exact.f_divergence_quadrature(MIX, A0, B0, a, s, name, n_grid=GRID))
        n = 100_000
        x0, _ = exact.affine_sample(A0, B0, n, g)
        x_t = a * x0 + s * torch.randn(n, 2, generator=g, dtype=DT)
        from diffdiv.divergence import f_value
        vals = f_value(exact.exact_ratio(MIX, x_t, A0, B0, a, s), name)
        se = float(vals.std() / math.sqrt(n))
        assert abs(float(vals.mean()) - quad) < 5 * se, (name, float(vals.mean()), quad, se)


def test_exact_denoisers_consistent():
    # Tweedie: score of q_t from the exact posterior mean equals the Gaussian score
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 2, generator=g, dtype=DT)
    for a, s in LEVELS:
        m, S = exact.affine_qt(A0, B0, a, s)
        d = exact.affine_posterior_mean(x, A0, B0, a, s)
        torch.testing.assert_close((a * d - x) / s**2, exact.gaussian_score(x, m, S))
        # the GMM teacher agrees with its own exact score (same identity for p_t)
        torch.testing.assert_close((a * MIX.posterior_mean(x, a, s) - x) / s**2, MIX.score(x, a, s))
    # closed-form denoiser MSE against Monte Carlo
    a, s = LEVELS[1]
    n = 200_000
    x0, _ = exact.affine_sample(A0, B0, n, g)
    x_t = a * x0 + s * torch.randn(n, 2, generator=g, dtype=DT)
    err = ((x_t @ W0.T + C0 - exact.affine_posterior_mean(x_t, A0, B0, a, s)) ** 2).sum(1)
    closed = float(exact.denoiser_mse_exact(W0, C0, A0, B0, a, s))
    assert abs(float(err.mean()) - closed) < 5 * float(err.std()) / n**0.5


@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("idx", range(len(CASES)), ids=IDS)
def test_gradient_matches_exact(idx, N):
    st = _stats(idx, N)
    assert st["chi2"] < CHI2_LIMIT, (CASES[idx].name, N, st)
    # the estimate is not trivially tiny: the exact gradient is resolved at the large N
    if N == SIZES[-1]:
        assert st["se_rel"] < 0.1, st


def test_error_shrinks_with_sample_count():
    small, large = SIZES
    ratios, errs_small, errs_large = [], [], []
    for idx in range(len(CASES)):
        s, g = _stats(idx, small), _stats(idx, large)
        ratios.append(g["se_rel"] / s["se_rel"])
        errs_small.append(s["rel"])
        errs_large.append(g["rel"])
    expect = math.sqrt(small / large)
    for i, r in enumerate(ratios):  # standard error ~ 1/sqrt(N)
        assert 0.6 * expect < r < 1.6 * expect, (IDS[i], r, expect)
    # and the actual error, in aggregate (root mean square over all losses)
    rms = lambda v: math.sqrt(sum(x * x for x in v) / len(v))  # noqa: E731
    assert rms(errs_large) < 0.5 * rms(errs_small), (rms(errs_small), rms(errs_large))


def test_sid_alpha1_equals_sim_l2_and_half_full():
    # algebraic identities between the estimators on the same batch (not against themselves: different code)
    z, eps, lev, al, si = _batch(257)
    x0 = (z @ A0.T + B0).requires_grad_(True)
    x_t = al[:, None] * x0 + si[:, None] * eps
    dp, dq = _denoisers(x_t, lev, True)
    g_sid = torch.autograd.grad(sid_loss(x0, dp, dq, 1.0, normalize=False).sum(), x0, retain_graph=True)[0]
    g_sim = torch.autograd.grad(sim_loss(x0, dp, dq, al, si, "l2").sum(), x0, retain_graph=True)[0]
    torch.testing.assert_close(2 * g_sid, g_sim)
    g_half = torch.autograd.grad(sid_loss(x0, dp, dq, 0.5, normalize=False).sum(), x0, retain_graph=True)[0]
    g_full = torch.autograd.grad(sim_loss(x0, dp, dq, al, si, "l2", full_gradient=True).sum(), x0)[0]
    torch.testing.assert_close(2 * g_half, g_full)


# ----------------------------------------------------------------------------------------------


def table(sizes: tuple[int, ...] = SIZES) -> str:
    lines = [
        "| loss | expected gradient equals | N | measured d/db | exact d/db | rel. error (6 params) | "
        "std. error (rel.) | chi2 (6 dof) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for idx, case in enumerate(CASES):
        for N in sizes:
            st = _stats(idx, N)
            fmt = lambda v: f"({float(v[4]):+.5f}, {float(v[5]):+.5f})"  # noqa: E731
            claim = case.claim.replace("|", "\\|")  # pipes inside a markdown cell
            lines.append(f"| {case.name} | {claim} | {N} | {fmt(st['est'])} | {fmt(st['exact'])} | "
                         f"{st['rel']:.4f} | {st['se_rel']:.4f} | {st['chi2']:.1f} |")
    lines.append("")
    lines.append(f"chi2 limit (chi^2_6 quantile at 1 - 1e-5): {CHI2_LIMIT:.1f}. Noise levels (alpha, sigma): "
                 + ", ".join(f"({a:.2f}, {s:.3f})" for a, s in LEVELS) + "; F = x0-space Fisher divergence "
                 "E||D_p - D_q||^2, F_sg its value with the sampling distribution frozen. For the fake-score "
                 "rows the parameters are (W, c) of D_phi(x_t) = W x_t + c; 'd/db' shows d/dc.")
    return "\n".join(lines)


if __name__ == "__main__":
    import pathlib

    md = table(SIZES + (2**18,))
    print(md)
    out = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "core.exactness.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Divergence core: loss gradients vs exact divergence gradients\n\n"
                   "Generated by `python tests/test_losses_exact.py`.\n\n" + md + "\n")
