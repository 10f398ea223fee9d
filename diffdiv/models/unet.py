"""Denoiser around a diffusers `UNet2DModel` with a diffusers noise scheduler."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from diffdiv.models.base import Denoiser
from diffdiv.param import Schedule, VPSchedule, x0_from_prediction


def schedule_from_scheduler(scheduler: Any) -> Schedule:
    """A diffusers scheduler -> our continuous-time Schedule."""
    from diffdiv.param import FlowSchedule

    name = type(scheduler).__name__
    if "FlowMatch" in name or getattr(scheduler.config, "use_flow_sigmas", False):
        return FlowSchedule(time_scale=float(getattr(scheduler.config, "num_train_timesteps", 1000)))
    if hasattr(scheduler, "alphas_cumprod"):
        return VPSchedule.from_scheduler(scheduler)
    raise ValueError(f"unsupported scheduler {name}")


def prediction_type_of(scheduler: Any) -> str:
    if "FlowMatch" in type(scheduler).__name__:
        return "flow"
    return getattr(scheduler.config, "prediction_type", "epsilon")


class UNetDenoiser(Denoiser):
    """Unconditional (or class-conditional) `UNet2DModel`; prediction type from the scheduler."""

    def __init__(self, unet: UNet2DModel, scheduler: Any, guidance_scale: float = 1.0):
        super().__init__()
        self.unet = unet
        self.scheduler_config = dict(scheduler.config)
        self.scheduler_cls = type(scheduler)
        self.schedule = schedule_from_scheduler(scheduler)
        self.prediction_type = prediction_type_of(scheduler)
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.sample_shape = (cfg.in_channels, size, size)
        self.guidance_scale = guidance_scale
        self.conditional = cfg.num_class_embeds is not None

    def _denoise(self, x_t: Tensor, t: Tensor, cond=None, return_features: bool = False):
        a, s = self.schedule.alpha_sigma(t)
        feats: list[Tensor] = []
        hook = None
        if return_features:
            hook = self.unet.mid_block.register_forward_hook(lambda m, i, o: feats.append(o))
        try:
            labels = None
            if self.conditional:
                labels = torch.zeros(x_t.shape[0], dtype=torch.long, device=x_t.device) if cond is None else cond
            pred = self.unet(x_t.to(self.unet.dtype), self.schedule.model_time(t).float(), class_labels=labels).sample
        finally:
            if hook is not None:
                hook.remove()
        x0 = x0_from_prediction(pred.float(), self.prediction_type, x_t.float(), a.float(), s.float()).to(x_t.dtype)
        return (x0, feats) if return_features else x0

    @property
    def trainable(self) -> nn.Module:
        """The network training updates."""
        return self.unet

    def features(self, x_t: Tensor, t: Tensor, cond=None) -> tuple[Tensor, list[Tensor]]:
        """x0 and the UNet mid-block activations (for discriminator heads)."""
        return self._denoise(x_t, self._as_time(t, x_t), cond, return_features=True)

    def make_scheduler(self, cls: Any = None) -> Any:
        """A fresh diffusers scheduler (any compatible class) with this model's training config."""
        return (cls or self.scheduler_cls).from_config(self.scheduler_config)
