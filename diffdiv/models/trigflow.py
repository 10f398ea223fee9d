"""TrigFlow view of any Denoiser (sCM, arXiv 2410.11081 section 2; docs/math.md#trigflow).

TrigFlow: `x_t = cos(t) x0 + sin(t) z`, `z ~ N(0, sd^2 I)`, `t in (0, pi/2)`. A teacher with schedule
(alpha, sigma) at its own time tau has the same signal-to-noise ratio when `tan(t) sd = sigma/alpha`,
and its input is the TrigFlow input rescaled by `sqrt(alpha^2 + sigma^2/sd^2)`. `TrigFlowView` wraps
the Denoiser (VP / EDM / rectified-flow / diffusers UNet or transformer) and returns the TrigFlow
network output `F` with `x0 = cos t x_t - sin t sd F`. The wrapped model stays the teacher's own
diffusers network, so a student trained through the view saves in the teacher's diffusers format.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diffdiv.models.base import Denoiser
from diffdiv.param import (
    Schedule,
    TrigFlowSchedule,
    bcast,
    trigflow_F_from_x0,
    trigflow_input_scale,
    x0_from_trigflow_F,
)


def _up(x: Tensor) -> Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def trigflow_logsnr(t: Tensor, sigma_data: float) -> Tensor:
    # alpha = cos t, sigma = sd sin t  =>  logSNR = 2 (log cos t - log(sd sin t))
    return 2.0 * (torch.log(torch.cos(t)) - torch.log(sigma_data * torch.sin(t)))


def trigflow_time_from_sigma(sigma_over_alpha: Tensor | float, sigma_data: float) -> Tensor:
    # tan t sd = sigma / alpha  (EDM sigma <-> TrigFlow time, sCM eq. 4 with sd)
    return torch.atan(torch.as_tensor(sigma_over_alpha, dtype=torch.float64) / sigma_data)


def teacher_time_and_scale(schedule: Schedule, t: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """TrigFlow time t -> (teacher time tau, input scale k) with x_teacher = k x_trig (same log-SNR)."""
    tau = schedule.t_from_logsnr(trigflow_logsnr(t, sigma_data))
    a, s = schedule.alpha_sigma(tau)
    return tau.to(t.dtype), trigflow_input_scale(a, s, sigma_data).to(t.dtype)


def trigflow_range(schedule: Schedule, sigma_data: float, sigma_max: float | None = None,
                   sigma_min: float | None = None) -> tuple[float, float]:
    """TrigFlow time range covered by a schedule's own range, optionally narrowed to sigma/alpha in
    [sigma_min, sigma_max] (EDM units)."""
    ends = torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)
    lam = schedule.logsnr(ends)
    ratio = torch.exp(-0.5 * lam)  # sigma / alpha at the two ends
    lo, hi = float(ratio.min()), float(ratio.max())
    if sigma_max is not None:
        hi = min(hi, float(sigma_max))
    if sigma_min is not None:
        lo = max(lo, float(sigma_min))
    lo = max(lo, 1e-6)
    t_lo = float(trigflow_time_from_sigma(lo, sigma_data))
    t_hi = min(float(trigflow_time_from_sigma(hi, sigma_data)), math.pi / 2 - 1e-6)
    return t_lo, t_hi


class TrigFlowView(nn.Module):
    """F(x_t, t) and x0(x_t, t) of a Denoiser in TrigFlow coordinates.

    `net` (optional) replaces the wrapped denoiser at call time, e.g. its DDP-wrapped copy inside a
    training phase; it must accept `(x_t, tau, cond, guidance_scale)` like `Denoiser.forward`.
    Time maps and rescalings run in fp32 (fp64 where the schedule tables do), outside autocast.
    """

    def __init__(self, denoiser: Denoiser, sigma_data: float, sigma_max: float | None = None,
                 sigma_min: float | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_data = float(sigma_data)
        t_min, t_max = trigflow_range(denoiser.schedule, self.sigma_data, sigma_max, sigma_min)
        self.schedule = TrigFlowSchedule(self.sigma_data, t_min=t_min, t_max=t_max)

    @property
    def t_min(self) -> float:
        return self.schedule.t_min

    @property
    def t_max(self) -> float:
        return self.schedule.t_max

    def teacher_time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(tau, k): the wrapped model's time and input scale at TrigFlow time t."""
        with torch.autocast(device_type=t.device.type, enabled=False):
            return teacher_time_and_scale(self.denoiser.schedule, _up(t), self.sigma_data)

    def to_teacher(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """TrigFlow (x_t, t) -> the wrapped model's (x_tau, tau)."""
        tau, k = self.teacher_time(t)
        return bcast(k, x) * x, tau

    def x0(self, x: Tensor, t: Tensor, cond: Any = None, guidance_scale: float | None = None,
           net: Callable | None = None) -> Tensor:
        """Denoised x0 at TrigFlow (x_t, t): the wrapped model's x0 at the same SNR (CFG inside)."""
        t = Denoiser._as_time(t, x)
        x_tau, tau = self.to_teacher(_up(x), t)
        fn = net if net is not None else self.denoiser
        return _up(fn(x_tau, tau, cond, guidance_scale))

    def forward(self, x: Tensor, t: Tensor, cond: Any = None, guidance_scale: float | None = None,
                net: Callable | None = None) -> Tensor:
        """TrigFlow network output F = (cos t x_t - x0) / (sd sin t) (sCM eq. 6)."""
        t = Denoiser._as_time(t, x)
        x0 = self.x0(x, t, cond, guidance_scale, net)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return trigflow_F_from_x0(_up(x), x0, _up(t), self.sigma_data)

    def consistency(self, x: Tensor, t: Tensor, F: Tensor) -> Tensor:
        """f(x_t, t) = cos t x_t - sin t sd F (sCM eq. 7)."""
        return x0_from_trigflow_F(_up(x), F, _up(Denoiser._as_time(t, x)), self.sigma_data)

    def model_times(self, t_trig: list[float] | Tensor) -> list[float]:
        """TrigFlow times -> the wrapped model's own times (for `sample_consistency` / diffdiv.json)."""
        t = torch.as_tensor(t_trig, dtype=torch.float64).reshape(-1)
        tau = self.denoiser.schedule.t_from_logsnr(trigflow_logsnr(t, self.sigma_data))
        return [float(v) for v in tau]
