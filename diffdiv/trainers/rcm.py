"""rCM / sCM trainer: continuous-time consistency distillation (JVP) + DMD regularizer with a fake score.

Networks: `student` (a copy of the teacher's own network, trained through its TrigFlow view, exported
as a diffusers pipeline with `kind: consistency`), `fake` (the critic, a copy of the teacher trained by
denoising score matching on student samples; only when `dmd_weight > 0`), `logvar` (optional adaptive
weight). Schedule per step: `fake_updates` critic updates then one student update once the DMD term is
on (`dmd_start`, default the end of the tangent warm-up), otherwise student only. Plain sCM is this
trainer with `dmd_weight: 0`.

Student loss (sCM Alg. 1, rCM eq. 5-6):
  scm_weight * sum ||F - sg(F) - g||^2  +  dmd_weight * sum (x0 - sg(x0 - (D_q - D_p)/n))^2,
the second on few-step student samples x0 (1..dmd_max_steps steps, gradient through the last step),
D_p the CFG-guided teacher, D_q the fake score, n = mean|x0 - D_p| (DMD2's normalizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from diffdiv.config import ConfigError, check
from diffdiv.divergence import vsd_loss
from diffdiv.methods.rcm import (
    AdaptiveWeight,
    normalize_tangent,
    scm_loss,
    scm_tangent,
    shifted_uniform_time,
    tangent_warmup,
    trigflow_time_from_normal,
)
from diffdiv.models.base import Denoiser
from diffdiv.models.jvp import JVP_METHODS, jvp
from diffdiv.models.trigflow import TrigFlowView, trigflow_time_from_sigma
from diffdiv.param import bcast, trigflow_F_from_x0
from diffdiv.sampling import rcm_simulate
from diffdiv.trainers.base import check_lr
from diffdiv.trainers.distill import DistillConfig, DistillTrainer
from diffdiv.trainers.steps import fake_score_step

# rCM's default intermediate sampling times (TrigFlow with sd = 1: 1.3, 1.0, 0.6) as sigma/alpha
RCM_MID_SIGMAS = (math.tan(1.3), math.tan(1.0), math.tan(0.6))


@dataclass
class RCMConfig(DistillConfig):
    """rCM / sCM options (DistillConfig holds teacher, data, student init, lr_gen, lr_fake, fake_updates)."""

    sigma_data: float | None = None  # TrigFlow sd; default: data std (digits / mixtures), else 0.5
    sigma_max: float = 80.0  # sigma/alpha where few-step sampling and student generation start
    p_mean: float = -0.8  # sCM time distribution: log(sd tan t) ~ N(p_mean, p_std^2)
    p_std: float = 1.6
    tangent_warmup: int = 1000  # r = min(1, step / tangent_warmup)
    warmup_form: Literal["scm", "rcm"] = "scm"
    tangent_norm: float = 0.1  # c in g / (||g|| + c); < 0 disables
    adaptive_weight: bool = False  # sCM's learned log-variance weighting
    lr_logvar: float = 1e-3
    scm_weight: float = 100.0  # rCM loss_scale (sum over elements)
    scm_x0: Literal["auto", "data", "student"] = "auto"  # x0 of the sCM points: real data or student samples
    jvp: Literal["forward", "forward_math", "fd"] = "forward"
    attention_jvp: Literal["auto", "reference", "blockwise", "triton"] = "auto"  # jvp: forward (attention_jvp.py)
    fd_h: float = 3e-4
    dmd_weight: float = 1.0  # 0 = plain sCM (no critic)
    dmd_start: int | None = None  # default: tangent_warmup
    dmd_max_steps: int = 4  # student samples for the DMD term use 1..dmd_max_steps steps
    dmd_shift: float = 5.0  # critic/DMD times: shifted uniform rectified-flow sigma (rCM timestep_shift)
    fake_weighting: str = "v"  # x0-space weighting of the critic's denoising loss (v: 1/sin^2 t at sd=1)
    eval_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    mid_sigmas: list[float] = field(default_factory=lambda: list(RCM_MID_SIGMAS))  # sampling times (sigma/alpha)
    times_search: bool = True  # digits: pick intermediate times per step count by Fréchet distance at export
    times_search_samples: int = 1000
    times_search_seeds: int = 3  # the Fréchet distance of one 1000-sample draw moves by +-4: average over seeds

    def validate(self) -> None:
        super().validate()
        check(self.sigma_data is None or self.sigma_data > 0, "sigma_data must be > 0")
        check(self.sigma_max > 0, "sigma_max must be > 0")
        check(self.p_std > 0, "p_std must be > 0")
        check(self.times_search_samples > 0 and self.times_search_seeds > 0,
              "times_search_samples and times_search_seeds must be > 0")
        check(self.tangent_warmup >= 0, "tangent_warmup must be >= 0")
        check(self.scm_weight >= 0 and self.dmd_weight >= 0, "scm_weight and dmd_weight must be >= 0")
        check(self.scm_weight > 0 or self.dmd_weight > 0, "scm_weight and dmd_weight cannot both be 0")
        check(self.jvp in JVP_METHODS, f"jvp must be one of {', '.join(JVP_METHODS)}")
        check(self.fd_h > 0, "fd_h must be > 0")
        check(1 <= self.dmd_max_steps <= 8, "dmd_max_steps must be in [1, 8]")
        check(self.dmd_shift > 0, "dmd_shift must be > 0")
        check(all(s > 0 for s in self.mid_sigmas), "mid_sigmas must be positive sigma/alpha values")
        check(bool(self.eval_steps) and all(1 <= k <= len(self.mid_sigmas) + 1 for k in self.eval_steps),
              f"eval_steps must be in [1, {len(self.mid_sigmas) + 1}] (one more than len(mid_sigmas))")
        start = self.tangent_warmup if self.dmd_start is None else self.dmd_start
        check(self.scm_weight > 0 or start == 0, "with scm_weight 0 the DMD term must start at step 0 (dmd_start: 0)")
        check(self.dmd_start is None or self.dmd_start >= 0, "dmd_start must be >= 0")
        check(list(self.mid_sigmas) == sorted(self.mid_sigmas, reverse=True), "mid_sigmas must be decreasing")
        if self.adaptive_weight:
            check_lr("lr_logvar", self.lr_logvar)


class RCMTrainer(DistillTrainer):
    """rCM: sCM consistency distillation (JVP) regularized by DMD with a fake-score critic."""

    config_cls = RCMConfig
    name = "rcm"

    # ------------------------------------------------------------------ setup
    def build(self) -> None:
        cfg = self.cfg
        self.build_teacher()
        sd = cfg.sigma_data
        if sd is None:
            sd = self.data.sigma_data if self.data is not None else float(getattr(self.teacher, "sigma_data", 0.5))
        self.sd = float(sd)
        if cfg.scm_x0 == "data" and self.data is None:
            raise ConfigError("scm_x0=data needs real data: set the `data` section (or use scm_x0=student)")
        self.use_data = cfg.scm_x0 == "data" or (cfg.scm_x0 == "auto" and self.data is not None)
        student = self.make_student()
        student.guidance_scale = 1.0
        self.student = self.add_network("student", student, lr=cfg.lr_gen, betas=tuple(cfg.betas), ema=True,
                                        params=self.trainable_params(student))
        self.teacher_view = TrigFlowView(self.teacher, self.sd, sigma_max=cfg.sigma_max)
        self.student_view = TrigFlowView(self.student, self.sd, sigma_max=cfg.sigma_max)
        self.fake_view = None
        if cfg.dmd_weight > 0:
            fake = self.make_student("fake_score")
            fake.guidance_scale = 1.0
            self.fake = self.add_network("fake_score", fake, lr=cfg.lr_fake, betas=tuple(cfg.betas),
                                         params=self.trainable_params(fake))
            self.fake_view = TrigFlowView(self.fake, self.sd, sigma_max=cfg.sigma_max)
        if cfg.adaptive_weight:
            self.add_network("logvar", AdaptiveWeight(), lr=cfg.lr_logvar, betas=(0.9, 0.999))

    @property
    def dmd_start(self) -> int:
        return self.cfg.tangent_warmup if self.cfg.dmd_start is None else self.cfg.dmd_start

    def dmd_on(self, step: int) -> bool:
        return self.cfg.dmd_weight > 0 and step >= self.dmd_start

    def phases(self, step: int) -> list[str]:
        if self.dmd_on(step):
            return ["fake_score"] * self.cfg.fake_updates + ["student"]
        return ["student"]

    def phase_networks(self, phase: str) -> list[str]:
        if phase == "student":
            return ["student", "logvar"] if self.cfg.adaptive_weight else ["student"]
        return [phase]

    # ------------------------------------------------------------------ pieces
    def scm_time(self) -> Tensor:
        t = trigflow_time_from_normal(self.randn(), self.cfg.p_mean, self.cfg.p_std, self.sd)
        return t.clamp(self.student_view.t_min, self.student_view.t_max)

    def dmd_time(self) -> Tensor:
        u = self.rand().double().clamp(1e-4, 1 - 1e-4)
        t = shifted_uniform_time(u, self.cfg.dmd_shift, self.sd).float()
        return t.clamp(self.student_view.t_min, self.student_view.t_max)

    def trig_noise(self, x0: Tensor, t: Tensor) -> Tensor:
        """x_t = cos t x0 + sin t z, z ~ N(0, sd^2 I)."""
        z = self.randn(*x0.shape[1:]).to(x0.dtype) * self.sd
        return bcast(torch.cos(t), x0) * x0 + bcast(torch.sin(t), x0) * z

    @torch.no_grad()
    def simulate(self, cond: Any, steps: int) -> tuple[Tensor, Tensor]:
        """Input (x, t) of the last of `steps` student consistency steps from pure noise at t_max, with
        random decreasing intermediate times (rCM's simulation for DMD samples; diffdiv.sampling.rcm_simulate)."""
        x = self.randn(*self.sample_shape) * self.sd * math.sin(self.student_view.t_max)
        return rcm_simulate(lambda xx, tt: self.student_view.x0(xx, tt, cond, 1.0), x, self.student_view.t_max, steps,
                            lambda i: self.dmd_time(), lambda i: self.randn(*self.sample_shape), self.sd)

    def num_gen_steps(self) -> int:
        """Global (same on every rank) number of student steps for this batch's samples."""
        return int(torch.randint(self.cfg.dmd_max_steps, (1,), generator=self.rng)) + 1

    def _cat_cond(self, a: Any, b: Any) -> Any:
        return None if a is None else self.student.cat_cond(a, b)

    # ------------------------------------------------------------------ losses
    def loss(self, phase: str, micro: int) -> tuple[Tensor, dict[str, float]]:
        if phase == "fake_score":
            return self.critic_loss()
        return self.student_loss()

    def critic_loss(self) -> tuple[Tensor, dict[str, float]]:
        """Denoising score matching of the fake score on sg(student samples) (rCM critic step)."""
        _, cond = self.draw_cond()
        x, t_g = self.simulate(cond, self.num_gen_steps())
        with torch.no_grad():
            x0 = self.student_view.x0(x, t_g, cond, 1.0)

        def fake(x_t: Tensor, t: Tensor, c: Any) -> Tensor:
            return self.fake_view.x0(x_t, t, c, 1.0, net=self.net("fake_score"))

        def noise(x: Tensor, t: Tensor) -> tuple[Tensor, None, Tensor, Tensor]:  # TrigFlow: alpha, sigma = cos, sd sin
            return self.trig_noise(x, t), None, torch.cos(t), self.sd * torch.sin(t)

        per, _ = fake_score_step(fake, x0, self.dmd_time(), noise, cond, self.cfg.fake_weighting, sigma_data=self.sd,
                                 reduction="sum")
        return per.mean(), {}

    def scm_inputs(self, cond: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_t, t, dx_t/dt, jvp_F): sCM points, the teacher's PF-ODE tangent and the student's JVP."""
        cfg, sd = self.cfg, self.sd
        x0 = self.real_batch() if self.use_data else self.student_view.x0(*self.simulate(cond, self.num_gen_steps()),
                                                                          cond, 1.0).detach()
        t = self.scm_time()
        x_t = self.trig_noise(x0.float(), t)
        with torch.no_grad():
            dxt_dt = sd * self.teacher_view(x_t, t, cond)  # CFG inside the teacher wrapper

        def F_student(x: Tensor, tt: Tensor) -> Tensor:
            return self.student_view(x, tt, cond, 1.0)

        cs = torch.cos(t) * torch.sin(t)
        with torch.autocast(device_type=self.device.type, enabled=False):
            _, jvp_F = jvp(F_student, (x_t, t), (bcast(cs, x_t) * dxt_dt, cs), method=cfg.jvp, fd_h=cfg.fd_h,
                           attention=cfg.attention_jvp)
        return x_t, t, dxt_dt.float(), jvp_F.float()

    def student_loss(self) -> tuple[Tensor, dict[str, float]]:
        cfg, sd = self.cfg, self.sd
        _, cond = self.draw_cond()
        logs: dict[str, float] = {}
        use_scm, use_dmd = cfg.scm_weight > 0, self.dmd_on(self.step)
        xs, ts, conds = [], [], []
        if use_scm:
            x_t, t, dxt_dt, jvp_F = self.scm_inputs(cond)
            xs.append(x_t), ts.append(t), conds.append(cond)
        if use_dmd:
            x_g, t_g = self.simulate(cond, self.num_gen_steps())
            xs.append(x_g), ts.append(t_g), conds.append(cond)
        # one student forward with grad for both terms (DDP: a single forward per backward)
        c_all = conds[0] if len(conds) == 1 else self._cat_cond(conds[0], conds[1])
        x0_all = self.student_view.x0(torch.cat(xs), torch.cat(ts), c_all, 1.0, net=self.net("student"))
        total = torch.zeros((), device=self.device)
        b = self.local_batch
        if use_scm:
            F_theta = trigflow_F_from_x0(x_t, x0_all[:b], t, sd)
            F_minus = F_theta.detach()
            r = tangent_warmup(self.step, cfg.tangent_warmup)
            g = scm_tangent(F_minus, jvp_F, dxt_dt, x_t, t, sd, r, cfg.warmup_form)
            g = normalize_tangent(g.double(), cfg.tangent_norm).float()
            ok = torch.isfinite(g).flatten(1).all(1) & torch.isfinite(F_minus).flatten(1).all(1)
            keep = ok.view((-1,) + (1,) * (g.ndim - 1))
            g = torch.where(keep, g, torch.zeros_like(g))  # rCM: samples with a non-finite tangent add nothing
            F_minus = torch.where(keep, F_minus, torch.zeros_like(F_minus))
            F_theta = torch.where(keep, F_theta, torch.zeros_like(F_theta))
            logvar = self.net("logvar")(t) if cfg.adaptive_weight else None
            per = scm_loss(F_theta, F_minus, g, logvar)
            total = total + cfg.scm_weight * per.mean()
            logs.update(scm=float(per.mean().detach()), tangent_r=r, g_norm=float(g.flatten(1).norm(dim=1).mean()),
                        nonfinite_tangent=float((~ok).float().mean()))
        if use_dmd:
            x0_gen = x0_all[-b:]
            t = self.dmd_time()
            x_t = self.trig_noise(x0_gen.detach(), t)
            with torch.no_grad():
                d_p = self.teacher_view.x0(x_t, t, cond)
                d_q = self.fake_view.x0(x_t, t, cond, 1.0)
            per = 2.0 * vsd_loss(x0_gen, d_p, d_q, normalize=True, reduction="sum")
            total = total + cfg.dmd_weight * per.mean()
            logs["dmd"] = float(per.mean().detach())
        return total, logs

    # ------------------------------------------------------------------ sampling times, export, eval
    def model_times(self, steps: int, mid_sigmas: list[float] | None = None) -> list[float]:
        """Sampling times in the student's own time: sigma_max, then `mid_sigmas` (sigma/alpha)."""
        mids = list(self.cfg.mid_sigmas if mid_sigmas is None else mid_sigmas)[: steps - 1]
        if len(mids) < steps - 1:
            raise ConfigError(f"{steps} steps need {steps - 1} intermediate sigmas, have {len(mids)}")
        trig = [self.student_view.t_max] + [float(trigflow_time_from_sigma(s, self.sd)) for s in mids]
        return self.student_view.model_times(trig)

    def search_times(self, student: Denoiser) -> dict[int, list[float]]:
        """Greedy per-step-count search of intermediate sigmas by digits Fréchet distance (vs train, seed mean)."""
        from diffdiv.data.digits import load_digits_tensor
        from diffdiv.eval.fid import digits_fid
        from diffdiv.sampling import sample

        real = load_digits_tensor("train")
        grid = [8.0, 4.0, 2.5, 1.6, 1.0, 0.6, 0.35, 0.2, 0.1]
        n = self.cfg.times_search_samples
        chosen: list[float] = []
        out: dict[int, list[float]] = {}
        self.times_search_log: dict[str, float] = {}
        student.eval()
        for k in range(2, max(self.cfg.eval_steps) + 1):
            best = None
            for s in grid:
                if chosen and s >= chosen[-1]:
                    continue
                mids = chosen + [s]
                fid = sum(digits_fid(real, sample(student, n, k, seed=1234 + i, kind="consistency",
                                                  times=self.model_times(k, mids), cond=self.eval_cond(n)))
                          for i in range(self.cfg.times_search_seeds)) / self.cfg.times_search_seeds
                self.times_search_log[f"{k}:{','.join(f'{m:g}' for m in mids)}"] = fid
                if best is None or fid < best[0]:
                    best = (fid, s)
            if best is None:
                break
            chosen = chosen + [best[1]]
            out[k] = self.model_times(k, chosen)
            self.print(f"times search: {k} steps -> sigmas {chosen} (fd {best[0]:.3f})")
        return out

    def is_digits(self) -> bool:
        return self.data is not None and self.data.cfg.kind == "digits" and tuple(self.sample_shape) == (1, 8, 8)

    def sampling_times(self) -> dict[int, list[float]]:
        times = {k: self.model_times(k) for k in range(1, len(self.cfg.mid_sigmas) + 2)}
        if self.cfg.times_search and self.is_digits():
            times.update(self.search_times(self.student))
        return times

    def export(self, out_dir: Path) -> None:
        self.times = self.sampling_times()
        extra: dict[str, Any] = {f"times_{k}": v for k, v in self.times.items()}
        extra.update({"default_steps": 2, "trigflow_sigma_data": self.sd, "sigma_max": self.cfg.sigma_max,
                      "dmd_weight": self.cfg.dmd_weight, "guidance_scale": 1.0,
                      "teacher_guidance_scale": float(getattr(self.teacher, "guidance_scale", 1.0))})
        folder = self.export_student(self.student, out_dir, kind="consistency", extra=extra)
        from diffdiv.models.loading import read_meta

        stored = read_meta(folder)  # the export rounds VP times to diffusers' integer timesteps
        self.times = {k: stored[f"times_{k}"] for k in self.times if f"times_{k}" in stored}

    def evaluate(self) -> dict[str, float]:
        times = getattr(self, "times", None) or {k: self.model_times(k) for k in range(1, len(self.cfg.mid_sigmas) + 2)}
        out = self.evaluate_student(self.student, tuple(self.cfg.eval_steps), "consistency", times)
        if self.accelerator.is_main_process and getattr(self, "times_search_log", None):
            out["times_search_evaluations"] = len(self.times_search_log)
        if self.accelerator.is_main_process and self.history:  # the last logged losses, for the final table
            out.update({f"final_{k.replace('/', '_')}": v for k, v in self.history[-1].items()
                        if k.endswith(("/loss", "/scm", "/dmd"))})
        self.student.train()
        return out


__all__ = ["RCMConfig", "RCMTrainer", "RCM_MID_SIGMAS"]
