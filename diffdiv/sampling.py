"""Samplers: teacher multi-step (diffusers schedulers), one-step students, consistency few-step."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
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

from diffdiv.config import ConfigError
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
    from diffdiv.models.loading import _scheduler_for

    return dict(_scheduler_for(denoiser.schedule).config)


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


__all__ = ["SAMPLERS", "make_scheduler", "sample", "sample_diffusion", "sample_consistency", "default_times",
           "VPSchedule"]
