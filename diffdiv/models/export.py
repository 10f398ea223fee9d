"""Student folders that stock diffusers samples the way diffdiv does: scheduler, integer times, the call.

diffdiv samples a student by x0 = D(sigma(t0) z, t0), then for few-step (consistency) students re-noises
x_{i+1} = alpha(t_{i+1}) x0 + sigma(t_{i+1}) eps and denoises again (sCM Alg. 1) at the times stored in
`diffdiv.json`. The scheduler written into the folder does the same in stock diffusers:

- SD / SDXL one-step students: `EulerDiscreteScheduler`, trailing spacing. One step runs at t = T - 1 and
  the pipeline scales the latents by sigma_max, so the UNet sees sigma(t0) z exactly as in diffdiv (unless
  sigma_max is so large, e.g. zero terminal SNR, that float32 cancellation in Euler's step costs more than
  LCM's unit-noise input: then LCM as below).
- other VP students (DDPMPipeline, SD / SDXL few-step): `LCMScheduler` (x0, then fresh noise at the next
  time) with its boundary condition switched off and `original_inference_steps = t0 + 1`, so one step runs at
  t0. Stored few-step times go in `timesteps=` (SD / SDXL pipelines); `DDPMPipeline.__call__` has no such
  argument, so a loop over the stored scheduler is needed there (README). The first UNet input is the unit
  noise z (LCM's `init_noise_sigma` is 1); passing `latents = latents_scale * z` makes it exact.
- flow students (SD3): `FlowMatchEulerDiscreteScheduler` with shift 1 (sigmas as given) and
  `stochastic_sampling` (x0 re-noising); stored times go in `sigmas=`.

VP times are rounded to integers (diffusers indexes `alphas_cumprod` by integer timestep) and the rounded
times are what diffdiv.json stores, so both samplers use the same ones. Distilled students carry their
guidance inside: every text-to-image call sets `guidance_scale=0.0` (the pipelines default to 7.5 / 7.0 and
would apply CFG again); stock pipelines cannot default that, so it is stored in diffdiv.json and the README.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from diffdiv.models.base import Denoiser
from diffdiv.param import FlowSchedule, VPSchedule

LCM_NO_BOUNDARY = 1.0e6  # LCMScheduler timestep_scaling: c_skip = 0.25 / (1e6 t)^2 ~ 0, c_out = 1 for t >= 1
TEXT2IMG = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")
SIGMA_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # scale latents by init_noise_sigma


def pipeline_class_of(denoiser: Denoiser) -> str | None:
    """The stock diffusers pipeline a saved denoiser loads as (None: no stock pipeline, e.g. MLPPipeline)."""
    from diffdiv.models.unet import UNetDenoiser

    name = getattr(denoiser, "pipeline_cls_name", None)
    if name:
        return name
    return "DDPMPipeline" if isinstance(denoiser, UNetDenoiser) else None


def stored_times(meta: dict[str, Any]) -> dict[int, list[float]]:
    """{steps: times} from diffdiv.json keys `times_<k>` (one-step students: `t_init` as times_1)."""
    out = {int(k.split("_", 1)[1]): [float(v) for v in val] for k, val in meta.items()
           if k.startswith("times_") and k.split("_", 1)[1].isdigit()}
    if 1 not in out and meta.get("t_init") is not None:
        out[1] = [float(meta["t_init"])]
    return dict(sorted(out.items()))


def stored_t0(meta: dict[str, Any]) -> float | None:
    """The first sampling time of a student (t_init, or the first of its stored times); None if none stored."""
    times = stored_times(meta)
    return next(iter(times.values()))[0] if times else None


def integer_times(times: dict[int, list[float]], num_train_timesteps: int) -> dict[int, list[float]]:
    """VP times rounded to diffusers' integer timesteps, kept strictly decreasing and in [1, T - 1]."""
    out = {}
    for k, ts in times.items():
        r: list[float] = []
        for t in ts:
            v = min(max(int(round(t)), 1), num_train_timesteps - 1)
            if r and v >= r[-1]:
                v = int(r[-1]) - 1
            r.append(float(v))
        out[k] = r
    return out


def alpha_sigma_at(denoiser: Denoiser, t: float) -> tuple[float, float]:
    a, s = denoiser.schedule.alpha_sigma(torch.tensor([float(t)], dtype=torch.float64))
    return float(a), float(s)


def config_for(cls: type, cfg: dict[str, Any], **settings: Any) -> Any:
    """`cls` built from the keys of a stored config it takes (no warnings about foreign keys), plus settings."""
    params = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in cfg.items() if k in params}, **settings)


