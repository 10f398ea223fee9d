"""Identity-pool reward (IPRO, Shen et al. 2025, arXiv 2510.14255) and feature encoders for it.

IPRO scores a generated video by embedding every frame's face with a face-feature encoder and
comparing it with a *pool* of reference embeddings (faces from the ground-truth video, i.e. several
views of the identity): reward = mean over frames of the best cosine match in the pool.
Here the encoder is any `nn.Module` mapping [-1, 1] images (N, C, H, W) to features (N, D): a CLIP
vision tower (`ClipEmbedder`), the parameter-free `HOGEncoder` below, or a user module (e.g. a face
recognition network). Face detection / cropping, if wanted, belongs inside the encoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from diffdiv.config import ConfigError
from diffdiv.rewards.base import (
    Reward,
    at_least_fp32,
    check_inputs,
    existing_path,
    register_reward,
    resolve_object,
    to_unit,
)
from diffdiv.rewards.clip import ClipEmbedder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def pool_similarity(
    frame_emb: torch.Tensor, pool: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """IPRO pool score: frames (B, F, D), pool (B, P, D) [, mask (B, P)] -> mean_f max_p cos (B,)."""
    dtype = at_least_fp32(torch.empty(0, dtype=torch.promote_types(frame_emb.dtype, pool.dtype))).dtype
    a = F.normalize(frame_emb.to(dtype), dim=-1, eps=1e-8)
    p = F.normalize(pool.to(dtype), dim=-1, eps=1e-8)
    cos = a @ p.transpose(1, 2)  # (B, F, P)
    if mask is not None:
        cos = cos.masked_fill(~mask[:, None, :], float("-inf"))
    return cos.max(dim=-1).values.mean(dim=1)


class IdentityPoolReward(Reward):
    """Mean over frames of the best cosine similarity between a frame's features and a reference pool.

    `pool_embeddings` is (P, D) (one pool for every sample) or (B, P, D) (one pool per sample, with an
    optional boolean `pool_mask` (B, P) for pools of different sizes). A pool can also be passed per
    call: `reward(images, prompts, pool=..., pool_mask=...)`. Differentiable when the encoder is.
    """

    name = "identity_pool"
    differentiable = True

    def __init__(
        self,
        encoder: nn.Module,
        pool_embeddings: torch.Tensor | None = None,
        pool_mask: torch.Tensor | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("pool", None if pool_embeddings is None else pool_embeddings.detach().float())
        self.register_buffer("pool_mask", None if pool_mask is None else pool_mask.bool())
        self.freeze()

    @classmethod
    def from_reference_images(
        cls, encoder: nn.Module, images: torch.Tensor | list[torch.Tensor]
    ) -> IdentityPoolReward:
        """Pool from reference images: (P, C, H, W), (B, P, C, H, W), or a list of (C, H, W) tensors."""
        return cls(encoder, embed_references(encoder, images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features of [-1, 1] images (N, C, H, W) -> (N, D)."""
        return self.encoder(images)

    def forward(
        self,
        images: torch.Tensor,
        prompts: list[str] | None = None,
        pool: torch.Tensor | None = None,
        pool_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images (B, C, H, W) or videos (B, F, C, H, W) -> (B,)."""
        images, _, frames = check_inputs(images, prompts, self.name, False)
        if pool is None:
            pool = self.pool
            pool_mask = self.pool_mask if pool_mask is None else pool_mask
        if pool is None:
            raise ValueError("identity_pool: no reference pool (give pool_embeddings or pool=...)")
        b = images.shape[0]
        video = images if frames is not None else images[:, None]
        emb = self.embed(video.reshape(-1, *video.shape[2:])).reshape(b, video.shape[1], -1)
        pool = pool.to(emb.device)
        if pool.ndim == 2:
            pool = pool[None].expand(b, -1, -1)
        if pool.ndim != 3 or pool.shape[0] != b:
            raise ValueError(f"identity_pool: pool must be (P, D) or ({b}, P, D), got {tuple(pool.shape)}")
        if pool_mask is not None and pool_mask.ndim == 1:
            pool_mask = pool_mask[None].expand(b, -1)
        return pool_similarity(emb, pool, None if pool_mask is None else pool_mask.to(emb.device))


@torch.no_grad()
def embed_references(encoder: nn.Module, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Embed reference images: (P, C, H, W) -> (P, D); (B, P, C, H, W) -> (B, P, D); list -> (P, D)."""
    if isinstance(images, (list, tuple)):
        return at_least_fp32(torch.cat([encoder(x[None]) for x in images]))
    if images.ndim == 5:
        b, p = images.shape[:2]
        return at_least_fp32(encoder(images.reshape(b * p, *images.shape[2:])).reshape(b, p, -1))
    return at_least_fp32(encoder(images))


class HOGEncoder(nn.Module):
    """Differentiable histogram-of-oriented-gradients descriptor (Dalal & Triggs 2005), in torch.

    Grayscale -> resize to `size` x `size` -> central-difference gradients -> unsigned orientation
    soft-binned into `bins` bins (linear interpolation between bin centres), weighted by magnitude ->
    `cell` x `cell` cell histograms -> 2x2-cell block L2 normalization -> flattened.
    If `center` (D,) is given it is subtracted (descriptors are all positive, so centering on a
    reference set's mean makes cosine similarity discriminative). Parameter-free apart from `center`.
    """

    def __init__(self, size: int = 32, cell: int = 4, bins: int = 9, center: torch.Tensor | None = None):
        super().__init__()
        if size % cell:
            raise ValueError(f"size {size} must be a multiple of cell {cell}")
        self.size, self.cell, self.bins = int(size), int(cell), int(bins)
        self.register_buffer("center", None if center is None else center.detach().float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit(at_least_fp32(images)).mean(dim=1, keepdim=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        gx = (x[..., 1:-1, 2:] - x[..., 1:-1, :-2])[:, 0]
        gy = (x[..., 2:, 1:-1] - x[..., :-2, 1:-1])[:, 0]
        mag = torch.sqrt(gx * gx + gy * gy + 1e-12)
        theta = torch.atan2(gy, gx) % math.pi  # unsigned orientation in [0, pi)
        pos = theta / (math.pi / self.bins) - 0.5  # position in bin units (bin b centred at b)
        centers = torch.arange(self.bins, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        d = (pos[:, None] - centers).abs()
        d = torch.minimum(d, self.bins - d)  # circular distance
        hist = F.relu(1.0 - d) * mag[:, None]  # (N, bins, H, W)
        cells = F.avg_pool2d(hist, self.cell) * self.cell**2  # (N, bins, H/c, W/c)
        blocks = F.unfold(cells, kernel_size=2)  # (N, bins*4, n_blocks)
        blocks = blocks / torch.sqrt((blocks * blocks).sum(dim=1, keepdim=True) + 1e-6)
        desc = blocks.flatten(1)
        if self.center is not None:
            desc = desc - self.center
        return desc

    @torch.no_grad()
    def fit_center(self, images: torch.Tensor) -> HOGEncoder:
        """Set `center` to the mean descriptor of `images` (N, C, H, W); returns self."""
        self.center = None
        self.center = self(images).mean(dim=0)
        return self


def load_image_folder(folder: str | Path) -> list[torch.Tensor]:
    """All images in a folder (sorted by name) as (C, H, W) float tensors in [-1, 1], RGB."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    out = []
    for f in files:
        arr = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)
    return out


def _build_encoder(encoder: str, clip_path: str | None, encoder_kwargs: dict[str, Any]) -> nn.Module:
    if encoder == "clip":
        if clip_path is None:
            raise ConfigError("reward 'identity_pool': encoder 'clip' needs clip_path")
        return ClipEmbedder.from_pretrained(clip_path, reward="identity_pool")
    if encoder == "hog":
        return HOGEncoder(**encoder_kwargs)
    factory = resolve_object(encoder, "identity_pool")
    if not callable(factory):
        raise ConfigError(f"reward 'identity_pool': encoder {encoder!r} is not callable")
    module = factory(**encoder_kwargs)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"reward 'identity_pool': encoder {encoder!r} did not return an nn.Module")
    return module


@register_reward("identity_pool")
def _build_identity_pool(
    encoder: str = "clip",
    clip_path: str | None = None,
    reference_dir: str | None = None,
    pool_path: str | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
) -> Reward:
    """encoder: 'clip' (needs clip_path), 'hog', or 'module:factory' returning an nn.Module.

    The pool comes from `reference_dir` (images) or `pool_path` (safetensors with a 'pool' tensor
    (P, D) or (B, P, D)); with neither, pools must be passed per call.
    """
    if reference_dir is not None and pool_path is not None:
        raise ConfigError("reward 'identity_pool': give reference_dir or pool_path, not both")
    enc = _build_encoder(encoder, clip_path, dict(encoder_kwargs or {}))
    pool = None
    if reference_dir is not None:
        folder = existing_path(reference_dir, "reference_dir", "identity_pool", kind="dir")
        refs = load_image_folder(folder)
        if not refs:
            raise ConfigError(f"reward 'identity_pool': no images in reference_dir {folder}")
        pool = embed_references(enc, refs)
    elif pool_path is not None:
        f = existing_path(pool_path, "pool_path", "identity_pool", kind="file")
        tensors = load_file(str(f))
        if "pool" not in tensors:
            raise ConfigError(f"reward 'identity_pool': {f} has no tensor named 'pool'")
        pool = tensors["pool"]
    return IdentityPoolReward(enc, pool)
