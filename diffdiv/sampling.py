"""Samplers: teacher multi-step (diffusers schedulers), one-step students, consistency few-step."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from torch import Tensor
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from diffdiv.config import ConfigError
from diffdiv.methods.dpok import ddim_mean_x0_coef, ddim_step_coeffs, ddim_step_mean, gaussian_log_prob, step_kl_from_x0
from diffdiv.methods.rocm import gaussian_step_divergence, kl_equal_var, step_sq_distance
from diffdiv.models.base import Denoiser
from diffdiv.param import FlowSchedule, VPSchedule, prediction_from_x0

SAMPLERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "flow_euler": FlowMatchEulerDiscreteScheduler,
}


def scheduler_config_of(denoiser: Denoiser) -> dict[str, Any]:
    """The diffusers scheduler config a denoiser was trained with (built from its schedule if needed)."""
    cfg = getattr(denoiser, "scheduler_config", None)
    if cfg is not None:
        return dict(cfg)
    from diffdiv.models.loading import scheduler_for

    return dict(scheduler_for(denoiser.schedule).config)


def make_scheduler(denoiser: Denoiser, sampler: str | None = "ddim", **overrides: Any):
    """A diffusers scheduler of kind `sampler` built from the model's stored scheduler config, as diffusers'
    `<Scheduler>.from_config(pipe.scheduler.config)` does: spacing, clipping and offsets are the authors'.

    `sampler` None or "stored": the model's own scheduler class. `overrides` replace stored settings
    (explicit only; `diffdiv sample --scheduler-set` prints and records them).
    """
    if sampler is not None and sampler not in SAMPLERS and sampler != "stored":
        raise ConfigError(f"unknown sampler '{sampler}' (choose from stored, {', '.join(SAMPLERS)})")
    is_flow = isinstance(denoiser.schedule, FlowSchedule)
    cfg = scheduler_config_of(denoiser)
    if sampler in (None, "stored"):
        stored = getattr(denoiser, "scheduler_cls", None)
        if stored is not None:
            return stored.from_config(cfg, **overrides)
        sampler = "flow_euler" if is_flow else "ddim"
    if is_flow and sampler not in ("flow_euler", "euler"):
        raise ConfigError(f"sampler '{sampler}' does not apply to a flow-matching model (use flow_euler)")
    if is_flow:
        return FlowMatchEulerDiscreteScheduler.from_config(cfg, **overrides)
    return SAMPLERS[sampler].from_config(cfg, **overrides)


def _step_alpha_sigma(scheduler, timestep: Tensor, schedule) -> tuple[float, float]:
    """(alpha, sigma) the scheduler assumes for the model input at this step."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        s = float(scheduler.sigmas[scheduler.step_index if scheduler.step_index is not None else 0])
        return 1.0 - s, s
    if hasattr(scheduler, "sigmas") and getattr(scheduler, "step_index", None) is not None \
            and not isinstance(scheduler, DPMSolverMultistepScheduler):
        sig = float(scheduler.sigmas[scheduler.step_index])  # VE sigma; model input is x / sqrt(1 + sig^2)
        a = 1.0 / math.sqrt(1.0 + sig**2)
        return a, sig * a
    acp = scheduler.alphas_cumprod[int(timestep)]
    return float(acp.sqrt()), float((1 - acp).sqrt())