def student_scheduler(denoiser: Denoiser, kind: str, t0: float) -> Any:
    """The stock scheduler that samples this student like diffdiv (module docstring); None for MLP folders."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

    pipe = pipeline_class_of(denoiser)
    cfg = dict(getattr(denoiser, "scheduler_config", None) or {})
    if pipe is None or not cfg:
        return None
    if isinstance(denoiser.schedule, FlowSchedule):
        return config_for(
            FlowMatchEulerDiscreteScheduler, cfg, shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True,
            invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
            use_beta_sigmas=False)
    if not isinstance(denoiser.schedule, VPSchedule):
        return None
    pred = getattr(denoiser, "prediction_type", cfg.get("prediction_type", "epsilon"))
    T = int(denoiser.schedule.num_train_timesteps)
    a0, s0 = alpha_sigma_at(denoiser, t0)
    # Euler feeds sigma(t0) z exactly but its step x + (0 - sigma)(x - x0)/sigma cancels in float32 at
    # x ~ sigma_max z (error ~ sigma_max / 2^23; 4096 / 2^23 for zero terminal SNR); LCM feeds z (error 1 - s0)
    if kind == "one_step" and pipe in SIGMA_PIPELINES and (s0 / max(a0, 1e-12)) * 2.0**-23 < 1.0 - s0:
        return config_for(
            EulerDiscreteScheduler, cfg, timestep_spacing="trailing", prediction_type=pred, use_karras_sigmas=False,
            use_exponential_sigmas=False, use_beta_sigmas=False, timestep_type="discrete", final_sigmas_type="zero",
            interpolation_type="linear", steps_offset=1)  # trailing ignores the offset; SD pipelines warn unless 1
    n_orig = int(round(t0)) + 1
    if T // n_orig != 1:  # LCM's grid is k * j - 1 with k = T // n: one step at t0 needs k = 1
        n_orig = T
    return config_for(
        LCMScheduler, cfg, original_inference_steps=n_orig, timestep_scaling=LCM_NO_BOUNDARY, prediction_type=pred,
        clip_sample=False, thresholding=False, set_alpha_to_one=True, steps_offset=1)  # LCM ignores the offset


def one_step_time(scheduler: Any) -> float:
    """The timestep a stock scheduler runs for `num_inference_steps=1`."""
    sch = type(scheduler).from_config(scheduler.config)
    sch.set_timesteps(1)
    t = float(sch.timesteps[0])
    return t / 1000.0 if "FlowMatch" in type(sch).__name__ else t


def diffusers_calls(denoiser: Denoiser, scheduler: Any, times: dict[int, list[float]]) -> dict[str, Any]:
    """How to call the stock pipeline for each stored step count (the `diffusers` section of diffdiv.json)."""
    pipe = pipeline_class_of(denoiser)
    is_flow = isinstance(denoiser.schedule, FlowSchedule)
    sch_name = type(scheduler).__name__
    t0 = next(iter(times.values()))[0]
    _, s0 = alpha_sigma_at(denoiser, t0)
    euler = sch_name == "EulerDiscreteScheduler"
    latents_scale = 1.0 if euler else s0
    gs = {"guidance_scale": 0.0} if pipe in TEXT2IMG else {}
    default_t = one_step_time(scheduler)
    calls: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for k, ts in times.items():
        if is_flow:
            kw: dict[str, Any] = {"sigmas": [round(t, 6) for t in ts]}
        elif k == 1 and abs(default_t - ts[0]) < 1e-6:
            kw = {"num_inference_steps": 1}
        else:
            kw = {"timesteps": [int(t) for t in ts]}
        calls[str(k)] = {**kw, **gs}
    if pipe == "DDPMPipeline" and any("timesteps" in c for c in calls.values()):
        notes.append("DDPMPipeline.__call__ has no `timesteps` argument: for the stored few-step times, call "
                     "scheduler.set_timesteps(timesteps=...) and loop unet -> scheduler.step(..., generator=g) "
                     "(README, 'Sampling students with diffusers')")
    if pipe in TEXT2IMG:
        notes.append("CFG is distilled into the student: pass guidance_scale=0.0 (the pipeline's default 7.5/7.0 "
                     "would apply it a second time)")
    if abs(latents_scale - 1.0) > 1e-7:
        fix = "pass latents=latents_scale * randn(...) for an exact match" if pipe in TEXT2IMG else \
            "DDPMPipeline takes no latents, so its outputs differ by that input scale"
        notes.append(f"diffdiv's first network input is sigma(t0) z = {latents_scale:.6g} z, the pipeline's is the "
                     f"unit noise z: {fix}")
    if is_flow and abs(default_t - t0) > 1e-6:
        notes.append(f"num_inference_steps=1 runs at sigma {default_t:g}, the student's t0 is {t0:g}: pass sigmas=")
    return {"pipeline": pipe, "scheduler": sch_name, "calls": calls, "latents_scale": latents_scale,
            "notes": notes}


def prepare_student_export(denoiser: Denoiser, meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(scheduler to save, updated meta) for a student: integer VP times, the stock scheduler, the calls."""
    meta = dict(meta)
    kind = meta.get("kind", "one_step")
    times = stored_times(meta)
    if not times or pipeline_class_of(denoiser) is None:  # no stock pipeline (MLP folders): nothing to match
        return None, meta
    if isinstance(denoiser.schedule, VPSchedule):
        rounded = integer_times(times, int(denoiser.schedule.num_train_timesteps))
        moved = max(abs(a - b) for k in times for a, b in zip(times[k], rounded[k], strict=True))
        if moved > 0:
            meta["times_rounded_by"] = round(moved, 6)  # diffusers indexes its alpha table by integer timestep
        times = rounded
    for k, ts in times.items():
        if f"times_{k}" in meta or k == 1:
            meta[f"times_{k}"] = ts
    if kind == "one_step":
        meta["t_init"] = times[1][0]
    sch = student_scheduler(denoiser, kind, next(iter(times.values()))[0])
    if sch is not None:
        meta["diffusers"] = diffusers_calls(denoiser, sch, times)
    return sch, meta


__all__ = ["prepare_student_export", "stored_t0", "student_scheduler", "diffusers_calls", "integer_times",
           "stored_times", "pipeline_class_of"]
