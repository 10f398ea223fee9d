"""DI* math: the CFG implicit-reward ("OUT") term against the exact classifier gradient of a conditional
Gaussian mixture, and the expected gradient of the full DI* loss (reward + pseudo-Huber SIM) against the
exact gradient of the DI* objective for an affine generator (quadrature of the score divergence)."""

import pytest
import torch
from scipy.stats import chi2

from diffdiv.divergence import exact
from diffdiv.methods.di_star import cfg_implicit_reward_loss, di_star_generator_loss
from diffdiv.models.gmm import GaussianMixture, GaussianMixtureTeacher
from diffdiv.param import VPSchedule

DT = torch.float64


@pytest.mark.parametrize("space", ["score", "x0"])
def test_cfg_out_term_is_the_implicit_classifier_reward(space):
    """d/dx0 of the OUT term = -(w-1)/(alpha N) grad_x0 log p_t(c | x_t) (score space), times sigma^2/alpha
    more in x0 space; p_t(c | x_t) from the exact conditional mixture, x_t = alpha x0 + sigma eps."""
    mix = GaussianMixture([[-1.0, 0.5], [1.0, -0.5], [0.2, 1.0]], [0.4, 0.3, 0.5], [0.3, 0.3, 0.4], labels=[0, 1, 1])
    teacher = GaussianMixtureTeacher(mix, VPSchedule.linear())
    g = torch.Generator().manual_seed(0)
    B, w = 64, 4.0
    x0 = torch.randn(B, 2, generator=g, dtype=DT).requires_grad_(True)
    eps = torch.randn(B, 2, generator=g, dtype=DT)
    labels = torch.randint(2, (B,), generator=g)
    t = torch.full((B,), 500.0, dtype=DT)
    a, s = teacher.schedule.alpha_sigma(t)
    x_t = a[:, None] * x0 + s[:, None] * eps
    d_c = teacher(x_t, t, labels, guidance_scale=1.0)
    d_u = teacher(x_t, t, None)
    (G,) = torch.autograd.grad(cfg_implicit_reward_loss(x0, d_c, d_u, w, a, s, space).sum(), x0)
    log_post = mix.log_prob(x_t, a, s, labels) - mix.log_prob(x_t, a, s)  # log p(c|x_t) + const
    (E,) = torch.autograd.grad(log_post.sum(), x0)
    scale = 1.0 / a if space == "score" else s**2 / a**2
    expected = -(w - 1) * scale[:, None] * E / 2
    torch.testing.assert_close(G, expected, rtol=1e-9, atol=1e-12)
    assert float(E.abs().max()) > 0.1


MIX = GaussianMixture([[-0.8, 0.3], [0.8, -0.2], [0.1, 0.9]], 0.5, [0.3, 0.3, 0.4])
A0 = torch.tensor([[0.7, 0.15], [-0.1, 0.6]], dtype=DT)
B0 = torch.tensor([0.25, -0.15], dtype=DT)
C_REW = torch.tensor([0.5, 0.4], dtype=DT)


def test_di_star_expected_gradient_equals_objective_gradient():
    """Affine generator x0 = A z + b, exact teacher (mixture) and exact fake score: the mean per-sample gradient
    of di_star_generator_loss w.r.t. (A, b) equals  rw * grad(-E r) + dw * grad E_{sg(q_t)} d_PH(D_p - D_q) / N,
    r(x) = -||x - c||^2 (so -E r = ||b - c||^2 + tr A A^T); chi^2 test with the estimate's covariance."""
    a, s, c_ph, rw, dw = 0.6, 0.8, 0.1, 0.7, 1.5
    n = 2**15
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, 2, generator=g, dtype=DT)
    eps = torch.randn(n, 2, generator=g, dtype=DT)
    x0 = (z @ A0.T + B0).requires_grad_(True)
    x_t = a * x0 + s * eps
    d_p = MIX.posterior_mean(x_t, a, s)  # frozen teacher, graph through x_t
    d_q = exact.affine_posterior_mean(x_t, A0, B0, a, s)  # frozen fake score (the exact one), graph through x_t
    r = -((x0 - C_REW) ** 2).sum(1)
    loss, parts = di_star_generator_loss(x0, r, d_p, d_q, a, s, rw, dw, "pseudo_huber", c_ph, "x0")
    (G,) = torch.autograd.grad(loss * n, x0)  # row i: d loss_i / d x0_i
    per = torch.cat([(G[:, :, None] * z[:, None, :]).reshape(n, -1), G], 1)
    est, cov = per.mean(0), torch.cov(per.T) / n
    _, gA, gb = exact.value_and_grad(
        lambda A, b: exact.score_divergence_quadrature(MIX, A, b, a, s, "pseudo_huber", c_ph, "x0", frozen=True),
        A0, B0)
    div_grad = torch.cat([gA.reshape(-1), gb]) / 2  # N = 2 elements per sample
    rew_grad = torch.cat([(2 * A0).reshape(-1), 2 * (B0 - C_REW)])
    exact_grad = rw * rew_grad + dw * div_grad
    d = est - exact_grad
    stat = float(d @ torch.linalg.solve(cov, d))
    assert stat < chi2.ppf(1 - 1e-5, 6), (est, exact_grad, stat)
    assert float(div_grad.norm()) > 5 * float(cov.trace().sqrt())  # the divergence part is resolved
    assert set(parts) == {"sim", "reward"}


def test_div_weight_zero_is_pure_reward():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 2, generator=g, dtype=DT).requires_grad_(True)
    d_p, d_q = torch.randn(8, 2, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)
    r = -((x0 - C_REW) ** 2).sum(1)
    loss, _ = di_star_generator_loss(x0, r, d_p, d_q, 0.6, 0.8, 2.0, 0.0)
    (G,) = torch.autograd.grad(loss, x0)
    torch.testing.assert_close(G, 2.0 * 2 * (x0 - C_REW).detach() / 8)
