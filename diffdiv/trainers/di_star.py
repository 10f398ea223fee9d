"""DIStarTrainer (Diff-Instruct*, arXiv 2410.20898): one-step generator, frozen CFG reference, online fake
score, reward term plus the pseudo-Huber score divergence (SIM), CFG inside or outside the divergence.

Built on DistillTrainer: the frozen teacher (`teacher.guidance_scale` = w) is the reference; the
generator G(z, c) = D_theta(sigma_init z, t_init, c) and the fake score D_q start from the teacher
(generator optionally with LoRA). Each step runs `fake_updates` fake-score updates (denoising score
matching on sg(G(z))) then one generator update minimizing
    -reward_weight * mean r(decode(G(z)), c) + div_weight * mean [SIM(D_p, D_q) (+ CFG implicit reward)]
(diffdiv.methods.di_star). cfg_mode "in": D_p is the guided teacher; "out": D_p is the unguided
conditional teacher and CFG enters as the implicit reward (w - 1) log p_t(c | x_t).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from diffdiv.config import ConfigError, check
from diffdiv.divergence import pseudo_huber_c
from diffdiv.methods.di_star import di_star_generator_loss
from diffdiv.models.lora import LoRAConfig, add_lora, has_lora, merged_copy, save_lora
from diffdiv.trainers.distill import DistillConfig, DistillTrainer
from diffdiv.trainers.rewarding import RewardFields, RewardKit, evaluate_rewards
from diffdiv.trainers.steps import fake_score_step


@dataclass
class DIStarConfig(DistillConfig, RewardFields):
    """DI*: reward + score-divergence fine-tuning of a one-step generator distilled from a CFG teacher."""

    output_dir: str = "runs/di_star"
    batch_size: int = 8
    max_steps: int = 200
    checkpoint_every: int = 100
    log_every: int = 5
    reward: dict[str, Any] = field(default_factory=lambda: {"name": "jpeg_compressibility_surrogate"})
    div_weight: float = 1.0  # weight of the score divergence (0 = reward only)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(enabled=False))  # generator adapters
    eval_samples: int = 64  # (DistillConfig's default is 2000)
    cfg_mode: Literal["in", "out"] = "in"
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    huber_c: float | None = None  # pseudo-Huber c in the units of y (default 0.00054 sqrt(N))
    space: Literal["x0", "score"] = "x0"
    normalize: bool = False  # divide the SIM loss by sg(mean |x0 - D_p|)
    fake_weighting: Literal["x0", "eps", "v", "flow", "edm"] = "x0"
    ref_steps: int = 25  # DDIM steps of the reference (teacher) samples in evaluation

    def validate(self) -> None:
        super().validate()
        self.validate_reward()
        check(self.frames == 0, "DI* works on images: frames must be 0")
        check(self.huber_c is None or self.huber_c > 0, "huber_c must be > 0")
        check(self.ref_steps >= 1, "ref_steps must be >= 1")
        check(not self.student.lora.enabled, "DI*: LoRA on the generator is `lora.enabled` (student.lora is for "
              "the distillation trainers)")


class DIStarTrainer(DistillTrainer):
    """DI*: one-step generator + fake score; reward plus pseudo-Huber score divergence to a CFG teacher."""

    config_cls = DIStarConfig
    name = "di_star"

    def preflight(self) -> None:
        super().preflight()
        self.cfg.preflight_reward()

    def build(self) -> None:
        cfg = self.cfg
        if cfg.teacher.kind != "pipeline":
            raise ConfigError("DI* fine-tunes for an image reward: teacher.kind must be 'pipeline'")
        torch.manual_seed(cfg.seed)
        self.build_teacher()
        self.w = float(self.teacher.guidance_scale)
        student = self.make_student()
        student.guidance_scale = 1.0
        if cfg.lora.enabled:
            student.requires_grad_(False)
            params = add_lora(student.trainable, cfg.lora)
        else:
            params = list(student.parameters())
        self.student = student
        self.generator = self.one_step_generator(student)
        self.add_network("student", self.generator, lr=cfg.lr_gen, betas=tuple(cfg.betas), params=params)
        fake = self.make_student()
        fake.guidance_scale = 1.0
        self.add_network("fake_score", fake, lr=cfg.lr_fake, betas=tuple(cfg.betas))
        self.rewards = RewardKit(cfg, self.teacher, self.conds, self.add_frozen)
        if cfg.reward_weight > 0:
            self.rewards.require_differentiable(self.name)

    def phases(self, step: int) -> list[str]:
        return ["fake_score"] * self.cfg.fake_updates + ["student"]

    def _batch(self) -> tuple[Tensor | None, Any, Tensor]:
        n = self.cfg.batch_size
        idx, cond = self.draw_cond(n)
        return idx, cond, self.randn(*self.sample_shape, n=n)

    def loss(self, phase: str, micro: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        idx, cond, z = self._batch()
        if phase == "fake_score":
            with torch.no_grad():
                x0 = self.nets["student"].module(z, cond)
            per, _ = fake_score_step(self.net("fake_score"), x0, self.sample_t(), self.noise, cond, cfg.fake_weighting)
            return per.mean(), {}
        x0 = self.net("student")(z, cond)
        if cfg.reward_weight > 0:
            rewards = self.rewards.score(x0, idx)
        else:
            with torch.no_grad():
                rewards = self.rewards.score(x0.detach(), idx)
        t = self.sample_t()
        x_t, _, a, s = self.noise(x0, t)
        d_q = self.nets["fake_score"].module(x_t, t, cond)
        cfg_out = None
        if cfg.cfg_mode == "out" and cond is not None and self.w != 1.0:
            d_p = self.teacher(x_t, t, cond, guidance_scale=1.0)
            d_u = self.teacher(x_t, t, self.teacher.uncond_like(cond), guidance_scale=1.0)
            cfg_out = (d_p, d_u, self.w)
        else:
            d_p = self.teacher(x_t, t, cond)
        return di_star_generator_loss(x0, rewards, d_p, d_q, a, s, cfg.reward_weight, cfg.div_weight,
                                      cfg.distance, cfg.huber_c, cfg.space, cfg.normalize, cfg_out)

    # --- evaluation / export ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return evaluate_rewards(self)

    def eval_samples_for(self, which: str, z: Tensor, cond: Any, gen: torch.Generator) -> tuple[Tensor, dict]:
        """Generator samples (one step) vs the teacher's DDIM(ref_steps) CFG samples from t_init; plus a
        score-divergence estimate E_t d(D_p - D_q) at the generator's samples (x0 units, t in [t_lo, t_hi])."""
        if which == "reference":  # deterministic DDIM from the generator's t_init (CFG inside the teacher)
            from diffdiv.sampling import ddim_chain, ddim_times

            sch = self.teacher.schedule
            times = ddim_times(self.nets["student"].module.t_init, sch.t_min, self.cfg.ref_steps)
            return ddim_chain(lambda x, t: self.teacher(x, t, cond), z, times, sch, 0.0).x, {}
        x0 = self.nets["student"].module(z, cond)
        sch = self.teacher.schedule
        u = self.cfg.t_lo + (self.cfg.t_hi - self.cfg.t_lo) * torch.rand(len(z), generator=gen)
        t = (sch.t_min + (sch.t_max - sch.t_min) * u).to(z.device)
        a, s = sch.alpha_sigma(t)
        view = (-1,) + (1,) * (x0.ndim - 1)
        x_t = a.view(view) * x0 + s.view(view) * torch.randn(x0.shape, generator=gen).to(z.device)
        y = (self.teacher(x_t, t, cond) - self.nets["fake_score"].module(x_t, t, cond)).flatten(1).float()
        c = self.cfg.huber_c if self.cfg.huber_c is not None else pseudo_huber_c(y.shape[1])
        d = torch.sqrt((y * y).sum(1) + c * c) - c
        return x0, {"score_div_est": float(d.mean())}

    def export(self, out_dir: Path) -> None:
        student = self.nets["student"].module.denoiser
        if has_lora(student.trainable):
            save_lora(student, out_dir / "lora")
            student = merged_copy(student)
        self.export_student(student, out_dir, kind="one_step")
        (out_dir / "reward_config.json").write_text(json.dumps({"reward": self.cfg.reward,
                                                                "eval_reward": self.cfg.eval_reward}))
