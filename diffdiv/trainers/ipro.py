"""IPROTrainer: reward back-propagation through the last K DDIM steps (arXiv 2510.14255), LoRA, KL regularizer.

Per step: sample B prompts and noises, run the DDIM(eta) chain without gradients for steps - K steps and
with gradients for the last K (optionally gradient-checkpointed), decode, score with a differentiable
reward (e.g. `identity_pool`), and minimize
    -reward_weight * mean r + div_weight * mean sum_{last K} KL_t,
KL_t = k_t^2 ||x0_theta - x0_ref||^2 / (2 std_t^2) of the DDIM(kl_eta) transitions at the visited states
(mean over elements with reduce=mean, exact sum with reduce=sum). With `frames: F` a per-frame image
model produces (B, F, C, H, W) videos; the reward sees the video, the KL is summed (reduce=sum) or
averaged (reduce=mean) over frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from diffdiv.config import check
from diffdiv.methods.ipro import ipro_loss
from diffdiv.sampling import ddim_chain
from diffdiv.trainers.reward_base import RewardTrainConfig, RewardTrainer


@dataclass
class IPROConfig(RewardTrainConfig):
    """IPRO: truncated (last-K-step) reward back-propagation."""

    output_dir: str = "runs/ipro"
    reward: dict[str, Any] = field(default_factory=lambda: {"name": "jpeg_compressibility_surrogate"})
    eta: float = 0.0  # sampler: deterministic DDIM by default
    grad_steps: int = 1  # K: differentiate the last K steps (-1 = all)
    kl_eta: float = 1.0  # the KL is that of the DDIM(kl_eta) transitions (1 = DDPM posterior variance)
    ref_grad: bool = False  # KL gradient also through the reference's input state
    grad_checkpointing: bool = False  # recompute each differentiated step in backward (saves memory)

    def validate(self) -> None:
        super().validate()
        check(self.grad_steps == -1 or 1 <= self.grad_steps <= self.steps,
              f"grad_steps must be -1 or in [1, steps={self.steps}], got {self.grad_steps}")
        check(self.kl_eta > 0, "kl_eta must be > 0 (the KL of deterministic steps is undefined)")


class IPROTrainer(RewardTrainer):
    """IPRO-style K-step reward back-propagation with a per-step KL regularizer (LoRA)."""

    config_cls = IPROConfig
    name = "ipro"

    def build_method(self) -> None:
        self.rewards.require_differentiable(self.name)

    def loss(self, phase: str, micro: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        n = cfg.batch_size
        idx, cond = self.draw_cond(n)
        cond = self.rewards.per_frame(cond)
        z = self.initial_noise(n) * self.x_scale
        noises = self.step_noises(n, cfg.steps) if cfg.eta > 0 else None
        out = ddim_chain(self.policy_fn(cond), z, self.times, self.policy.schedule, cfg.eta, noises,
                         grad_steps=cfg.grad_steps, ref_denoise=self.ref_fn(cond) if cfg.div_weight > 0 else None,
                         kl_eta=cfg.kl_eta,
                         kl_on="grad", reduce=cfg.reduce, checkpoint=cfg.grad_checkpointing,
                         ref_grad=cfg.ref_grad)
        rewards = self.rewards.score(out.x, idx)
        loss, parts = ipro_loss(rewards, self.per_sample(out.kl), cfg.reward_weight, cfg.div_weight)
        return loss, parts
