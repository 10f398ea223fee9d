"""Small networks as diffusers models (save_pretrained / from_pretrained work unchanged)."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from diffdiv.models.base import Denoiser
from diffdiv.param import Schedule, VPSchedule


def fourier_embedding(x: Tensor, dim: int, max_period: float = 100.0) -> Tensor:
    """Sinusoidal features of a scalar per sample: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = x.float()[:, None] * freqs[None] * 2 * math.pi
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class MLPNet(ModelMixin, ConfigMixin):
    """MLP on flattened inputs with a noise-level embedding and optional class labels."""

    @register_to_config
    def __init__(self, in_dim: int = 2, hidden: int = 128, depth: int = 3, emb_dim: int = 64,
                 num_classes: int = 0, out_dim: int | None = None):
        super().__init__()
        out_dim = out_dim or in_dim
        self.emb = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(depth)])
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor, noise_cond: Tensor, class_labels: Tensor | None = None,
                return_features: bool = False):
        shape = x.shape
        h = self.inp(x.reshape(shape[0], -1))
        e = self.emb(fourier_embedding(noise_cond, self.config.emb_dim))
        if self.class_emb is not None:
            lab = torch.zeros(shape[0], dtype=torch.long, device=x.device) if class_labels is None else class_labels
            e = e + self.class_emb(lab.clamp(min=-1) + 1)  # index 0 = unconditional
        feats = []
        for blk, norm in zip(self.blocks, self.norms):
            h = h + blk(norm(h) + e)
            feats.append(h)
        out = self.out(h)
        out = out.reshape(shape) if out.shape[1] == math.prod(shape[1:]) else out
        return (out, feats) if return_features else out


def edm_precond(a: Tensor, s: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    # EDM preconditioning (Karras et al. 2022, Table 1) written for x_t = a x0 + s eps
    var = a**2 * sigma_data**2 + s**2
    c_skip = a * sigma_data**2 / var
    c_out = s * sigma_data / var.sqrt()
    c_in = 1.0 / var.sqrt()
    return c_skip, c_out, c_in


class NetDenoiser(Denoiser):
    """Denoiser around an `MLPNet` with EDM-style preconditioning; noise level fed as log-SNR."""

    def __init__(self, net: MLPNet, schedule: Schedule | None = None, sigma_data: float = 1.0,
                 sample_shape: tuple[int, ...] | None = None, guidance_scale: float = 1.0):
        super().__init__()
        self.net = net
        self.schedule = schedule or VPSchedule.linear()
        self.sigma_data = float(sigma_data)
        self.sample_shape = tuple(sample_shape) if sample_shape else (net.config.in_dim,)
        self.guidance_scale = guidance_scale
        self.conditional = net.config.num_classes > 0

    def _denoise(self, x_t: Tensor, t: Tensor, cond=None, return_features: bool = False):
        a, s = self.schedule.alpha_sigma(t)
        a, s = a.float(), s.float()
        c_skip, c_out, c_in = edm_precond(a, s, self.sigma_data)
        view = (-1,) + (1,) * (x_t.ndim - 1)
        noise_cond = -0.125 * 2.0 * (torch.log(a) - torch.log(s))  # -logsnr/8, O(1) range
        res = self.net(c_in.view(view) * x_t.float(), noise_cond, class_labels=cond,
                       return_features=return_features)
        F, feats = res if return_features else (res, None)
        x0 = (c_skip.view(view) * x_t.float() + c_out.view(view) * F).to(x_t.dtype)
        return (x0, feats) if return_features else x0

    @property
    def trainable(self) -> nn.Module:
        """The network training updates."""
        return self.net

    def features(self, x_t: Tensor, t: Tensor, cond=None) -> tuple[Tensor, list[Tensor]]:
        """x0 and the hidden activations (for discriminator heads)."""
        return self._denoise(x_t, self._as_time(t, x_t), cond, return_features=True)

    def uncond_like(self, cond):
        return torch.full_like(torch.as_tensor(cond), -1)

    def cat_cond(self, a, b):
        return torch.cat([torch.as_tensor(a), torch.as_tensor(b)])


class OneStepGenerator(nn.Module):
    """One-step student x0 = G(z) = D(sigma_init z, t_init) (SiD/DMD-style init from a teacher)."""

    def __init__(self, denoiser: Denoiser, t_init: float | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.t_init = float(denoiser.schedule.t_max if t_init is None else t_init)

    def input_scale(self) -> float:
        a, s = self.denoiser.schedule.alpha_sigma(torch.tensor([self.t_init], dtype=torch.float64))
        return float(torch.sqrt(a**2 + s**2))  # x_t = a x0 + s z has this std for unit-variance data

    def forward(self, z: Tensor, cond=None) -> Tensor:
        t = torch.full((z.shape[0],), self.t_init, device=z.device)
        _, s = self.denoiser.schedule.alpha_sigma(t)
        view = (-1,) + (1,) * (z.ndim - 1)
        return self.denoiser(s.view(view).to(z.dtype) * z, t, cond)


class AffineGenerator(nn.Module):
    """x0 = A z + b: its output law is exactly Gaussian (for exactness tests)."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__()
        self.A = nn.Parameter(torch.eye(dim) * scale)
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, z: Tensor, cond=None) -> Tensor:
        return z @ self.A.T + self.b
