"""Fused weighted-score-difference op: PyTorch backend, dispatch, and the Triton kernels.

The Triton kernels run on CPU under TRITON_INTERPRET=1, which must be set before the kernel module is
decorated, so they run in a subprocess (`python tests/test_kernels.py --worker OUT.json`) that checks
them against a float64 reference on fresh random inputs (sizes not multiples of the block size,
outputs poisoned with NaN before each launch so every element must be written). The tests below
assert on its report; they skip when triton is not installed.

Tolerances: fp32 outputs computed in fp32 from exactly representable inputs: relative 2e-5. Half
outputs: the interpreter converts fp32 -> bf16 by truncation (error < 2^-7 |x|) and fp32 -> fp16 by
rounding (error <= 2^-11 |x|); the bound used is that conversion error plus the fp32 error.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RTOL32 = 2e-5
HALF_REL = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}
HALF_ABS = {torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 2.0**-24}  # fp16 subnormal step
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# float64 reference (independent of the library: straight from the definition in docs/math.md#kernel)
# ----------------------------------------------------------------------------------------------


def reference64(x0, d_p, d_q, h, normalize=True, eps=1e-5):
    B = x0.shape[0]
    x, p, q = (t.double().reshape(B, -1) for t in (x0, d_p, d_q))
    N = x.shape[1]
    n = (x - p).abs().mean(1).clamp_min(eps) if normalize else torch.ones(B, dtype=torch.float64)
    g = h.double()[:, None] * (q - p) / n[:, None]
    target = (x - g).detach()
    xr = x.clone().requires_grad_(True)
    loss = 0.5 * ((xr - target) ** 2).mean(1)
    (grad,) = torch.autograd.grad(loss.sum(), xr)  # gradient of the per-sample losses summed
    return dict(n=n, g=g, loss=loss.detach(), grad=grad, scale=h.double() / n, N=N)


def _inputs(B, shape, dtype, seed, equal_row=False):
    g = torch.Generator().manual_seed(seed)
    full = (B, *shape)
    x0 = torch.randn(full, generator=g).to(dtype)
    d_p = (x0.float() + 0.7 * torch.randn(full, generator=g)).to(dtype)
    d_q = (d_p.float() + 0.3 * torch.randn(full, generator=g)).to(dtype)
    h = torch.rand(B, generator=g) * 2 + 0.1
    if equal_row:  # n hits the eps floor on the first row; keep g = h (q - p) / eps inside the fp16 range
        d_p[0] = x0[0]
        d_q[0] = (d_p[0].float() + 2e-3 * torch.randn(shape, generator=g)).to(dtype)
    return x0, d_p, d_q, h


def _rel_excess(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, extra_abs: float = 0.0) -> float:
    """max |out - ref| / bound (<= 1 passes), bound = (conversion + fp32) relative error + absolute floor."""
    out = out.detach().double().reshape(ref.shape)
    if not bool(torch.isfinite(out).all()):
        return math.inf
    bound = (HALF_REL[dtype] + RTOL32) * ref.abs() + HALF_ABS[dtype] + extra_abs
    return float(((out - ref).abs() / bound).max()) if ref.numel() else 0.0


# ----------------------------------------------------------------------------------------------
# In-process: PyTorch backend and dispatch (never imports the Triton kernel module)
# ----------------------------------------------------------------------------------------------

from diffdiv.divergence.kernels import resolve_backend, weighted_score_difference  # noqa: E402


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("B,shape,normalize,equal_row", [
    (1, (1,), True, False), (3, (37,), True, True), (4, (3, 17, 19), False, False),
    (2, (4099,), True, False),
])
def test_torch_backend_matches_float64(dtype, B, shape, normalize, equal_row):
    seed = int.from_bytes(os.urandom(4), "little")
    x0, d_p, d_q, h = _inputs(B, shape, dtype, seed, equal_row)
    x = x0.clone().requires_grad_(True)
    g, n, loss = weighted_score_difference(x, d_p, d_q, h, backend="torch", normalize=normalize)
    loss.sum().backward()
    ref = reference64(x0, d_p, d_q, h, normalize)
    assert g.dtype == dtype and g.shape == x0.shape
    assert n.dtype == torch.float32 and loss.dtype == torch.float32
    msg = f"seed={seed}"
    assert _rel_excess(n, ref["n"], torch.float32) <= 1, msg
    assert _rel_excess(loss, ref["loss"], torch.float32) <= 1, msg
    # g = s (q - p): conversion error of the stored dtype on top of fp32 arithmetic
    assert _rel_excess(g, ref["g"], dtype) <= 1, msg
    assert _rel_excess(x.grad, ref["grad"], dtype) <= 1, msg


def test_torch_backend_tiles(monkeypatch):
    from diffdiv.divergence.kernels import reference

    monkeypatch.setattr(reference, "_BLOCK_ELEMS", 50)  # many ragged tiles, rows split across tiles
    for shape in [(3, 7), (4, 123), (70, 3)]:
        x0, d_p, d_q, h = _inputs(shape[0], shape[1:], torch.float32, 11)
        x = x0.clone().requires_grad_(True)
        g, n, loss = weighted_score_difference(x, d_p, d_q, h, backend="torch")
        loss.sum().backward()
        ref = reference64(x0, d_p, d_q, h)
        for out, key in ((n, "n"), (loss, "loss"), (g, "g"), (x.grad, "grad")):
            assert _rel_excess(out, ref[key], torch.float32) <= 1, (shape, key)


def test_float64_inputs_stay_float64():
    x0, d_p, d_q, h = _inputs(3, (11,), torch.float64, 0)
    g, n, loss = weighted_score_difference(x0, d_p, d_q, h)
    ref = reference64(x0, d_p, d_q, h)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(g, ref["g"], rtol=1e-12, atol=1e-15)


def test_non_contiguous_and_scalar_h_and_no_g():
    x0, d_p, d_q, _ = _inputs(4, (6, 5), torch.float32, 1)
    xt = x0.transpose(1, 2).requires_grad_(True)  # non-contiguous view
    g, n, loss = weighted_score_difference(xt, d_p.transpose(1, 2), d_q.transpose(1, 2), 2.0, return_g=False)
    assert g is None
    loss.sum().backward()
    ref = reference64(x0.transpose(1, 2), d_p.transpose(1, 2), d_q.transpose(1, 2), torch.full((4,), 2.0))
    torch.testing.assert_close(xt.grad.double(), ref["grad"].reshape(xt.shape), rtol=1e-5, atol=1e-8)
    assert not n.requires_grad


def test_gradient_only_to_x0():
    x0, d_p, d_q, h = _inputs(2, (9,), torch.float32, 2)
    p, q, hh = d_p.requires_grad_(True), d_q.requires_grad_(True), h.requires_grad_(True)
    _, _, loss = weighted_score_difference(x0.requires_grad_(True), p, q, hh)
    loss.sum().backward()
    assert p.grad is None and q.grad is None and hh.grad is None and x0.grad is not None


def test_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        weighted_score_difference(x, torch.zeros(2, 4), x, 1.0)
    with pytest.raises(ValueError):
        weighted_score_difference(x, x, x, torch.ones(3))
    with pytest.raises(ValueError):
        weighted_score_difference(x, x, x, 1.0, backend="cuda")


def test_dispatch_rules(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("DIFFDIV_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", x) == "torch"  # CPU tensors -> PyTorch reference
    assert resolve_backend("torch", x) == "torch"
    monkeypatch.setenv("DIFFDIV_KERNEL", "torch")
    assert resolve_backend("auto", x) == "torch"
    monkeypatch.setenv("DIFFDIV_KERNEL", "bogus")
    with pytest.raises(ValueError):
        resolve_backend("auto", x)
    assert resolve_backend("torch", x) == "torch"  # an explicit argument wins over the variable
    monkeypatch.setenv("DIFFDIV_KERNEL", "triton")
    with pytest.raises(RuntimeError):  # CPU tensors without the interpreter: refused, not crashed
        resolve_backend("auto", x)
    with pytest.raises(RuntimeError):
        resolve_backend("triton", x)
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        monkeypatch.delenv("DIFFDIV_KERNEL")
        from diffdiv.divergence.kernels import triton_available

        assert resolve_backend("auto", x.cuda()) == ("triton" if triton_available() else "torch")


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess)
# ----------------------------------------------------------------------------------------------

# (B, per-sample shape, block, chunk, normalize, equal_row)
KERNEL_CASES = [
    (1, (1,), 64, None, True, False),
    (3, (37,), 16, 32, True, True),
    (5, (1000,), 64, 128, True, False),
    (2, (4099,), 128, None, False, False),
    (4, (3, 17, 19), 1024, None, True, False),
]
BIG_CASE = (1, (70001,), 64, 64, True, False)  # > 1024 chunks: the finalize kernel loops


def _kernel_case_list():
    cases = []
    for dname in DTYPES:
        for c in KERNEL_CASES:
            cases.append(dict(dtype=dname, B=c[0], shape=c[1], block=c[2], chunk=c[3], normalize=c[4],
                              equal_row=c[5]))
    c = BIG_CASE
    cases.append(dict(dtype="float32", B=c[0], shape=c[1], block=c[2], chunk=c[3], normalize=c[4],
                      equal_row=c[5]))
    return cases


def _case_id(c):
    return f"{c['dtype']}-B{c['B']}-{'x'.join(map(str, c['shape']))}-blk{c['block']}-ch{c['chunk']}" + (
        "" if c["normalize"] else "-nonorm") + ("-eqrow" if c["equal_row"] else "")


def _poison(k: int) -> torch.Tensor:
    return torch.full((k,), float("nan"))


def _worker(out_path: str) -> None:  # runs with TRITON_INTERPRET=1 in a fresh interpreter
    from diffdiv.divergence.kernels import triton_score  # noqa: F401  (decorated in interpreter mode)

    results = {}
    for c in _kernel_case_list():
        dtype = DTYPES[c["dtype"]]
        seed = int.from_bytes(os.urandom(4), "little")
        x0, d_p, d_q, h = _inputs(c["B"], c["shape"], dtype, seed, c["equal_row"])
        B = c["B"]
        X, P, Q = (t.reshape(B, -1).contiguous() for t in (x0, d_p, d_q))
        N = X.shape[1]
        ref = reference64(x0, d_p, d_q, h, c["normalize"])
        nan = float("nan")
        chunk, C = triton_score._launch_shape(B, N, c["block"], c["chunk"])
        bufs = dict(n_out=_poison(B), loss_out=_poison(B), scale_out=_poison(B),
                    partials=(_poison(B * C), _poison(B * C)))
        n, loss, scale = triton_score.wsd_forward(X, P, Q, h, c["normalize"], 1e-5, block=c["block"],
                                                  chunk=c["chunk"], **bufs)
        g = triton_score.scaled_diff(P, Q, scale, out=torch.full((B, N), nan, dtype=dtype), block=c["block"],
                                     chunk=c["chunk"])
        go = torch.rand(B, dtype=torch.float64) + 0.5  # upstream gradient of the per-sample losses
        coef = go.float() * scale / N
        gx = triton_score.scaled_diff(P, Q, coef, out=torch.full((B, N), nan, dtype=dtype), block=c["block"],
                                      chunk=c["chunk"])
        # through the autograd wrapper (dispatch -> triton) as well
        xr = x0.clone().requires_grad_(True)
        g_w, n_w, loss_w = weighted_score_difference(xr, d_p, d_q, h, backend="triton",
                                                     normalize=c["normalize"])
        (loss_w * go.float()).sum().backward()
        grad_ref = go[:, None] * ref["grad"]
        written = [n, loss, scale, g.float(), gx.float(), *bufs["partials"]]
        results[_case_id(c)] = dict(
            seed=seed, chunks=C,
            all_written=all(bool(torch.isfinite(t).all()) for t in written),
            n=_rel_excess(n, ref["n"], torch.float32),
            loss=_rel_excess(loss, ref["loss"], torch.float32),
            scale=_rel_excess(scale, ref["scale"], torch.float32),
            g=_rel_excess(g, ref["g"], dtype),
            grad=_rel_excess(gx, grad_ref, dtype),
            wrapper_g=_rel_excess(g_w, ref["g"], dtype),
            wrapper_n=_rel_excess(n_w, ref["n"], torch.float32),
            wrapper_loss=_rel_excess(loss_w, ref["loss"], torch.float32),
            wrapper_grad=_rel_excess(xr.grad, grad_ref, dtype),
        )
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def kernel_report(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("kernels") / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("DIFFDIV_KERNEL", None)
    proc = subprocess.run([sys.executable, __file__, "--worker", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        if "No module named 'triton'" in proc.stderr:
            pytest.skip("triton is not importable")
        raise AssertionError(f"kernel worker failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", _kernel_case_list(), ids=_case_id)
def test_triton_kernel_matches_float64(kernel_report, case):
    r = kernel_report[_case_id(case)]
    assert r["all_written"], r
    for key in ("n", "loss", "scale", "g", "grad", "wrapper_g", "wrapper_n", "wrapper_loss", "wrapper_grad"):
        assert r[key] <= 1.0, (key, r)


def test_triton_cases_cover_multi_chunk_and_ragged_sizes():
    cases = _kernel_case_list()
    assert any(math.prod(c["shape"]) % c["block"] for c in cases)
    assert any(c["chunk"] is not None and math.prod(c["shape"]) > c["chunk"] for c in cases)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
