"""DPOK math: Gaussian DDIM policy log-probs and KL, the clipped surrogate, and the policy-gradient
estimator's expectation vs the exact gradient on an analytic 1-step Gaussian policy."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffdiv.methods.dpok import (
    PerPromptStatTracker,
    ddim_mean_x0_coef,
    ddim_step_coeffs,
    ddim_step_mean,
    dpok_loss,
    gaussian_kl_same_std,
    gaussian_log_prob,
    normalize_by_group,
    ppo_clipped_loss,
    step_kl_from_x0,
)
from diffdiv.param import VPSchedule

DT = torch.float64


def test_gaussian_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=DT)
    mean = torch.randn(5, 3, 4, 4, generator=g, dtype=DT)
    std = torch.rand(5, generator=g, dtype=DT) + 0.1
    ref = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(x).flatten(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, "sum"), ref.sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, "mean"), ref.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.3, "sum"),
                               torch.distributions.Normal(mean, 0.3).log_prob(x).flatten(1).sum(1))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta):
    sch = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    sch.set_timesteps(10)
    vp = VPSchedule.from_scheduler(sch)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    z = torch.randn(3, 4, 8, 8, generator=g)
    for tau in (sch.timesteps[0], sch.timesteps[4], sch.timesteps[-1]):
        prev = int(tau) - 100
        expected = sch.step(eps, tau, x, eta=eta, variance_noise=z).prev_sample
        t = torch.full((3,), float(tau), dtype=DT)
        s = torch.full((3,), float(max(prev, 0)), dtype=DT)
        a_t, s_t = (v.float() for v in vp.alpha_sigma(t))
        a_s, s_s = (v.float() for v in vp.alpha_sigma(s))
        x0 = (x - s_t.view(-1, 1, 1, 1) * eps) / a_t.view(-1, 1, 1, 1)
        c_x0, c_eps, std = ddim_step_coeffs(a_t, s_t, a_s, s_s, eta)
        mine = ddim_step_mean(x, x0, a_t, s_t, c_x0, c_eps) + std.view(-1, 1, 1, 1) * z
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=2e-5)
        var = sch._get_variance(tau, prev)  # diffusers' eta=1 variance
        torch.testing.assert_close(std, (eta * var.sqrt()).expand(3), rtol=1e-5, atol=1e-7)


def test_step_kl_closed_form_vs_monte_carlo():
    """KL of the two DDIM transitions at the same x_t: closed form vs MC of E_a[log p_a - log p_b]."""
    g = torch.Generator().manual_seed(2)
    D = 6
    x_t = torch.randn(1, D, generator=g, dtype=DT)
    x0_a, x0_b = torch.randn(1, D, generator=g, dtype=DT), torch.randn(1, D, generator=g, dtype=DT)
    a_t, s_t, a_s, s_s = (torch.tensor([v], dtype=DT) for v in (0.6, 0.8, 0.8, 0.6))
    c_x0, c_eps, std = ddim_step_coeffs(a_t, s_t, a_s, s_s, 1.0)
    mu_a = ddim_step_mean(x_t, x0_a, a_t, s_t, c_x0, c_eps)
    mu_b = ddim_step_mean(x_t, x0_b, a_t, s_t, c_x0, c_eps)
    k = ddim_mean_x0_coef(a_t, s_t, c_x0, c_eps)
    torch.testing.assert_close(mu_a - mu_b, k * (x0_a - x0_b))  # the mean is affine in x0 with slope k
    kl = step_kl_from_x0(x0_a, x0_b, k, std, "sum")
    torch.testing.assert_close(kl, gaussian_kl_same_std(mu_a, mu_b, std, "sum"))
    torch.testing.assert_close(step_kl_from_x0(x0_a, x0_b, k, std, "mean"), kl / D)
    n = 400_000
    y = mu_a + std * torch.randn(n, D, generator=g, dtype=DT)
    lr = gaussian_log_prob(y, mu_a.expand(n, D), std, "sum") - gaussian_log_prob(y, mu_b.expand(n, D), std, "sum")
    se = lr.std() / math.sqrt(n)
    assert abs(lr.mean() - kl[0]) < 4 * se, (float(lr.mean()), float(kl[0]), float(se))
    assert float(kl[0]) > 10 * float(se)  # the check has power


def test_ppo_clipped_loss_values():
    lp_old = torch.zeros(4, dtype=DT)
    eps = 0.1
    log_ratio = torch.tensor([0.5, -0.5, 0.5, -0.5], dtype=DT, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=DT)
    loss = ppo_clipped_loss(log_ratio, lp_old, adv, eps)
    r = math.exp(0.5)
    expected = torch.tensor([-(1 + eps), -math.exp(-0.5), r, 1 - eps], dtype=DT)
    torch.testing.assert_close(loss.detach(), expected)
    (g,) = torch.autograd.grad(loss.sum(), log_ratio)
    # clipped branch active (no gradient) when the ratio left the trust region in the advantage's direction
    torch.testing.assert_close(g, torch.tensor([0.0, -math.exp(-0.5), r, 0.0], dtype=DT))


def _pg_gradients(theta: torch.Tensor, theta_old: torch.Tensor, n: int, seed: int, baseline: float = 0.0,
                  reduce: str = "sum", alpha: float = 2.0, beta: float = 0.3, clip: float = 1e9,
                  chunks: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the gradient of DPOK's loss (samples from theta_old)."""
    s, c, mu_ref = 0.7, torch.tensor([1.0, -0.5, 0.25], dtype=DT), torch.tensor([0.2, 0.1, -0.3], dtype=DT)
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(chunks):
        th = theta.clone().requires_grad_(True)
        x = theta_old + s * torch.randn(n // chunks, 3, generator=g, dtype=DT)  # actions from the old policy
        r = -((x - c) ** 2).sum(1)  # quadratic reward
        lp = gaussian_log_prob(x, th.expand_as(x), s, reduce)
        lp_old = gaussian_log_prob(x, theta_old.expand_as(x), s, reduce)
        kl = gaussian_kl_same_std(th.expand_as(x), mu_ref.expand_as(x), s, reduce)
        loss, _ = dpok_loss(lp, lp_old, r - baseline, kl, clip, alpha, beta)
        grads.append(torch.autograd.grad(loss, th)[0])
    G = torch.stack(grads)
    return G.mean(0), G.std(0) / math.sqrt(chunks)


def _exact_gradient(theta: torch.Tensor, alpha: float = 2.0, beta: float = 0.3, D: int = 1) -> torch.Tensor:
    # E[r] = -||theta - c||^2 - 3 s^2;  KL = ||theta - mu_ref||^2 / (2 s^2) (divided by D for reduce=mean)
    s, c, mu_ref = 0.7, torch.tensor([1.0, -0.5, 0.25], dtype=DT), torch.tensor([0.2, 0.1, -0.3], dtype=DT)
    return -alpha * (-2 * (theta - c)) + beta * (theta - mu_ref) / s**2 / D


def test_policy_gradient_expectation_equals_exact_gradient():
    """On-policy (ratio 1): E[grad loss] = -alpha grad E[r] + beta grad KL, within 5 standard errors."""
    theta = torch.tensor([0.3, 0.2, -0.1], dtype=DT)
    mean, se = _pg_gradients(theta, theta, 200_000, seed=3)
    exact = _exact_gradient(theta)
    assert torch.all((mean - exact).abs() < 5 * se), (mean, exact, se)
    assert torch.all(exact.abs() > 10 * se)  # informative


def test_importance_ratio_corrects_off_policy_samples():
    """Samples from an older policy, unclipped ratio: the estimator still targets the gradient at theta."""
    theta = torch.tensor([0.3, 0.2, -0.1], dtype=DT)
    old = theta + torch.tensor([0.15, -0.1, 0.05], dtype=DT)
    mean, se = _pg_gradients(theta, old, 200_000, seed=4)
    exact = _exact_gradient(theta)
    assert torch.all((mean - exact).abs() < 5 * se), (mean, exact, se)
    # without the ratio (pretending the samples are on-policy) the estimate is biased
    naive, se_n = _pg_gradients(old, old, 200_000, seed=4)
    assert torch.any((naive - exact).abs() > 8 * se_n)


def test_baseline_keeps_expectation_and_reduces_variance():
    theta = torch.tensor([0.3, 0.2, -0.1], dtype=DT)
    m0, se0 = _pg_gradients(theta, theta, 100_000, seed=5)
    m1, se1 = _pg_gradients(theta, theta, 100_000, seed=5, baseline=-4.0)  # ~ E[r] at theta
    exact = _exact_gradient(theta)
    assert torch.all((m1 - exact).abs() < 5 * se1)
    assert torch.all(se1 < 0.7 * se0), (se0, se1)


def test_mean_reduction_divides_gradient_by_elements():
    """reduce='mean' (references) = reduce='sum' / N for both the on-policy PG term and the KL."""
    theta = torch.tensor([0.3, 0.2, -0.1], dtype=DT)
    m_sum, _ = _pg_gradients(theta, theta, 4000, seed=6, chunks=4)
    m_mean, _ = _pg_gradients(theta, theta, 4000, seed=6, reduce="mean", chunks=4)
    torch.testing.assert_close(m_mean, m_sum / 3)


def test_normalization_and_per_prompt_tracker():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    groups = ["a", "a", "a", "b", "b", "b"]
    out = normalize_by_group(r, groups)
    z = torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3)
    torch.testing.assert_close(out, torch.cat([z, z]), rtol=1e-5, atol=1e-5)
    tr = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tr.update(["a", "b"], torch.tensor([1.0, 3.0]))  # too few: batch statistics
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0]), rtol=1e-5, atol=1e-5)
    tr.update(["a", "a"], torch.tensor([2.0, 3.0]))
    out = tr.update(["a"], torch.tensor([4.0]))  # buffer a = [1, 2, 3, 4] (size 4)
    buf = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(out, ((4.0 - buf.mean()) / (buf.std(unbiased=False) + 1e-6)).reshape(1))
    tr2 = PerPromptStatTracker(buffer_size=4, min_count=3)
    tr2.load_state_dict(tr.state_dict())
    torch.testing.assert_close(tr2.update(["a"], torch.tensor([0.0])), tr.update(["a"], torch.tensor([0.0])))
