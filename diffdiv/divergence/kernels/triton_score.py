"""Triton kernels for the fused weighted score difference (same math as `reference.py`).

Forward (one read of x0, D_p, D_q; fp32 arithmetic whatever the storage dtype):
  1. `_wsd_partial_kernel`, grid (B, C): each program reduces one chunk of a row to
     partial sums of |x0 - D_p| and (D_q - D_p)^2 (deterministic: no atomics).
  2. `_wsd_finalize_kernel`, grid (B,): n = max(sum|.|/N, eps), s = h/n, loss = s^2 sum(.)^2 / (2N).
`_scaled_diff_kernel`, grid (B, C): out = c_b (D_q - D_p) -- gives g (c = s) in the forward when asked
for, and the x0-gradient (c = grad_loss * s / N) in the backward, so g never has to be stored.

Importing this module decorates the kernels; set TRITON_INTERPRET=1 *before* importing it to run
them on CPU with Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DEFAULT_BLOCK = 1024


@triton.jit
def _wsd_partial_kernel(x0_ptr, dp_ptr, dq_ptr, pabs_ptr, psq_ptr, N, CHUNK, NUM_CHUNKS,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * N
    start = chunk * CHUNK
    acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < N
        x = tl.load(x0_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        p = tl.load(dp_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        q = tl.load(dq_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        acc_abs += tl.abs(x - p)
        d = q - p
        acc_sq += d * d
    out = row * NUM_CHUNKS + chunk
    tl.store(pabs_ptr + out, tl.sum(acc_abs, axis=0))
    tl.store(psq_ptr + out, tl.sum(acc_sq, axis=0))


@triton.jit
def _wsd_finalize_kernel(pabs_ptr, psq_ptr, h_ptr, n_ptr, loss_ptr, scale_ptr, NUM_CHUNKS, inv_n_elem, eps,
                         NORMALIZE: tl.constexpr, CBLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc_abs = tl.zeros([CBLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([CBLOCK], dtype=tl.float32)
    for c0 in range(0, NUM_CHUNKS, CBLOCK):
        idx = c0 + tl.arange(0, CBLOCK)
        m = idx < NUM_CHUNKS
        acc_abs += tl.load(pabs_ptr + row * NUM_CHUNKS + idx, mask=m, other=0.0)
        acc_sq += tl.load(psq_ptr + row * NUM_CHUNKS + idx, mask=m, other=0.0)
    sum_abs = tl.sum(acc_abs, axis=0)
    sum_sq = tl.sum(acc_sq, axis=0)
    if NORMALIZE:
        n = tl.maximum(sum_abs * inv_n_elem, eps)
    else:
        n = sum_abs * 0.0 + 1.0
    h = tl.load(h_ptr + row).to(tl.float32)
    s = h / n
    tl.store(n_ptr + row, n)
    tl.store(scale_ptr + row, s)
    tl.store(loss_ptr + row, 0.5 * s * s * sum_sq * inv_n_elem)


@triton.jit
def _scaled_diff_kernel(dp_ptr, dq_ptr, coef_ptr, out_ptr, N, CHUNK, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * N
    start = chunk * CHUNK
    c = tl.load(coef_ptr + row).to(tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < N
        p = tl.load(dp_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        q = tl.load(dq_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + idx, (c * (q - p)).to(out_ptr.dtype.element_ty), mask=m)


def _launch_shape(B: int, N: int, block: int, chunk: int | None) -> tuple[int, int]:
    """(CHUNK, NUM_CHUNKS): enough programs to fill a GPU, CHUNK a multiple of BLOCK."""
    if chunk is None:
        target_programs = 1024
        per_row = max(1, target_programs // max(B, 1))
        chunk = triton.cdiv(triton.cdiv(N, per_row), block) * block
        chunk = max(chunk, block)
    if chunk % block:
        raise ValueError("chunk must be a multiple of block")
    return chunk, triton.cdiv(N, chunk)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def wsd_forward(x0: Tensor, d_p: Tensor, d_q: Tensor, h: Tensor, normalize: bool = True, eps: float = 1e-5,
                *, block: int = DEFAULT_BLOCK, chunk: int | None = None, n_out: Tensor | None = None,
                loss_out: Tensor | None = None, scale_out: Tensor | None = None,
                partials: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous (B, N) inputs (fp32/fp16/bf16), h (B,) -> (n, loss, scale) in fp32.

    The `*_out` / `partials` buffers may be passed in (tests poison them to prove every element is written).
    """
    B, N = x0.shape
    for t in (x0, d_p, d_q):
        if not t.is_contiguous() or t.shape != (B, N):
            raise ValueError("triton wsd_forward needs contiguous (B, N) inputs of one shape")
    CHUNK, C = _launch_shape(B, N, block, chunk)
    dev = x0.device
    f32 = dict(dtype=torch.float32, device=dev)
    n = torch.empty(B, **f32) if n_out is None else n_out
    loss = torch.empty(B, **f32) if loss_out is None else loss_out
    scale = torch.empty(B, **f32) if scale_out is None else scale_out
    pabs, psq = partials if partials is not None else (torch.empty(B * C, **f32), torch.empty(B * C, **f32))
    h32 = h.to(**f32).contiguous()
    if B == 0:
        return n, loss, scale
    _wsd_partial_kernel[(B, C)](x0, d_p, d_q, pabs, psq, N, CHUNK, C, BLOCK=block,
                                num_warps=_num_warps(block))
    cblock = min(1024, triton.next_power_of_2(C))
    _wsd_finalize_kernel[(B,)](pabs, psq, h32, n, loss, scale, C, 1.0 / N, float(eps),
                               NORMALIZE=bool(normalize), CBLOCK=cblock, num_warps=4)
    return n, loss, scale


def scaled_diff(d_p: Tensor, d_q: Tensor, coef: Tensor, out_dtype: torch.dtype | None = None,
                out: Tensor | None = None, *, block: int = DEFAULT_BLOCK, chunk: int | None = None) -> Tensor:
    """out[b] = coef[b] * (D_q[b] - D_p[b]); fp32 arithmetic, stored in out_dtype (default D_p's)."""
    B, N = d_p.shape
    if not (d_p.is_contiguous() and d_q.is_contiguous()) or d_q.shape != (B, N):
        raise ValueError("triton scaled_diff needs contiguous (B, N) inputs of one shape")
    if out is None:
        out = torch.empty((B, N), dtype=out_dtype or d_p.dtype, device=d_p.device)
    if B == 0 or N == 0:
        return out
    CHUNK, C = _launch_shape(B, N, block, chunk)
    c32 = coef.to(device=d_p.device, dtype=torch.float32).contiguous()
    _scaled_diff_kernel[(B, C)](d_p, d_q, c32, out, N, CHUNK, BLOCK=block, num_warps=_num_warps(block))
    return out
