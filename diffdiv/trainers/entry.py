"""Command-line entry for `train/<job>.py --config X.yaml key=value ...`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from diffdiv.config import ConfigError, load_config
from diffdiv.trainers.base import Trainer, TrainingError
from diffdiv.trainers.runtime import shutdown


def parse_args(argv: list[str] | None, description: str,
               config_cls: type | None = None) -> tuple[str | None, list[str]]:
    """(config path, overrides); `--help` lists every config key of `config_cls` with its default."""
    from diffdiv.config import config_help

    p = argparse.ArgumentParser(description=description, exit_on_error=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=config_help(config_cls) if config_cls is not None else None)
    p.add_argument("--config", "-c", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys for sections)")
    try:
        ns = p.parse_args(argv)
    except argparse.ArgumentError as e:
        raise ConfigError(str(e)) from None
    return ns.config, ns.overrides


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column markdown table of scalar metrics."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]
    if not rows:
        return ""
    w = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    for k, v in rows:
        val = f"{v:.4g}" if isinstance(v, float) else str(v)
        lines.append(f"| {k.ljust(w)} | {val} |")
    return "\n".join(lines)


def run(trainer_cls: type[Trainer], argv: list[str] | None = None) -> dict[str, Any]:
    """Load config, train, print the metrics table. Exit 2 on bad input, 1 on a failed run."""
    try:
        path, overrides = parse_args(argv, trainer_cls.__doc__ or trainer_cls.__name__, trainer_cls.config_cls)
        cfg = load_config(trainer_cls.config_cls, path, overrides)
        trainer = trainer_cls(cfg)
        trainer.preflight()
        metrics = trainer.train()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        shutdown()
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        shutdown()
        sys.exit(130)
    acc = trainer.accelerator
    if acc.is_main_process:
        table = format_metrics(metrics)
        if table:
            print(table, flush=True)
        print(json.dumps({"output_dir": str(trainer.out)}), flush=True)
    acc.wait_for_everyone()
    shutdown()
    return metrics
