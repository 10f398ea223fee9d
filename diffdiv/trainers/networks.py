"""The registry of trained networks: module, optimizer, LR warmup, EMA, per-network gradient clipping."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Network:
    """One trained network and what updates it (`wrapped` is the DDP / accelerate-prepared module)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    wrapped: nn.Module | None = None
    ema: Any = None
    grad_clip: float | None = None
    params: list[nn.Parameter] = field(default_factory=list)
    lr_sched: Any = None

    @property
    def trained(self) -> bool:
        return self.optimizer is not None


def make_network(module: nn.Module, lr: float | None, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, params: Iterable[nn.Parameter] | None = None,
                 grad_clip: float | None = None, warmup_steps: int = 0, ema_decay: float = 0.0,
                 ema_start: int = 0) -> Network:
    """AdamW over `params` (default: the module's parameters that require grad), optional linear warmup and EMA."""
    params = list(params) if params is not None else [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay) if lr else None
    net = Network(module=module, optimizer=opt, grad_clip=grad_clip, params=params)
    if opt is not None and warmup_steps > 0:
        w = int(warmup_steps)
        net.lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / w))
    if ema_decay > 0:
        from diffusers.training_utils import EMAModel

        net.ema = EMAModel(params, decay=ema_decay, update_after_step=ema_start)
    return net


def set_trainable(nets: dict[str, Network], active: set[str]) -> None:
    """requires_grad and train mode on for the networks in `active`, off for every other."""
    for name, n in nets.items():
        for p in n.params:
            p.requires_grad_(name in active)
        n.module.train(name in active)


def freeze_params(nets: dict[str, Network]) -> None:
    for n in nets.values():
        for p in n.params:
            p.requires_grad_(False)


def grads_finite(nets: Iterable[Network]) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for n in nets for p in n.params if p.grad is not None)


def weights_finite(module_or_params: nn.Module | Iterable[Tensor]) -> bool:
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    return all(bool(torch.isfinite(p).all()) for p in params)


def apply_update(n: Network, clip: float, clip_fn: Any) -> float | None:
    """Clip, step, zero, warmup and EMA for one network; returns the pre-clip gradient norm (or None)."""
    gn = float(clip_fn(n.params, clip)) if clip > 0 else None
    n.optimizer.step()
    n.optimizer.zero_grad(set_to_none=True)
    if n.lr_sched is not None:
        n.lr_sched.step()
    if n.ema is not None:
        n.ema.step(n.params)
    return gn


@contextlib.contextmanager
def ema_swapped(nets: Iterable[Network]) -> Iterator[None]:
    """Temporarily swap EMA weights into the networks that keep an EMA."""
    swapped = [n for n in nets if n.ema is not None]
    for n in swapped:
        n.ema.store(n.params)
        n.ema.copy_to(n.params)
    try:
        yield
    finally:
        for n in swapped:
            n.ema.restore(n.params)
