"""Sanity checks that name the problem: data vs teacher shapes, x0 far outside the data range, too few samples."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from diffdiv.config import ConfigError

PIXEL_LIMIT = 3.0  # |x0| beyond 3x the data's range (pixels in [-1, 1]) is garbage, not a sample
LATENT_LIMIT = 10.0  # VAE latents are scaled to unit variance: 10 standard deviations
MAX_GAIN = 10.0  # suggested t_init: the largest time where an eps-teacher's 1 / alpha <= this


def warn(message: str) -> None:
    """One `warning:` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _shape(s: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in s)


def check_data_shape(data_shape: tuple[int, ...], teacher: Any) -> None:
    """ConfigError unless the `data` samples are what the teacher generates (images for latent teachers)."""
    want = tuple(teacher.sample_shape)
    data_shape = tuple(data_shape)
    if data_shape == want:
        return
    f = getattr(teacher, "vae_scale_factor", None)
    if f is not None and hasattr(teacher, "encode_images"):
        img = (3, want[1] * f, want[2] * f)
        if data_shape == img:
            return
        raise ConfigError(f"data: samples are {_shape(data_shape)} but the teacher's VAE encodes {_shape(img)} "
                          f"images to its {_shape(want)} latents; set data.image_size: {img[1]} and data.channels: 3, "
                          "or drop the data section")
    if len(want) == 3 and len(data_shape) == 3:
        raise ConfigError(f"data: samples are {_shape(data_shape)} but the teacher generates {_shape(want)}; set "
                          f"data.image_size: {want[1]} and data.channels: {want[0]}, or drop the data section")
    raise ConfigError(f"data: samples have shape {_shape(data_shape)} but the teacher generates {_shape(want)}")


def range_limit(model: Any, data: Any = None) -> tuple[float, str]:
    """(|x0| limit, description of the data range) for a model and its data (if known)."""
    if data is not None and getattr(data, "data", None) is not None and \
            tuple(data.data.shape[1:]) == tuple(model.sample_shape):
        m = float(data.data.abs().max())
        return PIXEL_LIMIT * m, f"data within +-{m:.3g}"
    if data is not None and getattr(data, "mixture", None) is not None:
        m = float(data.all(2000).abs().max())
        return PIXEL_LIMIT * m, f"data within +-{m:.3g}"
    if hasattr(model, "decode"):
        return LATENT_LIMIT, "unit-variance latents"
    return PIXEL_LIMIT, "pixels in [-1, 1]"


@torch.no_grad()
def x0_at(model: Any, t: float, n: int = 8, seed: int = 0) -> torch.Tensor:
    """x0 = D(sigma(t) z, t) on n fixed noises, unconditional (what a one-step student starts from)."""
    z = torch.randn(n, *model.sample_shape, generator=torch.Generator().manual_seed(seed))
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    tt = torch.full((n,), float(t), device=dev)
    _, s = model.schedule.alpha_sigma(tt)
    x = s.view((-1,) + (1,) * (z.ndim - 1)).to(z.dtype) * z.to(dev)
    return model(x, tt, None).float().cpu()


def eps_gain_time(schedule: Any, max_gain: float = MAX_GAIN) -> float | None:
    """Largest time with 1 / alpha(t) <= max_gain (where an eps-teacher's x0 errors stay moderate)."""
    lam = math.log(1.0 / (max_gain**2 - 1.0))  # alpha^2 = 1/g^2 for VP: logSNR = log(alpha^2 / (1 - alpha^2))
    try:
        return float(schedule.t_from_logsnr(torch.tensor([lam], dtype=torch.float64)))
    except Exception:
        return None


