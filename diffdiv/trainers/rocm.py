"""ROCMTrainer (arXiv 2503.06171): first-order reward optimization through a consistency model's 1-4 step chain.

The model is any Denoiser sampled with `diffdiv.sampling.sample_consistency` semantics (an rCM/sCM
student, or a diffusion teacher used few-step). Per step: sample B prompts, noise z and re-noising
noises, run the reparameterized chain with gradients through every step, decode, score with a
differentiable reward and minimize
    -reward_weight * mean r + div_weight * mean sum_i D_f(step_i),
with D_f(policy step || reference step) the chosen f-divergence (a name of diffdiv.divergence.fdiv with a
closed form for equal-variance Gaussians: fkl rkl hellinger tv pearson neyman js, on that table's scale) in
closed form in d = alpha ||f_theta - f_ref|| / sigma (diffdiv.methods.rocm). `div_weight` is the divergence
weight whatever the divergence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from diffdiv.config import ConfigError, check
from diffdiv.methods.rocm import rocm_divergence, rocm_loss
from diffdiv.sampling import consistency_chain
from diffdiv.trainers.reward_base import RewardTrainConfig, RewardTrainer


@dataclass
class ROCMConfig(RewardTrainConfig):
    """ROCM: reward back-propagation through the consistency chain with an f-divergence regularizer."""

    output_dir: str = "runs/rocm"
    reward: dict[str, Any] = field(default_factory=lambda: {"name": "jpeg_compressibility_surrogate"})
    steps: int = 4  # consistency steps (1-4 typical)
    times: list[float] | None = None  # model times; default: the folder's diffdiv.json times_<steps> or default_times
    divergence: str = "fkl"  # KL(policy || ref); any of diffdiv.methods.rocm.ROCM_DIVERGENCES
    final_logsnr: float | None = 2.0  # the last step is compared after re-noising to this log-SNR (null: skip)
    ref_grad: bool = True  # divergence gradient also through the reference's input state
    eval_eta: float = 0.0  # unused by ROCM (consistency chains)
    timesteps: Literal["scheduler", "uniform"] = "uniform"  # unused by ROCM (its chain times are `times`)

    def validate(self) -> None:
        super().validate()
        check(self.times is None or len(self.times) == self.steps,
              f"times must list {self.steps} model times (one per step), got {self.times}")
        rocm_divergence(self.divergence)


class ROCMTrainer(RewardTrainer):
    """ROCM: regularized first-order reward optimization of a consistency model (LoRA)."""

    config_cls = ROCMConfig
    name = "rocm"
    export_kind = "consistency"

    def build_method(self) -> None:
        self.rewards.require_differentiable(self.name)
        from diffdiv.models.loading import read_meta
        from diffdiv.sampling import default_times

        cfg = self.cfg
        times = cfg.times
        if times is None:
            from pathlib import Path

            meta = read_meta(cfg.model.path) if Path(cfg.model.path).exists() else {}
            mt = meta.get(f"times_{cfg.steps}", meta.get("times"))  # rCM students store times_<steps>
            if isinstance(mt, list) and len(mt) == cfg.steps:
                times = [float(v) for v in mt]
        if times is None:
            times = default_times(self.policy, cfg.steps)
        sch = self.policy.schedule
        if any(not (sch.t_min <= t <= sch.t_max) for t in times):
            raise ConfigError(f"times {times} are outside the model's range [{sch.t_min}, {sch.t_max}]")
        self.cm_times = [float(t) for t in times]
        self.divergence = rocm_divergence(cfg.divergence)  # the table name (case and spaces normalized)

    def chain(self, fn, z: Tensor, noises: list[Tensor], ref=None):
        cfg = self.cfg
        return consistency_chain(fn, z, self.cm_times, self.policy.schedule, noises, ref, self.divergence,
                                 cfg.final_logsnr, cfg.ref_grad)

    def loss(self, phase: str, micro: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        n = cfg.batch_size
        idx, cond = self.draw_cond(n)
        cond = self.rewards.per_frame(cond)
        z = self.initial_noise(n)
        noises = self.step_noises(n, cfg.steps - 1)
        out = self.chain(self.policy_fn(cond), z, noises, self.ref_fn(cond) if cfg.div_weight > 0 else None)
        rewards = self.rewards.score(out.x0, idx)
        loss, parts = rocm_loss(rewards, self.per_sample(out.div), cfg.reward_weight, cfg.div_weight)
        parts["kl"] = float(out.kl.mean())
        return loss, parts

    def eval_samples_for(self, which: str, z: Tensor, cond: Any, gen: torch.Generator) -> tuple[Tensor, dict]:
        """Consistency-chain samples; for the policy also the chain's summed step KL and divergence."""
        noises = [torch.randn(z.shape, generator=gen).to(z.device) for _ in range(self.cfg.steps - 1)]
        if which == "reference":
            return self.chain(self.ref_fn(cond), z, noises).x0, {}
        out = self.chain(self.policy_fn(cond, grad=False), z, noises, self.ref_fn(cond))
        return out.x0, {"path_kl": float(out.kl.mean()), f"path_{self.divergence}": float(out.div.mean())}

    def export_meta(self) -> dict[str, Any]:
        meta = super().export_meta()
        meta["times"] = self.cm_times
        meta[f"times_{self.cfg.steps}"] = self.cm_times  # what `diffdiv sample` reads
        return meta
