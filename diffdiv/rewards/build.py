"""Build a reward by name: every built-in reward module is imported here, so its @register_reward has run."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from diffdiv.config import ConfigError
from diffdiv.rewards import aesthetic, clip, custom, digits, identity, jpeg  # noqa: F401  (registration)
from diffdiv.rewards.base import REWARDS, Reward


def available_rewards() -> list[str]:
    """Sorted names accepted by `build_reward`."""
    return sorted(REWARDS)


def build_reward(spec: dict[str, Any] | str | Reward) -> Reward:
    """Build a reward from a config mapping `{name: ..., **kwargs}` or a bare name.

    A string containing ':' is shorthand for `{name: callable, target: <string>}`.
    """
    if isinstance(spec, Reward):
        return spec
    if isinstance(spec, str):
        spec = {"name": "callable", "target": spec} if ":" in spec else {"name": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"reward: expected a mapping with a 'name' key or a name, got {spec!r}")
    if "name" not in spec:
        raise ConfigError(f"reward: missing 'name' (one of: {', '.join(sorted(REWARDS))})")
    kwargs = dict(spec)
    name = kwargs.pop("name")
    if name not in REWARDS:
        raise ConfigError(f"unknown reward '{name}' (one of: {', '.join(sorted(REWARDS))})")
    factory = REWARDS[name]
    check_kwargs(factory, kwargs, name)
    return factory(**kwargs).freeze()


def check_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any], name: str) -> None:
    sig = inspect.signature(factory)
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(
            f"reward '{name}': unknown key '{unknown[0]}' (valid keys: {', '.join(sorted(params))})"
        )
    missing = [
        k
        for k, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in kwargs
    ]
    if missing:
        raise ConfigError(f"reward '{name}': missing required key '{missing[0]}'")
