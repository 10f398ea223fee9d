"""Backend choice and the autograd wrapper of the fused weighted score difference.

Backend precedence: an explicit `backend="torch"|"triton"` argument, else the environment variable
DIFFDIV_KERNEL=torch|triton|auto, else auto = Triton for CUDA tensors when Triton imports, PyTorch
otherwise (float64 inputs always use PyTorch: the kernel computes in fp32).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from diffdiv.divergence.kernels import reference
from diffdiv.triton_env import triton_available, triton_interpreting

BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(backend: str, x: Tensor) -> str:
    """Resolve "auto" (and the DIFFDIV_KERNEL override) to "torch" or "triton" for tensor x."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("DIFFDIV_KERNEL", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"DIFFDIV_KERNEL={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        ok = x.is_cuda and x.dtype in _KERNEL_DTYPES and triton_available()
        return "triton" if ok else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' requested but triton is not importable")
        if not x.is_cuda and not triton_interpreting():
            raise RuntimeError("kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
                               "set before import")
        if x.dtype not in _KERNEL_DTYPES:
            raise RuntimeError(f"triton kernel supports fp32/fp16/bf16 inputs, got {x.dtype}")
    return backend


def _impl(backend: str) -> ModuleType:
    if backend == "triton":
        from diffdiv.divergence.kernels import triton_score

        return triton_score
    return reference


class _WeightedScoreDifference(torch.autograd.Function):
    """loss_b = 1/2 mean_j (x0 - sg(x0 - g))^2, g = h (D_q - D_p) / n; gradient only to x0."""

    @staticmethod
    def forward(ctx, x0, d_p, d_q, h, normalize, eps, backend, return_g, g_dtype):
        shape = x0.shape
        B = shape[0]
        X = x0.detach().reshape(B, -1).contiguous()
        P = d_p.detach().reshape(B, -1).contiguous()
        Q = d_q.detach().reshape(B, -1).contiguous()
        impl = _impl(backend)
        n, loss, scale = impl.wsd_forward(X, P, Q, h, normalize, eps)
        if return_g:
            g = impl.scaled_diff(P, Q, scale, out_dtype=g_dtype or x0.dtype).reshape(shape)
        else:
            g = x0.new_empty(0)
        ctx.save_for_backward(P, Q, scale)
        ctx.impl, ctx.shape, ctx.x_dtype, ctx.n_elem = impl, shape, x0.dtype, X.shape[1]
        ctx.mark_non_differentiable(g, n)
        return g, n, loss

    @staticmethod
    def backward(ctx, grad_g, grad_n, grad_loss):
        if not ctx.needs_input_grad[0] or grad_loss is None:
            return (None,) * 9
        P, Q, scale = ctx.saved_tensors
        coef = grad_loss.to(scale.dtype) * scale / ctx.n_elem  # d loss_b / d x0 = g_b / N
        gx = ctx.impl.scaled_diff(P, Q, coef, out_dtype=ctx.x_dtype).reshape(ctx.shape)
        return (gx,) + (None,) * 8


def weighted_score_difference(x0: Tensor, d_p: Tensor, d_q: Tensor, h: Tensor | float = 1.0,
                              backend: str = "auto", *, normalize: bool = True, eps: float = 1e-5,
                              return_g: bool = True, g_dtype: torch.dtype | None = None
                              ) -> tuple[Tensor | None, Tensor, Tensor]:
    """Fused f-distill core -> (g, n, loss) per sample (docs/math.md#kernel, f-distill arXiv 2502.15681).

    n = sg(max(mean|x0 - D_p|, eps)) (1 if not normalize), g = sg(h (D_q - D_p) / n) shaped like x0
    (None when return_g=False, which saves one pass and one buffer), loss (B,) =
    1/2 mean (x0 - sg(x0 - g))^2 whose gradient is g / N w.r.t. x0 only; D_p, D_q, h get no gradient.
    n and loss are fp32 (float64 for float64 inputs).
    """
    if x0.shape != d_p.shape or x0.shape != d_q.shape:
        raise ValueError(f"x0, d_p, d_q must share a shape, got {tuple(x0.shape)}, {tuple(d_p.shape)}, "
                         f"{tuple(d_q.shape)}")
    if x0.ndim < 1 or x0[0].numel() == 0:
        raise ValueError("x0 must be (B, ...) with at least one element per sample")
    B = x0.shape[0]
    h = torch.as_tensor(h, device=x0.device).detach()
    h = h.expand(B) if h.ndim == 0 else h.reshape(-1)
    if h.shape != (B,):
        raise ValueError(f"h must be a scalar or have shape ({B},), got {tuple(h.shape)}")
    which = resolve_backend(backend, x0)
    if which == "triton" and (d_p.dtype not in _KERNEL_DTYPES or d_q.dtype not in _KERNEL_DTYPES):
        raise RuntimeError("triton kernel supports fp32/fp16/bf16 inputs")
    g, n, loss = _WeightedScoreDifference.apply(x0, d_p, d_q, h, bool(normalize), float(eps), which,
                                               bool(return_g), g_dtype)
    return (g if return_g else None), n, loss
