"""PyTorch reference for the fused weighted-score-difference op (the CPU default backend).

Per sample b (rows of length N after flattening):
    n_b    = max(mean_j |x0 - D_p|, eps)          (1 when normalize=False)
    s_b    = h_b / n_b
    g_b    = s_b (D_q - D_p)                      (DESIGN.md 3.1, f-distill generator direction)
    loss_b = 1/2 mean_j (x0 - sg(x0 - g))^2 = 1/2 s_b^2 mean_j (D_q - D_p)^2,   d loss_b / d x0 = g_b / N.
Arithmetic is fp32 for half inputs (float64 stays float64). Rows are processed in groups so the
temporaries stay bounded whatever the batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor

_GROUP_ELEMS = 1 << 22  # temporaries are at most this many elements per group of rows


def compute_dtype(*ts: Tensor) -> torch.dtype:
    """fp32 for half/fp32 inputs, float64 if any input is float64."""
    dt = torch.float32
    for t in ts:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _row_groups(B: int, N: int):
    step = max(1, _GROUP_ELEMS // max(N, 1))
    for i in range(0, B, step):
        yield slice(i, min(B, i + step))


def wsd_forward(x0: Tensor, d_p: Tensor, d_q: Tensor, h: Tensor, normalize: bool = True,
                eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N) inputs, h (B,) -> (n, loss, scale = h/n), each (B,) in the compute dtype."""
    B, N = x0.shape
    ct = compute_dtype(x0, d_p, d_q)
    n = torch.empty(B, dtype=ct, device=x0.device)
    sumsq = torch.empty(B, dtype=ct, device=x0.device)
    for sl in _row_groups(B, N):
        p = d_p[sl].to(ct)
        diff = d_q[sl].to(ct) - p
        sumsq[sl] = torch.linalg.vector_norm(diff, dim=1) ** 2  # sum_j (D_q - D_p)^2
        if normalize:
            torch.sub(x0[sl].to(ct), p, out=diff)
            n[sl] = diff.abs_().sum(1) / N
        del diff, p
    n = n.clamp_min(eps) if normalize else torch.ones_like(n)
    scale = h.to(ct) / n
    loss = 0.5 * scale**2 * sumsq / N
    return n, loss, scale


def scaled_diff(d_p: Tensor, d_q: Tensor, coef: Tensor, out_dtype: torch.dtype | None = None,
                out: Tensor | None = None) -> Tensor:
    """out[b] = coef[b] * (D_q[b] - D_p[b]) computed in the compute dtype, stored in out_dtype."""
    ct = compute_dtype(d_p, d_q)
    if out is None:
        out = torch.empty(d_p.shape, dtype=out_dtype or d_p.dtype, device=d_p.device)
    B, N = d_p.shape
    c = coef.to(ct)
    for sl in _row_groups(B, N):
        diff = d_q[sl].to(ct) - d_p[sl].to(ct)
        out[sl] = diff.mul_(c[sl, None])
    return out
