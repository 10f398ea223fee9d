"""Reward base class, registry and the config-driven factory `build_reward`.

Conventions shared by every reward:
- input images are float tensors in [-1, 1], shape (B, C, H, W), or videos (B, F, C, H, W);
- output is a float32 tensor of shape (B,) (float64 if computed in float64), larger is better;
- a video's reward is the mean over frames of the per-frame reward (unless a reward overrides it);
- reward networks are frozen (`requires_grad=False`, eval mode); when `differentiable` is True the
  reward is a differentiable function of the images, so first-order methods can back-propagate.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffdiv.config import ConfigError

Prompts = Sequence[str] | None


class Reward(nn.Module):
    """A scalar reward r(images, prompts) -> (B,) tensor. Subclasses implement `score`."""

    name: str = "reward"
    differentiable: bool = False
    needs_prompts: bool = False

    def freeze(self) -> Reward:
        """Freeze every parameter and switch to eval mode (rewards are never trained)."""
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> Reward:
        """Rewards stay in eval mode (no dropout / batch-norm updates) whatever the trainer asks."""
        return super().train(False)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """Per-image reward for images of shape (N, C, H, W) in [-1, 1] -> (N,)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Prompts = None) -> torch.Tensor:
        """Reward for (B, C, H, W) images or (B, F, C, H, W) videos (mean over frames) -> (B,)."""
        images, prompts_list, frames = check_inputs(images, prompts, self.name, self.needs_prompts)
        if frames is None:
            out = self.score(images, prompts_list)
            return _check_output(out, images.shape[0], self.name)
        b, f = images.shape[:2]
        flat = images.reshape(b * f, *images.shape[2:])
        flat_prompts = None if prompts_list is None else [p for p in prompts_list for _ in range(f)]
        out = _check_output(self.score(flat, flat_prompts), b * f, self.name)
        return out.reshape(b, f).mean(dim=1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


def check_inputs(
    images: torch.Tensor, prompts: Prompts, name: str, needs_prompts: bool
) -> tuple[torch.Tensor, list[str] | None, int | None]:
    """Validate shapes; returns (images, prompts as list or None, number of frames or None)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"reward '{name}': images must be a float tensor in [-1, 1]")
    if images.ndim not in (4, 5):
        raise ValueError(
            f"reward '{name}': images must be (B, C, H, W) or (B, F, C, H, W), got {tuple(images.shape)}"
        )
    b = images.shape[0]
    plist: list[str] | None = None
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts] * b
        plist = list(prompts)
        if len(plist) != b:
            raise ValueError(f"reward '{name}': got {len(plist)} prompts for {b} images")
    elif needs_prompts:
        raise ValueError(f"reward '{name}' needs one prompt per image")
    return images, plist, (images.shape[1] if images.ndim == 5 else None)


def _check_output(out: Any, n: int, name: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out, dtype=torch.float32)
    if out.shape != (n,):
        raise ValueError(f"reward '{name}' returned shape {tuple(out.shape)}, expected ({n},)")
    return out if out.dtype == torch.float64 else out.float()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 / integer -> float32; float32 and float64 are kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (no clamping, so gradients are kept everywhere)."""
    return (images + 1.0) * 0.5


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C) on CPU, rounded like DDPO."""
    x = (to_unit(images.detach().float()) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


# --------------------------------------------------------------------------- registry

REWARDS: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: register a factory `fn(**spec_without_name) -> Reward` under `name`."""

    def deco(fn: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward '{name}' is already registered")
        REWARDS[name] = fn
        return fn

    return deco


def existing_path(value: Any, key: str, reward: str, kind: str = "any") -> Path:
    """A local path that must exist (kind: 'file', 'dir' or 'any'); else a one-line ConfigError."""
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise ConfigError(f"reward '{reward}': {key} must be a path, got {value!r}")
    p = Path(value).expanduser()
    ok = p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists()
    if not ok:
        what = {"file": "file", "dir": "folder"}.get(kind, "path")
        raise ConfigError(f"reward '{reward}': {key} {what} not found: {p}")
    return p


def looks_like_local_path(value: str) -> bool:
    """True when `value` cannot be a hub id ('org/name' or 'name') and must be a local path."""
    s = str(value)
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or "\\" in s or s.count(os.sep) > 1


def resolve_object(target: str, reward: str) -> Any:
    """Import `pkg.module:attr` or `pkg.module.attr`; one-line ConfigError when it cannot."""
    if not isinstance(target, str) or not target:
        raise ConfigError(f"reward '{reward}': target must be 'module:function', got {target!r}")
    if ":" in target:
        mod_name, _, attr = target.partition(":")
    else:
        mod_name, _, attr = target.rpartition(".")
    if not mod_name or not attr:
        raise ConfigError(f"reward '{reward}': target {target!r} is not 'module:function'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"reward '{reward}': cannot import module '{mod_name}' ({e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward '{reward}': module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj
