"""JVP through attention, diffusers UNets and transformers, checked against central finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from diffdiv.models import jvp as J
from diffdiv.models.jvp import attention_jvp_reference, jvp, relative_error, set_attention_jvp


def fd64(fn, primals, tangents, h=1e-6):
    """Central finite difference in float64 (error ~ h^2 + 1e-16/h)."""
    plus = [p + h * v for p, v in zip(primals, tangents)]
    minus = [p - h * v for p, v in zip(primals, tangents)]
    with torch.no_grad():
        return (fn(*plus) - fn(*minus)) / (2 * h)


def richardson_fd(fn, primals, tangents, h):
    """Fourth-order central difference (Richardson): (4 D(h/2) - D(h)) / 3, for fp32 networks."""
    return (4 * fd64(fn, primals, tangents, h / 2) - fd64(fn, primals, tangents, h)) / 3


@pytest.mark.parametrize("case", ["plain", "bool_mask", "additive_mask", "causal", "gqa"])
def test_attention_jvp_reference_vs_finite_difference(case):
    g = torch.Generator().manual_seed(0)
    hq, hk = (4, 2) if case == "gqa" else (3, 3)
    q = torch.randn(2, hq, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, hk, 7 if case != "causal" else 5, 8, generator=g, dtype=torch.float64)
    v = torch.randn(k.shape, generator=g, dtype=torch.float64)
    tq, tk, tv = (torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (q, k, v))
    mask, causal = None, case == "causal"
    if case == "bool_mask":
        mask = torch.rand(5, k.shape[2], generator=g) > 0.3
        mask[:, 0] = True
    if case == "additive_mask":
        mask = torch.randn(2, 1, 5, k.shape[2], generator=g, dtype=torch.float64)
    kw = dict(attn_mask=mask, is_causal=causal, scale=0.3)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=(case == "gqa"), **kw)

    out, tout = attention_jvp_reference(q, k, v, tq, tk, tv, **kw)
    torch.testing.assert_close(out, sdpa(q, k, v), rtol=1e-12, atol=1e-12)
    assert relative_error(tout, fd64(sdpa, (q, k, v), (tq, tk, tv))) < 1e-8
    # the hooked SDPA inside torch.func.jvp gives the same tangent
    _, t2 = jvp(sdpa, (q, k, v), (tq, tk, tv), method="forward")
    assert relative_error(t2, tout) < 1e-12


def test_attention_hook_is_the_path_used(tmp_path):
    """The installed attention JVP is what `jvp(..., method='forward')` uses inside diffusers attention."""
    from diffdiv.models.loading import load_denoiser
    from diffdiv.models.tiny import build_tiny_unet2d

    d = load_denoiser(build_tiny_unet2d(tmp_path / "u"))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([300.0, 700.0])
    dx, dt = torch.randn_like(x), torch.tensor([5.0, -5.0])
    calls = []

    def zero_tangent(q, k, v, tq, tk, tv, **kw):
        calls.append(q.shape)
        out, tout = attention_jvp_reference(q, k, v, tq, tk, tv, **kw)
        return out, torch.zeros_like(tout)

    _, ref = jvp(d, (x, t), (dx, dt), method="forward")
    set_attention_jvp(zero_tangent)
    try:
        _, hooked = jvp(d, (x, t), (dx, dt), method="forward")
    finally:
        set_attention_jvp(None)
    assert len(calls) == 4  # AttnDown (1) + mid (1) + AttnUp (2)
    assert relative_error(hooked, ref) > 1e-3  # the zeroed attention tangent changed the result
    _, math_ = jvp(d, (x, t), (dx, dt), method="forward_math")
    assert relative_error(math_, ref) < 1e-5
    assert J.F.scaled_dot_product_attention is J._ORIG_SDPA and J.F.group_norm is J._ORIG_GROUP_NORM


# ------------------------------------------------------------------------------------------------
# Raw diffusers networks in float64: forward-mode JVP vs finite differences (tight)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    from diffdiv.models.loading import load_denoiser
    from diffdiv.models.tiny import build_tiny_sd, build_tiny_sd3

    root = tmp_path_factory.mktemp("tiny_jvp")
    sd = load_denoiser(build_tiny_sd(root / "sd"))
    sd3 = load_denoiser(build_tiny_sd3(root / "sd3", t5=False))
    prompts = ["a red cat", "a house on a hill"]
    return {"sd": (sd, sd.encode_prompts(prompts)), "sd3": (sd3, sd3.encode_prompts(prompts))}


def raw_fn(kind, nets, dtype):
    import copy

    d, cond = nets[kind]
    net = copy.deepcopy(d.trainable).to(dtype)
    emb = cond.embeds.to(dtype)
    if kind == "sd":
        return lambda x, t: net(x, t, encoder_hidden_states=emb).sample
    pooled = cond.pooled.to(dtype)
    return lambda x, t: net(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled).sample


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_network_jvp_float64_vs_finite_difference(kind, nets):
    """x-direction: float64 end to end, tight. t-direction: diffusers builds the sinusoidal time embedding
    in fp32 even for a float64 network, so the finite difference (Richardson, h = 1e-2) is good to ~1e-4."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([310.0, 640.0], dtype=torch.float64)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    dt = torch.tensor([40.0, -25.0], dtype=torch.float64)
    f64 = raw_fn(kind, nets, torch.float64)
    ref_x = fd64(f64, (x, t), (dx, 0 * dt), h=1e-6)
    ref_t = richardson_fd(f64, (x, t), (0 * dx, dt), h=1e-2)
    for method in ("forward", "forward_math"):
        _, tan_x = jvp(f64, (x, t), (dx, 0 * dt), method=method)
        _, tan_t = jvp(f64, (x, t), (0 * dx, dt), method=method)
        _, tan = jvp(f64, (x, t), (dx, dt), method=method)
        assert relative_error(tan_x, ref_x) < 1e-7, method
        assert relative_error(tan_t, ref_t) < 5e-4, method
        assert relative_error(tan, tan_x + tan_t) < 1e-10, method  # linear in the tangent
    # fp32 forward-mode JVP agrees with the float64 one to fp32 round-off
    f32 = raw_fn(kind, nets, torch.float32)
    _, tan32 = jvp(f32, (x.float(), t.float()), (dx.float(), dt.float()), method="forward")
    assert relative_error(tan32, jvp(f64, (x, t), (dx, dt))[1]) < 1e-4


