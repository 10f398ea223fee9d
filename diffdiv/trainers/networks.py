"""The registry of trained networks: module, optimizer, LR warmup, EMA, per-network gradient clipping.

Trained parameters are fp32 master weights whatever dtype the module was loaded in (a bf16 teacher's copy is
upcast: AdamW on bf16 weights loses most updates to rounding). Under FSDP2 (`diffdiv.trainers.sharding`) the
parameters are DTensors: checks read the local shards (callers combine ranks) and the network is rebuilt after
sharding (`rebuild_network`) so that optimizer and EMA hold the sharded parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffdiv.trainers.sharding import local, reshard


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
    spec: dict[str, Any] = field(default_factory=dict)  # make_network's arguments (to rebuild after sharding)
    shard_roots: list[nn.Module] = field(default_factory=list)  # FSDP roots of the module (empty: not sharded)

    @property
    def trained(self) -> bool:
        return self.optimizer is not None


def make_network(module: nn.Module, lr: float | None, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, params: Iterable[nn.Parameter] | None = None,
                 grad_clip: float | None = None, warmup_steps: int = 0, ema_decay: float = 0.0,
                 ema_start: int = 0) -> Network:
    """AdamW over `params` (default: the module's parameters that require grad; trained ones upcast to fp32
    master weights), optional linear warmup and EMA."""
    params = list(params) if params is not None else [p for p in module.parameters() if p.requires_grad]
    if lr:
        upcast_trained_(module, params)
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay) if lr else None
    spec = dict(lr=lr, betas=betas, weight_decay=weight_decay, grad_clip=grad_clip, warmup_steps=warmup_steps,
                ema_decay=ema_decay, ema_start=ema_start)
    net = Network(module=module, optimizer=opt, grad_clip=grad_clip, params=params, spec=spec)
    if opt is not None and warmup_steps > 0:
        w = int(warmup_steps)
        net.lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / w))
    if ema_decay > 0:
        from diffusers.training_utils import EMAModel

        net.ema = EMAModel(params, decay=ema_decay, update_after_step=ema_start)
    return net


def rebuild_network(n: Network, module: nn.Module, params: list[nn.Parameter]) -> Network:
    """The same network over new parameter objects (after FSDP replaced them): fresh optimizer, warmup, EMA."""
    spec = dict(n.spec)
    return make_network(module, spec.pop("lr"), params=params, **spec)


def upcast_trained_(module: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """fp32 master weights: every submodule whose own parameters are all trained goes to fp32 (in place)."""
    trained = {id(p) for p in params}
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if not own or any(id(p) not in trained for p in own):
            continue
        if not any(p.is_floating_point() and p.dtype != torch.float32 for p in own):
            continue
        for p in own:
            if p.is_floating_point():
                p.data = p.data.float()
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                setattr(m, name, b.float())


def enable_gradient_checkpointing(module: nn.Module) -> tuple[list[str], list[str]]:
    """diffusers' `enable_gradient_checkpointing()` on every diffusers model in `module` that supports it.

    Returns (names it was turned on for, names of the other parameter-holding parts it does not apply to:
    non-diffusers nets such as discriminator heads, and diffusers models without checkpointing support)."""
    from diffusers.models.modeling_utils import ModelMixin

    from diffdiv.trainers.sharding import shard_roots

    on, off = [], []
    for name, m in module.named_modules():
        if isinstance(m, ModelMixin) and not any(name.startswith(f"{o}.") or not o for o in on + off):
            try:  # the outermost diffusers model: it switches its nested ones (e.g. Transformer2DModel) too
                m.enable_gradient_checkpointing()
                on.append(name)
            except ValueError:  # the model does not support it
                off.append(name)
    covered = {id(p) for name, m in module.named_modules() if name in on for p in m.parameters()}
    for root in shard_roots(module):
        if any(id(p) not in covered for p in root.parameters()):
            rname = next(n for n, m in module.named_modules() if m is root)
            if rname not in off:
                off.append(rname)
    return on, off


def reshard_roots(n: Network) -> None:
    """After the sharded weights changed (optimizer step, EMA swap): drop the roots' gathered copies, which FSDP
    keeps between forwards (the next forward gathers the new values)."""
    for root in n.shard_roots:
        reshard(root)


def set_trainable(nets: dict[str, Network], active: set[str]) -> None:
    """requires_grad and train mode on for the networks in `active`, off for every other.

    A sharded (FSDP2) network keeps requires_grad on in every phase: FSDP copies the flag into its gathered
    parameters only when it all-gathers (possibly inside `torch.func.jvp`, where changing it is an error) and
    fixes its mixed-precision dtypes from it at the first forward. An inactive sharded network called with
    grad enabled (Uni-Instruct's and DI*'s fake score in the generator phase) computes weight gradients that
    nothing uses; they are cleared when its own phase starts."""
    for name, n in nets.items():
        for p in n.params:
            p.requires_grad_(name in active or bool(n.shard_roots))
        n.module.train(name in active)


def freeze_params(nets: dict[str, Network]) -> None:
    for n in nets.values():
        for p in n.params:
            p.requires_grad_(bool(n.shard_roots))


def grads_finite(nets: Iterable[Network]) -> bool:
    """On this rank's gradients (local shards under FSDP: combine ranks with any_rank)."""
    return all(bool(torch.isfinite(local(p.grad)).all()) for n in nets for p in n.params
               if p.grad is not None)


def weights_finite(module_or_params: nn.Module | Iterable[Tensor]) -> bool:
    """On this rank's weights (local shards under FSDP: combine ranks with any_rank)."""
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    return all(bool(torch.isfinite(local(p)).all()) for p in params)


def apply_update(n: Network, clip: float, clip_fn: Any) -> float | None:
    """Clip, step, zero, warmup and EMA for one network; returns the pre-clip gradient norm (or None)."""
    gn = float(clip_fn(n.params, clip)) if clip > 0 else None
    n.optimizer.step()
    reshard_roots(n)
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
    kept: list[list[Tensor] | None] = []
    for n in swapped:
        if n.shard_roots:  # EMAModel.store moves to CPU, which a sharded CUDA parameter cannot copy back from
            kept.append([p.detach().clone() for p in n.params])
        else:
            kept.append(None)
            n.ema.store(n.params)
        n.ema.copy_to(n.params)
        reshard_roots(n)
    try:
        yield
    finally:
        for n, k in zip(swapped, kept):
            if k is None:
                n.ema.restore(n.params)
            else:
                with torch.no_grad():
                    for p, v in zip(n.params, k):
                        p.copy_(v)
                reshard_roots(n)
