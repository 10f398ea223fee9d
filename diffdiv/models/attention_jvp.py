"""Attention forward + JVP without the L x L tangent: a blockwise PyTorch path and a fused Triton kernel.

Both return `(O, O')` for O = softmax(S) V, S = scale q k^T (+ bias), along tangents (dq, dk, dv):
  dS = scale (dq k^T + q dk^T),  mu_i = sum_j P_ij dS_ij,
  O' = sum_j P_ij (dS_ij - mu_i) v_j + P dV = (P o dS) V - mu O + P dV      (rCM, arXiv 2510.08431 app.)
Online over key blocks (running max m, l = sum e^{s-m}): acc_O = sum e^{s-m} v, acc_T = sum e^{s-m} (dS v + dv),
acc_mu = sum e^{s-m} dS; then O = acc_O / l, mu = acc_mu / l, O' = acc_T / l - mu O.

- `attention_jvp_blockwise`: plain torch, chunked over queries (and optionally over keys with the online
  softmax above); peak extra memory B*H*block_q*block_k instead of B*H*Lq*Lk. Any shape, masks, causal,
  GQA, float64. The CPU default.
- `attention_jvp_triton`: one fused Triton kernel (FlashAttention-2 style, one program per BLOCK_M queries of
  one head, looping over key blocks; fp32 accumulation; bf16/fp16/fp32 inputs, any strides; non-causal, no
  mask, head dim <= 128, equal q/k/v head counts, any Lq, Lk: edges masked). Other calls (masks, causal, GQA,
  head dim > 128, float64) go to the blockwise path. `triton` is imported on first use only.
- `resolve_attention_jvp`: the dispatch rule ("auto": Triton for CUDA fp32/fp16/bf16 tensors when triton
  imports, else blockwise; or "reference" | "blockwise" | "triton"), used by `auto_attention_jvp`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffdiv.triton_env import triton_available, triton_interpreting

ATTENTION_JVP_MODES = ("auto", "reference", "blockwise", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 128
DEFAULT_CHUNK_ELEMS = 1 << 20  # blockwise path: score-tile elements per query chunk (4 MiB in fp32)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _scale(q: Tensor, scale: float | None) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _expand_heads(q: Tensor, x: Tensor | None) -> Tensor | None:
    """Grouped-query attention: repeat key/value heads to the query's head count."""
    if x is not None and x.ndim >= 3 and x.shape[-3] != q.shape[-3]:
        return x.repeat_interleave(q.shape[-3] // x.shape[-3], dim=-3)
    return x


def _bias_rows(q: Tensor, attn_mask: Tensor | None, is_causal: bool, r0: int, r1: int, c0: int, c1: int,
               dtype: torch.dtype) -> Tensor | None:
    """Additive bias for query rows [r0, r1) and key columns [c0, c1) (SDPA mask/causal semantics)."""
    bias = None
    if is_causal:
        rows = torch.arange(r0, r1, device=q.device)[:, None]
        cols = torch.arange(c0, c1, device=q.device)[None, :]
        bias = torch.zeros(r1 - r0, c1 - c0, dtype=dtype, device=q.device).masked_fill(cols > rows, -math.inf)
    if attn_mask is not None:
        m = attn_mask
        m = m[..., r0:r1, :] if m.shape[-2] != 1 else m
        m = m[..., c0:c1] if m.shape[-1] != 1 else m
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=q.device).masked_fill(~m, -math.inf)
        m = m.to(dtype)
        bias = m if bias is None else bias + m
    return bias


# ----------------------------------------------------------------------------------------------
# Blockwise PyTorch path
# ----------------------------------------------------------------------------------------------


def _block_scores(qc: Tensor, tqc: Tensor | None, kc: Tensor, tkc: Tensor | None, sc: float
                  ) -> tuple[Tensor, Tensor | None]:
    """S = scale q k^T and dS = scale (dq k^T + q dk^T) for one tile (None when dq = dk = 0)."""
    s = torch.matmul(qc, kc.transpose(-2, -1)).mul_(sc)
    ds = None
    if tqc is not None:
        ds = torch.matmul(tqc, kc.transpose(-2, -1))
    if tkc is not None:
        d2 = torch.matmul(qc, tkc.transpose(-2, -1))
        ds = d2 if ds is None else ds.add_(d2)
    return s, (None if ds is None else ds.mul_(sc))


