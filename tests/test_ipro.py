"""IPRO: the DDIM chain against diffusers' DDIMScheduler, the K-step truncated gradient against autograd
through an independently written full chain, the per-step KL, and frame noise."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from diffdiv.config import ConfigError
from diffdiv.models.lora import LoRAConfig, adapters_disabled, add_lora
from diffdiv.models.unet import UNetDenoiser
from diffdiv.sampling import correlated_frame_noise, ddim_chain, ddim_times, scheduler_times

STEPS = 5
TIMES = torch.tensor([999.0, 799.0, 599.0, 399.0, 199.0, 0.0], dtype=torch.float64)  # diffusers "trailing"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    den = UNetDenoiser(unet, DDPMScheduler(num_train_timesteps=1000))
    den.requires_grad_(False)
    params = add_lora(den.unet, LoRAConfig(rank=2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:  # non-zero adapters, so the policy differs from the reference
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return den, params


def _scheduler() -> DDIMScheduler:
    sch = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                        timestep_spacing="trailing")
    sch.set_timesteps(STEPS)
    assert [int(t) for t in sch.timesteps] == [int(t) for t in TIMES[:-1]]
    return sch


def _inputs(seed: int = 2, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 2, 8, 8, generator=g)
    noises = [torch.randn(b, 2, 8, 8, generator=g) for _ in range(STEPS)]
    return z, noises


def _diffusers_chain(den, z, noises, eta, detach_before: int = 0):
    """Full DDIM chain written with diffusers' scheduler step; x detached before step `detach_before`."""
    sch = _scheduler()
    x = z
    for i, tau in enumerate(sch.timesteps):
        if i < detach_before:
            x = x.detach()
        with torch.set_grad_enabled(i >= detach_before):
            eps = den.eps(x, torch.full((x.shape[0],), float(tau)))
            x = sch.step(eps, tau, x, eta=eta, variance_noise=noises[i]).prev_sample
    return x


