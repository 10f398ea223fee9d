"""Shared parts of every distillation trainer: teacher, student/fake-score init, conditions, export, eval.

Methods (f-distill, Uni-Instruct, DI*, rCM) subclass `DistillTrainer` and only add their losses and
update schedule. For an analytic (Gaussian-mixture) teacher there is no network to copy, so an MLP
`NetDenoiser` is first regressed onto the exact denoiser (`student.pretrain_steps`) and the student
and fake score start from it, exactly as they would start from a pretrained diffusers teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from diffdiv.config import ConfigError, check
from diffdiv.data.config import DataConfig, Dataset
from diffdiv.eval.training import evaluate_model, evaluate_model_steps
from diffdiv.models.base import Denoiser
from diffdiv.models.gmm import GaussianMixtureTeacher
from diffdiv.models.lora import AdapterView, LoRAConfig, add_lora, merged_copy, save_lora
from diffdiv.models.nets import MLPNet, NetDenoiser, OneStepGenerator
from diffdiv.models.spec import TeacherConfig, build_teacher
from diffdiv.trainers.base import TrainConfig, Trainer, check_lr
from diffdiv.trainers.conditions import CondConfig, Conditions


@dataclass
class StudentConfig:
    """How the student (and fake score) are initialized."""

    init: Literal["teacher", "pretrained_mlp"] = "teacher"  # gmm teachers always use pretrained_mlp
    t_init: float | None = None  # model time at which a one-step generator reads its noise (default t_max)
    hidden: int = 128  # MLP size for analytic teachers
    depth: int = 3
    pretrain_steps: int = 600
    pretrain_lr: float = 2e-3
    path: str | None = None  # optional: initialize the student from another pipeline folder
    # LoRA students (as DMD2 / LCM-LoRA): student and fake score are peft adapters on one shared frozen base
    # (the teacher's own network, adapters off for teacher calls); export: a diffusers LoRA + the fused student
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(enabled=False))

    def validate(self) -> None:
        check(self.hidden > 0 and self.depth > 0, "student.hidden and student.depth must be positive")
        check(self.pretrain_steps >= 0, "student.pretrain_steps must be >= 0")


@dataclass
class DistillConfig(TrainConfig):
    """Options shared by all distillation methods."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig | None = None  # real data (GAN terms, reference for eval); default from the teacher
    student: StudentConfig = field(default_factory=StudentConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    lr_gen: float = 1e-4
    lr_fake: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    fake_updates: int = 1  # fake-score (critic) updates per generator update
    t_lo: float = 0.02  # distillation noise levels: fraction of the schedule's time range [t_lo, t_hi]
    t_hi: float = 0.98
    eval_samples: int = 2000
    eval_teacher_steps: int = 0  # >0: also evaluate the teacher at this many steps for comparison

    def validate(self) -> None:
        super().validate()
        check_lr("lr_gen", self.lr_gen)
        check_lr("lr_fake", self.lr_fake)
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)")
        check(self.fake_updates >= 1, "fake_updates must be >= 1")
        if self.student.lora.enabled:  # the roles share one network: one sharding, one recompute per call
            check(self.distributed.strategy != "fsdp2", "student.lora with distributed.strategy=fsdp2 is not "
                  "supported yet (the student and fake-score adapters share one base network); use ddp")
            check(not self.gradient_checkpointing, "student.lora with gradient_checkpointing is not supported yet "
                  "(the recompute would run under whichever adapter is active)")
        check(0 <= self.t_lo < self.t_hi <= 1, "need 0 <= t_lo < t_hi <= 1")
        check(self.eval_samples >= 0, "eval_samples must be >= 0")