@torch.no_grad()
def sample_diffusion(denoiser: Denoiser, noise: Tensor, steps: int, sampler: str | None = "ddim", cond: Any = None,
                     eta: float = 0.0, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Multi-step sampling with a diffusers scheduler (`make_scheduler`); the model output comes from our x0.

    Same noise, same steps as the diffusers pipeline call on the stored scheduler: latents scaled by
    `init_noise_sigma`, `scale_model_input`, and the generator passed to every `step` that takes one.
    """
    sch = make_scheduler(denoiser, sampler)
    sch.set_timesteps(steps, device=noise.device)
    x = noise * getattr(sch, "init_noise_sigma", 1.0)  # flow-matching schedulers have no such attribute
    sched = denoiser.schedule
    it = sch.timesteps
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{sampler} {steps} steps", leave=False)
    kind = "flow" if isinstance(sch, FlowMatchEulerDiscreteScheduler) else sch.config.prediction_type
    step_params = inspect.signature(sch.step).parameters
    step_kw: dict[str, Any] = {"generator": generator} if "generator" in step_params else {}
    if isinstance(sch, DDIMScheduler):
        step_kw["eta"] = eta
    for tau in it:
        x_in = sch.scale_model_input(x, tau) if hasattr(sch, "scale_model_input") else x
        a, s = _step_alpha_sigma(sch, tau, sched)
        a_t = torch.full((x.shape[0],), a, device=x.device, dtype=torch.float64)
        s_t = torch.full((x.shape[0],), s, device=x.device, dtype=torch.float64)
        t = sched.t_from_logsnr(2 * (torch.log(a_t) - torch.log(s_t))).float()
        x0 = denoiser(x_in, t, cond)
        out = prediction_from_x0(x0.float(), kind, x_in.float(), a_t.float(), s_t.float())
        x = sch.step(out.to(x.dtype), tau, x, **step_kw).prev_sample
    return x


def default_times(denoiser: Denoiser, steps: int, t_max: float | None = None,
                  mid_logsnr: Sequence[float] | None = None) -> list[float]:
    """Times for few-step consistency sampling: t_max, then evenly spaced in log-SNR (or given)."""
    sched = denoiser.schedule
    t0 = sched.t_max if t_max is None else t_max
    if steps == 1:
        return [t0]
    if mid_logsnr is not None:
        if len(mid_logsnr) != steps - 1:
            raise ConfigError(f"{steps} steps need {steps - 1} intermediate log-SNRs, got {len(mid_logsnr)}")
        mids = sched.t_from_logsnr(torch.tensor(list(mid_logsnr), dtype=torch.float64)).tolist()
        return [t0, *mids]
    lam_hi = float(sched.logsnr(torch.tensor([t0], dtype=torch.float64)))
    lam_lo = 2.0  # last re-noise at moderate noise (sigma ~ 0.35 for VP)
    lams = torch.linspace(lam_hi, lam_lo, steps)[1:]
    lams = torch.maximum(lams, torch.full_like(lams, lam_hi + 1e-3))
    return [t0, *sched.t_from_logsnr(lams.double()).tolist()]


@torch.no_grad()
def sample_consistency(denoiser: Denoiser, noise: Tensor, steps: int = 1, times: Sequence[float] | None = None,
                       cond: Any = None, generator: torch.Generator | None = None) -> Tensor:
    """Few-step consistency / one-step sampling: x0 = D(x, t_i), re-noise to t_{i+1} (sCM, Alg. 1)."""
    times = list(times) if times is not None else default_times(denoiser, steps)
    if len(times) != steps:
        raise ConfigError(f"{steps} steps need {steps} times, got {len(times)}")
    n = noise.shape[0]
    t = torch.full((n,), float(times[0]), device=noise.device)
    a, s = denoiser.schedule.alpha_sigma(t)
    view = (-1,) + (1,) * (noise.ndim - 1)
    x = s.view(view).to(noise.dtype) * noise
    x0 = denoiser(x, t, cond)
    for ti in times[1:]:
        t = torch.full((n,), float(ti), device=noise.device)
        a, s = denoiser.schedule.alpha_sigma(t)
        eps = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
        x = a.view(view).to(x0.dtype) * x0 + s.view(view).to(x0.dtype) * eps
        x0 = denoiser(x, t, cond)
    return x0


def sample(denoiser: Denoiser, n: int, steps: int, seed: int = 0, sampler: str = "ddim", kind: str = "diffusion",
           cond: Any = None, batch_size: int = 500, times: Sequence[float] | None = None,
           progress: bool = False, device: torch.device | str | None = None) -> Tensor:
    """Draw n samples (in model space) reproducibly from a seed; `kind` diffusion | one_step | consistency."""
    if n <= 0 or steps <= 0:
        raise ConfigError(f"num-samples and steps must be positive (got {n}, {steps})")
    device = torch.device(device) if device is not None else next(
        (p.device for p in denoiser.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    out = []
    it = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", total=math.ceil(n / batch_size))
    for i in it:
        b = min(batch_size, n - i)
        z = torch.randn(b, *denoiser.sample_shape, generator=g).to(device)
        c = _slice_cond(cond, i, b)
        if kind == "diffusion":
            x = sample_diffusion(denoiser, z, steps, sampler, c, generator=g)
        elif kind in ("one_step", "consistency"):
            x = sample_consistency(denoiser, z, steps, times, c, generator=g)
        else:
            raise ConfigError(f"unknown model kind '{kind}'")
        out.append(x.float().cpu())
    return torch.cat(out)


def _slice_cond(cond: Any, i: int, b: int) -> Any:
    if cond is None:
        return None
    if torch.is_tensor(cond):
        return cond[i:i + b]
    if hasattr(cond, "slice"):
        return cond.slice(i, i + b)
    return cond


# ----------------------------------------------------------------------------------------------
# Differentiable chains for training and reward evaluation: fn(denoise, x, times, schedule, ..., noises)
# with denoise(x, t) -> x0 (t of shape (B,)); noises are given (a list, or a callable i -> noise of step i)
# so that callers control the order of random draws.
# ----------------------------------------------------------------------------------------------

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
Noises = Sequence[Tensor] | Callable[[int], Tensor]


@dataclass
class ChainOut:
    """Result of a DDIM chain: final state, per-sample KL and (optionally) the recorded trajectory."""

    x: Tensor  # final state x_{t_T}
    x0: Tensor  # denoiser output at the last step
    kl: Tensor  # (B,) sum of the per-step KLs that were computed (zeros without a reference)
    kl_steps: list[Tensor] = field(default_factory=list)
    states: list[Tensor] = field(default_factory=list)  # x_{t_0..t_T} (record=True)
    log_probs: list[Tensor] = field(default_factory=list)  # log p(x_{i+1} | x_i) per step (record=True)


def ddim_times(t_max: float, t_min: float, steps: int) -> Tensor:
    """steps + 1 model times, evenly spaced from t_max down to t_min (float64)."""
    return torch.linspace(float(t_max), float(t_min), steps + 1, dtype=torch.float64)


def scheduler_times(denoiser: Denoiser, steps: int) -> Tensor:
    """steps + 1 model times (float64) of the pipeline scheduler's `steps`-step grid: the timesteps that
    `make_scheduler(denoiser, "ddim").set_timesteps(steps)` visits (FlowMatchEuler's sigmas for flow models),
    then the noise level its last step lands on (DDIM's `final_alpha_cumprod`; alpha = 1 maps to t_min)."""
    sched = denoiser.schedule
    if isinstance(sched, FlowSchedule):
        sch = make_scheduler(denoiser, "flow_euler")
        try:
            sch.set_timesteps(steps)
        except ValueError as e:  # dynamic shifting needs the image size (mu)
            raise ConfigError(f"timesteps: scheduler: {e}; use timesteps: uniform") from None
        sig = sch.sigmas.double()[: steps + 1]
        logsnr = 2.0 * (torch.log1p(-sig) - torch.log(sig))
    elif isinstance(sched, VPSchedule):
        sch = make_scheduler(denoiser, "ddim")
        sch.set_timesteps(steps)
        acp = sch.alphas_cumprod.double()
        final = torch.as_tensor(sch.final_alpha_cumprod, dtype=torch.float64).reshape(1)
        a2 = torch.cat([acp[sch.timesteps.long()], final])
        logsnr = torch.log(a2) - torch.log1p(-a2)
    else:
        raise ConfigError(f"timesteps: scheduler needs a VP or flow-matching model, not {type(sched).__name__}; "
                          "use timesteps: uniform")
    times = sched.t_from_logsnr(logsnr).double().clamp(sched.t_min, sched.t_max)
    if not bool((times[1:] < times[:-1]).all()):  # e.g. "leading" spacing without steps_offset: last timestep 0
        raise ConfigError(f"timesteps: scheduler: the {steps}-step grid {times.tolist()} does not decrease strictly "
                          "(its last step lands on alpha = 1, below the schedule's t_min); use timesteps: uniform")
    return times


def correlated_frame_noise(shared: Tensor, per_frame: Tensor, corr: float) -> Tensor:
    """Frame noises sqrt(c) z_shared + sqrt(1 - c) z_f: (B, ...) and (B, F, ...) -> (B, F, ...), each N(0, I)."""
    return corr**0.5 * shared.unsqueeze(1) + (1.0 - corr) ** 0.5 * per_frame


def _noise_at(noises: Noises | None, i: int) -> Tensor | None:
    if noises is None:
        return None
    return noises(i) if callable(noises) else noises[i]


# DDIM(eta) (Song et al. 2021, eq. 12) with exact per-step Gaussian log-probs and KLs (DPOK eq. 7; IPRO)
def ddim_chain(denoise: DenoiseFn, x_T: Tensor, times: Tensor, schedule, eta: float = 0.0,
               noises: Noises | None = None, grad_steps: int = 0,
               ref_denoise: DenoiseFn | None = None, kl_eta: float | None = None, kl_on: str = "grad",
               reduce: str = "mean", record: bool = False, checkpoint: bool = False,
               ref_grad: bool = False) -> ChainOut:
    """Run x_{t_0} = x_T -> x_{t_T} with DDIM(eta); gradients only through the last `grad_steps` steps.

    denoise(x, t) -> x0 with t of shape (B,). ref_denoise, if given, is evaluated without gradients at the
    same states; kl_on = "grad" computes the per-step KL on the differentiated steps, "all" on every step.
    The KL uses the transition of DDIM(kl_eta) (default: eta), which must be stochastic. ref_grad=True lets
    the KL's gradient flow through the reference's input state too (pathwise gradient of KL_t(x_t(theta)));
    by default the reference output is a constant at the visited state.
    """
    steps = len(times) - 1
    grad_steps = steps if grad_steps < 0 else min(grad_steps, steps)
    kl_eta = eta if kl_eta is None else kl_eta
    B = x_T.shape[0]
    x = x_T
    out = ChainOut(x=x_T, x0=x_T, kl=torch.zeros(B, dtype=torch.float32, device=x_T.device))
    if record:
        out.states.append(x_T.detach())
    grad_on = torch.is_grad_enabled()
    for i in range(steps):
        t = torch.full((B,), float(times[i]), device=x.device, dtype=torch.float64)
        s = torch.full((B,), float(times[i + 1]), device=x.device, dtype=torch.float64)
        a_t, s_t = (v.float() for v in schedule.alpha_sigma(t))
        a_s, s_s = (v.float() for v in schedule.alpha_sigma(s))
        with_grad = grad_on and i >= steps - grad_steps
        if not with_grad:
            x = x.detach()
        tt = t.float()
        with torch.set_grad_enabled(with_grad):
            if with_grad and checkpoint:
                x0 = grad_checkpoint(denoise, x, tt, use_reentrant=False)
            else:
                x0 = denoise(x, tt)
            c_x0, c_eps, std = ddim_step_coeffs(a_t, s_t, a_s, s_s, eta)
            mean = ddim_step_mean(x, x0.to(x.dtype), a_t, s_t, c_x0, c_eps)
            z = _noise_at(noises, i)
            if eta > 0 and z is None:
                raise ValueError("a stochastic DDIM chain (eta > 0) needs noises")
            x_next = mean if z is None or eta == 0 else mean + std.view(-1, *([1] * (x.ndim - 1))) * z
        if ref_denoise is not None and (kl_on == "all" or with_grad):
            with torch.set_grad_enabled(with_grad and ref_grad):
                x0_ref = ref_denoise(x if ref_grad else x.detach(), tt)
            k_c, k_e, k_std = ddim_step_coeffs(a_t, s_t, a_s, s_s, kl_eta)
            if bool((k_std <= 0).any()):
                raise ValueError("the per-step KL needs a stochastic transition: set kl_eta > 0")
            kl_i = step_kl_from_x0(x0.float(), x0_ref.float(), ddim_mean_x0_coef(a_t, s_t, k_c, k_e), k_std, reduce)
            out.kl_steps.append(kl_i)
            out.kl = out.kl + kl_i
        if record:
            out.states.append(x_next.detach())
            if eta > 0:
                out.log_probs.append(gaussian_log_prob(x_next.detach(), mean.detach(), std, reduce))
        x = x_next
        out.x0 = x0
    out.x = x
    return out


@dataclass
class ConsistencyChainOut:
    """Result of a consistency chain: last output and the summed step divergences to the reference."""

    x0: Tensor  # output of the last step
    div: Tensor  # (B,) sum over regularized steps of the chosen divergence
    d2_steps: list[Tensor] = field(default_factory=list)
    kl: Tensor | None = None  # (B,) the summed KL of the same steps (for reporting)


# sCM multistep sampling (Lu & Song 2024, Alg. 1), reparameterized, with ROCM's per-step f-divergence
def consistency_chain(denoise: DenoiseFn, noise: Tensor, times: Sequence[float], schedule,
                      noises: Sequence[Tensor] | None = None, ref_denoise: DenoiseFn | None = None,
                      divergence: str = "fkl", final_logsnr: float | None = 2.0,
                      ref_grad: bool = True) -> ConsistencyChainOut:
    """Few-step consistency chain (reparameterized) with the per-step f-divergence to a reference.

    x_0 = sigma_{t_0} noise, f_i = denoise(x_i, t_i), x_{i+1} = alpha_{t_{i+1}} f_i + sigma_{t_{i+1}} noises[i]
    (the semantics of `sample_consistency`). Step i is compared with the reference step at the same state by
    `diffdiv.methods.rocm.gaussian_step_divergence`; the last step after re-noising to log-SNR
    `final_logsnr` (skipped when None). ref_grad: the reference is evaluated with gradients w.r.t. its input
    state (its weights stay frozen), so the divergence's gradient includes how the visited states move.
    """
    n = noise.shape[0]
    view = (-1,) + (1,) * (noise.ndim - 1)
    t = torch.full((n,), float(times[0]), device=noise.device)
    _, s = schedule.alpha_sigma(t)
    x = s.view(view).to(noise.dtype) * noise
    div = torch.zeros(n, device=noise.device)
    kl = torch.zeros(n, device=noise.device)
    d2s: list[Tensor] = []
    f = x
    for i in range(len(times)):
        t = torch.full((n,), float(times[i]), device=noise.device)
        f = denoise(x, t)
        last = i == len(times) - 1
        if ref_denoise is not None and not (last and final_logsnr is None):
            with torch.set_grad_enabled(ref_grad and torch.is_grad_enabled()):
                f_ref = ref_denoise(x if ref_grad else x.detach(), t)
            if last:
                lam = torch.tensor(float(final_logsnr), device=noise.device)
            else:
                lam = schedule.logsnr(torch.full((n,), float(times[i + 1]), device=noise.device)).float()
            d2 = step_sq_distance(f, f_ref.detach() if not ref_grad else f_ref, lam)
            d2s.append(d2)
            div = div + gaussian_step_divergence(divergence, d2)
            kl = kl + kl_equal_var(d2.detach())
        if not last:
            tn = torch.full((n,), float(times[i + 1]), device=noise.device)
            a_n, s_n = schedule.alpha_sigma(tn)
            if noises is None:
                raise ValueError("a multi-step consistency chain needs noises")
            x = a_n.view(view).to(f.dtype) * f + s_n.view(view).to(f.dtype) * noises[i]
    return ConsistencyChainOut(x0=f, div=div, d2_steps=d2s, kl=kl)


# rCM's training-time simulation of few-step student samples (rCM, Zheng et al. 2025: DMD inputs at random times)
@torch.no_grad()
def rcm_simulate(denoise: DenoiseFn, x: Tensor, t_max: float, steps: int, times: Callable[[int], Tensor],
                 noises: Callable[[int], Tensor], sigma_data: float) -> tuple[Tensor, Tensor]:
    """Input (x, t) of the last of `steps` TrigFlow consistency steps started from x (= sd sin(t_max) z) at t_max.

    Between steps: x0 = denoise(x, t), t <- min(times(i), t), x = cos t x0 + sin t sd noises(i), with times(i)
    the (B,) time of re-noise i and noises(i) N(0, I) noise, drawn in the order times(0), noises(0), times(1), ...
    """
    t = torch.full((x.shape[0],), float(t_max), device=x.device)
    view = (-1,) + (1,) * (x.ndim - 1)
    for i in range(steps - 1):
        x0 = denoise(x, t)
        t = torch.minimum(times(i), t)
        z = noises(i).to(x0.dtype) * sigma_data
        x = torch.cos(t).to(x0.dtype).view(view) * x0 + torch.sin(t).to(x0.dtype).view(view) * z
    return x, t


__all__ = ["SAMPLERS", "make_scheduler", "sample", "sample_diffusion", "sample_consistency", "default_times",
           "VPSchedule", "ChainOut", "ConsistencyChainOut", "correlated_frame_noise", "consistency_chain", "ddim_chain",
           "ddim_times", "scheduler_times", "rcm_simulate"]