def _reward(x):
    return -((x - 0.3) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_chain_matches_diffusers_ddim(model, eta):
    den, _ = model
    z, noises = _inputs()
    with torch.no_grad():
        out = ddim_chain(lambda x, t: den(x, t), z, TIMES, den.schedule, eta, noises)
        ref = _diffusers_chain(den, z, noises, eta)
    torch.testing.assert_close(out.x, ref, rtol=1e-4, atol=1e-4)


def _grads(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _assert_same_vector(a, b, rel=1e-5):
    # float32 chains: compare whole gradient vectors (the 1/alpha_T amplification makes entries large)
    err = float((a - b).norm() / b.norm())
    assert err < rel, err


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_truncated_gradient_equals_full_autograd(model, eta):
    """K = all steps: the gradient w.r.t. the LoRA weights equals autograd through the whole (diffusers) chain;
    K < all: it equals the chain with the state detached before the last K steps, and differs from the full."""
    den, params = model
    z, noises = _inputs()
    fn = lambda x, t: den(x, t)  # noqa: E731
    full = _grads(_reward(_diffusers_chain(den, z, noises, eta)).sum(), params)
    mine = _grads(_reward(ddim_chain(fn, z, TIMES, den.schedule, eta, noises, grad_steps=STEPS).x).sum(), params)
    _assert_same_vector(mine, full)
    assert full.abs().max() > 1e-4
    K = 2
    trunc_ref = _grads(_reward(_diffusers_chain(den, z, noises, eta, detach_before=STEPS - K)).sum(), params)
    trunc = _grads(_reward(ddim_chain(fn, z, TIMES, den.schedule, eta, noises, grad_steps=K).x).sum(), params)
    _assert_same_vector(trunc, trunc_ref)
    assert (trunc - full).norm() > 1e-3 * full.norm()
    ck = _grads(_reward(ddim_chain(fn, z, TIMES, den.schedule, eta, noises, grad_steps=K, checkpoint=True).x).sum(),
                params)
    _assert_same_vector(ck, trunc, 1e-6)


def test_per_step_kl_equals_diffusers_transitions(model):
    """The chain's KL = sum over differentiated steps of ||mu_theta - mu_ref||^2 / (2 std^2) with the means
    and variance of diffusers' DDIM(kl_eta) step for the policy and the reference at the visited state."""
    den, _ = model
    z, noises = _inputs(b=3)
    kl_eta, K = 1.0, 3

    def ref(x, t):
        with adapters_disabled(den.unet):
            return den(x, t)

    with torch.no_grad():
        out = ddim_chain(lambda x, t: den(x, t), z, TIMES, den.schedule, 0.0, None, grad_steps=K,
                         ref_denoise=ref, kl_eta=kl_eta, kl_on="all", reduce="sum", record=True)
        sch = _scheduler()
        total = torch.zeros(3)
        for i, tau in enumerate(sch.timesteps):
            x = out.states[i]
            t = torch.full((3,), float(tau))
            zero = torch.zeros_like(x)
            mu_p = sch.step(den.eps(x, t), tau, x, eta=kl_eta, variance_noise=zero).prev_sample
            with adapters_disabled(den.unet):
                mu_r = sch.step(den.eps(x, t), tau, x, eta=kl_eta, variance_noise=zero).prev_sample
            var = kl_eta**2 * sch._get_variance(tau, int(tau) - 200)
            kl_i = ((mu_p - mu_r) ** 2).flatten(1).sum(1) / (2 * var)
            torch.testing.assert_close(out.kl_steps[i], kl_i, rtol=2e-3, atol=1e-6)
            total += kl_i
    torch.testing.assert_close(out.kl, total, rtol=2e-3, atol=1e-6)
    assert float(total.min()) > 0
    with pytest.raises(ValueError, match="kl_eta"):
        ddim_chain(lambda x, t: den(x, t), z, TIMES, den.schedule, 0.0, None, ref_denoise=ref, kl_eta=0.0,
                   kl_on="all")


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_scheduler_times_reproduce_the_pipeline_ddim(model, spacing):
    """The default grid of the reward trainers is the stored scheduler's: for SD's DDIM config (leading, offset 1,
    final alpha = alphas_cumprod[0]) 5 steps visit 801, ..., 1, and the DDIM(eta) chain on that grid reproduces
    diffusers' DDIMScheduler.step on the same noises, the last step included."""
    den, _ = model
    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing=spacing)
    sd = UNetDenoiser(den.unet, sch)
    times = scheduler_times(sd, STEPS)
    sch.set_timesteps(STEPS)
    expect = {"leading": [801.0, 601.0, 401.0, 201.0, 1.0, 0.0], "trailing": [999.0, 799.0, 599.0, 399.0, 199.0, 0.0]}
    torch.testing.assert_close(times, torch.tensor(expect[spacing], dtype=torch.float64), rtol=0, atol=1e-9)
    z, noises = _inputs()
    with torch.no_grad():
        out = ddim_chain(lambda x, t: sd(x, t), z, times, sd.schedule, 1.0, noises)
        x = z
        for i, tau in enumerate(sch.timesteps):
            x = sch.step(sd.eps(x, torch.full((2,), float(tau))), tau, x, eta=1.0, variance_noise=noises[i]).prev_sample
    torch.testing.assert_close(out.x, x, rtol=1e-4, atol=1e-4)
    # "leading" without offset ends at timestep 0 and lands on alpha = 1, which the chain cannot represent
    with pytest.raises(ConfigError, match="timesteps: uniform"):
        scheduler_times(UNetDenoiser(den.unet, DDPMScheduler(num_train_timesteps=1000)), STEPS)


def test_ddim_times():
    torch.testing.assert_close(ddim_times(999, 0, 3), torch.tensor([999.0, 666.0, 333.0, 0.0], dtype=torch.float64))


def test_correlated_frame_noise_covariance():
    g = torch.Generator().manual_seed(3)
    n, corr = 200_000, 0.6
    z = correlated_frame_noise(torch.randn(n, 1, generator=g), torch.randn(n, 3, 1, generator=g), corr)[..., 0]
    cov = torch.cov(z.T)
    se = 4 / math.sqrt(n)  # ~ std of a sample covariance of unit-variance Gaussians, times 4
    torch.testing.assert_close(cov.diagonal(), torch.ones(3), atol=4 * se, rtol=0)
    off = cov[~torch.eye(3, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, corr), atol=4 * se, rtol=0)
