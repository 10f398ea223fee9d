"""Method registry: the `method` key of a config names its trainer class (imported on demand)."""

from __future__ import annotations

import importlib
from typing import Any

from diffdiv.config import ConfigError, apply_overrides, read_yaml

METHODS: dict[str, str] = {
    "teacher": "diffdiv.trainers.teacher:TeacherTrainer",
    "fdistill": "diffdiv.trainers.fdistill:FDistillTrainer",
    "uni_instruct": "diffdiv.trainers.uni_instruct:UniInstructTrainer",
    "rcm": "diffdiv.trainers.rcm:RCMTrainer",
    "di_star": "diffdiv.trainers.di_star:DIStarTrainer",
    "dpok": "diffdiv.trainers.dpok:DPOKTrainer",
    "ipro": "diffdiv.trainers.ipro:IPROTrainer",
    "rocm": "diffdiv.trainers.rocm:ROCMTrainer",
}


def trainer_class(method: str) -> type:
    """The Trainer subclass registered for `method`; ConfigError naming the choices otherwise."""
    if method not in METHODS:
        raise ConfigError(f"method: '{method}' is not one of {', '.join(METHODS)}")
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)


def method_of(path: str | None, overrides: list[str], default: str, allowed: tuple[str, ...] | None = None) -> str:
    """The `method` of a config file after `key=value` overrides (default when the file has none)."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    apply_overrides(data, [o for o in overrides if o.split("=", 1)[0].strip().lstrip("-") == "method"])
    method = data.get("method", default)
    if allowed is not None and method not in allowed:
        raise ConfigError(f"method: '{method}' is not one of {', '.join(allowed)}")
    return method
