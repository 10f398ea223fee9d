"""Config sections that name a model or a data set, and the builders that make them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from diffdiv.config import ConfigError, check
from diffdiv.data.mixtures import MixtureConfig, build_mixture, mixture_sigma_data
from diffdiv.models.base import Denoiser
from diffdiv.models.gmm import GaussianMixtureTeacher
from diffdiv.param import Schedule, VPSchedule


@dataclass
class ScheduleConfig:
    """A VP noise schedule as diffusers builds it."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"

    def validate(self) -> None:
        check(self.num_train_timesteps >= 2, "schedule.num_train_timesteps must be >= 2")
        check(0 < self.beta_start < self.beta_end < 1, "schedule: need 0 < beta_start < beta_end < 1")

    def build(self) -> VPSchedule:
        return VPSchedule.linear(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)


@dataclass
class TeacherConfig:
    """The frozen teacher: an analytic mixture (`gmm`) or a diffusers pipeline (`pipeline`)."""

    kind: Literal["gmm", "pipeline"] = "gmm"
    path: str | None = None  # pipeline folder or hub id
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    guidance_scale: float = 1.0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    allow_pickle: bool = False  # load .bin/.ckpt weights (unpickling runs code from the file)

    def validate(self) -> None:
        if self.kind == "pipeline":
            check(bool(self.path), "teacher.path: a pipeline teacher needs a folder or hub id")
        check(self.guidance_scale >= 0, "teacher.guidance_scale must be >= 0")

    def preflight(self) -> None:
        """Fail early on a missing local teacher folder (hub ids are not checked offline)."""
        if self.kind != "pipeline":
            return
        p = Path(self.path)
        looks_local = p.is_absolute() or self.path.startswith((".", "~")) or p.exists() or self.path.count("/") != 1
        if looks_local and not (p / "model_index.json").is_file():
            raise ConfigError(f"teacher.path: {self.path} is not a diffusers pipeline folder")


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def build_teacher(cfg: TeacherConfig) -> Denoiser:
    """TeacherConfig -> frozen Denoiser."""
    if cfg.kind == "gmm":
        mix = build_mixture(cfg.mixture)
        t = GaussianMixtureTeacher(mix, cfg.schedule.build(), guidance_scale=cfg.guidance_scale)
        t.sigma_data = mixture_sigma_data(mix)
        return t
    from diffdiv.models.loading import load_denoiser

    return load_denoiser(cfg.path, guidance_scale=cfg.guidance_scale, allow_pickle=cfg.allow_pickle,
                         torch_dtype=torch_dtype(cfg.dtype) if cfg.dtype != "float32" else None)


def schedule_of(cfg: TeacherConfig) -> Schedule:
    return cfg.schedule.build()
