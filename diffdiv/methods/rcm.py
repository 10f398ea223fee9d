"""sCM / rCM math: TrigFlow time sampling, the continuous-time consistency tangent and loss.

sCM: Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv 2410.11081 (Algorithm 1, sections 4-5). rCM: Zheng et al., "Large Scale Diffusion Distillation
via Score-Regularized Continuous-Time Consistency", arXiv 2510.08431.

TrigFlow student `f(x_t, t) = cos t x_t - sin t sd F(x_t, t)`; teacher PF-ODE tangent
`dx_t/dt = sd F_teacher(x_t, t)`; `jvp_F` = JVP of F along `(cos t sin t dx_t/dt, cos t sin t)`, i.e.
`cos t sin t dF/dt`. With warm-up ratio r = 1 the tangent is `g = cos t df/dt` (the time derivative of
the consistency function along the teacher's ODE, weighted by cos t), and the gradient of
`||F - sg(F) - g||^2` is `-2 dF/dtheta^T g`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from diffdiv.param import bcast


def trigflow_time_from_normal(u: Tensor, p_mean: float, p_std: float, sigma_data: float) -> Tensor:
    # sCM section 4.2: tau ~ N(P_mean, P_std^2), t = atan(exp(tau) / sd)
    return torch.atan(torch.exp(p_mean + p_std * u) / sigma_data)


def shifted_uniform_time(u: Tensor, shift: float, sigma_data: float) -> Tensor:
    # rCM critic/DMD times: rectified-flow sigma s = shift u / (1 + (shift - 1) u), then the TrigFlow
    # time with the same SNR: tan t sd = s / (1 - s)
    s = shift * u / (1.0 + (shift - 1.0) * u)
    return torch.atan(s / ((1.0 - s).clamp_min(1e-12) * sigma_data))


def tangent_warmup(step: int, warmup_steps: int) -> float:
    # sCM section 4.2 "tangent warmup": r = min(1, step / H)
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def scm_tangent(F_minus: Tensor, jvp_F: Tensor, dxt_dt: Tensor, x_t: Tensor, t: Tensor, sigma_data: float,
                r: float = 1.0, form: Literal["scm", "rcm"] = "scm") -> Tensor:
    """The sCM target direction g (before normalization), per element, fp32/fp64 as given.

    scm (sCM Alg. 1): g = -cos^2 t (sd F- - dx/dt) - r (cos t sin t x_t + sd jvp_F).
    rcm (rCM code's warm-up): the first factor cos^2 t is cos t sqrt(1 - r^2 sin^2 t) (equal at r = 1;
    at r = 0 it regresses F onto the teacher with weight cos t).
    """
    c, s = bcast(torch.cos(t), x_t), bcast(torch.sin(t), x_t)
    if form == "scm":
        first = c * c
    elif form == "rcm":
        first = c * torch.sqrt((1.0 - (r * s) ** 2).clamp_min(0.0))
    else:
        raise ValueError(f"form must be 'scm' or 'rcm', got {form!r}")
    return -first * (sigma_data * F_minus - dxt_dt) - r * (c * s * x_t + sigma_data * jvp_F)


def normalize_tangent(g: Tensor, c: float = 0.1) -> Tensor:
    # sCM section 4.2 "tangent normalization": g <- g / (||g|| + c), per sample
    if c is None or c < 0:
        return g
    norm = g.flatten(1).norm(dim=1)
    return g / bcast(norm + c, g)


def scm_loss(F_theta: Tensor, F_minus: Tensor, g: Tensor, logvar: Tensor | None = None) -> Tensor:
    """Per-sample sCM loss: sum ||F - sg(F) - g||^2; with adaptive weighting (sCM eq. 9)
    exp(-logvar) ||.||^2 / D + logvar."""
    dt = torch.promote_types(F_theta.dtype, torch.float32)
    err = (F_theta.to(dt) - F_minus.to(dt) - g.to(dt)).flatten(1)
    per = (err * err).sum(1)
    if logvar is None:
        return per
    lv = logvar.to(dt).reshape(-1)
    return torch.exp(-lv) * per / err.shape[1] + lv


class AdaptiveWeight(nn.Module):
    """Learned log-variance u(t) for sCM's adaptive loss weighting: Fourier features of log(tan t)."""

    def __init__(self, dim: int = 64, max_period: float = 100.0):
        super().__init__()
        self.dim = int(dim)
        self.max_period = float(max_period)
        self.linear = nn.Linear(self.dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        c = torch.log(torch.tan(t.float())) / 4.0
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        ang = c[:, None] * freqs[None] * 2 * math.pi
        return self.linear(torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1))[:, 0]
