"""Shared parts of the reward fine-tuning trainers (DPOK, IPRO, ROCM; DI* reuses the mixin).

- Policy: the pretrained Denoiser with LoRA (peft) on its trainable network; the frozen reference is the
  same network with the adapters disabled (no second copy), or a frozen clone when LoRA is off.
- Prompts are encoded once and cached; a batch draws prompt indices from the shared generator.
- Rewards come from `diffdiv.rewards.build_reward` (`reward`, and optionally `eval_reward`, e.g. the true
  JPEG size when training on the differentiable surrogate).
- Video-shaped samples: `frames: F` samples F frames per sample from the per-frame image model
  ((B*F, ...) through the model, (B, F, C, H, W) to the reward).
- Export: LoRA weights in the diffusers format (`pipe.load_lora_weights(dir)`) for SD-family pipelines,
  in the peft format (`PeftModel.from_pretrained(net, dir)`) otherwise, plus the merged model as a
  diffusers pipeline folder (`load_denoiser(dir)` / `<Pipeline>.from_pretrained(dir)`).
- Evaluation: reward of the fine-tuned and of the reference model on the same noise and prompts, MMD^2
  between their images, and the method's own divergence (e.g. the summed per-step KL of the chain).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffdiv.config import ConfigError, check
from diffdiv.models.base import Denoiser
from diffdiv.trainers.base import TrainConfig, Trainer, check_lr
from diffdiv.trainers.distill import CondConfig
from diffdiv.trainers.runtime import rank0_decides

# ----------------------------------------------------------------------------------------------
# Config sections
# ----------------------------------------------------------------------------------------------


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) on the trainable network; the reference is the network without them."""

    enabled: bool = True
    rank: int = 4
    alpha: float | None = None  # lora_alpha (scale alpha/rank); default: rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] | None = None  # default: attention projections (+ resnet convs for UNet2DModel)

    def validate(self) -> None:
        check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        check(self.alpha is None or self.alpha > 0, "lora.alpha must be positive")
        check(0 <= self.dropout < 1, "lora.dropout must be in [0, 1)")


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
class RewardTrainConfig(TrainConfig):
    """Options shared by DPOK, IPRO and ROCM."""

    batch_size: int = 8
    max_steps: int = 200
    checkpoint_every: int = 100
    log_every: int = 5
    model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    reward: dict[str, Any] = field(default_factory=lambda: {"name": "jpeg_compressibility"})
    eval_reward: dict[str, Any] | None = None  # also reported (e.g. the true reward behind a surrogate)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    reward_weight: float = 1.0  # alpha: weight of the reward term
    div_weight: float = 0.01  # beta: weight of the divergence regularizer (0 = unregularized)
    steps: int = 10  # sampling steps of the chain
    eta: float = 1.0  # DDIM eta of the sampler (DDIM chains)
    t_start: float | None = None  # first model time of the DDIM chain (default: the schedule's t_max); for
    # schedules whose alpha(t_max) ~ 0 (squaredcos_cap_v2: 5e-5) start lower, e.g. 990, or x0 = (x - s eps)/a explodes
    reduce: Literal["mean", "sum"] = "mean"  # log-probs / KL per sample: mean or sum over elements
    frames: int = 0  # > 0: video-shaped samples (B, F, C, H, W) from the per-frame image model
    frame_noise_corr: float = 0.0  # correlation of the frames' initial noise
    eval_samples: int = 64
    eval_batch: int = 32
    eval_seed: int = 12345
    eval_eta: float = 1.0  # DDIM eta of the chain whose per-step KL is reported
    max_train_time_s: float = 0.0  # > 0: stop after this much training time (evaluation excluded)
    eval_every_s: float = 0.0  # > 0: evaluate (eval_history.json) every this much training time, from step 0

    def validate(self) -> None:
        super().validate()
        check_lr("lr", self.lr)
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)")
        check(self.reward_weight >= 0 and self.div_weight >= 0, "reward_weight and div_weight must be >= 0")
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.eta >= 0 and self.eval_eta >= 0, "eta and eval_eta must be >= 0")
        check(self.frames >= 0, "frames must be >= 0")
        check(0 <= self.frame_noise_corr < 1, "frame_noise_corr must be in [0, 1)")
        check(self.eval_samples >= 0 and self.eval_batch > 0, "eval_samples >= 0 and eval_batch > 0 required")
        check(isinstance(self.reward, dict) and "name" in self.reward, "reward: a mapping with a 'name' key")


