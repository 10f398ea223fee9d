"""Load any supported model (hub id or local folder) as a Denoiser; save students as pipelines.

A saved model is a plain diffusers pipeline folder (`model_index.json` + components) that
`DiffusionPipeline`/`<Pipeline>.from_pretrained` load unchanged, plus an optional `diffdiv.json`
describing how diffdiv samples it (teacher multi-step, one-step student, consistency student).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline

from diffdiv.config import ConfigError
from diffdiv.models import text2img
from diffdiv.models.base import Denoiser
from diffdiv.models.hub import is_local, read_model_index
from diffdiv.models.nets import MLPNet, NetDenoiser
from diffdiv.models.unet import UNetDenoiser

META_FILE = "diffdiv.json"
UNET_PIPELINES = {"DDPMPipeline", "DDIMPipeline"}
TEXT2IMG_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusion3Pipeline",
}


class MLPPipeline(DiffusionPipeline):
    """diffusers pipeline for vector data: an `MLPNet` plus a noise scheduler."""

    def __init__(self, net: MLPNet, scheduler: DDPMScheduler):
        super().__init__()
        self.register_modules(net=net, scheduler=scheduler)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The diffdiv.json sidecar (empty for plain diffusers pipelines)."""
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def pipeline_guidance(cls_name: str) -> float:
    """The CFG scale a diffusers pipeline class applies by default (its `__call__` default, e.g. SD 7.5, SDXL 5.0,
    SD3 7.0; 1 for unconditional pipelines)."""
    import inspect

    import diffusers

    pipe_cls = getattr(diffusers, cls_name, None)
    if pipe_cls is None or cls_name not in TEXT2IMG_PIPELINES:
        return 1.0
    param = inspect.signature(pipe_cls.__call__).parameters.get("guidance_scale")
    return float(param.default) if param is not None and isinstance(param.default, (int, float)) else 1.0


def load_denoiser(path_or_id: str | os.PathLike, guidance_scale: float | None = None,
                  torch_dtype: torch.dtype | None = None, allow_pickle: bool = False, **kwargs: Any) -> Denoiser:
    """A diffusers pipeline (folder or hub id) -> Denoiser.

    Weights load from safetensors only; pickle (`.bin`/`.ckpt`) weights are refused unless
    `allow_pickle=True` (unpickling runs arbitrary code from the file).
    """
    index = read_model_index(path_or_id)
    if not allow_pickle:
        _refuse_pickle_only(path_or_id)
        kwargs.setdefault("use_safetensors", True)
    cls = index.get("_class_name", "")
    meta = read_meta(path_or_id) if is_local(path_or_id) else {}
    gs = guidance_scale if guidance_scale is not None else meta.get("guidance_scale", 1.0)
    dtype_kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    safe_kw = {"use_safetensors": kwargs.pop("use_safetensors")} if "use_safetensors" in kwargs else {}
    dtype_kw.update(safe_kw)
    if cls in UNET_PIPELINES:
        pipe = DDPMPipeline.from_pretrained(path_or_id, **dtype_kw)
        return UNetDenoiser(pipe.unet, pipe.scheduler, guidance_scale=gs)
    if cls == "MLPPipeline":
        pipe = MLPPipeline.from_pretrained(path_or_id, **dtype_kw)
        return NetDenoiser(pipe.net, _schedule_of(pipe.scheduler), sigma_data=meta.get("sigma_data", 1.0),
                           guidance_scale=gs)
    if cls in TEXT2IMG_PIPELINES:
        return text2img.load_text2img(path_or_id, cls, guidance_scale=gs, torch_dtype=torch_dtype, **safe_kw,
                                      **kwargs)
    raise ConfigError(f"unsupported pipeline class '{cls}' in {path_or_id}")


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def _refuse_pickle_only(path_or_id: str | os.PathLike) -> None:
    """One-line error if a local model component holds pickle weights but no safetensors."""
    root = Path(path_or_id)
    if not root.exists():
        return
    for comp in [root, *[p for p in root.iterdir() if p.is_dir()]]:
        files = [p for p in comp.iterdir() if p.is_file()]
        has_safe = any(p.suffix == ".safetensors" for p in files)
        pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickled and not has_safe:
            raise ConfigError(f"{comp} holds pickle weights ({pickled[0]}) and no safetensors; refusing to unpickle "
                              "(convert to safetensors, or set allow_pickle=true if you trust the file)")


def _schedule_of(scheduler):
    from diffdiv.models.unet import schedule_from_scheduler

    return schedule_from_scheduler(scheduler)


def atomic_dir_write(target: str | os.PathLike, write_fn) -> Path:
    """Write a directory through `write_fn(tmp_dir)` into a sibling temp dir, then rename over target."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_fn(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """JSON file written to a temp name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_denoiser(denoiser: Denoiser, path: str | os.PathLike, meta: dict[str, Any] | None = None,
                  scheduler: Any = None) -> Path:
    """Save a Denoiser as a diffusers pipeline folder (+ diffdiv.json), atomically; `scheduler` replaces the
    model's own (students: `diffdiv.models.export.prepare_student_export`)."""
    meta = dict(meta or {})
    meta.setdefault("kind", "diffusion")
    meta.setdefault("guidance_scale", float(getattr(denoiser, "guidance_scale", 1.0)))

    def write(tmp: Path) -> None:
        if isinstance(denoiser, UNetDenoiser):
            sch = scheduler if scheduler is not None else DDIMScheduler.from_config(denoiser.scheduler_config) \
                if denoiser.scheduler_cls is None else denoiser.make_scheduler()
            DDPMPipeline(unet=denoiser.unet, scheduler=sch).save_pretrained(tmp, safe_serialization=True)
        elif isinstance(denoiser, NetDenoiser):
            sch = scheduler_for(denoiser.schedule)
            meta.setdefault("sigma_data", denoiser.sigma_data)
            MLPPipeline(net=denoiser.net, scheduler=sch).save_pretrained(tmp, safe_serialization=True)
        elif hasattr(denoiser, "save_pipeline"):
            denoiser.save_pipeline(tmp, scheduler=scheduler)
        else:
            raise TypeError(f"cannot save {type(denoiser).__name__} as a pipeline")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    return atomic_dir_write(path, write)


def scheduler_for(schedule) -> DDPMScheduler:
    """diffdiv's own scheduler for a bare schedule (analytic / MLP models): no x0 clipping, trailing spacing."""
    from diffdiv.param import VPSchedule

    settings = {"clip_sample": False, "timestep_spacing": "trailing"}  # vectors are not images in [-1, 1]
    if isinstance(schedule, VPSchedule):
        if schedule._beta_cfg is not None:
            return DDPMScheduler(**schedule._beta_cfg, **settings)
        acp = schedule.alphas_cumprod
        alphas = torch.cat([acp[:1], acp[1:] / acp[:-1]])
        return DDPMScheduler(num_train_timesteps=len(acp), trained_betas=(1 - alphas).tolist(), **settings)
    raise TypeError(f"no diffusers scheduler for {type(schedule).__name__}")
