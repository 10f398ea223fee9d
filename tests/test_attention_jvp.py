"""Attention forward + JVP: blockwise PyTorch path, fused Triton kernel (interpreter), dispatch.

Reference: float64 forward-mode AD (`torch.func.jvp`) of the definition O = softmax(scale q k^T + bias) V,
written here independently of the library. Error metric: max|out - ref| / max|ref| per tensor.

Tolerances (stated, per output tensor):
- float64 inputs (blockwise path): 1e-12.
- fp32 inputs: 2e-6 -- fp32 arithmetic over <= 130 keys (observed ~2e-7).
- bf16 / fp16 inputs: the reference is computed from the same rounded inputs, so the error is the output
  conversion (the Triton interpreter truncates fp32 -> bf16: < 2^-7 relative; fp16 rounds: <= 2^-11) plus
  fp32 arithmetic: bound 2^-7 + 2e-6 (bf16), 2^-10 + 2e-6 (fp16; on a GPU the kernel's tf32 dots round
  P and dS to 10 mantissa bits, so half the budget is left for that).
The Triton kernel runs under TRITON_INTERPRET=1, which must be set before triton is imported, so it runs in a
subprocess (`python tests/test_attention_jvp.py --worker OUT.json`); outputs are poisoned with NaN before
each launch, so every element must be written. Those tests skip when triton is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffdiv.models import attention_jvp as A
from diffdiv.models.jvp import attention_jvp_reference, jvp, set_attention_jvp

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2.0**-7 + 2e-6, torch.float16: 2.0**-10 + 2e-6}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (B, H, Lq, Lk, d, dv): edges not multiples of the 16/32 test blocks, Lq != Lk, d in {8, 40, 64, 72, 128}
SHAPES = [
    (1, 1, 1, 1, 8, 8),
    (1, 2, 17, 77, 40, 40),
    (2, 1, 130, 17, 64, 64),
    (1, 1, 77, 130, 72, 72),
    (1, 1, 33, 65, 128, 128),
    (1, 2, 32, 48, 64, 64),  # exact multiples of the blocks
    (1, 1, 20, 33, 40, 24),  # value head dim != query head dim
]


# ----------------------------------------------------------------------------------------------
# float64 reference (independent of the library)
# ----------------------------------------------------------------------------------------------


def attention64(q, k, v, bias=None, scale=None):
    sc = scale if scale is not None else q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * sc
    if bias is not None:
        s = s + bias
    return torch.softmax(s, dim=-1) @ v


def reference64(q, k, v, tq, tk, tv, bias=None, scale=None):
    """(O, O') in float64 by forward-mode AD of `attention64` (None tangents are zero)."""
    prim = tuple(x.double() for x in (q, k, v))
    tans = tuple(torch.zeros_like(p) if t is None else t.double() for p, t in zip(prim, (tq, tk, tv)))
    b = None if bias is None else bias.double()
    return torch.func.jvp(lambda q, k, v: attention64(q, k, v, b, scale), prim, tans)


def rel_max(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def make_inputs(shape, dtype, seed, strided=False):
    B, H, lq, lk, d, dv = shape
    g = torch.Generator().manual_seed(seed)

    def r(L, D):
        if strided:  # the diffusers layout: (B, L, H, D) transposed to (B, H, L, D)
            return torch.randn(B, L, H, D, generator=g).transpose(1, 2).to(dtype)
        return torch.randn(B, H, L, D, generator=g).to(dtype)

    q, k, v = r(lq, d), r(lk, d), r(lk, dv)
    tq, tk, tv = r(lq, d), r(lk, d), r(lk, dv)
    return q, k, v, tq, tk, tv


TANGENT_SETS = {"all": (1, 1, 1), "tk": (0, 1, 0), "tq_tv": (1, 0, 1)}


def _select(tangents, which):
    return tuple(t if keep else None for t, keep in zip(tangents, TANGENT_SETS[which]))


# ----------------------------------------------------------------------------------------------
# Blockwise PyTorch path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_blockwise_matches_float64(shape, dtype):
    q, k, v, *tans = make_inputs(shape, dtype, seed=sum(shape))
    ref_o, ref_t = reference64(q, k, v, *tans)
    for block_q, block_k in [(None, None), (7, None), (16, 16), (5, 32)]:
        o, t = A.attention_jvp_blockwise(q, k, v, *tans, block_q=block_q, block_k=block_k)
        assert o.dtype == dtype and o.shape == ref_o.shape and t.shape == ref_t.shape
        # blockwise computes in fp32 and rounds once to bf16 (round-to-nearest: 2^-8)
        tol = TOL[dtype] if dtype != torch.bfloat16 else 2.0**-8 + 2e-6
        assert rel_max(o, ref_o) < tol, (block_q, block_k, rel_max(o, ref_o))
        assert rel_max(t, ref_t) < tol, (block_q, block_k, rel_max(t, ref_t))


@pytest.mark.parametrize("which", list(TANGENT_SETS))
def test_blockwise_partial_tangents(which):
    q, k, v, *tans = make_inputs((2, 3, 19, 23, 16, 16), torch.float64, seed=5)
    tans = _select(tans, which)
    ref_o, ref_t = reference64(q, k, v, *tans)
    for block_k in (None, 8):
        o, t = A.attention_jvp_blockwise(q, k, v, *tans, block_q=6, block_k=block_k, scale=0.3)
        ref_o, ref_t = reference64(q, k, v, *tans, scale=0.3)
        assert rel_max(o, ref_o) < 1e-12 and rel_max(t, ref_t) < 1e-12


@pytest.mark.parametrize("case", ["bool_mask", "additive_mask", "row_broadcast_mask", "causal", "gqa"])
def test_blockwise_masks_causal_gqa(case):
    g = torch.Generator().manual_seed(1)
    hq, hk = (4, 2) if case == "gqa" else (3, 3)
    lq, lk = 13, (13 if case == "causal" else 21)
    q = torch.randn(2, hq, lq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, hk, lk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, hk, lk, 8, generator=g, dtype=torch.float64)
    tq, tk, tv = (torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (q, k, v))
    mask, causal, bias = None, case == "causal", None
    if case == "bool_mask":
        mask = torch.rand(lq, lk, generator=g) > 0.3
        mask[:, 0] = True
        bias = torch.zeros(lq, lk, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    elif case == "additive_mask":
        mask = bias = torch.randn(2, 1, lq, lk, generator=g, dtype=torch.float64)
    elif case == "row_broadcast_mask":  # (B, 1, 1, Lk): diffusers' padding masks
        mask = bias = torch.randn(2, 1, 1, lk, generator=g, dtype=torch.float64)
    elif case == "causal":
        bias = torch.zeros(lq, lk, dtype=torch.float64).masked_fill(
            torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
    kr, vr, tkr, tvr = (x.repeat_interleave(hq // hk, dim=1) for x in (k, v, tk, tv))
    ref_o, ref_t = reference64(q, kr, vr, tq, tkr, tvr, bias)
    for block_q, block_k in [(None, None), (4, None), (5, 6)]:
        o, t = A.attention_jvp_blockwise(q, k, v, tq, tk, tv, attn_mask=mask, is_causal=causal,
                                         block_q=block_q, block_k=block_k)
        assert rel_max(o, ref_o) < 1e-12 and rel_max(t, ref_t) < 1e-12, (block_q, block_k)
    # and the library's O(L^2) reference agrees
    o, t = attention_jvp_reference(q, k, v, tq, tk, tv, attn_mask=mask, is_causal=causal)
    assert rel_max(t, ref_t) < 1e-12


def test_blockwise_matches_forward_ad_through_sdpa_math_backend():
    """fp32: the blockwise path vs torch.func.jvp through PyTorch's SDPA (math backend), both vs float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, *tans = make_inputs((2, 4, 77, 130, 40, 40), torch.float32, seed=9, strided=True)
    with sdpa_kernel(SDPBackend.MATH):
        o_m, t_m = torch.func.jvp(torch.nn.functional.scaled_dot_product_attention, (q, k, v), tuple(tans))
    o_b, t_b = A.attention_jvp_blockwise(q, k, v, *tans, block_q=16)
    ref_o, ref_t = reference64(q, k, v, *tans)
    assert rel_max(o_b, ref_o) < TOL[torch.float32] and rel_max(t_b, ref_t) < TOL[torch.float32]
    assert rel_max(t_b, t_m.double()) < 2 * TOL[torch.float32]
    assert rel_max(t_m, ref_t) < TOL[torch.float32]


def test_blockwise_chunks_bound_the_score_tile(monkeypatch):
    """Peak score tile is B*H*block_q*Lk (or *block_k): record every matmul output inside the path."""
    sizes = []
    real = torch.matmul

    def spy(a, b):
        out = real(a, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(A.torch, "matmul", spy)
    q, k, v, *tans = make_inputs((1, 2, 300, 300, 8, 8), torch.float32, seed=3)
    monkeypatch.setattr(A, "DEFAULT_CHUNK_ELEMS", 2 * 300 * 10)
    A.attention_jvp_blockwise(q, k, v, *tans)
    assert max(sizes) == 2 * 10 * 300  # 10 query rows x 300 keys x 2 heads, never 300 x 300
    sizes.clear()
    A.attention_jvp_blockwise(q, k, v, *tans, block_q=50, block_k=32)
    assert max(sizes) == 2 * 50 * 32


def sdpa(q, k, v, **kw):
    """Looks SDPA up at call time, as diffusers' attention processors do (so `jvp_mode` patches apply)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


# ----------------------------------------------------------------------------------------------
# Dispatch and the hook
# ----------------------------------------------------------------------------------------------


def test_dispatch_rule(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1, 1, 4, 8)
    assert A.resolve_attention_jvp("auto", x) == "blockwise"  # CPU tensors
    assert A.resolve_attention_jvp("auto", x.double()) == "blockwise"
    assert A.resolve_attention_jvp("reference", x) == "reference"
    assert A.resolve_attention_jvp("blockwise", x) == "blockwise"
    with pytest.raises(ValueError, match="attention_jvp must be one of"):
        A.resolve_attention_jvp("flash", x)
    # the kernel refuses CPU tensors outside the interpreter, masks, causal, GQA, float64, head dim > 128
    assert not A.triton_supports(x, x, x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert A.triton_supports(x, x, x)
    assert not A.triton_supports(x, x, x, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    assert not A.triton_supports(x, x, x, is_causal=True)
    assert not A.triton_supports(torch.zeros(1, 2, 4, 8), x, x)
    assert not A.triton_supports(x.double(), x.double(), x.double())
    big = torch.zeros(1, 1, 4, 136)
    assert not A.triton_supports(big, big, big)
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        expect = "triton" if A.triton_available() else "blockwise"
        assert A.resolve_attention_jvp("auto", x.cuda()) == expect


def test_jvp_attention_argument_selects_the_path(monkeypatch):
    calls = []
    real = A.attention_jvp_blockwise

    def counting(*a, **kw):
        calls.append("blockwise")
        return real(*a, **kw)

    monkeypatch.setattr(A, "attention_jvp_blockwise", counting)
    q, k, v, *tans = make_inputs((1, 2, 9, 11, 8, 8), torch.float64, seed=4)
    ref_o, ref_t = reference64(q, k, v, *tans)
    for mode in ("auto", "blockwise", "reference"):
        calls.clear()
        o, t = jvp(sdpa, (q, k, v), tuple(tans), attention=mode)
        assert calls == ([] if mode == "reference" else ["blockwise"]), mode
        assert rel_max(o, ref_o) < 1e-12 and rel_max(t, ref_t) < 1e-12, mode
    set_attention_jvp("reference")
    try:
        calls.clear()
        jvp(sdpa, (q, k, v), tuple(tans))
        assert calls == []
    finally:
        set_attention_jvp(None)
    calls.clear()
    jvp(sdpa, (q, k, v), tuple(tans))
    assert calls == ["blockwise"]  # default: auto -> blockwise on CPU
    with pytest.raises(ValueError):
        set_attention_jvp("flash")


# ----------------------------------------------------------------------------------------------
# Triton kernel under the interpreter (subprocess)
# ----------------------------------------------------------------------------------------------


def _kernel_cases():
    cases = []
    for dname in DTYPES:
        for i, shape in enumerate(SHAPES):
            which = list(TANGENT_SETS)[i % len(TANGENT_SETS)] if dname == "float32" else "all"
            cases.append(dict(dtype=dname, shape=shape, tangents=which, strided=(i % 2 == 1), block=(16, 32)))
    cases.append(dict(dtype="float32", shape=(1, 2, 17, 77, 40, 40), tangents="all", strided=False,
                      block=(None, None)))  # the default blocks (64 x 64)
    return cases


def _case_id(c):
    return (f"{c['dtype']}-{'x'.join(map(str, c['shape']))}-{c['tangents']}" + ("-strided" if c["strided"] else "")
            + ("-defaultblocks" if c["block"][0] is None else ""))


def _worker(out_path: str) -> None:  # runs with TRITON_INTERPRET=1 in a fresh interpreter
    results = {}
    for c in _kernel_cases():
        dtype = DTYPES[c["dtype"]]
        seed = int.from_bytes(os.urandom(4), "little")
        q, k, v, *tans = make_inputs(c["shape"], dtype, seed, c["strided"])
        tans = _select(tans, c["tangents"])
        ref_o, ref_t = reference64(q, k, v, *tans)
        B, H, lq, _, _, dv = c["shape"]
        out = torch.full((B, H, lq, dv), float("nan"), dtype=dtype)
        tout = torch.full((B, H, lq, dv), float("nan"), dtype=dtype)
        o, t = A.attention_jvp_triton(q, k, v, *tans, block_m=c["block"][0], block_n=c["block"][1], out=out,
                                      tout=tout)
        results[_case_id(c)] = dict(seed=seed, same_buffers=(o is out and t is tout), o=rel_max(o, ref_o),
                                    t=rel_max(t, ref_t), tol=TOL[dtype])
    # through the hook: jvp(..., attention="triton") inside a network-style call, and a masked call that the
    # kernel hands to the blockwise path
    q, k, v, *tans = make_inputs((2, 2, 21, 21, 8, 8), torch.float32, 7, strided=True)
    ref_o, ref_t = reference64(q, k, v, *tans)
    o, t = jvp(sdpa, (q, k, v), tuple(tans), attention="triton")
    results["hook"] = dict(o=rel_max(o, ref_o), t=rel_max(t, ref_t), tol=TOL[torch.float32], same_buffers=True)
    from diffdiv.models.jvp import attention_jvp_override, jvp_mode

    with torch.no_grad(), jvp_mode("hook"), attention_jvp_override("triton"):  # functorch-wrapped tensors
        o, t = torch.func.jvp(sdpa, (q, k, v), tuple(tans))
    results["func_jvp"] = dict(o=rel_max(o, ref_o), t=rel_max(t, ref_t), tol=TOL[torch.float32], same_buffers=True)
    mask = torch.rand(21, 21, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[:, 0] = True
    bias = torch.zeros(21, 21, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    ref_o, ref_t = reference64(q, k, v, *tans, bias=bias)
    o, t = A.attention_jvp_triton(q, k, v, *tans, attn_mask=mask)
    results["masked_fallback"] = dict(o=rel_max(o, ref_o), t=rel_max(t, ref_t), tol=TOL[torch.float32],
                                      same_buffers=True)
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def kernel_report(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("attn_kernel") / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        if "No module named 'triton'" in proc.stderr:
            pytest.skip("triton is not importable")
        raise AssertionError(f"kernel worker failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", _kernel_cases(), ids=_case_id)
def test_triton_kernel_matches_float64(kernel_report, case):
    r = kernel_report[_case_id(case)]
    assert r["same_buffers"], r  # wrote into the poisoned buffers (NaN left anywhere -> inf error)
    assert r["o"] < r["tol"] and r["t"] < r["tol"], r


@pytest.mark.parametrize("key", ["hook", "func_jvp", "masked_fallback"])
def test_triton_through_the_hook_and_fallback(kernel_report, key):
    r = kernel_report[key]
    assert r["o"] < r["tol"] and r["t"] < r["tol"], r


def test_cpu_users_need_no_triton():
    """With triton unimportable, the library imports and the JVP runs (auto -> blockwise)."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from diffdiv.models import attention_jvp as A\n"
            "from diffdiv.models.jvp import jvp\n"
            "q = torch.randn(1, 1, 4, 8)\n"
            "assert not A.triton_available() and A.resolve_attention_jvp('auto', q) == 'blockwise'\n"
            "sdpa = lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q)\n"
            "out, tan = jvp(sdpa, (q,), (torch.ones_like(q),))\n"
            "assert torch.isfinite(tan).all()\n"
            "assert not any(m.split('.')[0] == 'triton' and sys.modules[m] for m in sys.modules)\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_kernel_cases_cover_ragged_edges():
    cases = _kernel_cases()
    assert len({c["shape"] for c in cases}) >= 6
    assert any(c["shape"][2] % 16 and c["shape"][3] % 32 for c in cases)
    assert any(c["shape"][2] != c["shape"][3] for c in cases)
    assert {c["shape"][4] for c in cases} >= {8, 40, 64, 72, 128}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
