"""Whether Triton kernels can run here: the package imports (lazily), or its CPU interpreter is on."""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the `triton` package imports."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
