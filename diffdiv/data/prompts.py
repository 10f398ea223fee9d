"""Prompt files (one prompt a line; blank lines and lines starting with # are skipped) and batched encoding."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffdiv.config import ConfigError


def load_prompts(path: str | Path) -> list[str]:
    """Read a prompt file; one-line error if missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"prompt file {p} is not UTF-8 text") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file {p} is empty")
    return prompts


def concat(parts: list[Any]) -> Any:
    """Concatenate encoded prompt batches: tensors, or condition objects with a `cat(a, b)` (e.g. TextCond)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    cat = getattr(type(parts[0]), "cat", None)
    if cat is None:
        raise TypeError(f"cannot concatenate {type(parts[0]).__name__} encodings")
    return functools.reduce(cat, parts)


def encode_in_batches(encode: Callable[[list[str]], Any], prompts: list[str], batch_size: int = 256) -> Any:
    """encode(prompts) run on at most `batch_size` prompts at a time, concatenated in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts to encode")
    with torch.no_grad():
        return concat([encode(prompts[k:k + batch_size]) for k in range(0, len(prompts), batch_size)])


class PromptBank:
    """A prompt list encoded on demand: the prompts of each batch are encoded (in batches of `batch_size`)
    when first drawn and kept in a least-recently-used cache of at most `max_cached` encodings.

    `bank[idx]` equals `encode(prompts)[idx]` without encoding (or holding) every prompt of a large file."""

    def __init__(self, prompts: list[str], encode: Callable[[list[str]], Any], batch_size: int = 256,
                 max_cached: int = 4096):
        if not prompts:
            raise ValueError("no prompts")
        if max_cached < 1:
            raise ValueError(f"max_cached must be >= 1, got {max_cached}")
        self.prompts = list(prompts)
        self.encode = encode
        self.batch_size = batch_size
        self.max_cached = max_cached
        self.cache: OrderedDict[int, Any] = OrderedDict()
        self.encoded = 0  # prompts encoded so far (a cache miss each)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, idx: torch.Tensor | list[int]) -> Any:
        order = [int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)]
        if len(set(order)) > self.max_cached:
            raise ValueError(f"{len(set(order))} distinct prompts in one batch exceed max_cached={self.max_cached}")
        missing = sorted({i for i in order if i not in self.cache})
        if missing:
            enc = encode_in_batches(self.encode, [self.prompts[i] for i in missing], self.batch_size)
            for k, i in enumerate(missing):
                self.cache[i] = enc[k:k + 1]
            self.encoded += len(missing)
        for i in order:
            self.cache.move_to_end(i)
        out = concat([self.cache[i] for i in order])
        while len(self.cache) > self.max_cached:
            self.cache.popitem(last=False)
        return out
