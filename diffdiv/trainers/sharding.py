"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the training loop: which submodules to shard, applying it,
local shard sizes, gathering full weights (export, rank-0 evaluation) and sharded checkpoints.

Layout: a network is looked through its parameter-free wrappers (`Denoiser`, `OneStepGenerator`, f-distill's
`Critic`) down to the modules those wrappers call (the diffusers UNet / transformer / MLP, discriminator heads,
value nets). Each such module is an independent FSDP root: its `down_blocks` / `up_blocks` / `mid_block` /
`transformer_blocks` / `single_transformer_blocks` / `blocks` are sharded first, then the module itself.
Wrappers stay plain, so `Denoiser.features()` and friends keep working (every call they make goes through a
root's forward). With `mixed_precision: bf16` the blocks compute in bf16 from fp32 master shards (gradients
reduced in fp32) and the root's own layers (time embedding, conv_in/out) keep the master dtype, so model time
is never rounded to bf16 (FSDP would otherwise cast the timestep input of the root to bf16).

Two FSDP2 behaviours shape how phases freeze networks: the mixed-precision dtypes of a parameter group are
fixed at the root's first forward from the parameters' `requires_grad` at that moment, and a parameter's
`requires_grad` reaches its gathered copy only at an all-gather (which may run inside `torch.func.jvp`, where
changing it raises). So sharded trained parameters keep requires_grad on in every phase
(`networks.set_trainable`), and `prime_lazy_init` covers a first forward with some of them switched off (peft
turns LoRA weights off while their adapters are disabled for the reference model).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffdiv.config import check

BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks")
BLOCK_MODULES = ("mid_block",)
SHARDED_DIR = "sharded"


@dataclass
class DistributedConfig:
    """How trained networks are distributed: replicated (DDP) or sharded (FSDP2)."""

    strategy: Literal["ddp", "fsdp2"] = "ddp"
    reshard_after_forward: bool = True  # free gathered block weights after each forward (re-gather in backward)
    shard_frozen: bool = True  # also shard frozen denoisers (teacher, reference copies)

    def validate(self) -> None:
        check(self.strategy in ("ddp", "fsdp2"), f"distributed.strategy must be ddp or fsdp2, got {self.strategy}")


@dataclass
class Shard:
    """One FSDP root and a parameter-free (meta) copy of it taken before sharding, to rebuild full copies."""

    root: nn.Module
    skeleton: nn.Module
    trainable: list[str] = field(default_factory=list)  # names (in root) of parameters some phase trains


# ---------------------------------------------------------------------------------------------- what to shard
def has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def has_own_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def is_wrapper(m: nn.Module) -> bool:
    """Looked through: a Denoiser, or a parameter-free module holding a Denoiser (OneStepGenerator, Critic)."""
    from diffdiv.models.base import Denoiser

    if has_own_params(m):
        return False
    return isinstance(m, Denoiser) or any(isinstance(c, Denoiser) for c in m.modules() if c is not m)


def shard_roots(module: nn.Module) -> list[nn.Module]:
    """The modules to shard as independent FSDP roots (each called through its own forward)."""
    out: list[nn.Module] = []
    seen: set[int] = set()

    def visit(m: nn.Module) -> None:
        if id(m) in seen or not has_params(m):
            return
        seen.add(id(m))
        if is_wrapper(m):
            for c in m.children():
                visit(c)
        else:
            out.append(m)

    visit(module)
    return out


def block_units(root: nn.Module) -> list[nn.Module]:
    """The root's transformer/UNet blocks (each its own FSDP unit); empty for small nets."""
    units: list[nn.Module] = []
    for name in BLOCK_LISTS:
        seq = getattr(root, name, None)
        if isinstance(seq, (nn.ModuleList, nn.Sequential)):
            units += [b for b in seq if has_params(b)]
    for name in BLOCK_MODULES:
        m = getattr(root, name, None)
        if isinstance(m, nn.Module) and has_params(m):
            units.append(m)
    return units


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are on the meta device (no memory); buffers are shared, not copied."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


def root_dtype(root: nn.Module, units: list[nn.Module]) -> torch.dtype:
    """dtype of the root's own layers (outside the blocks): what the blocks must hand back."""
    in_units = {id(p) for u in units for p in u.parameters()}
    own = [p.dtype for p in root.parameters() if id(p) not in in_units and p.is_floating_point()]
    return own[0] if own else torch.float32


def mp_policies(mixed_precision: str, out_dtype: torch.dtype) -> tuple[Any, Any]:
    """(block policy, root policy): bf16 compute from fp32 shards and fp32 reduction in the blocks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision != "bf16":
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    block = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=out_dtype)
    return block, MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)


def device_mesh(device: torch.device, world: int):
    """A 1-D mesh over every rank (NCCL on GPUs, gloo on CPU: the process group accelerate made)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


