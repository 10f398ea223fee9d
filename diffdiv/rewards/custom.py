"""A user reward given by dotted path in the config: `{name: callable, target: "pkg.module:fn"}`.

`fn(images, prompts, **kwargs)` receives the (B, C, H, W) or (B, F, C, H, W) images in [-1, 1] and
the prompt list (or None) and returns B scores (tensor, array or list). If `target` names a
`Reward` subclass it is instantiated with `kwargs` instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from diffdiv.config import ConfigError
from diffdiv.rewards.base import Reward, check_inputs, register_reward, resolve_object


class CallableReward(Reward):
    """Wrap `fn(images, prompts) -> (B,)`; `differentiable` is what the user declares."""

    name = "callable"

    def __init__(self, fn: Callable[..., Any], differentiable: bool = False, name: str | None = None):
        super().__init__()
        self.fn = fn
        self.differentiable = bool(differentiable)
        self.name = name or getattr(fn, "__name__", "callable")

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        images, plist, _ = check_inputs(images, prompts, self.name, False)
        out = self.fn(images, plist)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out, dtype=torch.float32, device=images.device)
        if out.shape != (images.shape[0],):
            raise ValueError(
                f"reward '{self.name}' returned shape {tuple(out.shape)}, expected ({images.shape[0]},)"
            )
        return out if out.dtype == torch.float64 else out.float()


@register_reward("callable")
def _build_callable(
    target: str, differentiable: bool = False, kwargs: dict[str, Any] | None = None
) -> Reward:
    obj = resolve_object(target, "callable")
    kwargs = dict(kwargs or {})
    if isinstance(obj, type) and issubclass(obj, Reward):
        try:
            return obj(**kwargs)
        except TypeError as e:
            raise ConfigError(f"reward 'callable': cannot build {target}: {e}") from None
    if not callable(obj):
        raise ConfigError(f"reward 'callable': {target} is not callable")
    if not isinstance(differentiable, bool):
        raise ConfigError(f"reward 'callable': differentiable must be true/false, got {differentiable!r}")
    fn = functools.partial(obj, **kwargs) if kwargs else obj
    return CallableReward(fn, differentiable=differentiable, name=target)
