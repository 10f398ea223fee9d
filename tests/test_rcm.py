"""sCM / rCM: the consistency tangent against the exact consistency function of a Gaussian, the sCM loss
recovering it, time samplers, the trainer end to end (mixture; tiny SD marked slow), recipes parse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from diffdiv.methods.rcm import (
    AdaptiveWeight,
    normalize_tangent,
    scm_loss,
    scm_tangent,
    shifted_uniform_time,
    tangent_warmup,
    trigflow_time_from_normal,
)
from diffdiv.models.gmm import GaussianMixture, GaussianMixtureTeacher
from diffdiv.models.jvp import jvp, relative_error
from diffdiv.models.trigflow import TrigFlowView
from diffdiv.param import EDMSchedule, VPSchedule

ROOT = Path(__file__).resolve().parents[1]
SD = 0.6
MU = torch.tensor([0.8, -0.5, 0.1], dtype=torch.float64)
S0 = 0.4
REPO = Path(__file__).resolve().parents[1]


def gaussian_teacher(schedule=None) -> TrigFlowView:
    mix = GaussianMixture(MU[None], torch.tensor([S0], dtype=torch.float64))
    sch = schedule or VPSchedule.linear(1000, 1e-4, 0.02, "squaredcos_cap_v2")
    return TrigFlowView(GaussianMixtureTeacher(mix, sch), SD, sigma_max=80.0)


class GaussianFamily(nn.Module):
    """F of the exact consistency function of N(mu, s^2 I) under TrigFlow noise:
    f(x, t) = mu + s (x - cos t mu) / sqrt(cos^2 t s^2 + sin^2 t sd^2) (the PF-ODE keeps the standardized
    coordinate fixed), F = (cos t x - f) / (sd sin t). Parameters (mu, log s)."""

    def __init__(self, mu: torch.Tensor, s: float, wobble: float = 0.0):
        super().__init__()
        self.mu = nn.Parameter(mu.clone())
        self.log_s = nn.Parameter(torch.tensor(math.log(s), dtype=torch.float64))
        self.wobble = wobble  # > 0: a non-consistent student (adds a smooth non-linear term to F)

    def f(self, x, t):
        s = self.log_s.exp()
        c, si = torch.cos(t)[:, None], torch.sin(t)[:, None]
        return self.mu + s * (x - c * self.mu) / torch.sqrt(c**2 * s**2 + si**2 * SD**2)

    def forward(self, x, t):
        c, si = torch.cos(t)[:, None], torch.sin(t)[:, None]
        F = (c * x - self.f(x, t)) / (SD * si)
        return F + self.wobble * torch.tanh(x) * (1 + t[:, None] ** 2)


def points(n: int, teacher: TrigFlowView, seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S0 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = teacher.t_min + (teacher.t_max - teacher.t_min) * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.cos(t)[:, None] * x0 + SD * torch.sin(t)[:, None] * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, t


def tangent_of(student: nn.Module, teacher: TrigFlowView, x, t, r=1.0, form="scm"):
    with torch.no_grad():
        dxdt = SD * teacher(x, t)
        F = student(x, t)
    cs = torch.cos(t) * torch.sin(t)
    _, jF = jvp(student, (x, t), (cs[:, None] * dxdt, cs))
    return scm_tangent(F, jF, dxdt, x, t, SD, r, form), F, dxdt


@pytest.mark.parametrize("schedule", ["vp", "edm"])
def test_tangent_vanishes_at_the_exact_consistency_function(schedule):
    teacher = gaussian_teacher(EDMSchedule(0.002, 80.0) if schedule == "edm" else None)
    exact = GaussianFamily(MU, S0)
    x, t = points(256, teacher, 0)
    g, F, dxdt = tangent_of(exact, teacher, x, t)
    scale = (torch.cos(t)[:, None] ** 2 * (SD * F - dxdt)).norm()  # size of the first term alone
    assert scale > 1.0
    assert g.norm() / scale < 1e-9


def test_tangent_is_cos_t_times_df_dt_along_the_teacher_ode():
    """g (r = 1) = cos t d/dt f(x(t), t) with x(t) the exact PF-ODE path (finite difference in float64)."""
    teacher = gaussian_teacher()
    student = GaussianFamily(MU + 0.3, 0.7, wobble=0.2)  # wrong and non-consistent
    x, t = points(128, teacher, 1)
    g, _, _ = tangent_of(student, teacher, x, t)
    sig = lambda tt: torch.sqrt(torch.cos(tt) ** 2 * S0**2 + torch.sin(tt) ** 2 * SD**2)[:, None]  # noqa: E731
    xi = (x - torch.cos(t)[:, None] * MU) / sig(t)

    def f_on_path(tt):
        xp = torch.cos(tt)[:, None] * MU + sig(tt) * xi
        with torch.no_grad():
            F = student(xp, tt)
        return torch.cos(tt)[:, None] * xp - SD * torch.sin(tt)[:, None] * F

    h = 1e-5
    df_dt = (f_on_path(t + h) - f_on_path(t - h)) / (2 * h)
    assert relative_error(g, torch.cos(t)[:, None] * df_dt) < 1e-7
    # the rCM warm-up form agrees at r = 1 and regresses onto the teacher at r = 0
    g_rcm, F, dxdt = tangent_of(student, teacher, x, t, form="rcm")
    torch.testing.assert_close(g_rcm, g, rtol=1e-12, atol=1e-12)
    g0, _, _ = tangent_of(student, teacher, x, t, r=0.0, form="rcm")
    torch.testing.assert_close(g0, -torch.cos(t)[:, None] * (SD * F - dxdt), rtol=1e-12, atol=1e-12)


def test_scm_loss_recovers_the_exact_consistency_function():
    """Training a (mu, s) consistency family with the sCM loss (warm-up, normalized tangents) on the
    teacher's PF-ODE converges to the teacher's Gaussian (mu, s0) = the only consistent member."""
    teacher = gaussian_teacher()
    student = GaussianFamily(torch.zeros(3, dtype=torch.float64), 1.0)
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(0)
    for step in range(250):
        n = 128
        x0 = MU + S0 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
        u = torch.randn(n, generator=gen, dtype=torch.float64)
        t = trigflow_time_from_normal(u, -0.8, 1.6, SD).clamp(teacher.t_min, teacher.t_max)
        x = torch.cos(t)[:, None] * x0 + SD * torch.sin(t)[:, None] * torch.randn(n, 3, generator=gen,
                                                                                   dtype=torch.float64)
        g, _, _ = tangent_of(student, teacher, x, t, r=tangent_warmup(step, 60))
        F = student(x, t)
        loss = scm_loss(F, F.detach(), normalize_tangent(g, 0.1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (student.mu.detach() - MU).abs().max() < 1e-3
    assert abs(student.log_s.exp().item() - S0) < 1e-3


def test_loss_gradient_is_minus_two_g_and_adaptive_weight():
    g = torch.randn(4, 5, dtype=torch.float64)
    F = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    scm_loss(F, F.detach(), g).sum().backward()
    torch.testing.assert_close(F.grad, -2 * g)
    lv = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    want = torch.exp(-lv) * (g**2).sum(1) / 5 + lv  # sCM eq. 9
    torch.testing.assert_close(scm_loss(F.detach(), F.detach(), g, lv), want)
    w = AdaptiveWeight()
    assert torch.equal(w(torch.tensor([0.1, 1.0])), torch.zeros(2))  # starts at uniform weighting
    gn = normalize_tangent(g, 0.1)
    torch.testing.assert_close(gn.norm(dim=1), g.norm(dim=1) / (g.norm(dim=1) + 0.1))


def test_time_samplers():
    n = 40000
    gen = torch.Generator().manual_seed(0)
    t = trigflow_time_from_normal(torch.randn(n, generator=gen, dtype=torch.float64), -0.8, 1.6, 0.5)
    tau = torch.log(0.5 * torch.tan(t))  # log(sigma/alpha) ~ N(-0.8, 1.6^2)
    assert abs(tau.mean().item() + 0.8) < 4 * 1.6 / math.sqrt(n)
    assert abs(tau.std().item() - 1.6) < 4 * 1.6 / math.sqrt(2 * n)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    s = 0.5 * torch.tan(shifted_uniform_time(u, 1.0, 0.5))  # shift 1: rectified-flow sigma s/(1+s) uniform
    rf = s / (1 + s)
    assert abs(rf.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    s5 = 0.5 * torch.tan(shifted_uniform_time(u, 5.0, 0.5))
    exact = 1.25 * (1 - math.log(5) / 4)  # E[5u / (1 + 4u)], u ~ U(0, 1)
    assert abs((s5 / (1 + s5)).mean().item() - exact) < 4 * 0.3 / math.sqrt(n)


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------


def run_trainer(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    from diffdiv.config import load_config
    from diffdiv.trainers.rcm import RCMConfig, RCMTrainer

    out = tmp_path / "run"
    base = [f"output_dir={out}", "max_steps=6", "batch_size=32", "student.pretrain_steps=30", "tangent_warmup=3",
            "log_with=null", "progress=false", "checkpoint_every=0", "eval_samples=200", "log_every=1",
            "times_search=false", "seed=0"]
    cfg = load_config(RCMConfig, None, base + list(overrides))
    tr = RCMTrainer(cfg)
    metrics = tr.train()
    return {"metrics": metrics, "trainer": tr}, out


def test_trainer_mixture_rcm_exports_consistency_student(tmp_path):
    from diffdiv.cli import main
    from diffdiv.models.loading import load_denoiser, read_meta

    res, out = run_trainer(tmp_path, "fake_updates=2", "dmd_max_steps=3")
    tr, m = res["trainer"], res["metrics"]
    assert set(tr.nets) == {"student", "fake_score"}
    assert tr.phases(0) == ["student"] and tr.phases(3) == ["fake_score", "fake_score", "student"]
    hist = tr.history
    assert all("student/scm" in h for h in hist) and "student/dmd" in hist[-1] and "student/dmd" not in hist[0]
    assert hist[-1]["student/tangent_r"] == 1.0 and hist[0]["student/tangent_r"] == 0.0
    assert math.isfinite(m["student_mmd"]) and "student_mmd_4step" in m
    meta = read_meta(out / "student")
    assert meta["kind"] == "consistency" and meta["guidance_scale"] == 1.0
    sch = load_denoiser(out / "student").schedule
    for k in (1, 2, 3, 4):
        times = meta[f"times_{k}"]
        assert len(times) == k and times == sorted(times, reverse=True)
    a, s = sch.alpha_sigma(torch.tensor(meta["times_1"], dtype=torch.float64))
    assert float(s / a) == pytest.approx(80.0, rel=1e-4)  # the first step starts at sigma/alpha = sigma_max
    assert main(["sample", "--model", str(out / "student"), "--steps", "2", "--num-samples", "16",
                 "--out", str(tmp_path / "s.npz")]) == 0


def test_trainer_scm_only_has_no_critic(tmp_path):
    res, _ = run_trainer(tmp_path, "dmd_weight=0", "jvp=fd", "adaptive_weight=true")
    tr = res["trainer"]
    assert set(tr.nets) == {"student", "logvar"} and tr.phases(5) == ["student"]
    assert all("student/dmd" not in h for h in tr.history)


def test_bad_config_is_a_one_line_error():
    from diffdiv.config import ConfigError, load_config
    from diffdiv.trainers.rcm import RCMConfig

    with pytest.raises(ConfigError, match="mid_sigmas must be decreasing"):
        load_config(RCMConfig, None, ["mid_sigmas=[1.0,2.0,0.5]"])
    with pytest.raises(ConfigError, match="dmd_start"):
        load_config(RCMConfig, None, ["scm_weight=0"])
    with pytest.raises(ConfigError, match="jvp"):
        load_config(RCMConfig, None, ["jvp=reverse"])


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*")
                                        if "rcm" in p.name or "scm" in p.name))
def test_recipes_parse(path):
    from diffdiv.config import load_config
    from diffdiv.trainers.rcm import RCMConfig

    cfg = load_config(RCMConfig, REPO / "configs" / path, [])
    assert cfg.max_steps > 0
    if "scm" in path:
        assert cfg.dmd_weight == 0
    else:
        assert cfg.dmd_weight > 0


@pytest.mark.slow
def test_tiny_sd_rcm_end_to_end(tmp_path):
    """configs/tiny_sd_rcm.yaml on a tiny SD pipeline: train, export a diffusers student, sample 2 steps."""
    from diffusers import StableDiffusionPipeline

    from diffdiv.cli import main
    from diffdiv.config import load_config
    from diffdiv.models.loading import read_meta
    from diffdiv.models.tiny import build_tiny_sd
    from diffdiv.trainers.rcm import RCMConfig, RCMTrainer

    teacher = build_tiny_sd(tmp_path / "teacher")
    out = tmp_path / "run"
    cfg = load_config(RCMConfig, REPO / "configs" / "tiny_sd_rcm.yaml",
                      [f"teacher.path={teacher}", f"output_dir={out}", "log_with=null", "progress=false"])
    tr = RCMTrainer(cfg)
    tr.train()
    assert "student/dmd" in tr.history[-1] and all(math.isfinite(v) for v in tr.history[-1].values())
    meta = read_meta(out / "student")
    assert meta["kind"] == "consistency" and json.loads((out / "student" / "model_index.json").read_text())[
        "_class_name"] == "StableDiffusionPipeline"
    StableDiffusionPipeline.from_pretrained(out / "student")  # plain diffusers loads the student
    assert main(["sample", "--model", str(out / "student"), "--steps", "2", "--num-samples", "4",
                 "--prompt", "a red cat", "--out", str(tmp_path / "s.npz")]) == 0
    import numpy as np

    z = np.load(tmp_path / "s.npz")
    assert z["images"].shape == (4, 3, 32, 32) and np.isfinite(z["images"]).all()


@pytest.mark.slow
def test_digits_times_search_averages_seeds_and_exports_times(tmp_path):
    from diffdiv.config import load_config
    from diffdiv.models.loading import read_meta
    from diffdiv.models.tiny import build_tiny_unet2d
    from diffdiv.trainers.rcm import RCMConfig, RCMTrainer

    teacher = build_tiny_unet2d(tmp_path / "teacher", sample_size=8, channels=1)
    out = tmp_path / "run"
    cfg = load_config(RCMConfig, ROOT / "configs" / "digits_rcm.yaml", [
        f"output_dir={out}", f"teacher.path={teacher}", "max_steps=2", "batch_size=8", "log_with=null",
        "progress=false", "checkpoint_every=0", "eval_samples=64", "eval_steps=[1,2,3]", "dmd_start=0",
        "times_search_samples=64", "times_search_seeds=2"])
    tr = RCMTrainer(cfg)
    m = tr.train()
    # 9 candidate sigmas for the 2-step chain, then the 8 below the chosen one at most for 3 steps
    assert 9 < m["times_search_evaluations"] <= 17
    meta = read_meta(out / "student")
    for k in (1, 2, 3):
        assert len(meta[f"times_{k}"]) == k and meta[f"times_{k}"] == sorted(meta[f"times_{k}"], reverse=True)
    assert meta["times_3"][:2] == meta["times_2"]  # greedy: the 3-step chain extends the 2-step one
    _, best = min((v, key) for key, v in tr.times_search_log.items() if key.startswith("2:"))
    from diffdiv.models.export import integer_times

    won = tr.model_times(2, [float(best.split(":")[1])])  # the argmin won; exported as diffusers' integer timesteps
    assert integer_times({2: won}, 1000)[2] == meta["times_2"]
    assert max(abs(a - b) for a, b in zip(won, meta["times_2"], strict=True)) <= 0.5
