"""The one training loop: accelerate, mixed precision, accumulation, EMA, atomic resume, NaN guard.

A method plugs in by subclassing `Trainer` and implementing:
- `build()`: create networks with `add_network(name, module, lr=..., ema=...)` and frozen parts;
- `phases(step)`: the update schedule, a list of phase names run in order at this step;
- `phase_networks(phase)`: which networks a phase updates (default: the network named like it);
- `loss(phase, micro)`: the (scalar) loss of a phase and a dict of floats to log;
- `export(out_dir)` and optionally `evaluate()`, `should_stop()` (e.g. a wall-clock budget).
Randomness for data and noise comes from `self.rng`, a generator shared by all ranks: each rank
draws the *global* batch and keeps its slice (`randn`, `rand`, `randint`, `local`), so N processes
see exactly the data one process would, and resume restores the stream exactly.
Checkpoint files: `diffdiv.trainers.checkpoint`; network registry: `diffdiv.trainers.networks`;
accelerator, signals and teardown: `diffdiv.trainers.runtime`; FSDP2 sharding (`distributed.strategy: fsdp2`):
`diffdiv.trainers.sharding`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffdiv.config import ConfigError, check, to_dict
from diffdiv.models.base import Denoiser
from diffdiv.models.loading import write_json_atomic
from diffdiv.trainers import checkpoint as ckpt
from diffdiv.trainers import sharding
from diffdiv.trainers.conditions import Conditions
from diffdiv.trainers.networks import (
    Network,
    apply_update,
    ema_swapped,
    enable_gradient_checkpointing,
    freeze_params,
    grads_finite,
    make_network,
    rebuild_network,
    set_trainable,
    weights_finite,
)
from diffdiv.trainers.runtime import (
    any_rank,
    flat_scalars,
    make_accelerator,
    mean_over_ranks,
    progress_bar,
    rank0_decides,
    stop_signals,
)


class TrainingError(RuntimeError):
    """A run stopped for a reason the user must see (e.g. too many non-finite steps)."""


@dataclass
class TrainConfig:
    """Options every trainer shares."""

    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 64  # global batch per micro-step, split across processes
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_clip: float = 1.0  # 0 disables
    ema_decay: float = 0.999  # used by networks added with ema=True; 0 disables
    ema_start: int = 0
    checkpoint_every: int = 500
    keep_last: int = 2
    resume: str | None = "latest"  # latest | <checkpoint dir> | null (start fresh)
    log_every: int = 25
    eval_every: int = 0
    log_with: str | None = "tensorboard"  # any accelerate tracker name, or null
    max_nonfinite: int = 20  # stop after this many non-finite steps in a row
    progress: bool = True
    cpu: bool = False
    deterministic: bool = False
    overwrite: bool = False  # allow writing into an output_dir that holds another run's results
    max_train_time_s: float = 0.0  # > 0: stop after this much training time (evaluation excluded), >= 1 step
    eval_every_s: float = 0.0  # > 0: evaluate every this much training time, from step 0
    distributed: sharding.DistributedConfig = field(default_factory=sharding.DistributedConfig)
    gradient_checkpointing: bool = False  # diffusers activation checkpointing in the trained networks

    def validate(self) -> None:
        check(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        check(self.grad_accum > 0, f"grad_accum must be > 0, got {self.grad_accum}")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        check(self.keep_last >= 1, "keep_last must be >= 1")
        check(self.log_every > 0, "log_every must be > 0")
        check(self.max_nonfinite >= 1, "max_nonfinite must be >= 1")
        check(bool(self.output_dir), "output_dir must not be empty")
        check(self.max_train_time_s >= 0 and self.eval_every_s >= 0, "max_train_time_s and eval_every_s must be >= 0")
        check(not (self.distributed.strategy == "fsdp2" and self.mixed_precision == "fp16"),
              "distributed.strategy=fsdp2 supports mixed_precision no or bf16 (fp16 needs a sharded grad scaler)")


def check_lr(name: str, lr: float) -> None:
    check(lr > 0 and math.isfinite(lr), f"{name} must be a positive number, got {lr}")


@dataclass
class TrainerState:
    """Counters saved with every checkpoint."""

    step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class RunClock:
    """Training wall-clock with evaluation time excluded (`with clock.excluded(): evaluate()`)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.excluded_s = 0.0

    def start(self) -> None:
        self.t0, self.excluded_s = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.perf_counter() - self.t0

    def train_seconds(self) -> float:
        return self.elapsed() - self.excluded_s

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded_s += time.perf_counter() - t


