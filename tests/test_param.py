"""Conversions round-trip for every parameterization; schedules invert; TrigFlow mapping is exact."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffdiv.param import (
    EDMSchedule,
    FlowSchedule,
    TrigFlowSchedule,
    VPSchedule,
    eps_from_x0,
    flow_from_x0,
    prediction_from_x0,
    score_from_x0,
    t_to_other,
    trigflow_F_from_x0,
    trigflow_input_scale,
    trigflow_time,
    v_from_x0,
    x0_from_eps,
    x0_from_flow,
    x0_from_prediction,
    x0_from_score,
    x0_from_trigflow_F,
    x0_from_v,
)

VP = VPSchedule.linear()
VP_COS = VPSchedule.linear(beta_schedule="squaredcos_cap_v2")
SCHEDULES = {"vp": VP, "vp_cos": VP_COS, "edm": EDMSchedule(), "flow": FlowSchedule(), "trig": TrigFlowSchedule(0.5)}

coef = st.floats(min_value=0.05, max_value=20.0)
seeds = st.integers(0, 2**31 - 1)


def _data(seed, n=4, d=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(a=coef, s=coef, seed=seeds)
def test_conversions_round_trip(a, s, seed):
    x0, eps = _data(seed)
    a_t = torch.full((4,), a, dtype=torch.float64)
    s_t = torch.full((4,), s, dtype=torch.float64)
    x_t = a * x0 + s * eps
    torch.testing.assert_close(eps_from_x0(x_t, x0, a_t, s_t), eps)
    torch.testing.assert_close(x0_from_eps(x_t, eps, a_t, s_t), x0)
    v = v_from_x0(x_t, x0, a_t, s_t)
    torch.testing.assert_close(v, a * eps - s * x0)
    torch.testing.assert_close(x0_from_v(x_t, v, a_t, s_t), x0)
    sc = score_from_x0(x_t, x0, a_t, s_t)
    torch.testing.assert_close(sc, -eps / s)  # conditional score of N(a x0, s^2)
    torch.testing.assert_close(x0_from_score(x_t, sc, a_t, s_t), x0)
    u = flow_from_x0(x_t, x0, a_t, s_t)
    torch.testing.assert_close(u, eps - x0)
    torch.testing.assert_close(x0_from_flow(x_t, u, a_t, s_t), x0)
    for kind in ("epsilon", "v_prediction", "sample", "flow"):
        pred = prediction_from_x0(x0, kind, x_t, a_t, s_t)
        torch.testing.assert_close(x0_from_prediction(pred, kind, x_t, a_t, s_t), x0)


@settings(max_examples=40, deadline=None)
@given(t=st.floats(0.01, math.pi / 2 - 0.01), sd=st.floats(0.1, 2.0), seed=seeds)
def test_trigflow_F_round_trip_and_velocity(t, sd, seed):
    x0, z = _data(seed)
    tt = torch.full((4,), t, dtype=torch.float64)
    x_t = math.cos(t) * x0 + math.sin(t) * sd * z
    F = trigflow_F_from_x0(x_t, x0, tt, sd)
    torch.testing.assert_close(x0_from_trigflow_F(x_t, F, tt, sd), x0)
    # sd F is the PF-ODE velocity dx_t/dt = -sin t x0 + cos t (sd z)
    torch.testing.assert_close(sd * F, -math.sin(t) * x0 + math.cos(t) * sd * z)


@settings(max_examples=40, deadline=None)
@given(a=st.floats(0.01, 5.0), s=st.floats(0.01, 5.0), sd=st.floats(0.1, 2.0), seed=seeds)
def test_trigflow_mapping_from_any_teacher(a, s, sd, seed):
    """x_teacher = scale * x_trig at t = atan2(sigma, alpha sd): same x0, same noise."""
    x0, eps = _data(seed)
    a_t, s_t = torch.tensor(a, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    t = trigflow_time(a_t, s_t, sd)
    x_trig = torch.cos(t) * x0 + torch.sin(t) * sd * eps
    scale = trigflow_input_scale(a_t, s_t, sd)
    torch.testing.assert_close(scale * x_trig, a * x0 + s * eps)
    tr = TrigFlowSchedule(sd)
    torch.testing.assert_close(tr.logsnr(t.reshape(1)), torch.log(a_t**2 / s_t**2).reshape(1))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(SCHEDULES)), u=st.floats(0.02, 0.98))
def test_schedule_inverts_through_logsnr(name, u):
    sch = SCHEDULES[name]
    t = torch.tensor([sch.t_min + u * (sch.t_max - sch.t_min)], dtype=torch.float64)
    back = sch.t_from_logsnr(sch.logsnr(t))
    torch.testing.assert_close(back, t, rtol=1e-6, atol=1e-6 * (sch.t_max - sch.t_min))
    for other in SCHEDULES.values():
        t2 = t_to_other(t, sch, other)
        lam_ok = other.t_min - 1e-9 <= float(t2) <= other.t_max + 1e-9
        if lam_ok:
            torch.testing.assert_close(other.logsnr(t2), sch.logsnr(t), rtol=1e-5, atol=1e-5)


def test_vp_matches_diffusers_table():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    t = torch.arange(0, 1000, 37, dtype=torch.float64)
    a, s = VP_COS.alpha_sigma(t)
    torch.testing.assert_close(a**2, ref[t.long()], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))
    # continuous t between integers is monotone in noise
    tt = torch.linspace(0, 999, 5000, dtype=torch.float64)
    assert bool((VP_COS.logsnr(tt).diff() < 0).all())


def test_flow_schedule_time_scale():
    f = FlowSchedule()
    a, s = f.alpha_sigma(torch.tensor([0.25]))
    assert float(a) == 0.75 and float(s) == 0.25
    assert float(f.model_time(torch.tensor([0.25]))) == 250.0


@settings(max_examples=60, deadline=None)
@given(a=coef, s=coef, sd=st.floats(0.1, 2.0), seed=seeds)
def test_x0_loss_weight_is_the_squared_error_of_each_prediction_type(a, s, sd, seed):
    """w ||D - x0||^2 = ||pred(D) - pred(x0)||^2 at the same x_t for every prediction type (the one weight of the
    teacher's DSM loss and of the fake-score loss); edm: EDM's lambda(sigma) = 1/c_out^2 at sigma = s/a."""
    from diffdiv.divergence import PREDICTION_WEIGHTING, x0_loss_weight

    assert set(PREDICTION_WEIGHTING) == {"epsilon", "v_prediction", "sample", "flow"}
    x0, eps = _data(seed)
    d = x0 + 0.3 * _data(seed + 1)[0]  # a denoiser output
    a_t = torch.full((4,), a, dtype=torch.float64)
    s_t = torch.full((4,), s, dtype=torch.float64)
    x_t = a * x0 + s * eps
    for kind, weighting in PREDICTION_WEIGHTING.items():
        err = ((prediction_from_x0(d, kind, x_t, a_t, s_t) - prediction_from_x0(x0, kind, x_t, a_t, s_t)) ** 2).sum(1)
        torch.testing.assert_close(x0_loss_weight(a_t, s_t, weighting) * ((d - x0) ** 2).sum(1), err)
    sig = s / a
    c_out = sig * sd / math.sqrt(sig**2 + sd**2)  # Karras et al. 2022, Table 1
    torch.testing.assert_close(x0_loss_weight(a_t, s_t, "edm", sd), torch.full((4,), 1 / c_out**2, dtype=torch.float64))
    # computed in the inputs' dtype (float32 stays float32), float64 for Python numbers
    assert x0_loss_weight(a_t.float(), s_t.float(), "v").dtype == torch.float32
    assert x0_loss_weight(a, s, "eps").dtype == torch.float64
