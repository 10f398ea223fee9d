"""Noise parameterizations (VP, EDM, rectified flow, TrigFlow) and conversions between predictions.

Every schedule maps a model's own time variable `t` to `(alpha_t, sigma_t)` with
`x_t = alpha_t * x0 + sigma_t * eps`, `eps ~ N(0, I)`. Predictions are derived from the denoiser
output `x0` (docs/math.md#parameterizations) by the pure functions below.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow", "trigflow"]


def bcast(c: Tensor | float, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient (B,) so it broadcasts against (B, ...)."""
    if not torch.is_tensor(c):
        return torch.as_tensor(c, dtype=like.dtype, device=like.device)
    if c.ndim == 0:
        return c.to(like.dtype)
    return c.to(like.dtype).reshape(c.shape + (1,) * (like.ndim - c.ndim))


# ----------------------------------------------------------------------------------------------
# Conversions. a = alpha_t, s = sigma_t, broadcast per sample.
# ----------------------------------------------------------------------------------------------


def eps_from_x0(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    # eps = (x_t - alpha x0) / sigma
    return (x_t - bcast(a, x_t) * x0) / bcast(s, x_t)


def x0_from_eps(x_t: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    # x0 = (x_t - sigma eps) / alpha
    return (x_t - bcast(s, x_t) * eps) / bcast(a, x_t)


def v_from_x0(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    # v = alpha eps - sigma x0 (Salimans & Ho 2022)
    return bcast(a, x_t) * eps_from_x0(x_t, x0, a, s) - bcast(s, x_t) * x0


def x0_from_v(x_t: Tensor, v: Tensor, a: Tensor, s: Tensor) -> Tensor:
    # x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)   (= alpha x_t - sigma v when VP)
    a_, s_ = bcast(a, x_t), bcast(s, x_t)
    return (a_ * x_t - s_ * v) / (a_**2 + s_**2)


def score_from_x0(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    # Tweedie: grad log p_t(x_t) = (alpha x0 - x_t) / sigma^2
    return (bcast(a, x_t) * x0 - x_t) / bcast(s, x_t) ** 2


def x0_from_score(x_t: Tensor, score: Tensor, a: Tensor, s: Tensor) -> Tensor:
    # x0 = (x_t + sigma^2 score) / alpha
    return (x_t + bcast(s, x_t) ** 2 * score) / bcast(a, x_t)


def flow_from_x0(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    # rectified-flow velocity u = eps - x0 (alpha = 1 - t, sigma = t)
    return eps_from_x0(x_t, x0, a, s) - x0


def x0_from_flow(x_t: Tensor, u: Tensor, a: Tensor, s: Tensor) -> Tensor:
    # x_t = a x0 + s (u + x0)  =>  x0 = (x_t - s u) / (a + s)
    a_, s_ = bcast(a, x_t), bcast(s, x_t)
    return (x_t - s_ * u) / (a_ + s_)


def trigflow_F_from_x0(x_t: Tensor, x0: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    # sCM: D(x_t, t) = cos t x_t - sin t sd F  =>  F = (cos t x_t - x0) / (sd sin t)
    c, s = bcast(torch.cos(t), x_t), bcast(torch.sin(t), x_t)
    return (c * x_t - x0) / (sigma_data * s)


def x0_from_trigflow_F(x_t: Tensor, F: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    # sCM consistency/denoiser parameterization: f(x_t, t) = cos t x_t - sin t sd F
    c, s = bcast(torch.cos(t), x_t), bcast(torch.sin(t), x_t)
    return c * x_t - s * sigma_data * F


def x0_from_prediction(
    pred: Tensor, kind: str, x_t: Tensor, a: Tensor, s: Tensor
) -> Tensor:
    """Model output of a given prediction type -> x0."""
    if kind == "epsilon":
        return x0_from_eps(x_t, pred, a, s)
    if kind == "v_prediction":
        return x0_from_v(x_t, pred, a, s)
    if kind == "sample":
        return pred
    if kind == "flow":
        return x0_from_flow(x_t, pred, a, s)
    raise ValueError(f"unknown prediction type {kind!r}")


def prediction_from_x0(
    x0: Tensor, kind: str, x_t: Tensor, a: Tensor, s: Tensor
) -> Tensor:
    """x0 -> model output of a given prediction type."""
    if kind == "epsilon":
        return eps_from_x0(x_t, x0, a, s)
    if kind == "v_prediction":
        return v_from_x0(x_t, x0, a, s)
    if kind == "sample":
        return x0
    if kind == "flow":
        return flow_from_x0(x_t, x0, a, s)
    raise ValueError(f"unknown prediction type {kind!r}")


# ----------------------------------------------------------------------------------------------
# TrigFlow mapping (sCM, arXiv 2410.11081, section 2 / appendix)
# ----------------------------------------------------------------------------------------------


def trigflow_time(a: Tensor, s: Tensor, sigma_data: float) -> Tensor:
    # same SNR: tan(t) sd = sigma/alpha  =>  t = atan2(sigma, alpha sd)
    return torch.atan2(s, a * sigma_data)


def trigflow_input_scale(a: Tensor, s: Tensor, sigma_data: float) -> Tensor:
    # x_teacher = x_trig * sqrt(alpha^2 + sigma^2 / sd^2)
    return torch.sqrt(a**2 + (s / sigma_data) ** 2)


def trigflow_alpha_sigma(t: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    # x_t = cos t x0 + sin t z, z ~ N(0, sd^2)  =>  alpha = cos t, sigma = sd sin t
    return torch.cos(t), sigma_data * torch.sin(t)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


class Schedule(ABC):
    """Maps a model's time variable t to (alpha_t, sigma_t); invertible through log-SNR."""

    t_min: float
    t_max: float

    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]: ...

    @abstractmethod
    def t_from_logsnr(self, logsnr: Tensor) -> Tensor: ...

    def logsnr(self, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t)
        return 2.0 * (torch.log(a) - torch.log(s))

    def model_time(self, t: Tensor) -> Tensor:
        """The time value fed to the network (defaults to t itself)."""
        return t

    def to_dict(self) -> dict:
        raise NotImplementedError

    @staticmethod
    def from_dict(d: dict) -> Schedule:
        kind = d["kind"]
        if kind == "vp":
            return VPSchedule(torch.tensor(d["alphas_cumprod"], dtype=torch.float64))
        if kind == "vp_linear":
            return VPSchedule.linear(d.get("num_train_timesteps", 1000), d["beta_start"], d["beta_end"],
                                     d.get("beta_schedule", "linear"))
        if kind == "edm":
            return EDMSchedule(d.get("sigma_min", 0.002), d.get("sigma_max", 80.0))
        if kind == "flow":
            return FlowSchedule(d.get("t_min", 1e-4), d.get("t_max", 1.0 - 1e-4), d.get("time_scale", 1000.0))
        if kind == "trigflow":
            return TrigFlowSchedule(d.get("sigma_data", 0.5))
        raise ValueError(f"unknown schedule kind {kind!r}")


class VPSchedule(Schedule):
    """Variance preserving, from a diffusers `alphas_cumprod` table; t is a continuous timestep.

    Log-SNR is interpolated linearly between integer timesteps, so t -> alpha,sigma and its inverse
    agree exactly and integer t reproduces diffusers' table.
    """

    def __init__(self, alphas_cumprod: Tensor):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        self.alphas_cumprod = acp
        self.table = torch.log(acp) - torch.log1p(-acp)  # log-SNR, decreasing in t
        self.t_min = 0.0
        self.t_max = float(len(acp) - 1)
        self.num_train_timesteps = len(acp)
        self._beta_cfg: dict | None = None

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               beta_schedule: str = "linear") -> VPSchedule:
        from diffusers import DDPMScheduler

        sch = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                            beta_end=beta_end, beta_schedule=beta_schedule)
        out = cls(sch.alphas_cumprod)
        out._beta_cfg = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                             beta_end=beta_end, beta_schedule=beta_schedule)
        return out

    @classmethod
    def from_scheduler(cls, scheduler) -> VPSchedule:
        return cls(scheduler.alphas_cumprod)

    def _lerp_table(self, t: Tensor) -> Tensor:
        tab = self.table.to(t.device)
        tt = t.to(torch.float64).clamp(self.t_min, self.t_max)
        lo = tt.floor().long().clamp(max=len(tab) - 2)
        w = tt - lo
        return tab[lo] * (1 - w) + tab[lo + 1] * w

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lam = self._lerp_table(t)
        dt = t.dtype if t.is_floating_point() else torch.float32
        dt = torch.promote_types(dt, torch.float32)
        a = torch.sqrt(torch.sigmoid(lam)).to(dt)
        s = torch.sqrt(torch.sigmoid(-lam)).to(dt)
        return a, s

    def logsnr(self, t: Tensor) -> Tensor:
        dt = torch.promote_types(t.dtype if t.is_floating_point() else torch.float32, torch.float32)
        return self._lerp_table(t).to(dt)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        tab = self.table.to(logsnr.device)
        lam = logsnr.to(torch.float64).clamp(tab[-1].item(), tab[0].item())
        # table is decreasing: search on the negated (increasing) table
        neg = -tab
        idx = torch.searchsorted(neg, -lam.contiguous()).clamp(1, len(tab) - 1)
        l0, l1 = tab[idx - 1], tab[idx]
        w = (l0 - lam) / (l0 - l1)
        out = (idx - 1).to(torch.float64) + w
        return out.to(torch.promote_types(logsnr.dtype, torch.float32))

    def to_dict(self) -> dict:
        if self._beta_cfg is not None:
            return {"kind": "vp_linear", **self._beta_cfg}
        return {"kind": "vp", "alphas_cumprod": self.alphas_cumprod.tolist()}


class EDMSchedule(Schedule):
    """EDM / variance exploding: alpha = 1, sigma = t."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), t

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        # sigma = exp(-lambda / 2)
        return torch.exp(-0.5 * logsnr)

    def to_dict(self) -> dict:
        return {"kind": "edm", "sigma_min": self.t_min, "sigma_max": self.t_max}


class FlowSchedule(Schedule):
    """Rectified flow: alpha = 1 - t, sigma = t; networks see t * time_scale (diffusers: 1000)."""

    def __init__(self, t_min: float = 1e-4, t_max: float = 1.0 - 1e-4, time_scale: float = 1000.0):
        self.t_min, self.t_max, self.time_scale = float(t_min), float(t_max), float(time_scale)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1.0 - t, t

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        # sigma/alpha = t/(1-t) = exp(-lambda/2)
        return torch.sigmoid(-0.5 * logsnr)

    def model_time(self, t: Tensor) -> Tensor:
        return t * self.time_scale

    def to_dict(self) -> dict:
        return {"kind": "flow", "t_min": self.t_min, "t_max": self.t_max, "time_scale": self.time_scale}


class TrigFlowSchedule(Schedule):
    """TrigFlow: x_t = cos t x0 + sin t z, z ~ N(0, sd^2 I), t in [0, pi/2]."""

    def __init__(self, sigma_data: float = 0.5, t_min: float = 1e-4, t_max: float = math.pi / 2 - 1e-4):
        self.sigma_data = float(sigma_data)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return trigflow_alpha_sigma(t, self.sigma_data)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        # tan t = sigma / (alpha sd) = exp(-lambda/2) / sd
        return torch.atan(torch.exp(-0.5 * logsnr) / self.sigma_data)

    def to_dict(self) -> dict:
        return {"kind": "trigflow", "sigma_data": self.sigma_data}


def t_to_other(t: Tensor, src: Schedule, dst: Schedule) -> Tensor:
    """Time in `src` -> time in `dst` with the same log-SNR."""
    return dst.t_from_logsnr(src.logsnr(t))