# ----------------------------------------------------------------------------------------------
# LoRA helpers (peft)
# ----------------------------------------------------------------------------------------------


def default_lora_targets(net: nn.Module) -> list[str]:
    """Attention projections; resnet convs too for UNet2DModel; every Linear for an MLP."""
    names = [n for n, _ in net.named_modules()]
    attn = [t for t in ("to_q", "to_k", "to_v", "to_out.0") if any(n.endswith(t) for n in names)]
    if type(net).__name__ == "UNet2DModel":
        return attn + ["conv1", "conv2"]
    if attn:
        return attn
    linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError(f"lora: no default target modules for {type(net).__name__}; set lora.target_modules")
    return linear


def lora_peft_config(net: nn.Module, cfg: LoRAConfig):
    from peft import LoraConfig

    targets = list(cfg.target_modules) if cfg.target_modules else default_lora_targets(net)
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                      lora_dropout=cfg.dropout, target_modules=targets, init_lora_weights=True)


def add_lora(net: nn.Module, cfg: LoRAConfig) -> list[nn.Parameter]:
    """Inject LoRA adapters into `net` in place; freeze everything else; return the adapter parameters."""
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import inject_adapter_in_model

    config = lora_peft_config(net, cfg)
    try:
        if isinstance(net, PeftAdapterMixin):
            net.add_adapter(config)
        else:
            inject_adapter_in_model(config, net)
            net._diffdiv_lora_config = config
    except ValueError as e:
        raise ConfigError(f"lora: cannot add adapters ({e})") from None
    net.requires_grad_(False)
    params = [p for n, p in net.named_parameters() if "lora_" in n]
    if not params:
        raise ConfigError(f"lora: target_modules {config.target_modules} matched no layer")
    for p in params:
        p.requires_grad_(True)
    return params


def lora_config_of(net: nn.Module):
    cfg = getattr(net, "peft_config", None)
    if isinstance(cfg, dict) and cfg:
        return next(iter(cfg.values()))
    return getattr(net, "_diffdiv_lora_config", None)


def has_lora(net: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in net.modules())


@contextlib.contextmanager
def adapters_disabled(net: nn.Module) -> Iterator[nn.Module]:
    """The base network: LoRA adapters switched off (requires_grad flags restored afterwards)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for p in net.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield net
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, f in flags:
            p.requires_grad_(f)


def merge_lora_(net: nn.Module) -> nn.Module:
    """Merge LoRA weights into the base layers and remove the adapter modules (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_diffdiv_lora_config"):
        if hasattr(net, attr):
            delattr(net, attr)
    if hasattr(net, "_hf_peft_config_loaded"):
        net._hf_peft_config_loaded = False
    return net


def merged_copy(model: Denoiser) -> Denoiser:
    """A copy of a Denoiser with its LoRA merged into plain weights (frozen parts stay shared)."""
    out = model.clone()
    merge_lora_(out.trainable)
    return out


def save_lora(model: Denoiser, out_dir: str | Path) -> Path:
    """LoRA weights: diffusers format for SD-family pipelines, peft format (adapter_model.safetensors) otherwise."""
    from peft import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = model.trainable
    config = lora_config_of(net)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net).items()}
    pipe_name = getattr(model, "pipeline_cls_name", None)
    if pipe_name is not None:
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers

        pipe_cls = getattr(diffusers, pipe_name)
        layers = convert_state_dict_to_diffusers(state)
        key = model.trainable_name
        meta = config.to_dict() if config is not None else None
        if meta is not None:
            meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        pipe_cls.save_lora_weights(out, **{f"{key}_lora_layers": layers, f"{key}_lora_adapter_metadata": meta},
                                   safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(out / "adapter_model.safetensors"))
        config.save_pretrained(str(out))
    return out