# ------------------------------------------------------------------------------------------------
# Through the TrigFlow view of the wrappers (fp32, CFG on): forward, math and FD fallback
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_trigflow_view_jvp_vs_finite_difference(kind, nets):
    from diffdiv.models.trigflow import TrigFlowView

    d, cond = nets[kind]
    view = TrigFlowView(d, 0.5, sigma_max=80.0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.45, 1.2])
    cs = torch.cos(t) * torch.sin(t)
    dx = cs.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)

    def fn(x, t):
        return view(x, t, cond, guidance_scale=2.5)

    # the teacher time moves ~700 timesteps per radian: fp32 differences need h ~ 1e-3 (measured optimum)
    ref = richardson_fd(fn, (x, t), (dx, cs), h=1e-3)
    errs = {m: relative_error(jvp(fn, (x, t), (dx, cs), method=m)[1], ref) for m in ("forward", "forward_math")}
    assert max(errs.values()) < 2e-3, errs
    _, fd = jvp(fn, (x, t), (dx, cs), method="fd", fd_h=3e-4)
    assert relative_error(fd, ref) < 5e-3
    assert math.isfinite(errs["forward"])


def test_jvp_rejects_bad_method():
    with pytest.raises(ValueError, match="unknown jvp method"):
        jvp(lambda x: x, (torch.ones(1),), (torch.ones(1),), method="reverse")


# ------------------------------------------------------------------------------------------------
# diffdiv's forward-AD rules (jvp_mode("hook")) vs PyTorch's own rules, float64
# ------------------------------------------------------------------------------------------------