def _chunk_exact(qc, tqc, k, tk, v, tv, bias, sc):
    """One query chunk against all keys (exact softmax): (O, O') of the chunk."""
    s, ds = _block_scores(qc, tqc, k, tk, sc)
    if bias is not None:
        s = s.add_(bias)
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, v)
    tout = torch.zeros_like(out)
    if ds is not None:
        pds = ds.mul_(p)  # P o dS
        mu = pds.sum(-1, keepdim=True)
        tout = torch.matmul(pds, v).sub_(mu * out)  # (P o dS) V - mu O
    if tv is not None:
        tout = tout.add_(torch.matmul(p, tv))
    return out, tout


def _chunk_online(qc, tqc, k, tk, v, tv, q, attn_mask, is_causal, r0, r1, sc, block_k):
    """One query chunk, keys in blocks of block_k with the online softmax (the kernel's recurrence)."""
    lead, acc = qc.shape[:-1], qc.dtype
    m = torch.full((*lead, 1), -math.inf, dtype=acc, device=qc.device)
    l_ = torch.zeros((*lead, 1), dtype=acc, device=qc.device)
    acc_o = torch.zeros((*lead, v.shape[-1]), dtype=acc, device=qc.device)
    acc_t, acc_mu = torch.zeros_like(acc_o), torch.zeros_like(l_)
    lk = k.shape[-2]
    for c0 in range(0, lk, block_k):
        c1 = min(lk, c0 + block_k)
        kc, vc = k[..., c0:c1, :], v[..., c0:c1, :]
        s, ds = _block_scores(qc, tqc, kc, None if tk is None else tk[..., c0:c1, :], sc)
        bias = _bias_rows(q, attn_mask, is_causal, r0, r1, c0, c1, acc)
        if bias is not None:
            s = s + bias
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))  # fully masked so far
        alpha = torch.exp(m - m_safe)
        p = torch.exp(s - m_safe)
        l_ = l_ * alpha + p.sum(-1, keepdim=True)
        acc_o = acc_o * alpha + torch.matmul(p, vc)
        acc_t = acc_t * alpha
        if ds is not None:
            pds = ds * p
            acc_mu = acc_mu * alpha + pds.sum(-1, keepdim=True)
            acc_t = acc_t + torch.matmul(pds, vc)
        if tv is not None:
            acc_t = acc_t + torch.matmul(p, tv[..., c0:c1, :])
        m = m_new
    out = acc_o / l_
    return out, acc_t / l_ - (acc_mu / l_) * out


def attention_jvp_blockwise(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None,
                            tv: Tensor | None, attn_mask: Tensor | None = None, is_causal: bool = False,
                            scale: float | None = None, *, block_q: int | None = None,
                            block_k: int | None = None) -> tuple[Tensor, Tensor]:
    """(O, O') chunked over queries (block_q rows; default: ~2^20 score elements per chunk) and, when
    block_k is given, over keys with the online softmax. fp32 (float64 for float64) arithmetic; outputs in
    q's dtype. Same signature as `diffdiv.models.jvp.attention_jvp_reference`."""
    out_dtype, acc = q.dtype, _acc_dtype(q)
    sc = _scale(q, scale)
    k, v, tk, tv = (_expand_heads(q, x) for x in (k, v, tk, tv))
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    tq, tk, tv = (None if x is None else x.to(acc) for x in (tq, tk, tv))
    lq, lk = q.shape[-2], k.shape[-2]
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    rows_per_elem = max(1, math.prod(lead) * min(lk, block_k or lk))
    bq = block_q or max(1, DEFAULT_CHUNK_ELEMS // rows_per_elem)
    outs, touts = [], []
    for r0 in range(0, lq, bq):
        r1 = min(lq, r0 + bq)
        qc, tqc = q[..., r0:r1, :], None if tq is None else tq[..., r0:r1, :]
        if block_k is None or block_k >= lk:
            bias = _bias_rows(q, attn_mask, is_causal, r0, r1, 0, lk, acc)
            o, t = _chunk_exact(qc, tqc, k, tk, v, tv, bias, sc)
        else:
            o, t = _chunk_online(qc, tqc, k, tk, v, tv, q, attn_mask, is_causal, r0, r1, sc, block_k)
        outs.append(o.to(out_dtype))
        touts.append(t.to(out_dtype))
    if len(outs) == 1:
        return outs[0], touts[0]
    return torch.cat(outs, dim=-2), torch.cat(touts, dim=-2)


# ----------------------------------------------------------------------------------------------
# Fused Triton kernel (lazy import)
# ----------------------------------------------------------------------------------------------


def triton_supports(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                    is_causal: bool = False) -> bool:
    """Whether the fused kernel handles this call (else the PyTorch path is used)."""
    return (attn_mask is None and not is_causal and q.ndim == 4 and k.ndim == 4 and v.ndim == 4
            and q.dtype in TRITON_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] <= TRITON_MAX_HEAD_DIM and k.shape[-1] == q.shape[-1]
            and v.shape[-1] <= TRITON_MAX_HEAD_DIM
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[-2] == v.shape[-2]
            and q.shape[-2] > 0 and k.shape[-2] > 0
            and (q.is_cuda or triton_interpreting()))


