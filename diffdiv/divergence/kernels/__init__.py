"""Fused mixed-precision kernels for the divergence core (Triton on CUDA, PyTorch elsewhere)."""

from diffdiv.divergence.kernels.dispatch import (
    BACKENDS,
    resolve_backend,
    triton_available,
    weighted_score_difference,
)

__all__ = ["BACKENDS", "resolve_backend", "triton_available", "weighted_score_difference"]