# ---------------------------------------------------------------------------------------------- applying it
def shard_module(module: nn.Module, mesh: Any, mixed_precision: str, reshard_after_forward: bool,
                 trainable: Iterable[nn.Parameter] = ()) -> list[Shard]:
    """fully_shard every block then every root of `module` (in place; parameters become DTensors).

    `trainable`: the parameters some phase will train (used to fix FSDP's mixed-precision dtypes correctly).
    Roots already sharded (shared with another network) are skipped.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    train_ids = {id(p) for p in trainable}
    shards: list[Shard] = []
    for root in shard_roots(module):
        if isinstance(root, FSDPModule):
            continue
        units = block_units(root)
        block_mp, root_mp = mp_policies(mixed_precision, root_dtype(root, units))
        shard = Shard(root, meta_skeleton(root), [n for n, p in root.named_parameters() if id(p) in train_ids])
        for u in units:
            fully_shard(u, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=block_mp)
        # the root's own layers stay gathered (FSDP's default after forward, and after backward too): a backward
        # can reach them without passing through the root's output (discriminator features taken at the mid
        # block), possibly after another call's backward has finished with them (the teacher called twice).
        # So the gathered copy must be dropped whenever the sharded weights change (`networks.reshard_roots`).
        fully_shard(root, mesh=mesh, mp_policy=root_mp)
        root.set_reshard_after_backward(False, recurse=False)
        if shard.trainable:
            prime_lazy_init(root, shard.trainable)
        shards.append(shard)
    return shards


def prime_lazy_init(root: nn.Module, trainable: list[str]) -> None:
    """Make FSDP's lazy init (at the root's first forward) see the trainable parameters as requiring grad.

    FSDP2 fixes each parameter group's original and reduce dtypes from `requires_grad` at that moment; a first
    forward with the trainable weights switched off (a LoRA reference pass) would leave them unset and break
    bf16 gradient reduction. One-shot hooks set the flags around that forward and restore them after.
    """
    forced: list[str] = []
    handles: list[Any] = []

    def params() -> dict[str, nn.Parameter]:
        named = dict(root.named_parameters())
        return {n: named[n] for n in trainable if n in named}

    def before(m: nn.Module, args: Any) -> None:
        for n, p in params().items():
            if not p.requires_grad:  # only touch what differs (requires_grad_ raises inside torch.func)
                forced.append(n)
                p.requires_grad_(True)

    def after(m: nn.Module, args: Any, out: Any) -> None:
        for h in handles:
            h.remove()
        if not forced:
            return
        named = params()
        for n in forced:
            named[n].requires_grad_(False)
        if not torch.is_grad_enabled():  # no backward to come: re-gather later with the restored flags
            reshard(root)

    handles.append(root.register_forward_pre_hook(before, prepend=True))
    handles.append(root.register_forward_hook(after))


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(module: nn.Module) -> None:
    """Free every gathered copy under `module` (the next forward re-gathers with current requires_grad)."""
    for m in fsdp_units(module):
        m.reshard()


@contextlib.contextmanager
def gradient_sync_off(roots: Iterable[nn.Module]) -> Iterator[None]:
    """FSDP's no_sync: accumulate unsharded gradients locally, reduce-scatter on the next synced backward."""
    roots = list(roots)
    for r in roots:
        r.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for r in roots:
            r.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------------------------- tensors
def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if is_dtensor(t) else t


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip by the global gradient norm over all shards; returns the (pre-clip) full norm as a plain tensor."""
    gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return gn.full_tensor() if is_dtensor(gn) else gn


def param_names(module: nn.Module, params: Iterable[nn.Parameter]) -> list[str]:
    """Names in `module` of the given parameters, in their order (to find them again after sharding)."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [by_id[id(p)] for p in params]


def params_by_name(module: nn.Module, names: list[str]) -> list[nn.Parameter]:
    named = dict(module.named_parameters())
    return [named[n] for n in names]


def shard_stats(module: nn.Module) -> dict[str, int]:
    """Full parameter count, this rank's local shard count and bytes (measured on the local shards)."""
    ps = list(module.parameters())
    return {"full_numel": sum(p.numel() for p in ps), "local_numel": sum(local(p).numel() for p in ps),
            "local_bytes": sum(local(p).numel() * local(p).element_size() for p in ps)}


def is_sharded(module: nn.Module) -> bool:
    return any(is_dtensor(p) for p in module.parameters())


def shard_table(modules: dict[str, nn.Module], world: int) -> dict[str, Any]:
    """Collective: every rank's `shard_stats` of each module, as {"world", "networks": {name: per-rank lists}}."""
    mine = {name: shard_stats(m) for name, m in modules.items()}
    every: list[Any] = [None] * world
    torch.distributed.all_gather_object(every, mine)
    nets = {name: {"full_numel": every[0][name]["full_numel"], "local_numel": [r[name]["local_numel"] for r in every],
                   "local_bytes": [r[name]["local_bytes"] for r in every]} for name in mine}
    return {"world": world, "strategy": "fsdp2", "networks": nets}


