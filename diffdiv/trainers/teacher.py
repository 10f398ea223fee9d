"""Teacher training: denoising score matching of a diffusers UNet2DModel (images) or an MLP (vectors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor

from diffdiv.config import check
from diffdiv.data.config import DataConfig, Dataset
from diffdiv.divergence import PREDICTION_WEIGHTING, x0_loss_weight
from diffdiv.eval.training import evaluate_model
from diffdiv.models.base import Denoiser
from diffdiv.models.nets import MLPNet, NetDenoiser
from diffdiv.models.spec import ScheduleConfig
from diffdiv.models.unet import UNetDenoiser
from diffdiv.trainers.base import TrainConfig, Trainer, check_lr


@dataclass
class ModelConfig:
    """The network to train: a diffusers UNet2DModel or an MLP."""

    kind: Literal["unet", "mlp"] = "unet"
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 2
    attention: bool = True  # self-attention at the lowest resolution
    norm_num_groups: int = 16
    hidden: int = 256
    depth: int = 4

    def validate(self) -> None:
        check(len(self.block_out_channels) >= 1, "model.block_out_channels: empty")
        check(all(c > 0 and c % self.norm_num_groups == 0 for c in self.block_out_channels),
              f"model.block_out_channels must be positive multiples of norm_num_groups={self.norm_num_groups}")
        check(self.layers_per_block >= 1 and self.hidden > 0 and self.depth >= 1, "model: sizes must be positive")


@dataclass
class TeacherTrainConfig(TrainConfig):
    """Config of `train/teacher.py`."""

    output_dir: str = "runs/digits_teacher"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(beta_schedule="squaredcos_cap_v2"))
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    lr: float = 2e-4
    warmup_steps: int = 200
    eval_samples: int = 2000
    eval_steps: int = 50
    eval_sampler: str = "ddim"

    def validate(self) -> None:
        super().validate()
        check_lr("lr", self.lr)
        check(self.eval_samples >= 0 and self.eval_steps > 0, "eval_samples >= 0 and eval_steps > 0 required")
        if self.model.kind == "unet" and self.data.kind != "mixture":
            down = 2 ** (len(self.model.block_out_channels) - 1)
            check(self.data.image_size % down == 0,
                  f"data.image_size {self.data.image_size} is not divisible by the UNet's downsampling factor {down}")


def build_teacher_model(cfg: TeacherTrainConfig, sample_shape: tuple[int, ...], sigma_data: float) -> Denoiser:
    """A fresh (untrained) denoiser for the configured data."""
    sched = DDPMScheduler(num_train_timesteps=cfg.schedule.num_train_timesteps, beta_start=cfg.schedule.beta_start,
                          beta_end=cfg.schedule.beta_end, beta_schedule=cfg.schedule.beta_schedule,
                          prediction_type=cfg.prediction_type, clip_sample=False,
                          timestep_spacing="trailing")  # stored: diffusers and diffdiv sample with these settings
    m = cfg.model
    if m.kind == "mlp":
        dim = int(torch.tensor(sample_shape).prod())
        net = MLPNet(in_dim=dim, hidden=m.hidden, depth=m.depth)
        from diffdiv.models.unet import schedule_from_scheduler

        return NetDenoiser(net, schedule_from_scheduler(sched), sigma_data=sigma_data, sample_shape=sample_shape)
    c, h = sample_shape[0], sample_shape[1]
    n = len(m.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if m.attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    unet = UNet2DModel(sample_size=h, in_channels=c, out_channels=c, block_out_channels=tuple(m.block_out_channels),
                       layers_per_block=m.layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=m.norm_num_groups, attention_head_dim=8)
    return UNetDenoiser(unet, sched)


class TeacherTrainer(Trainer):
    """Train a diffusion teacher by denoising score matching and save it as a diffusers pipeline."""

    config_cls = TeacherTrainConfig
    name = "teacher"

    def preflight(self) -> None:
        self.cfg.data.preflight()

    def build(self) -> None:
        cfg = self.cfg
        self.data = Dataset(cfg.data)
        torch.manual_seed(cfg.seed)
        self.model = build_teacher_model(cfg, self.data.sample_shape, self.data.sigma_data)
        self.add_network("model", self.model, lr=cfg.lr, ema=True, warmup_steps=cfg.warmup_steps)

    def loss(self, phase: str, micro: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        x0 = self.data.local_batch(cfg.batch_size, self.rng, self.rank, self.world).to(self.device)
        sched = self.model.schedule
        t = sched.t_min + (sched.t_max - sched.t_min) * self.rand()
        eps = self.randn(*x0.shape[1:])
        a, s = sched.alpha_sigma(t)
        view = (-1,) + (1,) * (x0.ndim - 1)
        x_t = a.view(view) * x0 + s.view(view) * eps
        x0_hat = self.net("model")(x_t, t)
        weighting = "edm" if isinstance(self.model, NetDenoiser) else PREDICTION_WEIGHTING[cfg.prediction_type]
        w = x0_loss_weight(a, s, weighting, getattr(self.model, "sigma_data", 1.0))
        per = ((x0_hat.float() - x0.float()) ** 2).flatten(1).mean(1) * w
        if weighting == "eps":
            per = per.clamp(max=1e4)  # t ~ 0: the eps target is pure noise of the data quantization
        return per.mean(), {}

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        if cfg.eval_samples <= 0 or not self.accelerator.is_main_process:
            return {}
        return evaluate_model(self.model, self.data, cfg.eval_samples, cfg.eval_steps, cfg.eval_sampler, self.out)

    def export(self, out_dir: Path) -> None:
        from diffdiv.models.loading import save_denoiser

        save_denoiser(self.model, out_dir / "teacher", {"kind": "diffusion", "default_steps": self.cfg.eval_steps,
                                                         "default_sampler": self.cfg.eval_sampler})
