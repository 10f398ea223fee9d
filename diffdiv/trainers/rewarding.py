"""Rewards of a run: the config fields every reward trainer shares, and `RewardKit` (rewards, decoding, evaluation).

Composed (not inherited) into the reward fine-tuning trainers (DPOK, IPRO, ROCM) and DI*: a trainer builds
`self.rewards = RewardKit(cfg, model, conds, add_frozen)` and scores samples with `self.rewards.score(x, idx)`.
- Rewards come from `diffdiv.rewards.build_reward` (`reward`, and optionally `eval_reward`, e.g. the true JPEG
  size when training on the differentiable surrogate).
- Video-shaped samples: `frames: F` samples F frames per sample from the per-frame image model ((B*F, ...)
  through the model, (B, F, C, H, W) to the reward).
- Evaluation: reward of the fine-tuned and of the reference model on the same noise and conditions, the paired
  MMD^2 between their images, a diversity ratio, and the method's own metrics (e.g. the chain's path KL);
  appended with the step and training time to `eval_history.json`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffdiv.config import ConfigError, check
from diffdiv.eval.manifold import mean_pairwise_distance, median_mmd2
from diffdiv.models.base import Denoiser
from diffdiv.models.loading import write_json_atomic
from diffdiv.models.lora import LoRAConfig
from diffdiv.sampling import correlated_frame_noise
from diffdiv.trainers.conditions import Conditions

SampleFn = Callable[[str, Tensor, Any, torch.Generator], tuple[Tensor, dict[str, float]]]


@dataclass
class RewardFields:
    """Config fields shared by DPOK / IPRO / ROCM and DI* (a dataclass base of their configs)."""

    reward: dict[str, Any] = field(default_factory=lambda: {"name": "jpeg_compressibility"})
    eval_reward: dict[str, Any] | None = None  # also reported (e.g. the true reward behind a surrogate)
    reward_weight: float = 1.0  # alpha: weight of the reward term
    div_weight: float = 0.01  # beta: weight of the divergence regularizer (0 = unregularized)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    frames: int = 0  # > 0: video-shaped samples (B, F, C, H, W) from the per-frame image model
    frame_noise_corr: float = 0.0  # correlation of the frames' initial noise
    eval_samples: int = 64
    eval_batch: int = 32
    eval_seed: int = 12345

    def validate_reward(self) -> None:
        check(self.reward_weight >= 0 and self.div_weight >= 0, "reward_weight and div_weight must be >= 0")
        check(self.frames >= 0, "frames must be >= 0")
        check(0 <= self.frame_noise_corr < 1, "frame_noise_corr must be in [0, 1)")
        check(self.eval_samples >= 0 and self.eval_batch > 0, "eval_samples >= 0 and eval_batch > 0 required")
        check(isinstance(self.reward, dict) and "name" in self.reward, "reward: a mapping with a 'name' key")

    def preflight_reward(self) -> None:
        from diffdiv.rewards import available_rewards

        for key in ("reward", "eval_reward"):
            spec = getattr(self, key)
            if spec and spec.get("name") not in available_rewards():
                raise ConfigError(f"{key}: unknown reward '{spec.get('name')}' "
                                  f"(one of: {', '.join(available_rewards())})")


class RewardKit:
    """The run's reward functions, sample decoding, and the shared policy-vs-reference evaluation."""

    def __init__(self, cfg: RewardFields, model: Denoiser, conds: Conditions,
                 add_frozen: Callable[[str, nn.Module], nn.Module]):
        from diffdiv.rewards import build_reward

        self.cfg, self.model, self.conds = cfg, model, conds
        self.fn = add_frozen("reward", build_reward(dict(cfg.reward)))
        self.eval_fn = add_frozen("eval_reward", build_reward(dict(cfg.eval_reward))) if cfg.eval_reward else None
        if not conds.count and getattr(self.fn, "needs_prompts", False):
            raise ConfigError(f"reward '{cfg.reward.get('name')}' needs prompts: set cond.prompts or "
                              "cond.prompt_list (or cond.num_classes)")
        self.reference_cache: dict[int, tuple] = {}  # the reference model never changes
        self.history: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return str(self.cfg.reward.get("name"))

    def require_differentiable(self, method: str) -> None:
        if not getattr(self.fn, "differentiable", False):
            raise ConfigError(f"{method} back-propagates through the reward, but reward '{self.name}' is not "
                              "differentiable (use a surrogate)")

    def per_frame(self, cond: Any) -> Any:
        """Each sample's condition repeated for its F frames (labels or TextCond)."""
        f = self.cfg.frames
        return cond if cond is None or not f else cond.repeat_interleave(f)

    def to_images(self, x: Tensor) -> Tensor:
        """Model-space samples -> images in (nominally) [-1, 1]; (B*F, ...) -> (B, F, C, H, W) with frames."""
        lead = x.shape[:-3] if x.ndim > 4 else x.shape[:1]
        flat = x.reshape(-1, *x.shape[-3:]) if x.ndim >= 4 else x
        img = self.model.decode(flat) if hasattr(self.model, "decode") else flat
        img = img.reshape(*lead, *img.shape[1:]) if x.ndim > 4 else img
        if self.cfg.frames:
            img = img.reshape(-1, self.cfg.frames, *img.shape[1:])
        return img

    def score(self, x: Tensor, idx: Tensor | None, fn: nn.Module | None = None) -> Tensor:
        """Reward (B,) of model-space samples x for conditions idx (the training reward unless `fn`)."""
        return self.score_images(self.to_images(x), idx, fn)

    def score_images(self, images: Tensor, idx: Tensor | None, fn: nn.Module | None = None) -> Tensor:
        return (fn or self.fn)(images, self.conds.texts(idx))

    def eval_noise(self, n: int, gen: torch.Generator, device: torch.device) -> Tensor:
        shape = tuple(self.model.sample_shape)
        f = self.cfg.frames
        if not f:
            return torch.randn(n, *shape, generator=gen).to(device)
        shared = torch.randn(n, *shape, generator=gen)
        per = torch.randn(n, f, *shape, generator=gen)
        return correlated_frame_noise(shared, per, self.cfg.frame_noise_corr).reshape(n * f, *shape).to(device)

    @torch.no_grad()
    def evaluate(self, samples_for: SampleFn, out_dir: Path, step: int, train_time: float,
                 device: torch.device) -> dict[str, float]:
        """Reward of fine-tuned ('policy') vs reference (same noise and conditions), paired MMD^2 of their
        images, diversity, method metrics; sample grids and `eval_history.json` under out_dir."""
        cfg = self.cfg
        if cfg.eval_samples <= 0:
            return {}
        from diffdiv.data.images import save_image_grid

        sums: dict[str, list[Tensor]] = {}
        imgs: dict[str, list[Tensor]] = {"policy": [], "reference": []}
        extra: dict[str, list[float]] = {}
        for start in range(0, cfg.eval_samples, cfg.eval_batch):
            b = min(cfg.eval_batch, cfg.eval_samples - start)
            idx = self.conds.cycle(start, b)
            for which in ("policy", "reference"):
                if which == "reference" and start in self.reference_cache:
                    images, r, er = self.reference_cache[start]
                else:
                    gen = torch.Generator().manual_seed(cfg.eval_seed + start)  # same noise for both models
                    z = self.eval_noise(b, gen, device)
                    x, metrics = samples_for(which, z, self.per_frame(self.conds.encode(idx, device)), gen)
                    images = self.to_images(x).float().cpu()
                    r = self.score_images(images.to(device), idx).cpu()
                    er = None if self.eval_fn is None else self.score_images(images.to(device), idx, self.eval_fn).cpu()
                    for k, v in metrics.items():
                        extra.setdefault(k, []).append(float(v) * b)
                    if which == "reference":
                        self.reference_cache[start] = (images, r, er)
                imgs[which].append(images)
                sums.setdefault(f"reward_{which}", []).append(r)
                if er is not None:
                    sums.setdefault(f"eval_reward_{which}", []).append(er)
        out: dict[str, float] = {}
        for k, v in sums.items():
            t = torch.cat(v).double()
            out[k] = float(t.mean())
            out[f"{k}_sem"] = float(t.std() / math.sqrt(len(t))) if len(t) > 1 else 0.0
        out["reward_gain"] = out["reward_policy"] - out["reward_reference"]
        if "eval_reward_policy" in out:
            out["eval_reward_gain"] = out["eval_reward_policy"] - out["eval_reward_reference"]
        for k, v in extra.items():
            out[k] = sum(v) / cfg.eval_samples
        xp, xr = torch.cat(imgs["policy"]), torch.cat(imgs["reference"])
        if len(xp) > 1:
            out["mmd2"], out["mmd_bandwidth"] = median_mmd2(xp, xr, paired=True)  # same noises: paired
        out["paired_mse"] = float(((xp - xr) ** 2).flatten(1).mean(1).mean())
        if len(xp) > 1:  # < 1: the fine-tuned samples are less diverse than the reference's (collapse)
            out["diversity_ratio"] = mean_pairwise_distance(xp) / max(mean_pairwise_distance(xr), 1e-12)
        grid = lambda x: x.reshape(-1, *x.shape[-3:])[:64].clamp(-1, 1)  # noqa: E731
        save_image_grid(grid(xp), out_dir / "samples.png")
        save_image_grid(grid(xr), out_dir / "samples_reference.png")
        self.history.append({"step": step, "train_time_s": train_time, **out})
        write_json_atomic(out_dir / "eval_history.json", self.history)
        return out


def evaluate_rewards(trainer: Any) -> dict[str, float]:
    """A reward trainer's `evaluate()`: its `rewards` kit on its `eval_samples_for`, on the main process."""
    if not trainer.accelerator.is_main_process:
        return {}
    return trainer.rewards.evaluate(trainer.eval_samples_for, trainer.out, trainer.step,
                                    trainer.clock.train_seconds(), trainer.device)
