"""Jacobian-vector products through diffusers networks (sCM / rCM time derivatives).

`jvp(fn, primals, tangents, method=...)` returns `(fn(*primals), J_fn(primals) @ tangents)`:
- "forward": `torch.func.jvp` (forward-mode AD). Inside it, attention goes through one replaceable
  function, `attention_jvp` (see `set_attention_jvp`): the primal attention still runs on the fastest
  SDPA backend, and only its tangent comes from the hook. The default hook is an exact PyTorch
  reference (O(L^2) memory); a fused FlashAttention-JVP kernel (rCM, arXiv 2510.08431 appendix)
  would replace it there. GroupNorm inputs are made contiguous (its forward-AD rule needs that).
- "forward_math": `torch.func.jvp` with SDPA forced to the math backend, whose decomposition has
  forward-AD rules everywhere (no hook involved).
- "fd": central finite difference `(fn(x + h v) - fn(x - h v)) / 2h` (three forward passes; the
  fallback for networks with ops that lack forward-AD rules).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

JVP_METHODS = ("forward", "forward_math", "fd")

# ----------------------------------------------------------------------------------------------
# Attention JVP: the one hook point for a fused kernel
# ----------------------------------------------------------------------------------------------


def _attn_bias(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor | None:
    """Additive bias (..., Lq, Lk) from a boolean/additive mask and/or causality (SDPA semantics)."""
    bias = None
    if is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=0)
        bias = torch.zeros(lq, lk, dtype=q.dtype, device=q.device).masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, -math.inf)
        bias = m.to(q.dtype) if bias is None else bias + m.to(q.dtype)
    return bias


def _expand_kv(q: Tensor, x: Tensor) -> Tensor:
    """Grouped-query attention: repeat key/value heads to the query's head count."""
    if x.ndim >= 3 and x.shape[-3] != q.shape[-3]:
        return x.repeat_interleave(q.shape[-3] // x.shape[-3], dim=-3)
    return x


def attention_jvp_reference(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None,
                            tv: Tensor | None, attn_mask: Tensor | None = None, is_causal: bool = False,
                            scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention O = softmax(S) V, S = scale q k^T + bias, and its tangent (exact, PyTorch ops).

    dS = scale (dq k^T + q dk^T); dP = P * (dS - rowsum(P * dS)); dO = dP V + P dV.
    """
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    tk = None if tk is None else _expand_kv(q, tk)
    tv = None if tv is None else _expand_kv(q, tv)
    sc = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-2, -1)) * sc
    bias = _attn_bias(q, k, attn_mask, is_causal)
    if bias is not None:
        s = s + bias
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax and its tangent in >= fp32
    p = torch.softmax(s.to(acc), dim=-1).to(q.dtype)
    out = torch.matmul(p, v)
    ds = torch.zeros_like(s)
    if tq is not None:
        ds = ds + torch.matmul(tq, k.transpose(-2, -1)) * sc
    if tk is not None:
        ds = ds + torch.matmul(q, tk.transpose(-2, -1)) * sc
    pf, dsf = p.to(acc), ds.to(acc)
    dp = (pf * (dsf - (pf * dsf).sum(-1, keepdim=True))).to(q.dtype)
    tout = torch.matmul(dp, v)
    if tv is not None:
        tout = tout + torch.matmul(p, tv)
    return out, tout


_ATTENTION_JVP: Callable[..., tuple[Tensor, Tensor]] = attention_jvp_reference


def set_attention_jvp(fn: Callable[..., tuple[Tensor, Tensor]] | None) -> None:
    """Install the attention JVP used by method="forward" (None restores the PyTorch reference).

    `fn(q, k, v, tq, tk, tv, attn_mask=None, is_causal=False, scale=None) -> (out, t_out)`, shapes as
    `scaled_dot_product_attention` ((B, H, L, d)); tangents may be None (zero).
    """
    global _ATTENTION_JVP
    _ATTENTION_JVP = fn if fn is not None else attention_jvp_reference


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None,
                  attn_mask: Tensor | None = None, is_causal: bool = False,
                  scale: float | None = None) -> tuple[Tensor, Tensor]:
    """The installed attention JVP (the single place a fused kernel plugs in)."""
    return _ATTENTION_JVP(q, k, v, tq, tk, tv, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


_ORIG_SDPA = F.scaled_dot_product_attention
_ORIG_GROUP_NORM = F.group_norm


class _SDPAWithJVP(torch.autograd.Function):
    """SDPA whose primal uses the native kernels and whose forward-mode tangent uses `attention_jvp`."""

    @staticmethod
    def forward(q, k, v, attn_mask, is_causal, scale, enable_gqa):
        kw = {"enable_gqa": True} if enable_gqa else {}
        return _ORIG_SDPA(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale, **kw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, is_causal, scale, enable_gqa = inputs
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.save_for_forward(q, k, v, attn_mask)
        ctx.save_for_backward(q, k, v, attn_mask)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tmask, _tc, _ts, _tg):
        q, k, v, attn_mask = ctx.saved_tensors
        _, tout = attention_jvp(q, k, v, tq, tk, tv, attn_mask=attn_mask, is_causal=ctx.is_causal,
                                scale=ctx.scale)
        return tout

    @staticmethod
    def backward(ctx, gout):
        q, k, v, attn_mask = ctx.saved_tensors
        with torch.enable_grad():
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            out, _ = attention_jvp_reference(qq, kk, vv, None, None, None, attn_mask, ctx.is_causal, ctx.scale)
            gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), gout)
        return gq, gk, gv, None, None, None, None


def _sdpa_hooked(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False) -> Tensor:
    if dropout_p > 0:
        raise ValueError("attention dropout has no deterministic JVP; put the network in eval mode")
    return _SDPAWithJVP.apply(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def _group_norm_contiguous(input: Tensor, num_groups: int, weight: Tensor | None = None,
                           bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    return _ORIG_GROUP_NORM(input.contiguous(), num_groups, weight, bias, eps)


@contextlib.contextmanager
def jvp_mode(attention: str = "hook") -> Iterator[None]:
    """Make diffusers networks forward-differentiable: attention via the hook ("hook") or the SDPA
    math backend ("math"); contiguous GroupNorm inputs. Patches torch.nn.functional while active."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F.group_norm = _group_norm_contiguous
    try:
        if attention == "hook":
            F.scaled_dot_product_attention = _sdpa_hooked
            try:
                yield
            finally:
                F.scaled_dot_product_attention = _ORIG_SDPA
        elif attention == "math":
            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            raise ValueError(f"attention must be 'hook' or 'math', got {attention!r}")
    finally:
        F.group_norm = _ORIG_GROUP_NORM


# ----------------------------------------------------------------------------------------------
# JVP of a whole function
# ----------------------------------------------------------------------------------------------


def fd_jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor],
           h: float = 3e-4) -> tuple[Tensor, Tensor]:
    """Central finite difference: (fn(p + h v) - fn(p - h v)) / 2h, plus fn(p); O(h^2) error."""
    plus = [p + h * v for p, v in zip(primals, tangents)]
    minus = [p - h * v for p, v in zip(primals, tangents)]
    out = fn(*primals)
    return out, (fn(*plus) - fn(*minus)) / (2.0 * h)


def jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor],
        method: str = "forward", fd_h: float = 3e-4) -> tuple[Tensor, Tensor]:
    """(fn(*primals), directional derivative along tangents), by forward AD or finite differences.

    No graph is kept for parameters (call under `torch.no_grad()` or not: outputs are detached).
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError("need one tangent per primal")
    with torch.no_grad():
        if method == "fd":
            out, tout = fd_jvp(fn, primals, tangents, fd_h)
        elif method in ("forward", "forward_math"):
            with jvp_mode("hook" if method == "forward" else "math"):
                out, tout = torch.func.jvp(fn, primals, tangents)
        else:
            raise ValueError(f"unknown jvp method {method!r} (choose from {', '.join(JVP_METHODS)})")
    return out.detach(), tout.detach()


def relative_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