def pretrain_mlp_on_teacher(teacher: Denoiser, sample_shape: tuple[int, ...], sigma_data: float, cfg: StudentConfig,
                            seed: int, ref: Dataset | None = None) -> NetDenoiser:
    """Regress an MLP denoiser onto an (exact) teacher's x0 at all noise levels; deterministic."""
    g = torch.Generator().manual_seed(seed + 1)
    dim = int(torch.tensor(sample_shape).prod())
    torch.manual_seed(seed + 1)
    net = MLPNet(in_dim=dim, hidden=cfg.hidden, depth=cfg.depth)
    den = NetDenoiser(net, teacher.schedule, sigma_data=sigma_data, sample_shape=sample_shape)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.pretrain_lr)
    sch = teacher.schedule
    for k in range(cfg.pretrain_steps):
        n = 256
        x0 = teacher.sample_data(n, g) if hasattr(teacher, "sample_data") else ref.batch(n, g)
        t = sch.t_min + (sch.t_max - sch.t_min) * torch.rand(n, generator=g)
        a, s = sch.alpha_sigma(t)
        x_t = a[:, None] * x0 + s[:, None] * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            target = teacher(x_t, t)
        w = (a**2 * sigma_data**2 + s**2) / (s * sigma_data) ** 2
        loss = (w[:, None] * (den(x_t, t) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for grp in opt.param_groups:  # cosine decay
            grp["lr"] = cfg.pretrain_lr * 0.5 * (1 + torch.cos(torch.tensor(3.14159 * (k + 1) / cfg.pretrain_steps)))
    return den.requires_grad_(True)


class DistillTrainer(Trainer):
    """Base for distillation trainers: builds teacher (frozen), `self.student_init` to clone from, conditions."""

    config_cls = DistillConfig
    name = "distill"

    # ------------------------------------------------------------------ setup
    def preflight(self) -> None:
        self.cfg.teacher.preflight()
        self.cfg.cond.preflight()
        if self.cfg.data is not None:
            self.cfg.data.preflight()

    def build_teacher(self) -> None:
        """self.teacher (frozen), self.data (real data or None), self.base (trainable copy source)."""
        cfg = self.cfg
        self.teacher = self.add_frozen("teacher", build_teacher(cfg.teacher))
        self.data = Dataset(cfg.data) if cfg.data is not None else None
        if isinstance(self.teacher, GaussianMixtureTeacher):
            mix = self.teacher.mixture
            if self.data is None:
                dc = DataConfig(kind="mixture", mixture=cfg.teacher.mixture)
                self.data = Dataset(dc)
            self.base: Denoiser = pretrain_mlp_on_teacher(self.teacher, self.teacher.sample_shape,
                                                          self.teacher.sigma_data, cfg.student, cfg.seed)
            del mix
        else:
            if cfg.student.path:
                from diffdiv.models.loading import load_denoiser

                self.base = load_denoiser(cfg.student.path)
            else:
                self.base = self.teacher
            if self.data is None and getattr(self.teacher, "sample_shape", None) == (1, 8, 8):
                self.data = Dataset(DataConfig(kind="digits"))
        self.sample_shape = tuple(self.teacher.sample_shape)
        self.conds = Conditions(cfg.cond, self.teacher)
        from diffdiv.guards import check_distill_inputs

        self.guard_warnings = check_distill_inputs(self.teacher, self.data if cfg.data is not None else None,
                                                   self.data, self.cfg.student.t_init, self.accelerator)

    def make_student(self, role: str = "student") -> Denoiser:
        """A trainable copy of the base denoiser; with `student.lora` a LoRA adapter `role` on the shared base
        (an `AdapterView` whose `lora_params` are what trains; see `trainable_params`)."""
        lora = self.cfg.student.lora
        if not lora.enabled:
            s = self.base.clone()
            s.requires_grad_(True)
            s.train()
            return s
        if self.base is self.teacher:  # the teacher's network now carries adapters: teacher calls switch them off
            self.base = self.teacher
            self.teacher = self.frozen["teacher"] = AdapterView(self.base, None).eval()
        params = add_lora(self.base.trainable, lora, adapter_name=role)
        return AdapterView(self.base, role, lora_params=params)

    def frozen_base(self) -> Denoiser:
        """The base network as a frozen model (with LoRA students: its adapters switched off)."""
        return AdapterView(self.base, None) if self.cfg.student.lora.enabled else self.base

    @staticmethod
    def trainable_params(student: Denoiser) -> list | None:
        """The parameters a network built by `make_student` trains (None: all of them)."""
        return student.lora_params if isinstance(student, AdapterView) else None

    def one_step_generator(self, student: Denoiser) -> OneStepGenerator:
        return OneStepGenerator(student, self.cfg.student.t_init)

    # ------------------------------------------------------------------ randomness (global batch, local slice)
    def sample_t(self) -> Tensor:
        """Distillation times, uniform in the configured fraction of the schedule's range."""
        sch = self.teacher.schedule
        u = self.cfg.t_lo + (self.cfg.t_hi - self.cfg.t_lo) * self.rand()
        return sch.t_min + (sch.t_max - sch.t_min) * u

    def noise(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x_t = alpha x0 + sigma eps; returns (x_t, eps, alpha, sigma) with alpha, sigma of shape (B,)."""
        a, s = self.teacher.schedule.alpha_sigma(t)
        eps = self.randn(*x0.shape[1:]).to(x0.dtype)
        view = (-1,) + (1,) * (x0.ndim - 1)
        return a.view(view).to(x0.dtype) * x0 + s.view(view).to(x0.dtype) * eps, eps, a, s

    def real_batch(self) -> Tensor:
        """This rank's slice of a global batch of real data (for GAN terms)."""
        if self.data is None:
            raise ConfigError("this method needs real data: set the `data` section")
        return self.data.local_batch(self.cfg.batch_size, self.rng, self.rank, self.world).to(self.device)

    # ------------------------------------------------------------------ export / eval
    def export_student(self, student: Denoiser, out_dir: Path, kind: str = "one_step",
                       extra: dict[str, Any] | None = None) -> Path:
        from diffdiv.models.export import prepare_student_export
        from diffdiv.models.loading import save_denoiser

        if isinstance(student, AdapterView):  # LoRA student: the adapter as a diffusers LoRA, plus the fused model
            save_lora(student.base, out_dir / "student_lora", adapter_name=student.adapter)
            extra = {**(extra or {}), "lora": "student_lora", "lora_base": self.cfg.teacher.path}
            fused = merged_copy(student.base, student.adapter)
            fused.guidance_scale = student.guidance_scale
            student = fused
        meta = {"kind": kind, "default_steps": 1, "method": self.name}
        if kind == "one_step":
            meta["t_init"] = OneStepGenerator(student, self.cfg.student.t_init).t_init
        meta["teacher_guidance_scale"] = float(getattr(self.teacher, "guidance_scale", 1.0))  # distilled in
        meta.update(extra or {})
        scheduler, meta = prepare_student_export(student, meta)  # stock diffusers samples it like diffdiv
        from diffdiv.guards import check_student_export

        meta = check_student_export(student, meta, self.data, getattr(self, "guard_warnings", []))
        return save_denoiser(student, out_dir / "student", meta, scheduler=scheduler)

    def evaluate_student(self, student: Denoiser, steps_list: tuple[int, ...] = (1,), kind: str = "consistency",
                         times: dict[int, list[float]] | None = None) -> dict[str, float]:
        """Sample the student (1..k steps) and score it: digits FID or mixture mode stats; writes samples.png."""
        if self.cfg.eval_samples <= 0 or not self.accelerator.is_main_process:
            return {}

        out: dict[str, float] = {}
        for k in steps_list:
            m = evaluate_model_steps(student, self.data, self.cfg.eval_samples, k, self.out, kind,
                                     tag="" if k == steps_list[0] else f"{k}step",
                                     times=(times or {}).get(k), cond=self.eval_cond(self.cfg.eval_samples))
            out.update({f"student_{key}": v for key, v in m.items()})
        if self.cfg.eval_teacher_steps > 0 and self.data is not None:
            m = evaluate_model(self.teacher, self.data, self.cfg.eval_samples, self.cfg.eval_teacher_steps, "ddim",
                               self.out, tag="teacher")
            out.update({f"teacher_{k}": v for k, v in m.items()})
        return out