triton = tl = None  # bound by _fused_kernel() on first use (lazy import: CPU users need no triton)


@functools.lru_cache(maxsize=1)
def _fused_kernel():
    """Import triton and define the fused forward + JVP kernel (once; TRITON_INTERPRET is read here)."""
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def _attn_fwd_jvp_kernel(Q, K, V, TQ, TK, TV, O, TO, H, LQ, LK, D, DV, scale,
                             s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                             s_tqb, s_tqh, s_tqm, s_tqd, s_tkb, s_tkh, s_tkn, s_tkd,
                             s_tvb, s_tvh, s_tvn, s_tvd, s_ob, s_oh, s_om, s_od, s_tob, s_toh, s_tom, s_tod,
                             HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
                             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        # one program: BLOCK_M query rows of one (batch, head); loop over key blocks, online softmax
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        rdv = tl.arange(0, BLOCK_DV)
        rn0 = tl.arange(0, BLOCK_N)
        mm, md, mdv = rm < LQ, rd < D, rdv < DV
        mq = mm[:, None] & md[None, :]
        q = tl.load(Q + b * s_qb + h * s_qh + rm[:, None] * s_qm + rd[None, :] * s_qd, mask=mq, other=0.0)
        q = q.to(tl.float32)
        if HAS_TQ:
            tq = tl.load(TQ + b * s_tqb + h * s_tqh + rm[:, None] * s_tqm + rd[None, :] * s_tqd, mask=mq,
                         other=0.0).to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        mu_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for start in range(0, LK, BLOCK_N):
            rn = start + rn0
            mn = rn < LK
            mk = mn[:, None] & md[None, :]
            mv = mn[:, None] & mdv[None, :]
            k = tl.load(K + b * s_kb + h * s_kh + rn[:, None] * s_kn + rd[None, :] * s_kd, mask=mk,
                        other=0.0).to(tl.float32)
            v = tl.load(V + b * s_vb + h * s_vh + rn[:, None] * s_vn + rdv[None, :] * s_vd, mask=mv,
                        other=0.0).to(tl.float32)
            kt = tl.trans(k)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale  # S = scale q k^T
            s = tl.where(mn[None, :], s, float("-inf"))
            ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_TQ:
                ds += tl.dot(tq, kt, input_precision=PRECISION)
            if HAS_TK:
                tk = tl.load(TK + b * s_tkb + h * s_tkh + rn[:, None] * s_tkn + rd[None, :] * s_tkd, mask=mk,
                             other=0.0).to(tl.float32)
                ds += tl.dot(q, tl.trans(tk), input_precision=PRECISION)
            ds = ds * scale  # dS = scale (dq k^T + q dk^T)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])  # masked keys: exp(-inf) = 0
            pds = p * ds
            l_i = l_i * alpha + tl.sum(p, 1)
            mu_i = mu_i * alpha + tl.sum(pds, 1)
            acc_o = acc_o * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            acc_t = acc_t * alpha[:, None] + tl.dot(pds, v, input_precision=PRECISION)
            if HAS_TV:
                tv = tl.load(TV + b * s_tvb + h * s_tvh + rn[:, None] * s_tvn + rdv[None, :] * s_tvd, mask=mv,
                             other=0.0).to(tl.float32)
                acc_t += tl.dot(p, tv, input_precision=PRECISION)
            m_i = m_new
        o = acc_o / l_i[:, None]
        t = acc_t / l_i[:, None] - (mu_i / l_i)[:, None] * o  # O' = acc_T / l - mu O
        mo = mm[:, None] & mdv[None, :]
        tl.store(O + b * s_ob + h * s_oh + rm[:, None] * s_om + rdv[None, :] * s_od,
                 o.to(O.dtype.element_ty), mask=mo)
        tl.store(TO + b * s_tob + h * s_toh + rm[:, None] * s_tom + rdv[None, :] * s_tod,
                 t.to(TO.dtype.element_ty), mask=mo)

    return _attn_fwd_jvp_kernel


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


def _launch_fused(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None,
                  sc: float, block_m: int | None, block_n: int | None, out: Tensor | None,
                  tout: Tensor | None) -> tuple[Tensor, Tensor]:
    """Launch grid (cdiv(Lq, BLOCK_M), B*H); any strides; outputs (B, H, Lq, Dv) in q's dtype."""
    kernel = _fused_kernel()
    B, H, lq, d = q.shape
    lk, dv = k.shape[-2], v.shape[-1]
    shape = (B, H, lq, dv)
    out = torch.empty(shape, dtype=q.dtype, device=q.device) if out is None else out
    tout = torch.empty(shape, dtype=q.dtype, device=q.device) if tout is None else tout
    if B * H == 0:
        return out, tout
    bd, bdv = _pow2_at_least_16(d), _pow2_at_least_16(dv)
    bm = block_m or 64
    bn = block_n or (64 if max(bd, bdv) <= 64 else 32)
    tq_, tk_, tv_ = (x if x is not None else y for x, y in ((tq, q), (tk, k), (tv, v)))
    # half inputs are exact in tf32; fp32 inputs follow PyTorch's own matmul setting (default: full fp32)
    precision = "tf32" if q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (triton.cdiv(lq, bm), B * H)
    kernel[grid](q, k, v, tq_, tk_, tv_, out, tout, H, lq, lk, d, dv, sc,
                 *q.stride(), *k.stride(), *v.stride(), *tq_.stride(), *tk_.stride(), *tv_.stride(),
                 *out.stride(), *tout.stride(),
                 HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None, PRECISION=precision,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=4, num_stages=2)
    return out, tout


def attention_jvp_triton(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None,
                         tv: Tensor | None, attn_mask: Tensor | None = None, is_causal: bool = False,
                         scale: float | None = None, *, block_m: int | None = None, block_n: int | None = None,
                         out: Tensor | None = None, tout: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fused (O, O') by the Triton kernel; calls it cannot take (`triton_supports` false) go to the
    blockwise PyTorch path. `out` / `tout` buffers may be passed in (tests poison them)."""
    if not triton_supports(q, k, v, attn_mask, is_causal):
        return attention_jvp_blockwise(q, k, v, tq, tk, tv, attn_mask, is_causal, scale)
    return _launch_fused(q, k, v, tq, tk, tv, _scale(q, scale), block_m, block_n, out, tout)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def resolve_attention_jvp(mode: str, q: Tensor) -> str:
    """Dispatch rule: "auto" -> "triton" for CUDA tensors in fp32/fp16/bf16 when triton imports, else
    "blockwise" (measured faster than the reference on CPU, benchmarks/results/jvp.md, and O(L) memory);
    explicit modes are returned as given ("triton" on CPU tensors needs TRITON_INTERPRET=1). Per call, the
    triton path still sends masks, causal, GQA and head dim > 128 to the blockwise path."""
    if mode not in ATTENTION_JVP_MODES:
        raise ValueError(f"attention_jvp must be one of {', '.join(ATTENTION_JVP_MODES)}, got {mode!r}")
    if mode == "auto":
        return "triton" if q.is_cuda and q.dtype in TRITON_DTYPES and triton_available() else "blockwise"
    if mode == "triton" and not triton_available():
        raise RuntimeError("attention_jvp 'triton' requested but triton is not importable")
    return mode


def attention_jvp_fn(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The attention-JVP implementation for "blockwise" or "triton" (the O(L^2) "reference" lives in
    `diffdiv.models.jvp`)."""
    if name == "blockwise":
        return attention_jvp_blockwise
    if name == "triton":
        return attention_jvp_triton
    raise ValueError(f"unknown attention JVP {name!r}")


def auto_attention_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None,
                       attn_mask: Tensor | None = None, is_causal: bool = False,
                       scale: float | None = None) -> tuple[Tensor, Tensor]:
    """The "auto" attention JVP: decides per call with `resolve_attention_jvp("auto", q)` (never "reference")."""
    fn = attention_jvp_fn(resolve_attention_jvp("auto", q))
    return fn(q, k, v, tq, tk, tv, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
