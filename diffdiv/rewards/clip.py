"""CLIP loading, differentiable CLIP image preprocessing, and the CLIP text-image similarity reward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffdiv.config import ConfigError
from diffdiv.rewards.base import Reward, at_least_fp32, looks_like_local_path, register_reward, to_unit

# OpenAI CLIP normalization constants, used when a checkpoint folder has no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _read_preprocessor(path: str) -> dict[str, Any]:
    """The processor's preprocessor_config.json as a dict ({} if absent or remote-only)."""
    p = Path(path).expanduser() / "preprocessor_config.json"
    if p.is_file():
        return json.loads(p.read_text())
    if Path(path).expanduser().is_dir():
        return {}
    try:  # hub id: use the cached / downloadable file if available
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "preprocessor_config.json")).read_text())
    except Exception:
        return {}


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    crop: tuple[int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """Differentiable CLIP preprocessing of [-1, 1] images (N, C, H, W) -> normalized pixel values.

    Same steps as transformers' CLIPImageProcessor: resize the shortest edge to `size` (bicubic,
    antialiased), center-crop to `crop` = (height, width), scale to [0, 1], normalize by mean/std.
    Grayscale input is repeated to 3 channels.
    """
    x = to_unit(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"CLIP expects 1 or 3 channels, got {x.shape[1]}")
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    if short != size:
        new_long = int(size * long / short)
        new_hw = (size, new_long) if h <= w else (new_long, size)
        x = F.interpolate(x, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
    ch, cw = crop
    h, w = x.shape[-2:]
    if (h, w) != (ch, cw):
        if h < ch or w < cw:
            raise ValueError(f"image of size {(h, w)} is smaller than the CLIP crop {crop}")
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class ClipEmbedder(nn.Module):
    """A CLIPModel plus its tokenizer and a differentiable torch image preprocessing.

    `forward(images)` = `embed_images(images)`: projected (un-normalized) image embeddings (N, D), so
    the embedder can be used directly as an encoder (e.g. for `IdentityPoolReward`).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any = None, processor_config: dict[str, Any] | None = None
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        cfg = processor_config or {}
        image_size = int(model.config.vision_config.image_size)
        size = cfg.get("size", image_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height", image_size))
        crop = cfg.get("crop_size", image_size)
        if isinstance(crop, dict):
            crop = (int(crop["height"]), int(crop["width"]))
        elif isinstance(crop, int):
            crop = (crop, crop)
        self.size = int(size) if cfg.get("do_resize", True) else image_size
        self.crop = tuple(crop) if cfg.get("do_center_crop", True) else (image_size, image_size)
        mean = cfg.get("image_mean", OPENAI_CLIP_MEAN) if cfg.get("do_normalize", True) else (0.0,) * 3
        std = cfg.get("image_std", OPENAI_CLIP_STD) if cfg.get("do_normalize", True) else (1.0,) * 3
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: str | torch.dtype | None = None, reward: str = "clip"
    ) -> ClipEmbedder:
        """Load `CLIPModel` (+ tokenizer + preprocessing config) from a hub id or a local folder."""
        from transformers import AutoTokenizer, CLIPModel

        path = str(path)
        local = Path(path).expanduser()
        if looks_like_local_path(path) and not local.is_dir():
            raise ConfigError(f"reward '{reward}': CLIP folder not found: {local}")
        src = str(local) if local.is_dir() else path
        try:
            model = CLIPModel.from_pretrained(src)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"reward '{reward}': cannot load CLIP from '{path}': {first}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        if dtype is not None:
            model = model.to(_dtype(dtype, reward))
        return cls(model, tokenizer, _read_preprocessor(src))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (N, C, H, W) -> CLIP pixel values (differentiable)."""
        x = at_least_fp32(images)
        x = clip_preprocess(x, self.size, self.crop, self.mean.to(x.dtype), self.std.to(x.dtype))
        return x.to(self.dtype)

    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP pixel values -> projected image embeddings (N, D)."""
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return at_least_fp32(self.model.visual_projection(pooled))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (N, C, H, W) -> projected image embeddings (N, D)."""
        return self.embed_pixels(self.preprocess(images))

    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> projected text embeddings (N, D)."""
        if self.tokenizer is None:
            raise ValueError("this CLIP checkpoint has no tokenizer; text embeddings are unavailable")
        max_len = int(self.model.config.text_config.max_position_embeddings)
        max_len = min(max_len, int(getattr(self.tokenizer, "model_max_length", max_len) or max_len))
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        )
        device = self.mean.device
        out = self.model.text_model(
            input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
        )
        return at_least_fp32(self.model.text_projection(out.pooler_output))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_images(images)


def _dtype(value: str | torch.dtype, reward: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if value not in table:
        raise ConfigError(f"reward '{reward}': dtype {value!r} is not one of {', '.join(table)}")
    return table[value]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise cosine similarity of (N, D) and (N, D) -> (N,)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)


class ClipSimilarityReward(Reward):
    """`scale * cos(CLIP_image(x), CLIP_text(prompt))`; CLIPScore is scale=100 clamped at 0.

    Differentiable in the images; text embeddings are computed without gradients.
    """

    name = "clip_similarity"
    differentiable = True
    needs_prompts = True

    def __init__(self, embedder: ClipEmbedder, scale: float = 1.0):
        super().__init__()
        self.embedder = embedder
        self.scale = float(scale)
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        assert prompts is not None
        with torch.no_grad():
            text = self.embedder.embed_text(prompts)
        return self.scale * cosine_similarity(self.embedder.embed_images(images), text)


@register_reward("clip_similarity")
def _build_clip_similarity(clip_path: str, scale: float = 1.0, dtype: str | None = None) -> Reward:
    emb = ClipEmbedder.from_pretrained(clip_path, dtype=dtype, reward="clip_similarity")
    if emb.tokenizer is None:
        raise ConfigError(f"reward 'clip_similarity': no tokenizer found with CLIP at '{clip_path}'")
    return ClipSimilarityReward(emb, scale=scale)
