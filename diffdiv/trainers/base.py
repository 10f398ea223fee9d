"""The one training loop: accelerate, mixed precision, accumulation, EMA, atomic resume, NaN guard.

A method plugs in by subclassing `Trainer` and implementing:
- `build()`: create networks with `add_network(name, module, lr=..., ema=...)` and frozen parts;
- `phases(step)`: the update schedule, a list of phase names run in order at this step;
- `phase_networks(phase)`: which networks a phase updates (default: the network named like it);
- `loss(phase, micro)`: the (scalar) loss of a phase and a dict of floats to log;
- `export(out_dir)` and optionally `evaluate()`.
Randomness for data and noise comes from `self.rng`, a generator shared by all ranks: each rank
draws the *global* batch and keeps its slice (`randn`, `rand`, `randint`, `local`), so N processes
see exactly the data one process would, and resume restores the stream exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffdiv.config import ConfigError, check, to_dict

CKPT_PREFIX = "step_"
COMPLETE_FILE = "COMPLETE.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_tensors.safetensors"


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


def check_lr(name: str, lr: float) -> None:
    check(lr > 0 and math.isfinite(lr), f"{name} must be a positive number, got {lr}")


@dataclass
class _Net:
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    wrapped: nn.Module | None = None
    ema: Any = None
    grad_clip: float | None = None
    params: list = field(default_factory=list)
    lr_sched: Any = None


@dataclass
class TrainerState:
    """Counters saved with every checkpoint."""

    step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Base trainer; subclasses declare networks, losses and the update schedule."""

    config_cls: type[TrainConfig] = TrainConfig
    name: str = "trainer"
    find_unused_parameters: bool = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.nets: dict[str, _Net] = {}
        self.frozen: dict[str, nn.Module] = {}
        self.state = TrainerState()
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.accelerator = None
        self._active: set[str] = set()
        self._stateful: dict[str, Any] = {}
        self.history: list[dict[str, float]] = []
        self._stop_signal: int | None = None

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
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.world

    @property
    def step(self) -> int:
        return self.state.step

    def add_network(self, name: str, module: nn.Module, lr: float | None = None, betas=(0.9, 0.999),
                    weight_decay: float = 0.0, ema: bool = False, grad_clip: float | None = None,
                    params: list[nn.Parameter] | None = None, warmup_steps: int = 0) -> nn.Module:
        """Register a trainable network (lr=None: trained by no phase, e.g. fixed).

        `params` restricts training to a subset (e.g. LoRA weights); the rest stays frozen.
        `warmup_steps` ramps the learning rate linearly from 0 over that many updates.
        """
        params = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay) if lr else None
        self.nets[name] = _Net(module=module, optimizer=opt, grad_clip=grad_clip, params=params)
        if opt is not None and warmup_steps > 0:
            w = int(warmup_steps)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / w))
            self.nets[name].lr_sched = sched
            self.register_state(f"lr.{name}", sched)
        if ema and self.cfg.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.nets[name].ema = EMAModel(params, decay=self.cfg.ema_decay, update_after_step=self.cfg.ema_start)
        return module

    def add_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Register a frozen module (teacher, reward): eval mode, no grads, moved to device."""
        module.requires_grad_(False).eval()
        self.frozen[name] = module
        return module

    def register_state(self, name: str, obj: Any) -> None:
        """An object with state_dict()/load_state_dict() saved in checkpoints (tensors or JSON values)."""
        self._stateful[name] = obj

    def net(self, name: str) -> nn.Module:
        """The network to call: DDP-wrapped while its phase is running, plain otherwise."""
        n = self.nets[name]
        if name in self._active and n.wrapped is not None:
            return n.wrapped
        return n.module

    def local(self, x: Tensor) -> Tensor:
        """This rank's slice of a global-batch tensor."""
        b = self.local_batch
        return x[self.rank * b:(self.rank + 1) * b].to(self.device)

    def randn(self, *shape: int, n: int | None = None) -> Tensor:
        """Local slice of global N(0, I) noise of shape (batch_size, *shape)."""
        n = n or self.cfg.batch_size
        return self.local(torch.randn(n, *shape, generator=self.rng))

    def rand(self, n: int | None = None) -> Tensor:
        return self.local(torch.rand(n or self.cfg.batch_size, generator=self.rng))

    def randint(self, high: int, n: int | None = None) -> Tensor:
        return self.local(torch.randint(high, (n or self.cfg.batch_size,), generator=self.rng))

    def all_mean(self, x: Tensor) -> Tensor:
        """Mean of a local tensor over all ranks (differentiable pieces stay local)."""
        if self.world == 1:
            return x
        y = x.detach().clone()
        torch.distributed.all_reduce(y)
        return y / self.world

    def _mean_over_ranks(self, logs: dict[str, float]) -> dict[str, float]:
        """Average logged scalars over processes (every rank logs the same keys at the same steps)."""
        if self.world == 1 or not logs:
            return logs
        keys = sorted(logs)
        v = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(v)
        return {k: float(x) / self.world for k, x in zip(keys, v.tolist())}

    def log(self, **values: float) -> None:
        """Extra scalars for the current step (merged into the step's log)."""
        self._extra_logs.update({k: float(v) for k, v in values.items()})

    # ------------------------------------------------------------------ checkpoints
    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def _state_payload(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        js: dict[str, Any] = {"step": self.state.step, "nonfinite_total": self.state.nonfinite_total,
                              "nonfinite_in_row": self.state.nonfinite_in_row, "extra": self.state.extra,
                              "history": self.history, "objects": {}}
        tens: dict[str, Tensor] = {"rng": self.rng.get_state()}
        for name, n in self.nets.items():
            if n.ema is not None:
                sd = n.ema.state_dict()
                js["objects"][f"ema.{name}"] = {k: v for k, v in sd.items() if k != "shadow_params"}
                for i, p in enumerate(sd["shadow_params"]):
                    tens[f"ema.{name}.{i}"] = p.detach().cpu().contiguous()
        for name, obj in self._stateful.items():
            sd = obj.state_dict()
            js["objects"][name] = {k: v for k, v in sd.items() if not torch.is_tensor(v)}
            for k, v in sd.items():
                if torch.is_tensor(v):
                    tens[f"obj.{name}.{k}"] = v.detach().cpu().contiguous()
        return js, tens

    def _load_payload(self, js: dict[str, Any], tens: dict[str, Tensor]) -> None:
        self.state.step = js["step"]
        self.state.nonfinite_total = js["nonfinite_total"]
        self.state.nonfinite_in_row = js["nonfinite_in_row"]
        self.state.extra = js.get("extra", {})
        self.history = js.get("history", [])
        self.rng.set_state(tens["rng"])
        for name, n in self.nets.items():
            if n.ema is not None:
                sd = dict(js["objects"][f"ema.{name}"])
                count = len([k for k in tens if k.startswith(f"ema.{name}.")])
                sd["shadow_params"] = [tens[f"ema.{name}.{i}"].to(self.device) for i in range(count)]
                n.ema.load_state_dict(sd)
        for name, obj in self._stateful.items():
            sd = dict(js["objects"].get(name, {}))
            prefix = f"obj.{name}."
            sd.update({k[len(prefix):]: v for k, v in tens.items() if k.startswith(prefix)})
            obj.load_state_dict(sd)

    def save_checkpoint(self) -> Path | None:
        """Atomic: every rank writes into a temp dir, rank 0 seals it with a manifest and renames."""
        acc = self.accelerator
        for name, n in self.nets.items():
            for p in n.module.parameters():
                if not torch.isfinite(p).all():
                    raise TrainingError(f"refusing to checkpoint: network '{name}' has non-finite weights")
        step = self.state.step
        final = self.ckpt_dir / f"{CKPT_PREFIX}{step:08d}"
        tmp = self.ckpt_dir / f".tmp-{CKPT_PREFIX}{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            js, tens = self._state_payload()
            save_file(tens, str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(json.dumps(js))
        acc.wait_for_everyone()
        if acc.is_main_process:
            manifest = {"step": step, "time": time.time(), "world": self.world,
                        "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                                  for p in sorted(tmp.iterdir()) if p.is_file()}}
            with open(tmp / COMPLETE_FILE, "w") as f:
                json.dump(manifest, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        ckpts = list_checkpoints(self.ckpt_dir)
        for old in ckpts[: max(0, len(ckpts) - self.cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        r = self.cfg.resume
        if r is None or r in ("", "none", "never"):
            return
        if r == "latest":
            candidates = list(reversed(list_checkpoints(self.ckpt_dir)))
        else:
            candidates = [Path(r)]
        for ck in candidates:
            problem = verify_checkpoint(ck)
            if problem:
                self.print(f"skipping checkpoint {ck}: {problem}")
                if r != "latest":
                    raise ConfigError(f"resume={r}: {problem}")
                continue
            try:
                self.accelerator.load_state(str(ck))
                js = json.loads((ck / STATE_JSON).read_text())
                tens = load_file(str(ck / STATE_TENSORS))
                self._load_payload(js, tens)
            except Exception as e:  # corrupt despite the manifest
                self.print(f"skipping checkpoint {ck}: cannot load ({type(e).__name__}: {e})")
                if r != "latest":
                    raise ConfigError(f"resume={r}: cannot load ({type(e).__name__})") from None
                continue
            self.print(f"resumed from {ck} at step {self.state.step}")
            return

    # ------------------------------------------------------------------ the loop
    def print(self, *args: Any) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            print(*args, flush=True)

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cpu = self.cfg.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        log_with = self.cfg.log_with
        if log_with == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                log_with = None
        from accelerate.utils import DistributedDataParallelKwargs

        ddp = DistributedDataParallelKwargs(find_unused_parameters=self.find_unused_parameters)
        return Accelerator(
            mixed_precision=self.cfg.mixed_precision, cpu=cpu, log_with=log_with, kwargs_handlers=[ddp],
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )

    def _check_output_dir(self) -> None:
        results = [self.out / "metrics.json", self.out / "student"]
        has_ckpt = bool(list_checkpoints(self.ckpt_dir))
        if any(p.exists() for p in results) and not has_ckpt and not self.cfg.overwrite:
            raise ConfigError(f"output_dir {self.out} already holds results of another run "
                              "(set overwrite=true or choose another output_dir)")

    def setup(self) -> None:
        """Create the accelerator, build networks, prepare them, resume. Idempotent."""
        if self.accelerator is not None:
            return
        self.preflight()
        self._check_output_dir()
        if self.cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(self.cfg.seed)
        self.accelerator = acc = self._make_accelerator()
        if self.cfg.batch_size % acc.num_processes:
            raise ConfigError(f"batch_size {self.cfg.batch_size} is not divisible by the "
                              f"{acc.num_processes} processes")
        if acc.is_main_process and self.ckpt_dir.is_dir():
            for stale in self.ckpt_dir.glob(f".tmp-{CKPT_PREFIX}*"):  # saves interrupted by a crash
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        self.build()
        for m in self.frozen.values():
            m.to(acc.device)
        for _name, n in self.nets.items():
            n.module.to(acc.device)
            for p in n.params:
                p.requires_grad_(True)
            if n.optimizer is not None:
                n.wrapped, n.optimizer = acc.prepare(n.module, n.optimizer)
                if n.ema is not None:
                    n.ema.to(acc.device)
        for n in self.nets.values():
            for p in n.params:
                p.requires_grad_(False)
        self._resume()

    def _run_phase(self, phase: str) -> dict[str, float]:
        acc = self.accelerator
        names = [n for n in self.phase_networks(phase) if self.nets[n].optimizer is not None]
        self._active = set(names)
        for name, n in self.nets.items():
            for p in n.params:
                p.requires_grad_(name in self._active)
            n.module.train(name in self._active)
        for name in names:
            self.nets[name].optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        finite = True
        for micro in range(self.cfg.grad_accum):
            last = micro == self.cfg.grad_accum - 1
            ctx = contextlib.ExitStack()
            if not last and self.world > 1:
                for name in names:
                    ctx.enter_context(acc.no_sync(self.nets[name].wrapped))
            with ctx, acc.autocast():
                loss, parts = self.loss(phase, micro)
                finite = finite and bool(torch.isfinite(loss.detach()).all())
                acc.backward(loss / self.cfg.grad_accum)
            for k, v in parts.items():
                logs[f"{phase}/{k}"] = logs.get(f"{phase}/{k}", 0.0) + float(v) / self.cfg.grad_accum
            logs[f"{phase}/loss"] = logs.get(f"{phase}/loss", 0.0) + float(loss.detach()) / self.cfg.grad_accum
        params = [p for name in names for p in self.nets[name].params if p.grad is not None]
        finite_grads = all(bool(torch.isfinite(p.grad).all()) for p in params)
        flag = torch.tensor([0.0 if (finite and finite_grads) else 1.0], device=acc.device)
        if self.world > 1:
            torch.distributed.all_reduce(flag)
        if flag.item() > 0:  # skip on every rank together
            for name in names:
                self.nets[name].optimizer.zero_grad(set_to_none=True)
            logs[f"{phase}/skipped_nonfinite"] = 1.0
            self._phase_nonfinite = True
        else:
            for name in names:
                n = self.nets[name]
                clip = self.cfg.grad_clip if n.grad_clip is None else n.grad_clip
                if clip > 0:
                    gn = acc.clip_grad_norm_(n.params, clip)
                    logs[f"{phase}/grad_norm_{name}"] = float(gn)
                n.optimizer.step()
                n.optimizer.zero_grad(set_to_none=True)
                if n.lr_sched is not None:
                    n.lr_sched.step()
                if n.ema is not None:
                    n.ema.step(n.params)
        for n in self.nets.values():
            for p in n.params:
                p.requires_grad_(False)
        self._active = set()
        return logs

    def train(self) -> dict[str, float]:
        """Run to max_steps (resuming if possible), export, evaluate; returns final metrics."""
        self.setup()
        acc = self.accelerator
        cfg = self.cfg
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        if cfg.log_with:
            acc.init_trackers(self.name, config=_flat_scalars(to_dict(cfg)))
        bar = None
        if cfg.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.state.step, desc=self.name, dynamic_ncols=True,
                       file=sys.stderr)
        old_handlers = _install_stop_handlers(self)
        t0 = time.time()
        try:
            while self.state.step < cfg.max_steps:
                self._extra_logs: dict[str, float] = {}
                self._phase_nonfinite = False
                logs: dict[str, float] = {}
                for phase in self.phases(self.state.step):
                    logs.update(self._run_phase(phase))
                if self._phase_nonfinite:
                    self.state.nonfinite_total += 1
                    self.state.nonfinite_in_row += 1
                    if self.state.nonfinite_in_row >= cfg.max_nonfinite:
                        raise TrainingError(
                            f"stopped: {self.state.nonfinite_in_row} steps in a row had a non-finite loss or "
                            f"gradient (step {self.state.step}); lower the learning rate or check the inputs")
                else:
                    self.state.nonfinite_in_row = 0
                self.state.step += 1
                logs.update(self._extra_logs)
                logs["nonfinite_total"] = float(self.state.nonfinite_total)
                if self.state.step % cfg.log_every == 0 or self.state.step == cfg.max_steps:
                    logs = self._mean_over_ranks(logs)
                    logs["step"] = float(self.state.step)
                    logs["elapsed_s"] = time.time() - t0
                    self.history.append(logs)
                    if cfg.log_with:
                        acc.log(logs, step=self.state.step)
                    if bar is not None:
                        bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()
                                         if k.endswith("/loss")}, refresh=False)
                if cfg.eval_every and self.state.step % cfg.eval_every == 0:
                    ev = self.evaluate()
                    if ev and cfg.log_with:
                        acc.log({f"eval/{k}": v for k, v in ev.items()}, step=self.state.step)
                if bar is not None:
                    bar.update(1)
                if (cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0) or \
                        self._stop_signal is not None:
                    self.save_checkpoint()
                if self._stop_signal is not None:
                    self.print(f"received signal {self._stop_signal}: checkpoint saved at step {self.state.step}")
                    raise KeyboardInterrupt
            if bar is not None:
                bar.close()
            if cfg.checkpoint_every and not list_checkpoints(self.ckpt_dir, step=self.state.step):
                self.save_checkpoint()
            train_time = time.time() - t0
            metrics = self.finish(train_time)
        finally:
            _restore_handlers(old_handlers)
            if bar is not None:
                bar.close()
        return metrics

    def finish(self, train_time: float) -> dict[str, float]:
        """Export the model(s) and write metrics.json (main process), then close trackers."""
        acc = self.accelerator
        acc.wait_for_everyone()
        metrics: dict[str, Any] = {}
        with self.ema_weights():
            for name, n in self.nets.items():
                if not all(bool(torch.isfinite(p).all()) for p in n.params):
                    raise TrainingError(f"refusing to export: network '{name}' has non-finite weights")
            if acc.is_main_process:
                self.export(self.out)
            acc.wait_for_everyone()
            metrics.update(self.evaluate())
        metrics["train_time_s"] = train_time
        metrics["steps"] = self.state.step
        metrics["nonfinite_total"] = self.state.nonfinite_total
        if acc.is_main_process:
            from diffdiv.models.loading import write_json_atomic

            write_json_atomic(self.out / "metrics.json", metrics)
        acc.wait_for_everyone()
        if self.cfg.log_with:
            acc.end_training()
        return metrics

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily swap EMA weights into networks that keep an EMA."""
        swapped = [n for n in self.nets.values() if n.ema is not None]
        for n in swapped:
            n.ema.store(n.params)
            n.ema.copy_to(n.params)
        try:
            yield
        finally:
            for n in swapped:
                n.ema.restore(n.params)


def list_checkpoints(ckpt_dir: Path, step: int | None = None) -> list[Path]:
    """Sealed checkpoint dirs, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    out = sorted(p for p in Path(ckpt_dir).iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))
    if step is not None:
        out = [p for p in out if p.name == f"{CKPT_PREFIX}{step:08d}"]
    return out


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is sealed and every file matches its manifest, else the problem."""
    path = Path(path)
    mf = path / COMPLETE_FILE
    if not path.is_dir():
        return "not a directory"
    if not mf.is_file():
        return "incomplete (no COMPLETE.json manifest: the save was interrupted)"
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, OSError):
        return "manifest unreadable"
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != info["size"]:
            return f"file {name} has the wrong size (truncated or overwritten)"
        if _sha256(f) != info["sha256"]:
            return f"file {name} is corrupt (checksum mismatch)"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _flat_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is None:
            out[key] = "none"
        else:
            out[key] = str(v)
    return out


def _install_stop_handlers(trainer: Trainer):
    """SIGTERM/SIGUSR1: finish the step, checkpoint, stop (clusters send these before a kill)."""
    old = {}

    def handler(signum, frame):
        trainer._stop_signal = signum

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass
    return old


def _restore_handlers(old) -> None:
    for sig, h in old.items():
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, h)
