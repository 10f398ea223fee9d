"""Prompt files: one prompt a line (blank lines and lines starting with # are skipped)."""

from __future__ import annotations

from pathlib import Path

from diffdiv.config import ConfigError


def load_prompts(path: str | Path) -> list[str]:
    """Read a prompt file; one-line error if missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"prompt file {p} is not UTF-8 text") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file {p} is empty")
    return prompts
