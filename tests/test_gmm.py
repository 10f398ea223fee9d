"""The analytic teacher: exact scores, denoisers and densities at every noise level."""

import math

import pytest
import torch

from diffdiv.models.gmm import GaussianMixture, GaussianMixtureTeacher
from diffdiv.param import EDMSchedule, FlowSchedule, VPSchedule


def _mix(dim=3, k=4, seed=0, diag=False):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * 2
    stds = torch.rand(k, dim, generator=g, dtype=torch.float64) * 0.5 + 0.1 if diag else \
        torch.rand(k, generator=g, dtype=torch.float64) * 0.5 + 0.1
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    return GaussianMixture(means, stds, w)


@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("schedule", [VPSchedule.linear(), EDMSchedule(), FlowSchedule()], ids=["vp", "edm", "flow"])
def test_score_is_gradient_of_log_density(schedule, diag):
    mix = _mix(diag=diag)
    teacher = GaussianMixtureTeacher(mix, schedule)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    u = torch.rand(64, generator=g, dtype=torch.float64)
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * (0.02 + 0.96 * u)
    lp = teacher.log_prob(x, t).sum()
    (grad,) = torch.autograd.grad(lp, x)
    torch.testing.assert_close(teacher.score(x.detach(), t), grad, rtol=1e-9, atol=1e-9)


def test_denoiser_is_posterior_mean_by_monte_carlo():
    """E[x0 | x_t] from the formula vs importance-weighted samples of the prior."""
    mix = _mix(dim=2, k=3, seed=3)
    sch = VPSchedule.linear()
    teacher = GaussianMixtureTeacher(mix, sch)
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(400_000, g, dtype=torch.float64)
    t = torch.tensor([500.0], dtype=torch.float64)
    a, s = sch.alpha_sigma(t)
    x_t = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    logw = -((x_t - a * x0) ** 2).sum(-1) / (2 * s**2)
    w = torch.softmax(logw, 0)
    mc = (w[:, None] * x0).sum(0)
    ess = 1.0 / (w**2).sum()
    exact = teacher(x_t, t)[0]
    sd = x0.std(0).max()
    assert float((mc - exact).abs().max()) < 5 * float(sd) / math.sqrt(float(ess))


def test_density_integrates_to_one_in_2d():
    mix = _mix(dim=2, k=3, seed=5)
    a, s = 0.8, 0.6
    grid = torch.linspace(-12, 12, 601, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], -1)
    dens = mix.log_prob(pts, a, s).exp()
    total = float(dens.sum() * (grid[1] - grid[0]) ** 2)
    assert abs(total - 1.0) < 1e-6


def test_class_conditional_and_cfg():
    mix = GaussianMixture([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [0.3, 0.3, 0.3], [0.3, 0.3, 0.4], labels=[0, 1, 1])
    teacher = GaussianMixtureTeacher(mix, guidance_scale=3.0)
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.full((8,), 600.0, dtype=torch.float64)
    lab = torch.ones(8, dtype=torch.long)
    cond = teacher(x, t, lab, guidance_scale=1.0)
    unc = teacher(x, t, None)
    guided = teacher(x, t, lab)
    torch.testing.assert_close(guided, unc + 3.0 * (cond - unc))
    # label-1 samples come only from components 1 and 2
    xs, k = mix.sample(500, torch.Generator().manual_seed(0), labels=torch.ones(500, dtype=torch.long),
                       return_components=True)
    assert set(k.tolist()) <= {1, 2}


def test_bad_mixture_inputs():
    with pytest.raises(ValueError):
        GaussianMixture(torch.zeros(0, 2), 1.0)
    with pytest.raises(ValueError):
        GaussianMixture([[0.0, 0.0]], [-1.0])
    with pytest.raises(ValueError):
        GaussianMixture([[0.0, 0.0], [1.0, 1.0]], 0.1, [0.0, 0.0])
