"""f-distill trainer (arXiv 2502.15681): one-step generator, fake score, discriminator heads, f-weighted loss.

Networks: "student" (the student denoiser read as a one-step generator x0 = D(sigma_init z, t_init), with EMA) and
"fake_score" (the fake-score denoiser plus discriminator heads, trained together). Update schedule per step:
`fake_updates` "fake_score" phases (DSM of the fake score on sg(G(z)) + logistic discriminator loss) then one
"student" phase (f-weighted score difference, docs/math.md#fdistill, + a small non-saturating GAN term).
The discriminator reads teacher features (default) or fake-score features of noised samples; "real" samples
are noised data or a pool of teacher samples. Math lives in diffdiv.methods.fdistill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffdiv.config import ConfigError, check
from diffdiv.divergence import PREDICTION_WEIGHTING, RatioBinNormalizer, parse_divergence
from diffdiv.methods import fdistill as fd
from diffdiv.models.base import Denoiser
from diffdiv.models.heads import DiscriminatorHeads, feature_shapes
from diffdiv.trainers.distill import DistillConfig, DistillTrainer
from diffdiv.trainers.steps import fake_score_step


@dataclass
class RatioConfig:
    """Density ratio r = p_t/q_t from the discriminator (f-distill section 4)."""

    clamp: float = 10.0  # logits clamped to +-clamp before exp
    clip: list[float] = field(default_factory=lambda: [0.1, 20.0])  # r clipped to [lo, hi]; [] disables
    num_bins: int = 10  # per-noise-level normalization bins; 0 disables
    bin_decay: float = 0.9  # EMA decay of each bin's mean ratio
    normalize_mean: bool = True  # divide h(r) by its global batch mean

    def validate(self) -> None:
        check(self.clamp > 0, "ratio.clamp must be > 0")
        check(len(self.clip) in (0, 2), "ratio.clip must be [lo, hi] or []")
        if self.clip:
            check(0 < self.clip[0] < self.clip[1], "ratio.clip: need 0 < lo < hi")
        check(self.num_bins >= 0, "ratio.num_bins must be >= 0")
        check(0 <= self.bin_decay < 1, "ratio.bin_decay must be in [0, 1)")


@dataclass
class GanConfig:
    """Discriminator heads and the GAN terms."""

    enabled: bool = True  # false: r = 1 everywhere (f-distill reduces to DMD's weighting), no GAN terms
    features: Literal["teacher", "fake", "input"] = "teacher"  # whose features of noised samples the heads read
    input_head: bool = False  # also a head on the noised sample itself and its log-SNR ("input": only that)
    real: Literal["data", "teacher_samples"] = "data"  # "real" samples: data, or a pool of teacher samples
    head_hidden: int = 128
    gen_weight: float = 0.01  # weight of softplus(-logit_fake) in the generator loss
    disc_weight: float = 1.0  # weight of the discriminator loss in the critic loss
    pool_size: int = 512  # real=teacher_samples: teacher samples drawn once at start
    pool_steps: int = 25
    pool_sampler: str = "auto"  # auto: flow_euler for flow-matching teachers, else ddim

    def validate(self) -> None:
        check(self.head_hidden > 0, "gan.head_hidden must be > 0")
        check(self.gen_weight >= 0 and self.disc_weight >= 0, "gan weights must be >= 0")
        check(self.pool_size > 0 and self.pool_steps > 0, "gan.pool_size and gan.pool_steps must be > 0")


@dataclass
class FDistillConfig(DistillConfig):
    """f-distill: divergence, ratio estimation, GAN and loss options (plus everything in DistillConfig)."""

    output_dir: str = "runs/fdistill"
    method: Literal["fdistill", "uni_instruct"] = "fdistill"
    divergence: str = "js"  # a name of diffdiv.divergence.DIVERGENCES with a weight (not tv), e.g. rkl fkl js alpha:0.5
    ratio: RatioConfig = field(default_factory=RatioConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    normalize: bool = True  # divide the score difference by n = mean|x0 - D_p| (DMD2 / f-distill)
    fake_weighting: Literal["auto", "x0", "eps", "v", "flow", "edm"] = "auto"  # fake-score DSM weighting

    def validate(self) -> None:
        super().validate()
        parse_divergence(self.divergence, need_weight=True)


class Critic(nn.Module):
    """Fake-score denoiser + discriminator heads, called once per critic step (one DDP forward)."""

    def __init__(self, fake: Denoiser, heads: DiscriminatorHeads | None, own_features: bool):
        super().__init__()
        self.fake = fake
        self.heads = heads
        self.own_features = own_features

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None, disc: dict[str, Any] | None = None
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """-> (D_q(x_t), logits on fake, logits on real); `disc` holds the discriminator inputs."""
        if self.heads is None or disc is None:
            return self.fake(x_t, t, cond), None, None
        ls_fake = self.fake.schedule.logsnr(t)
        ls_real = self.fake.schedule.logsnr(disc["t_real"])
        if self.own_features:
            if disc["cond_fake"] is cond:
                d_q, f_fake = self.fake.features(x_t, t, cond)
            else:  # the discriminator is unconditional: features without the condition
                d_q = self.fake(x_t, t, cond)
                f_fake = self.fake.features(x_t, t, disc["cond_fake"])[1]
            _, f_real = self.fake.features(disc["x_real"], disc["t_real"], disc["cond_real"])
        else:
            d_q = self.fake(x_t, t, cond)
            f_fake, f_real = disc["f_fake"], disc["f_real"]
        return (d_q, self.heads(f_fake, x_t, ls_fake),
                self.heads(f_real, disc["x_real"], ls_real))


class FDistillTrainer(DistillTrainer):
    """Distill a diffusion teacher into a one-step generator with f-distill (any f-divergence)."""

    config_cls = FDistillConfig
    name = "fdistill"
    method_name = "fdistill"

    # ------------------------------------------------------------------ setup
    def preflight(self) -> None:
        super().preflight()
        if self.cfg.method != self.method_name:
            raise ConfigError(f"method: this entry point runs '{self.method_name}', the config says "
                              f"'{self.cfg.method}' (use train/distill.py to dispatch on it)")

    def build(self) -> None:
        cfg = self.cfg
        self.build_teacher()
        if cfg.gan.enabled and cfg.gan.real == "data" and self.data is None:
            raise ConfigError("gan.real=data needs a `data` section for this teacher (or set gan.real=teacher_samples)")
        torch.manual_seed(cfg.seed)
        student = self.make_student()
        student.guidance_scale = 1.0  # CFG is distilled into the student, never applied to it
        self.student = self.add_network("student", student, lr=cfg.lr_gen, betas=tuple(cfg.betas), ema=True,
                                        params=self.trainable_params(student))
        fake = self.make_student("fake_score")
        fake.guidance_scale = 1.0  # the fake score models q_t itself (no guidance)
        self.t_init = self.one_step_generator(student).t_init
        heads = None
        self.feature_net: Denoiser | None = None
        if cfg.gan.enabled:
            shapes: list[tuple[int, ...]] = []
            if cfg.gan.features == "teacher":
                self.feature_net = self.teacher if hasattr(self.teacher, "features") else \
                    self.add_frozen("feature_teacher", self.frozen_base())
            if cfg.gan.features != "input":
                src = fake if cfg.gan.features == "fake" else self.feature_net
                if not hasattr(src, "features"):
                    raise ConfigError(f"gan.features={cfg.gan.features}: {type(src).__name__} exposes no features")
                shapes = self._probe_features(src)
            with_input = cfg.gan.input_head or cfg.gan.features == "input"
            heads = DiscriminatorHeads(shapes, cfg.gan.head_hidden, self.sample_shape if with_input else None)
        critic = Critic(fake, heads, cfg.gan.features == "fake")
        lora_params = self.trainable_params(fake)
        params = None if lora_params is None else lora_params + ([] if heads is None else list(heads.parameters()))
        self.critic = self.add_network("fake_score", critic, lr=cfg.lr_fake, betas=tuple(cfg.betas), params=params)
        sch = self.teacher.schedule
        self.bins = None
        if cfg.gan.enabled and cfg.ratio.num_bins > 0:
            self.bins = RatioBinNormalizer(cfg.ratio.num_bins, cfg.ratio.bin_decay, sch.t_min, sch.t_max)
            self.register_state("ratio_bins", self.bins)
        self.pool: tuple[Tensor, Any] | None = None
        if cfg.gan.enabled and cfg.gan.real == "teacher_samples":
            self.pool = self._teacher_pool()

    def _probe_features(self, net: Denoiser) -> list[tuple[int, ...]]:
        x = torch.zeros(2, *self.sample_shape)
        t = torch.full((2,), float(self.teacher.schedule.t_max) * 0.5)
        cond = self._probe_cond(2)
        with torch.no_grad():
            _, feats = net.features(x, t, cond)
        return feature_shapes(feats)

    def _probe_cond(self, n: int) -> Any:
        c = self.cfg.cond
        if c.prompts or c.prompt_list:
            return self.teacher.encode_prompts([self.conds.prompts[0]] * n)
        if c.num_classes > 0:
            return torch.zeros(n, dtype=torch.long)
        return None

    def _teacher_pool(self) -> tuple[Tensor, Any]:
        """Teacher samples used as "real" data by the discriminator (same on every rank: fixed seed)."""
        from diffdiv.param import FlowSchedule
        from diffdiv.sampling import sample

        g = self.cfg.gan
        sampler = g.pool_sampler
        if sampler == "auto":
            sampler = "flow_euler" if isinstance(self.teacher.schedule, FlowSchedule) else "ddim"
        cond = self.eval_cond(g.pool_size)
        self.print(f"drawing {g.pool_size} teacher samples ({g.pool_steps} {sampler} steps) as real data")
        x = sample(self.teacher, g.pool_size, g.pool_steps, seed=self.cfg.seed + 7, sampler=sampler,
                   kind="diffusion", cond=cond, device=torch.device("cpu"))
        return x, cond

    # ------------------------------------------------------------------ schedule
    def phases(self, step: int) -> list[str]:
        return ["fake_score"] * self.cfg.fake_updates + ["student"]

    def phase_networks(self, phase: str) -> list[str]:
        return [phase]

    # ------------------------------------------------------------------ helpers
    def generate(self, z: Tensor, cond: Any = None) -> Tensor:
        """x0 = G(z) = D_gen(sigma(t_init) z, t_init, cond) through the (possibly DDP-wrapped) generator."""
        t = torch.full((z.shape[0],), self.t_init, device=z.device)
        _, s = self.student.schedule.alpha_sigma(t)
        view = (-1,) + (1,) * (z.ndim - 1)
        return self.net("student")(s.view(view).to(z.dtype) * z, t, cond)

    def fake_weighting(self) -> str:
        w = self.cfg.fake_weighting
        if w != "auto":
            return w
        pt = getattr(self.critic.fake, "prediction_type", None)
        return PREDICTION_WEIGHTING.get(pt, "edm")

    def real_sample(self) -> tuple[Tensor, Any]:
        """This rank's slice of a global batch of "real" samples (model space) and their conditions."""
        if self.pool is not None:
            x, cond = self.pool
            idx = self.randint(len(x)).cpu()
            c = cond[idx] if cond is not None else None
            return x[idx].to(self.device), (c.to(self.device) if c is not None else None)
        x = self.real_batch()
        if hasattr(self.teacher, "encode_images") and x.shape[1:] != self.sample_shape:
            with torch.no_grad():
                x = self.teacher.encode_images(x)
        return x, None

    def discriminator_inputs(self, x_t: Tensor, t: Tensor, cond: Any) -> dict[str, Any]:
        """Noised real samples and (for teacher features) both feature sets, all without grad."""
        x_real, cond_real = self.real_sample()
        t_real = self.sample_t()
        x_real_t, _, _, _ = self.noise(x_real, t_real)
        cond_fake = cond if self.pool is not None else None  # data carries no conditions
        out: dict[str, Any] = {"x_real": x_real_t, "t_real": t_real, "cond_real": cond_real, "cond_fake": cond_fake}
        out["f_fake"], out["f_real"] = [], []
        if self.feature_net is not None:
            with torch.no_grad():
                out["f_fake"] = self.feature_net.features(x_t, t, cond_fake)[1]
                out["f_real"] = self.feature_net.features(x_real_t, t_real, cond_real)[1]
        return out

    def teacher_and_logits(self, x_t: Tensor, t: Tensor, cond: Any, grad: bool
                           ) -> tuple[Tensor, Tensor | None]:
        """D_p(x_t) with CFG (graph to x_t iff grad) and discriminator logits on x_t (graph iff the GAN term is on)."""
        heads = self.critic.heads
        logits, shared = None, None
        if heads is not None:
            disc_cond = cond if self.pool is not None else None  # data carries no conditions
            src = {"teacher": self.feature_net, "fake": self.critic.fake}.get(self.cfg.gan.features)
            with torch.set_grad_enabled(grad or self.cfg.gan.gen_weight > 0):
                x0_f, feats = src.features(x_t, t, disc_cond) if src is not None else (None, [])
                logits = heads(feats, x_t, self.teacher.schedule.logsnr(t))
            cfg_on = cond is not None and getattr(self.teacher, "conditional", False) and \
                getattr(self.teacher, "guidance_scale", 1.0) != 1.0
            if src is self.teacher and disc_cond is cond and not cfg_on:
                shared = x0_f  # the features pass already gave the teacher's x0
        if shared is not None:
            return (shared if grad else shared.detach()), logits
        with torch.set_grad_enabled(grad):
            d_p = self.teacher(x_t if grad else x_t.detach(), t, cond)
        return d_p, logits

    def ratio(self, logits: Tensor | None, t: Tensor) -> Tensor:
        """Detached r per sample (1 when the GAN is disabled)."""
        if logits is None:
            return torch.ones(len(t), device=t.device)
        rc = self.cfg.ratio
        clip = tuple(rc.clip) if rc.clip else None
        return fd.density_ratio(logits.detach(), t, self.bins, rc.clamp, clip, update=True)

    # ------------------------------------------------------------------ losses
    def loss(self, phase: str, micro: int) -> tuple[Tensor, dict[str, float]]:
        if phase == "fake_score":
            return self.critic_step()
        return self.generator_step()

    def critic_forward(self, x_t: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(D_q(x_t), logits on fake, logits on real) from one critic forward (discriminator inputs drawn here)."""
        disc = self.discriminator_inputs(x_t, t, cond) if self.critic.heads is not None else None
        return self.net("fake_score")(x_t, t, cond, disc)

    def critic_step(self) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        z = self.randn(*self.sample_shape)
        _, cond = self.draw_cond()
        with torch.no_grad():
            x0 = self.generate(z, cond).float()
        t = self.sample_t()
        dsm, (l_fake, l_real) = fake_score_step(self.critic_forward, x0, t, self.noise, cond, self.fake_weighting(),
                                                sigma_data=getattr(self.base, "sigma_data", 0.5))
        total, dsm, dl = fd.critic_loss(dsm, l_real, l_fake, cfg.gan.disc_weight)
        logs = {"dsm": float(dsm.detach().mean())}
        if l_fake is not None:
            logs.update(disc=float(dl.detach().mean()), logit_real=float(l_real.detach().float().mean()),
                        logit_fake=float(l_fake.detach().float().mean()))
        return total.mean(), logs

    def generator_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Any]:
        """One generator batch (x0, x_t, t, alpha, sigma, cond): x0 = G(z) with its graph, noised at t."""
        z = self.randn(*self.sample_shape)
        _, cond = self.draw_cond()
        x0 = self.generate(z, cond)
        t = self.sample_t()
        x_t, _, a, s = self.noise(x0, t)
        return x0, x_t, t, a, s, cond

    def generator_step(self) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        x0, x_t, t, a, s, cond = self.generator_inputs()
        d_p, logits = self.teacher_and_logits(x_t, t, cond, grad=False)
        with torch.no_grad():
            d_q = self.critic.fake(x_t.detach(), t, cond)
        r = self.ratio(logits, t)
        h = fd.fdistill_weight(r, cfg.divergence, cfg.ratio.normalize_mean)
        total, dist, gan = fd.generator_loss(x0, d_p.detach(), d_q, h, cfg.normalize, logits, cfg.gan.gen_weight)
        return total.mean(), {"distill": float(dist.detach().mean()), "gan": float(gan.detach().mean()),
                              "r_mean": float(r.mean()), "h_max": float(h.max())}

    # ------------------------------------------------------------------ export / eval
    def export(self, out_dir: Path) -> None:
        self.export_student(self.student, out_dir, kind="one_step",
                            extra={"times_1": [self.t_init], "divergence": self.cfg.divergence})

    def evaluate(self) -> dict[str, float]:
        out = self.evaluate_student(self.student, (1,), kind="consistency", times={1: [self.t_init]})
        if self.history:
            out.update({f"final_{k.replace('/', '_')}": v for k, v in self.history[-1].items()
                        if k.endswith(("/loss", "/r_mean", "/dsm", "/disc"))})
        return out