def _rule_cases():
    g = torch.Generator().manual_seed(7)

    def r(*s, dtype=torch.float64):
        return torch.randn(*s, generator=g, dtype=dtype)

    F = torch.nn.functional
    w8, b8, w6 = r(8), r(8), r(6)
    y = r(2, 8, 4, 4)
    conv_w, conv_b, lin_w, lin_b = r(5, 8, 3, 3), r(5), r(3, 6), r(3)
    return {
        "group_norm": (lambda x: F.group_norm(x, 4, w8, b8, 1e-5), r(2, 8, 4, 4)),
        "group_norm_no_affine_3d": (lambda x: F.group_norm(x, 2, None, None, 1e-6), r(3, 8, 5)),
        "group_norm_noncontiguous": (lambda x: F.group_norm(x.transpose(2, 3), 4, w8, b8), r(2, 8, 4, 4)),
        "layer_norm": (lambda x: F.layer_norm(x, (6,), w6, None, 1e-5), r(2, 3, 6)),
        "layer_norm_2d_no_affine": (lambda x: F.layer_norm(x, (3, 6)), r(2, 3, 6)),
        "conv2d": (lambda x: F.conv2d(x, conv_w, conv_b, padding=1, stride=2), r(2, 8, 7, 7)),
        "linear": (lambda x: F.linear(x, lin_w, lin_b), r(4, 5, 6)),
        "scalar_mul_div": (lambda x: (2.0 * x) / 3.0 * 0.5, r(3, 4)),
        "broadcast_add_sub": (lambda x: (y + x) - (y * x) + (x - y), r(2, 8, 1, 1)),
        "alpha_rsub": (lambda x: torch.add(y, x, alpha=2.0) - torch.sub(y, x, alpha=0.5) + torch.rsub(x, 2.0)
                       + (1.0 - x), r(2, 8, 4, 4)),
        "methods_and_div_by_tensor": (lambda x: x.mul(y).div(y.abs() + 1) + torch.true_divide(x, 4.0), r(2, 8, 4, 4)),
        "dual_denominator_falls_back": (lambda x: y / (x.abs() + 1), r(2, 8, 4, 4)),
        "dtype_promotion": (lambda x: x.float() * y + x * y.float(), r(2, 8, 4, 4)),  # fp32 * fp64 const
    }


@pytest.mark.parametrize("name", list(_rule_cases()))
def test_hook_rules_match_pytorch_forward_ad(name):
    fn, x = _rule_cases()[name]
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=x.dtype)
    out, tan = jvp(fn, (x,), (dx,), method="forward")
    ref_out, ref_tan = torch.func.jvp(fn, (x,), (dx,))  # PyTorch's own rules (no jvp_mode)
    assert out.dtype == ref_out.dtype and tan.dtype == ref_tan.dtype and tan.shape == ref_tan.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert relative_error(tan, ref_tan) < (1e-12 if tan.dtype == torch.float64 else 1e-6)
    if name != "dtype_promotion":  # float64 end to end: both vs a float64 central difference
        assert relative_error(tan, fd64(fn, (x,), (dx,))) < 1e-7


def test_hook_rules_leave_reverse_mode_alone(tmp_path):
    """With a graph being recorded (parameters need grad), jvp_mode's rules defer to PyTorch: same gradients."""
    from diffdiv.models.loading import load_denoiser
    from diffdiv.models.tiny import build_tiny_unet2d

    d = load_denoiser(build_tiny_unet2d(tmp_path / "u"))
    net = d.trainable.double()
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([300.0, 700.0], dtype=torch.float64)

    def grads():
        net.zero_grad()
        (net(x, t).sample ** 2).sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    ref = grads()
    with J.jvp_mode("hook"):
        hooked = grads()
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(hooked, ref))


def test_attention_mask_with_a_tangent_is_differentiated():
    """An additive mask that depends on the input (rare) goes to PyTorch's math-backend rules, not dropped."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    m = torch.randn(5, 5, generator=g, dtype=torch.float64)

    def fn(q, m):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)

    dq, dm = torch.randn_like(q), torch.randn_like(m)
    _, tan = jvp(fn, (q, m), (dq, dm))
    assert relative_error(tan, fd64(fn, (q, m), (dq, dm))) < 1e-8
