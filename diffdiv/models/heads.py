"""Discriminator heads on a denoiser's internal features of noised samples (f-distill, DMD2 style).

A head maps one feature tensor to logits: vector features (B, C) through a small MLP -> (B, 1); feature maps
(B, C, h, w) through conv -> GroupNorm -> SiLU -> 1x1 conv -> (B, 1, h', w') patch logits. `DiscriminatorHeads`
holds one head per feature tensor and returns the logits of all heads averaged per sample, (B,); at the
optimum of the logistic loss that logit is log p_t/q_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _groups(c: int, want: int = 8) -> int:
    g = min(want, c)
    while c % g:
        g -= 1
    return g


class VectorHead(nn.Module):
    """(B, C) -> (B, 1) logits."""

    def __init__(self, channels: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f.reshape(f.shape[0], -1).float())


class ConvHead(nn.Module):
    """(B, C, h, w) -> (B, 1, h', w') patch logits (stride 2 when the map is at least 4x4)."""

    def __init__(self, channels: int, hidden: int = 128, spatial: int = 8):
        super().__init__()
        stride = 2 if spatial >= 4 else 1
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 4 if stride == 2 else 3, stride=stride, padding=1),
            nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f.float())


def logsnr_features(logsnr: Tensor, n: int = 8) -> Tensor:
    """Fourier features of the log-SNR per sample: (B,) -> (B, n)."""
    freqs = torch.arange(1, n // 2 + 1, device=logsnr.device, dtype=torch.float32) / 8.0
    ang = logsnr.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], 1)


class InputHead(nn.Module):
    """Head on the noised sample itself and its log-SNR: vectors through an MLP, images through a ConvHead."""

    def __init__(self, sample_shape: Sequence[int], hidden: int = 128, n_freq: int = 8):
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        self.n_freq = n_freq
        if len(self.sample_shape) == 3:
            c, h, w = self.sample_shape
            self.head: nn.Module = ConvHead(c + n_freq, hidden, min(h, w))
        else:
            self.head = VectorHead(int(torch.tensor(self.sample_shape).prod()) + n_freq, hidden)

    def forward(self, x_t: Tensor, logsnr: Tensor) -> Tensor:
        e = logsnr_features(logsnr, self.n_freq)
        if len(self.sample_shape) == 3:
            e = e[:, :, None, None].expand(-1, -1, *x_t.shape[-2:])
            return self.head(torch.cat([x_t.float(), e], 1))
        return self.head(torch.cat([x_t.reshape(x_t.shape[0], -1).float(), e], 1))


class DiscriminatorHeads(nn.Module):
    """One head per feature tensor (+ optionally one on the noised input); forward -> per-sample mean logit (B,)."""

    def __init__(self, feature_shapes: Sequence[Sequence[int]], hidden: int = 128,
                 input_shape: Sequence[int] | None = None):
        super().__init__()
        if not feature_shapes and input_shape is None:
            raise ValueError("no features to put discriminator heads on")
        heads = []
        for shp in feature_shapes:
            shp = tuple(shp)
            if len(shp) == 1:
                heads.append(VectorHead(shp[0], hidden))
            elif len(shp) == 3:
                heads.append(ConvHead(shp[0], hidden, min(shp[1], shp[2])))
            else:
                raise ValueError(f"unsupported feature shape {shp} (need (C,) or (C, h, w))")
        self.heads = nn.ModuleList(heads)
        self.feature_shapes = [tuple(s) for s in feature_shapes]
        self.input_head = InputHead(input_shape, hidden) if input_shape is not None else None

    def forward(self, features: Sequence[Tensor], x_t: Tensor | None = None, logsnr: Tensor | None = None) -> Tensor:
        """Mean logit over heads; x_t and its log-SNR are needed when there is an input head."""
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature tensors, got {len(features)}")
        per_head = [h(f).reshape(f.shape[0], -1).mean(1) for h, f in zip(self.heads, features)]
        if self.input_head is not None:
            if x_t is None or logsnr is None:
                raise ValueError("this discriminator has an input head: pass x_t and logsnr")
            per_head.append(self.input_head(x_t, logsnr).reshape(x_t.shape[0], -1).mean(1))
        return torch.stack(per_head, 1).mean(1)


def feature_shapes(features: Sequence[Tensor]) -> list[tuple[int, ...]]:
    """Per-sample shapes of a list of feature tensors."""
    return [tuple(f.shape[1:]) for f in features]