def describe(table: dict[str, Any]) -> str:
    return "fsdp2: " + "; ".join(f"{k} {v['full_numel']:,} params, rank 0 holds "
                                 f"{v['local_numel'][0] / max(v['full_numel'], 1):.3f}"
                                 for k, v in table["networks"].items())


# ---------------------------------------------------------------------------------------------- full weights
def full_state_dict(root: nn.Module) -> dict[str, Tensor]:
    """Collective: the root's full (unsharded) state dict on CPU, on rank 0 only (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_copy(shard: Shard, sd: dict[str, Tensor], device: torch.device) -> nn.Module:
    """An unsharded module with the full weights `sd`, built from the meta skeleton."""
    m = copy.deepcopy(shard.skeleton)
    m.load_state_dict(sd, assign=True)
    return m.to(device).train(shard.root.training)


def parent_links(tops: Iterable[nn.Module], roots: set[int]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, root) for every place a sharded root hangs under the given top modules."""
    links, seen = [], set()
    for top in tops:
        for parent in top.modules():
            for name, child in parent.named_children():
                key = (id(parent), name)
                if id(child) in roots and key not in seen:
                    seen.add(key)
                    links.append((parent, name, child))
    return links


@contextlib.contextmanager
def full_weights(shards: list[Shard], tops: Iterable[nn.Module], rank: int, device: torch.device
                 ) -> Iterator[None]:
    """Every rank gathers each sharded root's full weights; rank 0 swaps plain copies into the wrappers.

    Inside, rank 0 can run single-process code (export, sampling, evaluation) on the usual objects; the other
    ranks must not call the networks. Costs rank 0 one full copy of every sharded network (weights only).
    Roots that are not held by a wrapper (small value / weight nets) are not swapped.
    """
    links = parent_links(tops, {id(s.root) for s in shards})
    held = {id(r) for _, _, r in links}
    plain: dict[int, nn.Module] = {}
    for s in shards:
        if id(s.root) not in held:
            continue
        sd = full_state_dict(s.root)
        if rank == 0:
            plain[id(s.root)] = plain_copy(s, sd, device)
        del sd
    swapped = [(p, n, r) for p, n, r in links if id(r) in plain]
    for parent, name, root in swapped:
        setattr(parent, name, plain[id(root)])
    try:
        yield
    finally:
        for parent, name, root in swapped:
            setattr(parent, name, root)
        plain.clear()


# ---------------------------------------------------------------------------------------------- checkpoints
def sharded_state(nets: dict[str, Any], with_optim: set[str]) -> dict[str, Any]:
    """The DCP state of the trained networks: model and optimizer state dicts (FQN keys) and EMA shadows."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd: dict[str, Any] = {}
    for name, n in nets.items():
        if not n.trained:
            continue
        sd[f"model.{name}"] = get_model_state_dict(n.module)
        if name in with_optim:
            with requires_grad(n.params):  # the helper sees only parameters that require grad
                sd[f"optim.{name}"] = get_optimizer_state_dict(n.module, n.optimizer)
        if n.ema is not None:
            sd[f"ema.{name}"] = {str(i): s for i, s in enumerate(n.ema.shadow_params)}
    return sd


@contextlib.contextmanager
def requires_grad(params: list[nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def save_sharded(path: Path, nets: dict[str, Any]) -> None:
    """Collective: each rank writes its shards of every trained network, optimizer and EMA (dcp.save).

    An optimizer that has not stepped yet is not saved (the state-dict helper would initialize it, changing
    Adam's step count); it stays empty on resume as it would have.
    """
    import torch.distributed.checkpoint as dcp

    stepped = {name for name, n in nets.items() if n.trained and n.optimizer.state}
    dcp.save(sharded_state(nets, stepped), checkpoint_id=str(Path(path) / SHARDED_DIR))


def load_sharded(path: Path, nets: dict[str, Any]) -> None:
    """Collective: load what `save_sharded` wrote into the (identically sharded) networks, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    d = Path(path) / SHARDED_DIR
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is missing: the checkpoint was not written with distributed.strategy=fsdp2")
    keys = dcp.FileSystemReader(str(d)).read_metadata().state_dict_metadata
    stepped = {name for name in nets if any(k.startswith(f"optim.{name}.") for k in keys)}
    sd = sharded_state(nets, stepped)
    dcp.load(sd, checkpoint_id=str(d))
    for name, n in nets.items():
        if not n.trained:
            continue
        set_model_state_dict(n.module, sd[f"model.{name}"])
        if name in stepped:
            with requires_grad(n.params):  # the helper skips (drops) the states of frozen parameters
                set_optimizer_state_dict(n.module, n.optimizer, sd[f"optim.{name}"])
        if n.ema is not None:
            loaded = sd[f"ema.{name}"]
            with torch.no_grad():
                for i, s in enumerate(n.ema.shadow_params):
                    if loaded[str(i)] is not s:
                        s.copy_(loaded[str(i)])