def x0_range_problem(model: Any, t: float, limit: float, data_desc: str, who: str = "teacher",
                     n: int = 4) -> str | None:
    """A message if x0 at time t lies far outside the data range (99th percentile of |x0| over `limit`)."""
    x0 = x0_at(model, t, n)
    if not torch.isfinite(x0).all():
        q = float("inf")
    else:
        q = float(x0.abs().flatten().quantile(0.99))
    if q <= limit:
        return None
    lo, hi = float(x0.min()), float(x0.max())
    a, _ = model.schedule.alpha_sigma(torch.tensor([float(t)], dtype=torch.float64))
    pred = getattr(model, "prediction_type", None)
    msg = (f"{who} x0 at t={t:g} spans {lo:.4g}..{hi:.4g} ({data_desc}; 99% of |x0| <= {q:.3g} > {limit:g}): "
           "one-step samples from here are garbage")
    if pred == "epsilon" and float(a) > 0:
        t_ok = eps_gain_time(model.schedule)
        msg += (f". The {who} predicts epsilon, and x0 = (x - sigma eps) / alpha amplifies its errors "
                f"{1 / float(a):.3g}x at this time (alpha = {float(a):.3g}). Fix: a lower student.t_init")
        msg += f" (e.g. {math.floor(t_ok)}, where 1/alpha = {MAX_GAIN:g})" if t_ok is not None else ""
        msg += " or a v-prediction / sample-prediction teacher"
    return msg


def check_distill_inputs(teacher: Any, configured: Any, data: Any, t_init: float | None,
                         accelerator: Any) -> list[str]:
    """Before distilling: ConfigError if the `data` section's Dataset (`configured`) does not match the teacher;
    a warning (main process, returned) if the teacher's x0 at the one-step time is far outside the data range."""
    from diffdiv.models.gmm import GaussianMixtureTeacher

    if configured is not None:
        check_data_shape(configured.sample_shape, teacher)
    if isinstance(teacher, GaussianMixtureTeacher) or not accelerator.is_main_process:
        return []
    t0 = float(teacher.schedule.t_max if t_init is None else t_init)
    msg = x0_range_problem(teacher.to(accelerator.device), t0, *range_limit(teacher, data))
    if msg:
        warn(msg)
    return [msg] if msg else []


def check_student_export(student: Any, meta: dict[str, Any], data: Any, earlier: list[str]) -> dict[str, Any]:
    """meta with `warnings` (earlier ones + the student's x0 range at its first time, also printed)."""
    from diffdiv.models.export import stored_t0

    t0 = stored_t0(meta)
    msg = None if t0 is None else x0_range_problem(student, t0, *range_limit(student, data), who="student")
    if msg:
        warn(msg)
    warnings = list(earlier) + ([msg] if msg else [])
    return {**meta, "warnings": warnings} if warnings else meta


def feature_sample_warnings(rows: list[dict[str, Any]], dim: int | None, n_ref: int | None) -> list[str]:
    """Warnings (and `row['unreliable']` flags) for feature metrics computed from too few samples for `dim`."""
    if not dim:
        return []
    out: list[str] = []
    for r in rows:
        m = r.get("metrics", {})
        n = int(r.get("num_samples") or 0)
        bad = []
        if "fid" in m and (n < dim or (n_ref is not None and n_ref < dim)):
            bad.append("fid")
        if "precision" in m and min(n, n_ref or n) < dim:
            bad += ["precision", "recall"]
        if "mmd" in m and n < dim:
            bad.append("mmd")
        if bad:
            r["unreliable"] = bad
    flagged = [r for r in rows if r.get("unreliable")]
    if flagged:
        n_min = min(int(r["num_samples"]) for r in flagged)
        out.append(f"{', '.join(sorted({b for r in flagged for b in r['unreliable']}))} from {n_min} samples in "
                   f"{dim}-d features are unreliable (need n >= d; ideally 10x): the covariance has rank < d and "
                   "every sample is about equally far from every other, so the rankings between rows mean "
                   "little; draw more samples (--num-samples) or use smaller features")
    prec = [r["metrics"]["precision"] for r in rows if "precision" in r.get("metrics", {})]
    if len(prec) >= 2 and all(p == 0.0 for p in prec):
        out.append("precision is 0 for every row: no generated sample lies in any reference k-NN ball, "
                   "so precision / recall do not separate these models")
    return out


__all__ = ["check_distill_inputs", "check_student_export", "check_data_shape", "range_limit", "x0_range_problem",
           "feature_sample_warnings", "warn",
           "eps_gain_time"]
