"""Conditions shared by every trainer: text prompts (encoded once, lazily), class labels, or none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffdiv.config import ConfigError
from diffdiv.data.prompts import PromptBank

MAX_ENCODED = 4096  # prompt lists up to this size are encoded once and held; larger ones encode on demand


@dataclass
class CondConfig:
    """Conditions to train over: prompts (text-to-image), class labels, or none."""

    prompts: str | None = None  # prompt file, one per line
    prompt_list: list[str] | None = None
    num_classes: int = 0  # class-conditional models: labels drawn uniformly from [0, num_classes)

    def preflight(self) -> None:
        if self.prompts:
            from diffdiv.data.prompts import load_prompts

            load_prompts(self.prompts)

    def prompt_texts(self) -> list[str]:
        prompts: list[str] = []
        if self.prompts:
            from diffdiv.data.prompts import load_prompts

            prompts += load_prompts(self.prompts)
        return prompts + list(self.prompt_list or [])


class Conditions:
    """The condition set of a run: `count` choices indexed 0..count-1 (prompts or labels; 0 = unconditional).

    `encode(idx)` gives the model's condition batch (prompt embeddings from `encoder.encode_prompts`, computed
    on first use and cached; or the labels themselves); `texts(idx)` the prompt strings (rewards, grids).
    """

    def __init__(self, cfg: CondConfig, encoder: Any = None):
        self.prompts: list[str] | None = None
        self.num_labels = 0
        self.encoder = encoder
        self.cache: Any = None
        if cfg.prompts or cfg.prompt_list:
            self.prompts = cfg.prompt_texts()
            if not self.prompts:
                raise ConfigError("cond: no prompts given")
        elif cfg.num_classes > 0:
            self.num_labels = cfg.num_classes

    @property
    def count(self) -> int:
        return len(self.prompts) if self.prompts is not None else self.num_labels

    @property
    def labels(self) -> list[str] | None:
        """Display names of the choices (prompts, or label numbers), None when unconditional."""
        if self.prompts is not None:
            return self.prompts
        return [str(i) for i in range(self.num_labels)] if self.num_labels else None

    def encoded(self) -> Any:
        """Every prompt encoded (one call; prompt files above `MAX_ENCODED` prompts go through a PromptBank)."""
        if self.cache is None:
            with torch.no_grad():
                if len(self.prompts) > MAX_ENCODED:
                    self.cache = PromptBank(self.prompts, self.encoder.encode_prompts)
                else:
                    self.cache = self.encoder.encode_prompts(self.prompts)
        return self.cache

    def encode(self, idx: Tensor | None, device: torch.device | str = "cpu") -> Any:
        """Condition batch for choice indices (None for unconditional models)."""
        if idx is None or not self.count:
            return None
        if self.num_labels:
            return idx.to(device)
        with torch.no_grad():
            return self.encoded()[idx.cpu()].to(device)

    def texts(self, idx: Tensor | None) -> list[str] | None:
        names = self.labels
        if idx is None or names is None:
            return None
        return [names[int(i)] for i in idx]

    def cycle(self, start: int, n: int) -> Tensor | None:
        """Indices start, start+1, ... (mod count): the fixed evaluation conditions."""
        return (torch.arange(start, start + n) % self.count) if self.count else None
