"""PyTorch reference for the fused weighted-score-difference op (the CPU default backend).

Per sample b (rows of length N after flattening):
    n_b    = max(mean_j |x0 - D_p|, eps)          (1 when normalize=False)
    s_b    = h_b / n_b
    g_b    = s_b (D_q - D_p)                      (docs/math.md#kernel, f-distill generator direction)
    loss_b = 1/2 mean_j (x0 - sg(x0 - g))^2 = 1/2 s_b^2 mean_j (D_q - D_p)^2,   d loss_b / d x0 = g_b / N.
Arithmetic is fp32 for half inputs (float64 stays float64). The arrays are processed in tiles so the
temporaries stay bounded (256 KiB fp32 each) whatever the size.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BLOCK_ELEMS = 1 << 16  # temporaries are at most this many elements (256 KiB in fp32) at a time


def compute_dtype(*ts: Tensor) -> torch.dtype:
    """fp32 for half/fp32 inputs, float64 if any input is float64."""
    dt = torch.float32
    for t in ts:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _blocks(B: int, N: int):
    """(row slice, column slice) tiles of at most _BLOCK_ELEMS elements covering a (B, N) array."""
    cols = min(N, _BLOCK_ELEMS)
    rows = max(1, _BLOCK_ELEMS // max(cols, 1))
    for i in range(0, B, rows):
        for j in range(0, N, cols):
            yield slice(i, min(B, i + rows)), slice(j, min(N, j + cols))


def wsd_forward(x0: Tensor, d_p: Tensor, d_q: Tensor, h: Tensor, normalize: bool = True,
                eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N) inputs, h (B,) -> (n, loss, scale = h/n), each (B,) in the compute dtype."""
    B, N = x0.shape
    ct = compute_dtype(x0, d_p, d_q)
    sum_abs = torch.zeros(B, dtype=ct, device=x0.device)
    sumsq = torch.zeros(B, dtype=ct, device=x0.device)
    for rs, cs in _blocks(B, N):
        p = d_p[rs, cs].to(ct)
        diff = d_q[rs, cs].to(ct) - p
        sumsq[rs] += torch.linalg.vector_norm(diff, dim=1) ** 2  # sum_j (D_q - D_p)^2
        if normalize:
            torch.sub(x0[rs, cs].to(ct), p, out=diff)
            sum_abs[rs] += diff.abs_().sum(1)
        del diff, p
    n = (sum_abs / N).clamp_min(eps) if normalize else torch.ones_like(sum_abs)
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
    for rs, cs in _blocks(B, N):
        diff = d_q[rs, cs].to(ct) - d_p[rs, cs].to(ct)
        out[rs, cs] = diff.mul_(c[rs, None])
    return out
