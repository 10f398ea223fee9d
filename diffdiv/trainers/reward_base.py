"""Shared parts of the reward fine-tuning trainers (DPOK, IPRO, ROCM): policy, reference, chain evaluation, export.

- Policy: the pretrained Denoiser with LoRA (peft) on its trainable network; the frozen reference is the
  same network with the adapters disabled (no second copy), or a frozen clone when LoRA is off.
- Conditions (`trainers/conditions.py`) and rewards, decoding, evaluation (`trainers/rewarding.py`) are
  composed in, shared with DI*.
- Export: LoRA weights in the diffusers format (`pipe.load_lora_weights(dir)`) for SD-family pipelines,
  in the peft format (`PeftModel.from_pretrained(net, dir)`) otherwise, plus the merged model as a
  diffusers pipeline folder (`load_denoiser(dir)` / `<Pipeline>.from_pretrained(dir)`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from diffdiv.config import ConfigError, check
from diffdiv.models.base import Denoiser
from diffdiv.models.lora import adapters_disabled, add_lora, has_lora, merged_copy, save_lora
from diffdiv.trainers.base import TrainConfig, Trainer, check_lr
from diffdiv.trainers.conditions import CondConfig, Conditions
from diffdiv.trainers.rewarding import RewardFields, RewardKit, evaluate_rewards

# ----------------------------------------------------------------------------------------------
# Config sections
# ----------------------------------------------------------------------------------------------


@dataclass
class PolicyModelConfig:
    """The pretrained model to fine-tune (also the frozen reference)."""

    path: str | None = None  # pipeline folder or hub id
    guidance_scale: float | None = None  # CFG scale used for sampling; default: the folder's diffdiv.json or 1
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def validate(self) -> None:
        check(bool(self.path), "model.path: give a pipeline folder or hub id")
        check(self.guidance_scale is None or self.guidance_scale >= 0, "model.guidance_scale must be >= 0")

    def preflight(self) -> None:
        from diffdiv.models.spec import TeacherConfig

        try:
            TeacherConfig(kind="pipeline", path=self.path).preflight()
        except ConfigError:
            raise ConfigError(f"model.path: {self.path} is not a diffusers pipeline folder") from None


@dataclass
class RewardTrainConfig(TrainConfig, RewardFields):
    """Options shared by DPOK, IPRO and ROCM (reward fields: `diffdiv.trainers.rewarding.RewardFields`)."""

    batch_size: int = 8
    max_steps: int = 200
    checkpoint_every: int = 100
    log_every: int = 5
    model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    steps: int = 10  # sampling steps of the chain
    eta: float = 1.0  # DDIM eta of the sampler (DDIM chains)
    # DDIM chain grid: "scheduler" = the pipeline scheduler's (`diffdiv.sampling.scheduler_times`: SD's DDIM
    # with 10 steps visits 901, 801, ..., 1, like the diffusers pipeline); "uniform" = evenly spaced model times
    # from t_start down to t_min (`diffdiv.sampling.ddim_times`, the grid before 0.x)
    timesteps: Literal["scheduler", "uniform"] = "scheduler"
    t_start: float | None = None  # timesteps uniform: first model time (default: the schedule's t_max); for
    # schedules whose alpha(t_max) ~ 0 (squaredcos_cap_v2: 5e-5) start lower, e.g. 990, or x0 = (x - s eps)/a explodes
    reduce: Literal["mean", "sum"] = "mean"  # log-probs / KL per sample: mean or sum over elements
    eval_eta: float = 1.0  # DDIM eta of the chain whose per-step KL is reported

    def validate(self) -> None:
        super().validate()
        self.validate_reward()
        check_lr("lr", self.lr)
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)")
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.eta >= 0 and self.eval_eta >= 0, "eta and eval_eta must be >= 0")
        check(self.timesteps in ("scheduler", "uniform"), f"timesteps: scheduler or uniform, got {self.timesteps}")
        check(self.t_start is None or self.timesteps == "uniform", "t_start applies to timesteps: uniform only")


# ----------------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------------


def input_scale(model: Denoiser, t: float | None = None) -> float:
    """Std of x_t for unit-variance data: sqrt(alpha^2 + sigma^2) at t (default t_max; 1 for VP)."""
    t = model.schedule.t_max if t is None else t
    a, s = model.schedule.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    return float(torch.sqrt(a**2 + s**2))


# ----------------------------------------------------------------------------------------------
# Base trainer for DPOK / IPRO / ROCM
# ----------------------------------------------------------------------------------------------


class RewardTrainer(Trainer):
    """Base of DPOK / IPRO / ROCM: LoRA policy on a pretrained Denoiser, frozen reference, rewards, export."""

    config_cls = RewardTrainConfig
    name = "reward"
    export_kind = "diffusion"

    def preflight(self) -> None:
        self.cfg.model.preflight()
        self.cfg.cond.preflight()
        self.cfg.preflight_reward()

    # --- building ---------------------------------------------------------------------------------
    def load_model(self) -> Denoiser:
        from diffdiv.models.hub import read_model_index
        from diffdiv.models.loading import load_denoiser, pipeline_guidance, read_meta
        from diffdiv.models.spec import torch_dtype

        m = self.cfg.model
        if m.guidance_scale is None and "guidance_scale" not in read_meta(m.path):
            cls = read_model_index(m.path).get("_class_name", "")
            if pipeline_guidance(cls) != 1.0:
                self.print(f"note: model.guidance_scale is not set and {m.path} has no diffdiv.json: sampling "
                           f"without CFG (guidance 1); {cls} applies {pipeline_guidance(cls):g} by default "
                           "(set model.guidance_scale to the scale the pipeline is used with)")
        return load_denoiser(m.path, guidance_scale=m.guidance_scale,
                             torch_dtype=torch_dtype(m.dtype) if m.dtype != "float32" else None)

    def build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.policy = self.load_model()
        self.policy.requires_grad_(False).eval()
        self.ref_model: Denoiser | None = None
        if cfg.lora.enabled:
            params = add_lora(self.policy.trainable, cfg.lora)
        else:
            self.ref_model = self.add_frozen("reference", self.policy.clone())
            self.policy.trainable.requires_grad_(True)
            params = [p for p in self.policy.trainable.parameters()]
        self.add_network("policy", self.policy, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                         params=params)
        self.conds = Conditions(cfg.cond, self.policy)
        self.rewards = RewardKit(cfg, self.policy, self.conds, self.add_frozen)
        self.times = self.chain_times()
        self.x_scale = input_scale(self.policy, float(self.times[0]))
        self.build_method()

    def chain_times(self) -> Tensor:
        """steps + 1 model times of the DDIM chain (`timesteps`: the pipeline scheduler's grid, or uniform)."""
        from diffdiv.sampling import ddim_times, scheduler_times

        cfg = self.cfg
        sch = self.policy.schedule
        if cfg.timesteps == "scheduler":
            return scheduler_times(self.policy, cfg.steps)
        t_start = sch.t_max if cfg.t_start is None else cfg.t_start
        if not sch.t_min < t_start <= sch.t_max:
            raise ConfigError(f"t_start {t_start} is outside the model's time range ({sch.t_min}, {sch.t_max}]")
        return ddim_times(t_start, sch.t_min, cfg.steps)

    def build_method(self) -> None:
        """Method-specific networks and state (value function, buffers)."""

    def phases(self, step: int) -> list[str]:
        return ["policy"]

    # --- models as functions ----------------------------------------------------------------------
    @contextlib.contextmanager
    def reference(self) -> Iterator[Denoiser]:
        """The frozen reference model (the policy with adapters disabled, or the frozen copy)."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        module = self.nets["policy"].module
        with adapters_disabled(module.trainable):
            yield module

    def policy_fn(self, cond: Any, grad: bool = True) -> Callable[[Tensor, Tensor], Tensor]:
        net = self.net("policy") if grad else self.nets["policy"].module
        return lambda x, t: net(x, t, cond)

    def ref_fn(self, cond: Any) -> Callable[[Tensor, Tensor], Tensor]:
        def f(x: Tensor, t: Tensor) -> Tensor:
            with self.reference() as m:
                return m(x, t, cond)

        return f

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.policy.sample_shape)

    def initial_noise(self, n: int) -> Tensor:
        """This rank's initial noise for a global batch of n samples ((n*F, ...) with frames)."""
        f = self.cfg.frames
        if not f:
            return self.randn(*self.sample_shape, n=n)
        from diffdiv.sampling import correlated_frame_noise

        shared = self.randn(*self.sample_shape, n=n)
        per = self.randn(f, *self.sample_shape, n=n)
        z = correlated_frame_noise(shared, per, self.cfg.frame_noise_corr)
        return z.reshape(-1, *self.sample_shape)

    def step_noises(self, n: int, count: int) -> list[Tensor]:
        """Per-step noises for a global batch of n samples (frames flattened)."""
        f = self.cfg.frames
        if not f:
            return [self.randn(*self.sample_shape, n=n) for _ in range(count)]
        return [self.randn(f, *self.sample_shape, n=n).reshape(-1, *self.sample_shape) for _ in range(count)]

    def per_sample(self, v: Tensor) -> Tensor:
        """(B*F,) per-frame values -> (B,) per video (sum or mean over frames, like `reduce`)."""
        f = self.cfg.frames
        if not f:
            return v
        v = v.reshape(-1, f)
        return v.sum(1) if self.cfg.reduce == "sum" else v.mean(1)

    # --- evaluation / export ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return evaluate_rewards(self)

    def eval_samples_for(self, which: str, z: Tensor, cond: Any, gen: torch.Generator) -> tuple[Tensor, dict]:
        """DDIM(eta) samples; for the policy also the exact path KL (sum of per-step KLs, nats) of the
        DDIM(eval_eta) chain against the reference along the policy's own trajectories."""
        from diffdiv.sampling import ddim_chain

        cfg = self.cfg
        sch = self.policy.schedule
        z = z * self.x_scale
        fn = self.policy_fn(cond, grad=False) if which == "policy" else self.ref_fn(cond)

        def noises(eta: float) -> list[Tensor] | None:
            if eta <= 0:
                return None
            return [torch.randn(z.shape, generator=gen).to(z.device) for _ in range(cfg.steps)]

        out = ddim_chain(fn, z, self.times, sch, cfg.eta, noises(cfg.eta))
        metrics: dict[str, float] = {}
        if which == "policy" and cfg.eval_eta > 0:
            kl_out = ddim_chain(fn, z, self.times, sch, cfg.eval_eta, noises(cfg.eval_eta),
                                ref_denoise=self.ref_fn(cond), kl_on="all", reduce="sum")
            metrics["path_kl"] = float(kl_out.kl.mean())
            metrics["path_kl_per_element"] = float(kl_out.kl.mean()) / z[0].numel()
        return out.x, metrics

    def export_meta(self) -> dict[str, Any]:
        meta = {"kind": self.export_kind, "default_steps": self.cfg.steps, "method": self.name,
                "guidance_scale": float(self.policy.guidance_scale)}
        if self.export_kind == "diffusion":
            meta["default_sampler"] = "ddim"
        return meta

    def export(self, out_dir: Path) -> None:
        from diffdiv.models.export import prepare_student_export
        from diffdiv.models.loading import save_denoiser

        policy = self.nets["policy"].module
        if has_lora(policy.trainable):
            save_lora(policy, out_dir / "lora")
            model = merged_copy(policy)
        else:
            model = policy
        meta, scheduler = self.export_meta(), None
        if self.export_kind != "diffusion":  # a consistency model (ROCM): the scheduler stock diffusers needs
            scheduler, meta = prepare_student_export(model, meta)  # (VP times rounded to integer timesteps)
            if "times" in meta:
                meta["times"] = meta[f"times_{self.cfg.steps}"]
        save_denoiser(model, out_dir / "model", meta, scheduler=scheduler)
        (out_dir / "reward_config.json").write_text(json.dumps({"reward": self.cfg.reward,
                                                                "eval_reward": self.cfg.eval_reward}))
