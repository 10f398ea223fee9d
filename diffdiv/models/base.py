"""The one interface every model meets at: `x0 = denoise(x_t, t, cond)` plus its schedule."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from diffdiv.param import Schedule, eps_from_x0, score_from_x0


class Denoiser(nn.Module):
    """Base denoiser: subclasses implement `_denoise(x_t, t, cond)` (no guidance).

    `forward` applies classifier-free guidance when `guidance_scale != 1` and a condition is given;
    scores and eps are derived from x0, never stored twice.
    """

    schedule: Schedule
    sample_shape: tuple[int, ...]
    guidance_scale: float = 1.0
    conditional: bool = False

    def _denoise(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        raise NotImplementedError

    # --- classifier-free guidance plumbing; conditional subclasses override these two ---
    def uncond_like(self, cond: Any) -> Any:
        """The unconditional (null) condition matching `cond`'s batch."""
        raise NotImplementedError

    def cat_cond(self, a: Any, b: Any) -> Any:
        """Concatenate two conditions along the batch."""
        raise NotImplementedError

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None, guidance_scale: float | None = None) -> Tensor:
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        t = self._as_time(t, x_t)
        if cond is None or not self.conditional or w == 1.0:
            return self._denoise(x_t, t, cond)
        both = self._denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), self.cat_cond(self.uncond_like(cond), cond))
        x0_u, x0_c = both.chunk(2)
        return cfg_combine(x0_u, x0_c, w)

    def denoise(self, x_t: Tensor, t: Tensor, cond: Any = None, guidance_scale: float | None = None) -> Tensor:
        return self(x_t, t, cond, guidance_scale)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.schedule.alpha_sigma(t)

    def score(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        a, s = self.alpha_sigma(self._as_time(t, x_t))
        return score_from_x0(x_t, self(x_t, t, cond), a, s)

    def eps(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        a, s = self.alpha_sigma(self._as_time(t, x_t))
        return eps_from_x0(x_t, self(x_t, t, cond), a, s)

    @staticmethod
    def _as_time(t: Tensor | float, x_t: Tensor) -> Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor(float(t), device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return t.to(device=x_t.device, dtype=torch.promote_types(t.dtype, torch.float32))

    @property
    def trainable(self) -> nn.Module:
        """The network training updates (subclasses with frozen parts narrow this)."""
        return self

    def clone(self) -> Denoiser:
        """Copy with independent trainable weights (students / fake scores start from a teacher this way).

        Subclasses with frozen shared parts (text encoders, VAE) keep them shared.
        """
        return copy.deepcopy(self)

    def encode_prompts(self, prompts: list[str]) -> Any:
        """Text prompts -> condition (text-conditioned models only)."""
        raise TypeError(f"{type(self).__name__} is not text-conditioned")


def cfg_combine(x0_uncond: Tensor, x0_cond: Tensor, w: float) -> Tensor:
    # classifier-free guidance (Ho & Salimans 2022), linear in x0 as in eps for a shared x_t
    return x0_uncond + w * (x0_cond - x0_uncond)