def load_lora(model: Denoiser, lora_dir: str | Path) -> Denoiser:
    """Load LoRA weights written by `save_lora` into `model` (in place; adapters stay separate)."""
    d = Path(lora_dir)
    if (d / "pytorch_lora_weights.safetensors").is_file():
        pipe = model.pipeline()
        pipe.load_lora_weights(str(d))
        return model
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(d))
    net = model.trainable
    inject_adapter_in_model(config, net)
    prefix = "base_model.model."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in
             load_file(str(d / "adapter_model.safetensors")).items()}
    res = set_peft_model_state_dict(net, state)
    if getattr(res, "unexpected_keys", None):
        raise ConfigError(f"LoRA weights in {d} do not match the model (unexpected keys)")
    net._diffdiv_lora_config = config
    return model


# ----------------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------------


def mmd2_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None) -> tuple[float, float]:
    """Unbiased MMD^2 with an RBF kernel exp(-||a-b||^2 / (2 h^2)); h = median distance within y by default.

    Returns (mmd2, h). Inputs are flattened per sample.
    """
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    if bandwidth is None:
        dy = torch.cdist(y, y)
        iu = torch.triu_indices(len(y), len(y), 1)
        bandwidth = float(dy[iu[0], iu[1]].median().clamp_min(1e-12))
    h2 = 2.0 * bandwidth**2

    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b) ** 2 / h2)

    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean()), bandwidth


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean L2 distance between distinct samples (flattened)."""
    x = x.reshape(x.shape[0], -1).double()
    d = torch.cdist(x, x)
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def input_scale(model: Denoiser, t: float | None = None) -> float:
    """Std of x_t for unit-variance data: sqrt(alpha^2 + sigma^2) at t (default t_max; 1 for VP)."""
    t = model.schedule.t_max if t is None else t
    a, s = model.schedule.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    return float(torch.sqrt(a**2 + s**2))


# ----------------------------------------------------------------------------------------------
# The mixin shared with DI* (which derives from DistillTrainer)
# ----------------------------------------------------------------------------------------------


class RewardMixin:
    """Prompts, rewards, decoding and the common evaluation of reward fine-tuning trainers.

    The host class sets `self.cond_model` (the model whose encoder makes conditions) before
    calling `setup_prompts()`, and implements `eval_samples_for(which, z, cond, gen)`.
    """

    cfg: Any
    rng: torch.Generator

    # --- rewards --------------------------------------------------------------------------------
    def build_rewards(self) -> None:
        from diffdiv.rewards import build_reward

        self.reward_fn = self.add_frozen("reward", build_reward(dict(self.cfg.reward)))
        self.eval_reward_fn = None
        if self.cfg.eval_reward:
            self.eval_reward_fn = self.add_frozen("eval_reward", build_reward(dict(self.cfg.eval_reward)))

    def require_differentiable_reward(self) -> None:
        if not getattr(self.reward_fn, "differentiable", False):
            raise ConfigError(f"{self.name} back-propagates through the reward, but reward "
                              f"'{self.cfg.reward.get('name')}' is not differentiable (use a surrogate)")

    # --- prompts / conditions -------------------------------------------------------------------
    def setup_prompts(self) -> None:
        """self.prompt_list (strings or None) and self.cond_cache (encoded, or labels)."""
        c = self.cfg.cond
        model = self.cond_model
        self.prompt_list: list[str] | None = None
        self.cond_cache: Any = None
        self.num_labels = 0
        if c.prompts or c.prompt_list:
            prompts: list[str] = []
            if c.prompts:
                from diffdiv.data.prompts import load_prompts

                prompts += load_prompts(c.prompts)
            prompts += list(c.prompt_list or [])
            self.prompt_list = prompts
            with torch.no_grad():
                self.cond_cache = model.encode_prompts(prompts)
        elif c.num_classes > 0:
            self.num_labels = c.num_classes
            self.prompt_list = [str(i) for i in range(c.num_classes)]
        if self.prompt_list is None and getattr(self.reward_fn, "needs_prompts", False):
            raise ConfigError(f"reward '{self.cfg.reward.get('name')}' needs prompts: set cond.prompts or "
                              "cond.prompt_list (or cond.num_classes)")

    def cond_for(self, idx: Tensor | None) -> Any:
        """Condition batch for prompt indices (None for unconditional models)."""
        if idx is None or self.prompt_list is None:
            return None
        if self.num_labels:
            return idx.to(self.device)
        return self.cond_cache[idx.cpu()].to(self.device)

    def prompts_for(self, idx: Tensor | None) -> list[str] | None:
        if idx is None or self.prompt_list is None:
            return None
        return [self.prompt_list[int(i)] for i in idx]

    def draw_prompts(self, n: int) -> Tensor | None:
        """This rank's prompt indices for a global batch of n (None when unconditional)."""
        if self.prompt_list is None:
            return None
        return self.randint(len(self.prompt_list), n=n)

    def per_frame(self, cond: Any) -> Any:
        """Each sample's condition repeated for its F frames (labels or TextCond)."""
        f = self.cfg.frames
        return cond if cond is None or not f else cond.repeat_interleave(f)

    # --- decoding and rewards ---------------------------------------------------------------------
    def to_images(self, x: Tensor) -> Tensor:
        """Model-space samples -> images in (nominally) [-1, 1]; (B*F, ...) -> (B, F, C, H, W) with frames."""
        model = self.cond_model
        lead = x.shape[:-3] if x.ndim > 4 else x.shape[:1]
        flat = x.reshape(-1, *x.shape[-3:]) if x.ndim >= 4 else x
        img = model.decode(flat) if hasattr(model, "decode") else flat
        img = img.reshape(*lead, *img.shape[1:]) if x.ndim > 4 else img
        if self.cfg.frames:
            img = img.reshape(-1, self.cfg.frames, *img.shape[1:])
        return img

    def score(self, fn: nn.Module, images: Tensor, idx: Tensor | None) -> Tensor:
        return fn(images, self.prompts_for(idx))

    # --- evaluation -------------------------------------------------------------------------------
    def eval_samples_for(self, which: str, z: Tensor, cond: Any, gen: torch.Generator) -> tuple[Tensor, dict]:
        """Samples of the fine-tuned ('policy') or reference model from noise z; plus metrics."""
        raise NotImplementedError

    def eval_noise(self, n: int, gen: torch.Generator) -> Tensor:
        shape = tuple(self.cond_model.sample_shape)
        f = self.cfg.frames
        if not f:
            return torch.randn(n, *shape, generator=gen).to(self.device)
        shared = torch.randn(n, *shape, generator=gen)
        per = torch.randn(n, f, *shape, generator=gen)
        from diffdiv.methods.ipro import correlated_frame_noise

        return correlated_frame_noise(shared, per, self.cfg.frame_noise_corr).reshape(n * f, *shape).to(self.device)

    # --- wall-clock budget and evaluation history ---------------------------------------------------
    def should_stop(self) -> bool:
        """Evaluate every `eval_every_s` of training time (from step 0); stop once `max_train_time_s` of
        training time (evaluation excluded) is spent, after at least one step. Rank 0's clock decides."""
        every = getattr(self.cfg, "eval_every_s", 0.0)
        last = getattr(self, "last_timed_eval", None)
        if every and (last is None or self.clock.train_seconds() - last >= every):
            self.last_timed_eval = self.clock.train_seconds()
            with self.clock.excluded():
                self.evaluation()  # full weights on rank 0 under FSDP2
        budget = getattr(self.cfg, "max_train_time_s", 0.0)
        if not budget or self.step == 0:
            return False
        return rank0_decides(self.clock.train_seconds() >= budget, self.world, self.device)

    @torch.no_grad()
    def evaluate_rewards(self) -> dict[str, float]:
        """Reward of fine-tuned vs reference (same noise/prompts), MMD^2 of their images, method metrics.

        Also appended (with step and training time) to `eval_history.json` in the output folder.
        """
        cfg = self.cfg
        if cfg.eval_samples <= 0 or not self.accelerator.is_main_process:
            return {}
        from diffdiv.data.images import save_image_grid

        train_time = self.clock.train_seconds()
        cache: dict[int, tuple] = self.__dict__.setdefault("_ref_cache", {})  # the reference never changes
        sums: dict[str, list[Tensor]] = {}
        imgs: dict[str, list[Tensor]] = {"policy": [], "reference": []}
        extra: dict[str, list[float]] = {}
        for start in range(0, cfg.eval_samples, cfg.eval_batch):
            b = min(cfg.eval_batch, cfg.eval_samples - start)
            idx = None
            if self.prompt_list is not None:
                idx = torch.arange(start, start + b) % len(self.prompt_list)
            for which in ("policy", "reference"):
                if which == "reference" and start in cache:
                    images, r, er = cache[start]
                else:
                    gen = torch.Generator().manual_seed(cfg.eval_seed + start)  # same noise for both models
                    z = self.eval_noise(b, gen)
                    x, metrics = self.eval_samples_for(which, z, self.per_frame(self.cond_for(idx)), gen)
                    images = self.to_images(x).float().cpu()
                    r = self.score(self.reward_fn, images.to(self.device), idx).cpu()
                    er = None if self.eval_reward_fn is None else \
                        self.score(self.eval_reward_fn, images.to(self.device), idx).cpu()
                    for k, v in metrics.items():
                        extra.setdefault(k, []).append(float(v) * b)
                    if which == "reference":
                        cache[start] = (images, r, er)
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
            out["mmd2"], out["mmd_bandwidth"] = mmd2_rbf(xp, xr)
        out["paired_mse"] = float(((xp - xr) ** 2).flatten(1).mean(1).mean())
        if len(xp) > 1:  # < 1: the fine-tuned samples are less diverse than the reference's (collapse)
            out["diversity_ratio"] = mean_pairwise_distance(xp) / max(mean_pairwise_distance(xr), 1e-12)
        grid = lambda x: x.reshape(-1, *x.shape[-3:])[:64].clamp(-1, 1)  # noqa: E731
        save_image_grid(grid(xp), self.out / "samples.png")
        save_image_grid(grid(xr), self.out / "samples_reference.png")
        hist = self.__dict__.setdefault("eval_history", [])
        hist.append({"step": self.step, "train_time_s": train_time, **out})
        from diffdiv.models.loading import write_json_atomic

        write_json_atomic(self.out / "eval_history.json", hist)
        return out