class Trainer:
    """Base trainer; subclasses declare networks, losses and the update schedule."""

    config_cls: type[TrainConfig] = TrainConfig
    name: str = "trainer"
    find_unused_parameters: bool = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.nets: dict[str, Network] = {}
        self.frozen: dict[str, nn.Module] = {}
        self.state = TrainerState()
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.accelerator = None
        self.clock = RunClock()
        self.history: list[dict[str, float]] = []
        self.step_logs: dict[str, float] = {}
        self.active: set[str] = set()
        self.stateful: dict[str, Any] = {}
        self.stop_signal: int | None = None
        self.last_timed_eval: float | None = None
        self.conds: Conditions | None = None  # set by trainers whose models take conditions
        self.shards: list[sharding.Shard] = []

    # ------------------------------------------------------------------ hooks for methods
    def preflight(self) -> None:
        """Validate inputs (paths, shapes) before any process starts work; raise ConfigError."""

    def build(self) -> None:
        raise NotImplementedError

    def phases(self, step: int) -> list[str]:
        return list(self.nets)

    def phase_networks(self, phase: str) -> list[str]:
        return [phase]

    def loss(self, phase: str, micro: int) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def should_stop(self) -> bool:
        """Checked before every step on every rank (must agree across ranks): True ends training early.
        Default: the wall-clock budget `max_train_time_s` is spent (after at least one step; rank 0's clock)."""
        budget = self.cfg.max_train_time_s
        if not budget or self.step == 0:
            return False
        return rank0_decides(self.clock.train_seconds() >= budget, self.world, self.device)

    def evaluate(self) -> dict[str, float]:
        return {}

    def export(self, out_dir: Path) -> None:
        """Write the final model(s) under out_dir (main process only)."""

    # ------------------------------------------------------------------ helpers for methods
    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator is not None else torch.device("cpu")

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def sharded(self) -> bool:
        """FSDP2 in use: `distributed.strategy: fsdp2` with more than one process (one process runs plain)."""
        return self.cfg.distributed.strategy == "fsdp2" and self.world > 1

    @property
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.world

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def add_network(self, name: str, module: nn.Module, lr: float | None = None, betas=(0.9, 0.999),
                    weight_decay: float = 0.0, ema: bool = False, grad_clip: float | None = None,
                    params: list[nn.Parameter] | None = None, warmup_steps: int = 0) -> nn.Module:
        """Register a trainable network (lr=None: trained by no phase, e.g. fixed).

        `params` restricts training to a subset (e.g. LoRA weights); the rest stays frozen.
        `warmup_steps` ramps the learning rate linearly from 0 over that many updates.
        """
        n = make_network(module, lr, betas, weight_decay, params, grad_clip, warmup_steps,
                         ema_decay=self.cfg.ema_decay if ema else 0.0, ema_start=self.cfg.ema_start)
        self.nets[name] = n
        if n.lr_sched is not None:
            self.register_state(f"lr.{name}", n.lr_sched)
        return module

    def add_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Register a frozen module (teacher, reward): eval mode, no grads, moved to device."""
        module.requires_grad_(False).eval()
        self.frozen[name] = module
        return module

    def register_state(self, name: str, obj: Any) -> None:
        """An object with state_dict()/load_state_dict() saved in checkpoints (tensors or JSON values)."""
        self.stateful[name] = obj

    def net(self, name: str) -> nn.Module:
        """The network to call: DDP-wrapped while its phase is running, plain otherwise."""
        n = self.nets[name]
        if name in self.active and n.wrapped is not None:
            return n.wrapped
        return n.module

    def local(self, x: Tensor) -> Tensor:
        """This rank's slice of a global-batch tensor (any global size divisible by the process count)."""
        n = x.shape[0]
        if n % self.world:
            raise ConfigError(f"a global batch of {n} is not divisible by the {self.world} processes")
        per = n // self.world
        return x[self.rank * per:(self.rank + 1) * per].to(self.device)

    def randn(self, *shape: int, n: int | None = None) -> Tensor:
        """Local slice of global N(0, I) noise of shape (n or batch_size, *shape)."""
        return self.local(torch.randn(n or self.cfg.batch_size, *shape, generator=self.rng))

    def rand(self, n: int | None = None) -> Tensor:
        return self.local(torch.rand(n or self.cfg.batch_size, generator=self.rng))

    def randint(self, high: int, n: int | None = None) -> Tensor:
        return self.local(torch.randint(high, (n or self.cfg.batch_size,), generator=self.rng))

    def draw_cond(self, n: int | None = None) -> tuple[Tensor | None, Any]:
        """This rank's (choice indices, condition batch) for a global batch of n (None, None if unconditional)."""
        if self.conds is None or not self.conds.count:
            return None, None
        idx = self.randint(self.conds.count, n=n)
        return idx, self.conds.encode(idx, self.device)

    def eval_cond(self, n: int, start: int = 0) -> Any:
        """The fixed evaluation conditions of samples start..start+n-1 (choices in turn)."""
        if self.conds is None or not self.conds.count:
            return None
        return self.conds.encode(self.conds.cycle(start, n), self.device)

    def all_mean(self, x: Tensor) -> Tensor:
        """Mean of a local tensor over all ranks (differentiable pieces stay local)."""
        if self.world == 1:
            return x
        y = x.detach().clone()
        torch.distributed.all_reduce(y)
        return y / self.world

    def log(self, **values: float) -> None:
        """Extra scalars for the current step (merged into the step's log)."""
        self.step_logs.update({k: float(v) for k, v in values.items()})

    def print(self, *args: Any) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            print(*args, flush=True)

    # ------------------------------------------------------------------ checkpoints
    def state_payload(self) -> ckpt.Payload:
        """Counters, RNG, EMA shadows and registered objects as (JSON values, tensors)."""
        js: dict[str, Any] = {"step": self.state.step, "nonfinite_total": self.state.nonfinite_total,
                              "nonfinite_in_row": self.state.nonfinite_in_row, "extra": self.state.extra,
                              "history": self.history, "objects": {}}
        tens: dict[str, Tensor] = {"rng": self.rng.get_state()}
        for name, n in self.nets.items():
            if n.ema is not None:
                sd = n.ema.state_dict()
                js["objects"][f"ema.{name}"] = {k: v for k, v in sd.items() if k != "shadow_params"}
                if self.sharded:  # sharded shadows are written by every rank in write_models
                    continue
                for i, p in enumerate(sd["shadow_params"]):
                    tens[f"ema.{name}.{i}"] = p.detach().cpu().contiguous()
        for name, obj in self.stateful.items():
            sd = obj.state_dict()
            js["objects"][name] = {k: v for k, v in sd.items() if not torch.is_tensor(v)}
            tens.update({f"obj.{name}.{k}": v for k, v in ckpt.tensors_to_cpu(sd).items()})
        return js, tens

    def load_payload(self, payload: ckpt.Payload) -> None:
        js, tens = payload
        self.state.step = js["step"]
        self.state.nonfinite_total = js["nonfinite_total"]
        self.state.nonfinite_in_row = js["nonfinite_in_row"]
        self.state.extra = js.get("extra", {})
        self.history = js.get("history", [])
        self.rng.set_state(tens["rng"])
        for name, n in self.nets.items():
            if n.ema is not None:
                sd = dict(js["objects"][f"ema.{name}"])
                if self.sharded:  # read_models loaded the sharded shadows in place
                    sd["shadow_params"] = n.ema.shadow_params
                else:
                    count = len([k for k in tens if k.startswith(f"ema.{name}.")])
                    sd["shadow_params"] = [tens[f"ema.{name}.{i}"].to(self.device) for i in range(count)]
                n.ema.load_state_dict(sd)
        for name, obj in self.stateful.items():
            sd = dict(js["objects"].get(name, {}))
            prefix = f"obj.{name}."
            sd.update({k[len(prefix):]: v for k, v in tens.items() if k.startswith(prefix)})
            obj.load_state_dict(sd)

    def write_models(self, path: Path) -> None:
        """Networks, optimizers and this rank's RNG states into a checkpoint dir (every rank calls this).

        DDP: accelerate's `save_state`. FSDP2: each rank writes its shards of networks, optimizers and EMA
        shadows with torch.distributed.checkpoint into `path/sharded/`, and its RNG states."""
        if self.sharded:
            sharding.save_sharded(path, self.nets)
            ckpt.write_rng_state(path, self.rank)
            return
        self.accelerator.save_state(str(path), safe_serialization=True)

    def read_models(self, path: Path) -> None:
        if self.sharded:
            sharding.load_sharded(path, self.nets)
            ckpt.read_rng_state(path, self.rank)
            return
        self.accelerator.load_state(str(path))

    def all_finite(self, module_or_params: nn.Module | list[Tensor]) -> bool:
        """Finite weights on every rank (sharded: each rank checks its shards, then all agree)."""
        ok = weights_finite(module_or_params)
        return not any_rank(not ok, self.world, self.device) if self.sharded else ok

    def full_models(self):
        """Context: rank 0 sees full (unsharded) copies of the sharded networks, for export and evaluation.
        Every rank must enter it (the weights are gathered); a no-op without sharding."""
        if not self.sharded:
            return contextlib.nullcontext()
        tops = [n.module for n in self.nets.values()] + list(self.frozen.values())
        return sharding.full_weights(self.shards, tops, self.rank, self.device)

    def evaluation(self) -> dict[str, float]:
        """`evaluate()` with full weights on rank 0 when sharded; every rank calls this."""
        with self.full_models():
            return self.evaluate()

    def save_checkpoint(self) -> Path:
        """Atomic: every rank writes into a temp dir, rank 0 seals it with a manifest and renames."""
        for name, n in self.nets.items():
            if not self.all_finite(n.module):
                raise TrainingError(f"refusing to checkpoint: network '{name}' has non-finite weights")
        return ckpt.save_checkpoint(self.accelerator, self.ckpt_dir, self.state.step, self.cfg.keep_last,
                                    self.state_payload, self.write_models)

    # ------------------------------------------------------------------ setup
    def check_output_dir(self) -> None:
        results = [self.out / "metrics.json", self.out / "student"]
        has_ckpt = bool(ckpt.list_checkpoints(self.ckpt_dir))
        if any(p.exists() for p in results) and not has_ckpt and not self.cfg.overwrite:
            raise ConfigError(f"output_dir {self.out} already holds results of another run "
                              "(set overwrite=true or choose another output_dir)")

    def prepare_networks(self) -> None:
        """Move frozen and trained networks to the device; wrap trained ones (DDP) with their optimizers, or
        shard them (FSDP2)."""
        acc = self.accelerator
        if self.cfg.gradient_checkpointing:
            self.enable_checkpointing()
        if self.sharded:
            self.shard_networks()
            return
        for m in self.frozen.values():
            m.to(acc.device)
        for n in self.nets.values():
            n.module.to(acc.device)
            for p in n.params:
                p.requires_grad_(True)
            if n.trained:
                n.wrapped, n.optimizer = acc.prepare(n.module, n.optimizer)
                if n.ema is not None:
                    n.ema.to(acc.device)
        freeze_params(self.nets)

    def enable_checkpointing(self) -> None:
        """diffusers' gradient checkpointing in every trained network that has diffusers models."""
        on, off = [], []
        for name, n in self.nets.items():
            if n.trained:
                a, b = enable_gradient_checkpointing(n.module)
                on += [f"{name}.{x}" if x else name for x in a]
                off += [f"{name}.{x}" if x else name for x in b]
        self.print(f"gradient checkpointing on for: {', '.join(on) or 'none'}"
                   + (f"; not applied (not a diffusers model that supports it): {', '.join(off)}" if off else ""))

    def shard_networks(self) -> None:
        """FSDP2: shard frozen denoisers (`shard_frozen`) and every trained network, then rebuild each trained
        network's optimizer, warmup and EMA on its sharded parameters (nothing is `acc.prepare`d)."""
        acc, dc, mp = self.accelerator, self.cfg.distributed, self.cfg.mixed_precision
        mesh = sharding.device_mesh(acc.device, self.world)
        for m in self.frozen.values():
            m.to(acc.device)
            if dc.shard_frozen and isinstance(m, Denoiser):
                self.shards += sharding.shard_module(m, mesh, mp, dc.reshard_after_forward)
        for name, n in list(self.nets.items()):
            n.module.to(acc.device)
            for p in n.params:
                p.requires_grad_(True)
            if not n.trained:
                continue
            names = sharding.param_names(n.module, n.params)
            self.shards += sharding.shard_module(n.module, mesh, mp, dc.reshard_after_forward, n.params)
            rebuilt = rebuild_network(n, n.module, sharding.params_by_name(n.module, names))
            rebuilt.shard_roots = sharding.shard_roots(n.module)
            plain = [k for k, p in n.module.named_parameters() if not sharding.is_dtensor(p)]
            if plain:
                raise TrainingError(f"network '{name}': parameters outside every FSDP root ({plain[0]}, ...)")
            self.nets[name] = rebuilt
            if rebuilt.lr_sched is not None:
                self.register_state(f"lr.{name}", rebuilt.lr_sched)
        freeze_params(self.nets)
        self.report_shards()

    def report_shards(self) -> None:
        """Every rank's local shard sizes (measured on the local tensors) -> `output_dir/sharding.json`."""
        modules = {name: n.module for name, n in self.nets.items() if n.shard_roots}
        modules.update({f"frozen.{name}": m for name, m in self.frozen.items() if sharding.is_sharded(m)})
        table = sharding.shard_table(modules, self.world)
        if self.accelerator.is_main_process:
            write_json_atomic(self.out / "sharding.json", table)
            self.print(sharding.describe(table))

    def setup(self) -> None:
        """Create the accelerator, build networks, prepare them, resume. Idempotent."""
        if self.accelerator is not None:
            return
        cfg = self.cfg
        self.preflight()
        self.check_output_dir()
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        self.accelerator = acc = make_accelerator(self.out, cfg.mixed_precision, cfg.cpu, cfg.log_with,
                                                  self.find_unused_parameters)
        if cfg.batch_size % acc.num_processes:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {acc.num_processes} processes")
        if acc.is_main_process:
            ckpt.remove_stale(self.ckpt_dir)
        acc.wait_for_everyone()
        self.build()
        self.prepare_networks()
        ck = ckpt.resume_checkpoint(self.ckpt_dir, cfg.resume, self.read_models, self.load_payload, self.print)
        if ck is not None:
            self.print(f"resumed from {ck} at step {self.state.step}")

    # ------------------------------------------------------------------ one step
    def run_phase(self, phase: str) -> tuple[dict[str, float], bool]:
        """Accumulate the phase's loss over micro-batches, then update its networks; (logs, finite)."""
        acc, cfg = self.accelerator, self.cfg
        names = [n for n in self.phase_networks(phase) if self.nets[n].trained]
        self.active = set(names)
        set_trainable(self.nets, self.active)
        for name in names:
            self.nets[name].optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        finite = True
        for micro in range(cfg.grad_accum):
            ctx = contextlib.ExitStack()
            if micro < cfg.grad_accum - 1 and self.world > 1:
                for name in names:
                    n = self.nets[name]
                    ctx.enter_context(sharding.gradient_sync_off(n.shard_roots) if self.sharded
                                      else acc.no_sync(n.wrapped))
            with ctx, acc.autocast():
                loss, parts = self.loss(phase, micro)
                finite = finite and bool(torch.isfinite(loss.detach()).all())
                acc.backward(loss / cfg.grad_accum)
            for k, v in {**parts, "loss": float(loss.detach())}.items():
                logs[f"{phase}/{k}"] = logs.get(f"{phase}/{k}", 0.0) + float(v) / cfg.grad_accum
        nets = [self.nets[name] for name in names]
        ok = not any_rank(not (finite and grads_finite(nets)), self.world, acc.device)  # skip on every rank
        clip_fn = sharding.clip_grad_norm if self.sharded else acc.clip_grad_norm_
        for name, n in zip(names, nets):
            if not ok:
                n.optimizer.zero_grad(set_to_none=True)
                continue
            gn = apply_update(n, cfg.grad_clip if n.grad_clip is None else n.grad_clip, clip_fn)
            if gn is not None:
                logs[f"{phase}/grad_norm_{name}"] = gn
        if not ok:
            logs[f"{phase}/skipped_nonfinite"] = 1.0
        freeze_params(self.nets)
        self.active = set()
        return logs, ok

    def train_step(self) -> dict[str, float]:
        """Every phase of this step, the non-finite guard, then step += 1."""
        self.step_logs = {}
        logs: dict[str, float] = {}
        all_ok = True
        for phase in self.phases(self.state.step):
            phase_logs, ok = self.run_phase(phase)
            logs.update(phase_logs)
            all_ok = all_ok and ok
        st = self.state
        st.nonfinite_total += 0 if all_ok else 1
        st.nonfinite_in_row = 0 if all_ok else st.nonfinite_in_row + 1
        if st.nonfinite_in_row >= self.cfg.max_nonfinite:
            raise TrainingError(f"stopped: {st.nonfinite_in_row} steps in a row had a non-finite loss or gradient "
                                f"(step {st.step}); lower the learning rate or check the inputs")
        st.step += 1
        logs.update(self.step_logs)
        logs["nonfinite_total"] = float(st.nonfinite_total)
        return logs

    def record(self, logs: dict[str, float], bar: Any) -> None:
        """Rank-averaged logs to the history, the trackers and the progress bar (every log_every steps)."""
        cfg, step = self.cfg, self.state.step
        if step % cfg.log_every and step != cfg.max_steps:
            return
        logs = mean_over_ranks(logs, self.world, self.device)
        logs["step"] = float(step)
        logs["elapsed_s"] = self.clock.elapsed()
        self.history.append(logs)
        if cfg.log_with:
            self.accelerator.log(logs, step=step)
        if bar is not None:
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.endswith("/loss")},
                            refresh=False)

    def timed_evaluation(self) -> None:
        """Evaluate every `eval_every_s` of training time, from step 0 (excluded from the training clock)."""
        every = self.cfg.eval_every_s
        if every and (self.last_timed_eval is None or self.clock.train_seconds() - self.last_timed_eval >= every):
            self.last_timed_eval = self.clock.train_seconds()
            with self.clock.excluded():
                self.evaluation()  # full weights on rank 0 under FSDP2

    def periodic(self) -> None:
        """Evaluation (excluded from the training clock) and checkpoints due at this step."""
        cfg, step = self.cfg, self.state.step
        if cfg.eval_every and step % cfg.eval_every == 0:
            with self.clock.excluded():
                ev = self.evaluation()
            if ev and cfg.log_with:
                self.accelerator.log({f"eval/{k}": v for k, v in ev.items()}, step=step)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or self.stop_signal is not None:
            self.save_checkpoint()
        if self.stop_signal is not None:
            self.print(f"received signal {self.stop_signal}: checkpoint saved at step {step}")
            raise KeyboardInterrupt

    def request_stop(self, signum: int) -> None:
        self.stop_signal = signum

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        """Run to max_steps (resuming if possible), export, evaluate; returns final metrics."""
        self.setup()
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        if cfg.log_with:
            acc.init_trackers(self.name, config=flat_scalars(to_dict(cfg)))
        bar = progress_bar(cfg.max_steps, self.state.step, self.name) if cfg.progress and acc.is_main_process \
            else None
        self.clock.start()
        try:
            with stop_signals(self.request_stop):
                while self.state.step < cfg.max_steps:
                    self.timed_evaluation()
                    if self.should_stop():
                        break
                    logs = self.train_step()
                    self.record(logs, bar)
                    if bar is not None:
                        bar.update(1)
                    self.periodic()
            if bar is not None:
                bar.close()
            if cfg.checkpoint_every and not ckpt.list_checkpoints(self.ckpt_dir, step=self.state.step):
                self.save_checkpoint()
            return self.finish(self.clock.train_seconds())
        finally:
            if bar is not None:
                bar.close()

    def finish(self, train_time: float) -> dict[str, float]:
        """Export the model(s), write metrics.json (main process), close the trackers (not the process group:
        accelerate's `end_training` would destroy it under every rank still running; `runtime.shutdown` does)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        metrics: dict[str, Any] = {}
        with self.ema_weights():
            for name, n in self.nets.items():
                if not self.all_finite(n.params):
                    raise TrainingError(f"refusing to export: network '{name}' has non-finite weights")
            with self.full_models():  # sharded: every rank gathers, rank 0 exports full weights
                if acc.is_main_process:
                    self.export(self.out)
                acc.wait_for_everyone()
                metrics.update(self.evaluate())
        metrics["train_time_s"] = train_time
        metrics["steps"] = self.state.step
        metrics["nonfinite_total"] = self.state.nonfinite_total
        if acc.is_main_process:
            write_json_atomic(self.out / "metrics.json", metrics)
        acc.wait_for_everyone()
        if self.cfg.log_with:
            for tracker in acc.trackers:
                tracker.finish()
        return metrics

    def ema_weights(self):
        """Temporarily swap EMA weights into networks that keep an EMA."""
        return ema_swapped(self.nets.values())
