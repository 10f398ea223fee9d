"""TrigFlow view: VP / EDM / rectified-flow teachers (exact mixtures and tiny diffusers models) in TrigFlow."""

from __future__ import annotations

import math

import pytest
import torch

from diffdiv.models.gmm import GaussianMixture, GaussianMixtureTeacher
from diffdiv.models.trigflow import TrigFlowView, trigflow_range
from diffdiv.param import EDMSchedule, FlowSchedule, VPSchedule

SCHEDULES = {
    "vp_linear": lambda: VPSchedule.linear(),
    "vp_cosine": lambda: VPSchedule.linear(1000, 1e-4, 0.02, "squaredcos_cap_v2"),
    "edm": lambda: EDMSchedule(0.002, 80.0),
    "flow": lambda: FlowSchedule(),
}


def mixture() -> GaussianMixture:
    means = torch.tensor([[1.0, -0.5, 0.3], [-1.2, 0.4, 0.0], [0.2, 1.0, -1.0]], dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2]))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_converted_mixture_teacher_is_exact_trigflow_denoiser(name, sd):
    """x0 of the converted teacher = exact E[x0 | x_t] under TrigFlow noise (alpha = cos t, sigma = sd sin t)."""
    mix = mixture()
    view = TrigFlowView(GaussianMixtureTeacher(mix, SCHEDULES[name]()), sd)
    g = torch.Generator().manual_seed(0)
    n = 64
    t = view.t_min + (view.t_max - view.t_min) * torch.rand(n, generator=g, dtype=torch.float64)
    x0 = mix.sample(n, g, dtype=torch.float64)
    x = torch.cos(t)[:, None] * x0 + sd * torch.sin(t)[:, None] * torch.randn(n, 3, generator=g, dtype=torch.float64)
    want = mix.posterior_mean(x, torch.cos(t), sd * torch.sin(t))
    got = view.x0(x, t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_pf_ode_velocity_of_converted_teacher(name):
    """sd F of a converted single-Gaussian teacher = d/dt of the exact ODE path cos t mu + s_t xi."""
    sd, mu, s0 = 0.7, torch.tensor([0.4, -1.1], dtype=torch.float64), 0.45
    mix = GaussianMixture(mu[None], torch.tensor([s0], dtype=torch.float64))
    view = TrigFlowView(GaussianMixtureTeacher(mix, SCHEDULES[name]()), sd)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.05, 0.4, 0.9, 1.3, 1.5], dtype=torch.float64).clamp(view.t_min, view.t_max)
    xi = torch.randn(len(t), 2, generator=g, dtype=torch.float64)

    def path(tt):  # the PF-ODE keeps the standardized coordinate xi fixed for a Gaussian
        st = torch.sqrt(torch.cos(tt) ** 2 * s0**2 + torch.sin(tt) ** 2 * sd**2)
        return torch.cos(tt)[:, None] * mu + st[:, None] * xi

    h = 1e-6
    velocity = (path(t + h) - path(t - h)) / (2 * h)
    torch.testing.assert_close(sd * view(path(t), t), velocity, rtol=1e-6, atol=1e-6)


def test_range_and_model_times():
    sch = SCHEDULES["vp_cosine"]()
    t_lo, t_hi = trigflow_range(sch, 0.5, sigma_max=80.0)
    assert t_hi == pytest.approx(math.atan(80 / 0.5), abs=1e-12)  # the sigma_max cap binds
    assert 0 < t_lo < 0.05
    view = TrigFlowView(GaussianMixtureTeacher(mixture(), sch), 0.5, sigma_max=80.0)
    tau = view.model_times([view.t_max, 0.7])
    a, s = sch.alpha_sigma(torch.tensor(tau, dtype=torch.float64))
    assert (s / a).tolist() == pytest.approx([80.0, 0.5 * math.tan(0.7)], rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Tiny diffusers teachers: the converted x0 equals the network's own x0 computed by hand
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffdiv.models.loading import load_denoiser
    from diffdiv.models.tiny import build_tiny_sd, build_tiny_sd3, build_tiny_unet2d

    root = tmp_path_factory.mktemp("tiny_trigflow")
    return {
        "unet2d": load_denoiser(build_tiny_unet2d(root / "u")),
        "sd_v": load_denoiser(build_tiny_sd(root / "sdv", prediction_type="v_prediction")),
        "sd3": load_denoiser(build_tiny_sd3(root / "sd3", t5=False)),
    }


@pytest.mark.parametrize("kind", ["unet2d", "sd_v", "sd3"])
def test_converted_diffusers_teacher_matches_native_x0(kind, tiny):
    d = tiny[kind]
    sd = 0.5
    view = TrigFlowView(d, sd)
    g = torch.Generator().manual_seed(2)
    x_tau = torch.randn(2, *d.sample_shape, generator=g)
    cond = None if kind == "unet2d" else d.encode_prompts(["a red cat", "a small house"])
    with torch.no_grad():
        if kind == "sd3":  # rectified flow at diffusers timestep 1000 s: x = (1 - s) x0 + s eps, x0 = x - s u
            s = torch.tensor([0.3, 0.85])
            a = 1 - s
            net_t = 1000 * s
            u = d.transformer(hidden_states=x_tau, timestep=net_t, encoder_hidden_states=cond.embeds,
                              pooled_projections=cond.pooled).sample
            want = x_tau - s.view(-1, 1, 1, 1) * u
        else:
            steps = torch.tensor([120, 870])
            acp = d.make_scheduler().alphas_cumprod[steps]
            a, s = acp.sqrt(), (1 - acp).sqrt()
            if kind == "unet2d":  # eps prediction
                eps = d.unet(x_tau, steps.float()).sample
                want = (x_tau - s.view(-1, 1, 1, 1) * eps) / a.view(-1, 1, 1, 1)
            else:  # v prediction: x0 = a x - s v
                v = d.unet(x_tau, steps.float(), encoder_hidden_states=cond.embeds).sample
                want = a.view(-1, 1, 1, 1) * x_tau - s.view(-1, 1, 1, 1) * v
        t = torch.atan2(s, a * sd)  # same SNR
        x_trig = x_tau / torch.sqrt(a**2 + (s / sd) ** 2).view(-1, 1, 1, 1)
        got = view.x0(x_trig, t.float(), cond)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
