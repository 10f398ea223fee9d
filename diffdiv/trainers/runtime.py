"""Process-level plumbing of a run: the accelerator, stop signals, rank-averaged logs, progress, teardown."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def use_cpu(cpu_flag: bool) -> bool:
    return cpu_flag or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def make_accelerator(out: Path, mixed_precision: str, cpu: bool, log_with: str | None,
                     find_unused_parameters: bool = False):
    """An accelerate `Accelerator` logging under out/logs (tensorboard dropped if it is not installed)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    if log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            log_with = None
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(
        mixed_precision=mixed_precision, cpu=use_cpu(cpu), log_with=log_with, kwargs_handlers=[ddp],
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def mean_over_ranks(logs: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Average logged scalars over processes (every rank logs the same keys at the same steps)."""
    if world == 1 or not logs:
        return logs
    keys = sorted(logs)
    v = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(v)
    return {k: float(x) / world for k, x in zip(keys, v.tolist())}


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank if it is True on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if world > 1:
        torch.distributed.all_reduce(t)
    return t.item() > 0


def rank0_decides(flag: bool, world: int, device: torch.device) -> bool:
    """Rank 0's value of `flag` on every rank (for decisions from one clock, e.g. a time budget)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if world > 1:
        torch.distributed.broadcast(t, src=0)
    return t.item() > 0


def flat_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {dotted.key: scalar} for tracker hyper-parameters."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is None:
            out[key] = "none"
        else:
            out[key] = str(v)
    return out


def progress_bar(total: int, initial: int, desc: str):
    """tqdm on stderr; redrawn at most every 30 s when stderr is not a terminal (log files stay short)."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=tty, file=sys.stderr,
                mininterval=0.1 if tty else 30.0, maxinterval=10.0 if tty else 300.0)


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[int], None]):
    """SIGTERM/SIGUSR1 call `on_signal(signum)` while active (clusters send these before a kill)."""
    old = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            old[sig] = signal.signal(sig, lambda signum, frame: on_signal(signum))
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, h)


def dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Tear down the process group cleanly (avoids an abort at exit under accelerate launch)."""
    import torch.distributed as dist

    if dist_ready():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()