# ----------------------------------------------------------------------------------------------
# Base trainer for DPOK / IPRO / ROCM
# ----------------------------------------------------------------------------------------------


class RewardTrainer(RewardMixin, Trainer):
    """Base of DPOK / IPRO / ROCM: LoRA policy on a pretrained Denoiser, frozen reference, rewards, export."""

    config_cls = RewardTrainConfig
    name = "reward"
    export_kind = "diffusion"

    def preflight(self) -> None:
        self.cfg.model.preflight()
        self.cfg.cond.preflight()
        from diffdiv.rewards import available_rewards

        for key in ("reward", "eval_reward"):
            spec = getattr(self.cfg, key)
            if spec and spec.get("name") not in available_rewards():
                raise ConfigError(f"{key}: unknown reward '{spec.get('name')}' "
                                  f"(one of: {', '.join(available_rewards())})")

    # --- building ---------------------------------------------------------------------------------
    def load_model(self) -> Denoiser:
        from diffdiv.models.loading import load_denoiser
        from diffdiv.models.spec import torch_dtype

        m = self.cfg.model
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
        self.cond_model = self.policy
        self.build_rewards()
        self.setup_prompts()
        sch = self.policy.schedule
        from diffdiv.methods.ipro import ddim_times

        t_start = sch.t_max if cfg.t_start is None else cfg.t_start
        if not sch.t_min < t_start <= sch.t_max:
            raise ConfigError(f"t_start {t_start} is outside the model's time range ({sch.t_min}, {sch.t_max}]")
        self.times = ddim_times(t_start, sch.t_min, cfg.steps)
        self.x_scale = input_scale(self.policy, float(self.times[0]))
        self.build_method()

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
        from diffdiv.methods.ipro import correlated_frame_noise

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
        return self.evaluate_rewards()

    def eval_samples_for(self, which: str, z: Tensor, cond: Any, gen: torch.Generator) -> tuple[Tensor, dict]:
        """DDIM(eta) samples; for the policy also the exact path KL (sum of per-step KLs, nats) of the
        DDIM(eval_eta) chain against the reference along the policy's own trajectories."""
        from diffdiv.methods.ipro import ddim_chain

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
        from diffdiv.models.loading import save_denoiser

        policy = self.nets["policy"].module
        if has_lora(policy.trainable):
            save_lora(policy, out_dir / "lora")
            model = merged_copy(policy)
        else:
            model = policy
        save_denoiser(model, out_dir / "model", self.export_meta())
        (out_dir / "reward_config.json").write_text(json.dumps({"reward": self.cfg.reward,
                                                                "eval_reward": self.cfg.eval_reward}))
