"""Per-sample scores (rewards, CLIP score) and their summaries: mean, standard error, per prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from torch import Tensor

from diffdiv.config import ConfigError


def mean_stderr(values: Tensor | Sequence[float]) -> dict[str, float]:
    """Mean, standard error of the mean (sample std with ddof=1 over sqrt(n)) and n."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = int(v.numel())
    if n == 0:
        return {"mean": float("nan"), "stderr": float("nan"), "n": 0}
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "stderr": se, "n": n}


def summarize(values: Tensor, prompts: Sequence[str] | None = None) -> dict[str, Any]:
    """Overall mean/stderr plus, when prompts are given, the same per prompt (in first-seen order)."""
    out: dict[str, Any] = mean_stderr(values)
    if prompts is not None:
        per: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            per.setdefault(p, []).append(i)
        out["per_prompt"] = {p: mean_stderr(values[idx]) for p, idx in per.items()}
    return out


def parse_reward_metric(metric: str) -> dict[str, Any]:
    """`reward:<name>[:key=value...]` -> a build_reward spec; values are YAML scalars."""
    parts = metric.split(":")
    if len(parts) < 2 or parts[0] != "reward" or not parts[1]:
        raise ConfigError(f"--metrics: '{metric}' is not reward:<name>[:key=value...]")
    spec: dict[str, Any] = {"name": parts[1]}
    for kv in parts[2:]:
        if "=" not in kv or not kv.split("=", 1)[0]:
            raise ConfigError(f"--metrics {metric}: '{kv}' is not key=value")
        k, v = kv.split("=", 1)
        try:
            spec[k] = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            spec[k] = v
    return spec


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


class ClipScorer:
    """CLIPScore = 100 * max(cos(E_img(x), E_txt(prompt)), 0) (Hessel et al. 2021 with w = 100, the
    torchmetrics convention), computed directly from a `ClipEmbedder`."""

    def __init__(self, embedder):
        self.embedder = embedder.eval().requires_grad_(False)
        self._text: dict[str, Tensor] = {}

    def text(self, prompts: Sequence[str]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if missing:
            with torch.no_grad():
                emb = self.embedder.embed_text(list(missing)).double().cpu()
            self._text.update(zip(missing, emb, strict=True))
        return torch.stack([self._text[p] for p in prompts])

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        dev = self.embedder.mean.device
        img = self.embedder.embed_images(images.to(dev)).double().cpu()
        return 100.0 * cosine(img, self.text(prompts)).clamp_min(0.0)
