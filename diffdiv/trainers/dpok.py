"""DPOKTrainer (arXiv 2305.16381): policy gradient on the DDIM(eta > 0) Gaussian policy with a per-step KL.

Loop: every `updates_per_round` steps, sample `sample_batch` trajectories with the current policy (no
gradients), score the final samples (any reward, differentiable or not), normalize the rewards per
prompt (or over the batch), and push the trajectories into a replay buffer holding the last
`buffer_rounds` rounds (the global round, gathered on every rank, so N processes draw exactly the
transitions one process would). Each step then draws `batch_size` transitions (x_t -> x_s) uniformly from the
buffer and minimizes, per transition,
    reward_weight * max(-A rho, -A clip(rho, 1 +- clip_range)) + div_weight * KL_t(x_t),
rho = exp(log pi_theta(x_s|x_t) - log pi_old(x_s|x_t)) with pi_old the policy at sampling time,
KL_t the closed-form KL between the fine-tuned and reference DDIM transitions at x_t, and A the
normalized reward minus the value baseline V(x_t, t, c) when `value_baseline` is on. Log-probs and KL
are averaged over elements (reduce=mean, like the references) or summed (reduce=sum, exact densities);
since transitions are drawn uniformly over the T steps, the loss is (1/T) x DPOK's objective summed over t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffdiv.config import ConfigError, check
from diffdiv.methods.dpok import (
    PerPromptStatTracker,
    ddim_mean_x0_coef,
    ddim_step_coeffs,
    ddim_step_mean,
    dpok_loss,
    gaussian_log_prob,
    normalize_by_group,
    step_kl_from_x0,
)
from diffdiv.models.nets import fourier_embedding
from diffdiv.sampling import ddim_chain
from diffdiv.trainers.base import check_lr
from diffdiv.trainers.reward_base import RewardTrainConfig, RewardTrainer


@dataclass
class DPOKConfig(RewardTrainConfig):
    """DPOK: online policy gradient with clipped importance ratios and a per-step KL."""

    output_dir: str = "runs/dpok"
    batch_size: int = 16  # transitions per policy update (global)
    sample_batch: int = 8  # trajectories sampled per round (global)
    updates_per_round: int = 4  # policy updates per sampling round
    buffer_rounds: int = 4  # replay buffer: trajectories of the last rounds
    clip_range: float = 1e-4
    reward_weight: float = 10.0
    div_weight: float = 0.01
    eta: float = 1.0
    advantage: Literal["per_prompt", "batch", "none"] = "per_prompt"
    stat_buffer: int = 32  # per-prompt tracker: rewards kept per prompt
    stat_min_count: int = 8  # below this many, a prompt is normalized with the batch statistics
    value_baseline: bool = False
    lr_value: float = 1e-3
    value_width: int = 64

    def validate(self) -> None:
        super().validate()
        check(self.eta > 0, "DPOK needs a stochastic sampler: eta > 0")
        check(self.sample_batch >= 1 and self.updates_per_round >= 1 and self.buffer_rounds >= 1,
              "sample_batch, updates_per_round and buffer_rounds must be >= 1")
        check(self.clip_range > 0, "clip_range must be > 0")
        check(self.frames == 0, "DPOK works on images: frames must be 0")
        check_lr("lr_value", self.lr_value)


class ValueNet(nn.Module):
    """V(x_t, t, c): a small conv (or MLP) net on the state, time features and pooled condition."""

    def __init__(self, sample_shape: tuple[int, ...], cond_dim: int = 0, width: int = 64):
        super().__init__()
        if len(sample_shape) == 3:
            c = sample_shape[0]
            self.body = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            n = int(torch.tensor(sample_shape).prod())
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(n, width), nn.SiLU())
        self.time = nn.Linear(32, width)
        self.cond = nn.Linear(cond_dim, width) if cond_dim else None
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x: Tensor, t_frac: Tensor, cond_feat: Tensor | None = None) -> Tensor:
        h = self.body(x.float()) + self.time(fourier_embedding(t_frac, 32))
        if self.cond is not None and cond_feat is not None:
            h = h + self.cond(cond_feat.float())
        return self.head(h)[:, 0]


class TransitionBuffer:
    """Trajectories of the last rounds: states (N, T+1, ...), old log-probs (N, T), advantages, prompts."""

    KEYS = ("states", "log_probs", "adv", "reward", "prompt", "round")

    def __init__(self, rounds: int):
        self.rounds = rounds
        self.data: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return 0 if not self.data else len(self.data["adv"])

    def push(self, round_id: int, **items: Tensor) -> None:
        n = len(items["adv"])
        items = {k: v.detach() for k, v in items.items()}
        items["round"] = torch.full((n,), round_id, dtype=torch.long, device=items["adv"].device)
        if self.data:
            items = {k: torch.cat([self.data[k], items[k].to(self.data[k].device)]) for k in self.KEYS}
        keep = items["round"] > round_id - self.rounds
        self.data = {k: v[keep] for k, v in items.items()}

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.data = {k: sd[k] for k in self.KEYS if k in sd and torch.is_tensor(sd[k])}


class DPOKTrainer(RewardTrainer):
    """DPOK: policy gradient with clipped importance ratios, optional value baseline, per-step KL (LoRA)."""

    config_cls = DPOKConfig
    name = "dpok"

    def build_method(self) -> None:
        cfg = self.cfg
        self.buffer = TransitionBuffer(cfg.buffer_rounds)
        self.tracker = PerPromptStatTracker(cfg.stat_buffer, cfg.stat_min_count)
        self.register_state("dpok_buffer", self.buffer)
        self.register_state("dpok_tracker", self.tracker)
        self._mb: dict[tuple[int, int], dict[str, Any]] = {}
        self._last: dict[str, float] = {}
        if cfg.sample_batch % self.world:
            raise ConfigError(f"sample_batch {cfg.sample_batch} is not divisible by the {self.world} processes")
        if cfg.value_baseline:
            self.value = ValueNet(self.sample_shape, self.cond_dim(), cfg.value_width)
            self.add_network("value", self.value, lr=cfg.lr_value)

    def cond_dim(self) -> int:
        if not self.conds.count:
            return 0
        if self.conds.num_labels:
            return self.conds.num_labels
        return int(self.conds.encode(torch.zeros(1, dtype=torch.long)).embeds.shape[-1])

    def cond_features(self, idx: Tensor | None) -> Tensor | None:
        if idx is None or not self.conds.count:
            return None
        if self.conds.num_labels:
            return F.one_hot(idx.long(), self.conds.num_labels).float().to(self.device)
        return self.conds.encode(idx, self.device).embeds.float().mean(1)

    def phases(self, step: int) -> list[str]:
        return ["value", "policy"] if self.cfg.value_baseline else ["policy"]

    # --- sampling rounds -----------------------------------------------------------------------
    @torch.no_grad()
    def collect(self) -> None:
        """Sample a round of trajectories with the current policy, score and normalize, push to the buffer."""
        cfg = self.cfg
        n = cfg.sample_batch
        idx, cond = self.draw_cond(n)
        z = self.initial_noise(n) * self.x_scale
        noises = self.step_noises(n, cfg.steps)
        out = ddim_chain(self.policy_fn(cond, grad=False), z, self.times, self.policy.schedule, cfg.eta, noises,
                         record=True, reduce=cfg.reduce)
        rewards = self.rewards.score(out.x, idx).float()
        r_all = self.gather(rewards)
        idx_all = self.gather(idx) if idx is not None else None
        prompts_all = self.conds.texts(idx_all)
        if cfg.advantage == "per_prompt" and prompts_all is not None:
            adv_all = self.tracker.update(prompts_all, r_all)
        elif cfg.advantage in ("batch", "per_prompt"):
            adv_all = normalize_by_group(r_all, None)
        else:
            adv_all = r_all
        # the buffer holds the global round on every rank, so minibatches are exactly those of one process
        pid = idx if idx is not None else torch.full((rewards.shape[0],), -1, dtype=torch.long)
        self.buffer.push(self.step // cfg.updates_per_round, states=self.gather(torch.stack(out.states, 1)),
                         log_probs=self.gather(torch.stack(out.log_probs, 1)), adv=adv_all.to(self.device),
                         reward=r_all, prompt=self.gather(pid.to(self.device)))
        self._last = {"reward": float(r_all.mean()), "reward_std": float(r_all.std()) if len(r_all) > 1 else 0.0}

    def gather(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        return self.accelerator.gather(x.contiguous())

    def minibatch(self, micro: int) -> dict[str, Any]:
        """The transitions of this (step, micro): collected first if a new round starts."""
        key = (self.step, micro)
        if key not in self._mb:
            if micro == 0 and (self.step % self.cfg.updates_per_round == 0 or len(self.buffer) == 0):
                self.collect()
            d = self.buffer.data
            T = self.cfg.steps
            traj = self.randint(len(self.buffer))
            k = self.randint(T)
            pid = d["prompt"][traj]
            idx = pid if self.conds.count else None
            self._mb = {key: {"x_t": d["states"][traj, k], "x_s": d["states"][traj, k + 1],
                              "old_lp": d["log_probs"][traj, k], "adv": d["adv"][traj], "k": k, "idx": idx}}
        return self._mb[key]

    def step_times(self, k: Tensor) -> tuple[Tensor, Tensor]:
        times = self.times.to(k.device)
        return times[k], times[k + 1]

    # --- losses ----------------------------------------------------------------------------------
    def loss(self, phase: str, micro: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        mb = self.minibatch(micro)
        self.log(**{f"sample/{k}": v for k, v in self._last.items()})
        t, s = self.step_times(mb["k"])
        if phase == "value":
            v = self.net("value")(mb["x_t"], (t / self.policy.schedule.t_max).float(), self.cond_features(mb["idx"]))
            loss = F.mse_loss(v, mb["adv"].float())
            return loss, {}
        cond = self.conds.encode(mb["idx"], self.device)
        sch = self.policy.schedule
        a_t, s_t = (v.float() for v in sch.alpha_sigma(t))
        a_s, s_s = (v.float() for v in sch.alpha_sigma(s))
        c_x0, c_eps, std = ddim_step_coeffs(a_t, s_t, a_s, s_s, cfg.eta)
        x_t = mb["x_t"]
        x0 = self.net("policy")(x_t, t.float(), cond)
        mean = ddim_step_mean(x_t, x0.to(x_t.dtype), a_t, s_t, c_x0, c_eps)
        log_prob = gaussian_log_prob(mb["x_s"], mean, std, cfg.reduce)
        kl = torch.zeros_like(log_prob)
        if cfg.div_weight > 0:  # the reference forward only when the KL is weighted
            with torch.no_grad(), self.reference() as ref:
                x0_ref = ref(x_t, t.float(), cond)
            kl = step_kl_from_x0(x0.float(), x0_ref.float(), ddim_mean_x0_coef(a_t, s_t, c_x0, c_eps), std,
                                 cfg.reduce)
        adv = mb["adv"].float()
        parts_extra: dict[str, float] = {}
        if cfg.value_baseline:
            with torch.no_grad():
                v = self.nets["value"].module(x_t, (t / sch.t_max).float(), self.cond_features(mb["idx"]))
            parts_extra["value_mean"] = float(v.mean())
            adv = adv - v
        loss, parts = dpok_loss(log_prob, mb["old_lp"], adv, kl, cfg.clip_range, cfg.reward_weight, cfg.div_weight)
        parts.update(parts_extra)
        return loss, parts
