"""Evaluate models (or sample files) at several step counts against one reference; multi-process aware.

Samples are drawn in fixed chunks of `batch_size`; chunk c uses seed `seed * 1000003 + c` and rank r
takes chunks r, r + W, ... . So the sample set does not depend on the number of processes, and
`accelerate launch -m diffdiv.eval.job` with N processes reproduces the 1-process numbers. Per-chunk
features, rewards and CLIP scores are gathered on the main process, which computes the metrics.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffdiv.config import ConfigError

FEATURE_METRICS = ("fid", "precision_recall", "mmd")
KNOWN_METRICS = (*FEATURE_METRICS, "mode_stats", "clip_score")


# ----------------------------------------------------------------------------- processes
class Dist:
    """Rank/world plus gather/broadcast/barrier; a no-op single process when not launched."""

    def __init__(self, state: Any = None):
        self.state = state
        self.rank = state.process_index if state is not None else 0
        self.world = state.num_processes if state is not None else 1
        self.device = state.device if state is not None else torch.device("cpu")

    @classmethod
    def from_env(cls) -> Dist:
        """Accelerate's PartialState when launched (`accelerate launch` / torchrun), else one process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not torch.distributed.is_initialized():
            return cls(None)
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
        return cls(PartialState(cpu=cpu))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, items: list[Any]) -> list[Any]:
        """Concatenate every rank's list (same order on all ranks)."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(items))

    def broadcast(self, obj: Any) -> Any:
        """The main process's value of obj, on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def sharded_map(n: int, chunk: int, fn: Callable[[int, int, int], dict[str, Any]], dist: Dist,
                desc: str = "", progress: bool = True) -> list[dict[str, Any]]:
    """Run fn(c, start, size) over the chunks of range(n) split round-robin over ranks; all results, in order."""
    chunks = math.ceil(n / chunk)
    mine = list(range(dist.rank, chunks, dist.world))
    out = []
    with _bar(len(mine), desc, progress and dist.is_main) as bar:
        for c in mine:
            start = c * chunk
            res = fn(c, start, min(chunk, n - start))
            res["_chunk"] = c
            out.append(res)
            bar.update(1)
    allres = dist.gather(out)
    allres.sort(key=lambda r: r["_chunk"])
    return allres


def _cat(results: list[dict[str, Any]], key: str) -> Tensor | None:
    parts = [r[key] for r in results if r.get(key) is not None]
    return torch.cat(parts) if parts else None


# ----------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """One model to evaluate: a pipeline folder / hub id, a samples .npz, or a Denoiser object."""

    label: str
    source: Any
    steps: list[int] | None = None
    kind: str | None = None
    sampler: str | None = None


def _device_of(module: torch.nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def parse_model_arg(text: str) -> tuple[str, str]:
    """`LABEL=PATH` or `PATH` -> (label, path)."""
    if "=" in text and not Path(text).exists():
        label, _, path = text.partition("=")
        if label and path:
            return label, path
    p = text.rstrip("/")
    name = Path(p).stem if p.endswith(".npz") else Path(p).name
    if name in ("teacher", "student") and Path(p).parent.name:
        name = f"{Path(p).parent.name}/{name}"
    return name or text, text


def parse_steps(text: str | int | Sequence[int] | None) -> list[int] | None:
    """`1,4,10,50` -> [1, 4, 10, 50]; validates positivity."""
    if text is None:
        return None
    if isinstance(text, int):
        vals = [text]
    elif isinstance(text, str):
        try:
            vals = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--steps: '{text}' is not a comma-separated list of integers") from None
    else:
        vals = [int(v) for v in text]
    if not vals or any(v <= 0 for v in vals):
        raise ConfigError(f"--steps: step counts must be positive integers, got {text!r}")
    return vals


class LoadedModel:
    """A model ready to sample: a Denoiser with its sampling metadata, or fixed samples from a .npz."""

    def __init__(self, spec: ModelSpec, guidance_scale: float | None = None, device: torch.device | None = None):
        from diffdiv.models.base import Denoiser

        self.spec = spec
        self.meta: dict[str, Any] = {}
        self.samples: Tensor | None = None
        self.images: Tensor | None = None
        self.denoiser: Denoiser | None = None
        self.path: Path | None = None
        self.file_prompts: list[str] | None = None
        src = spec.source
        if isinstance(src, Denoiser):
            self.denoiser = src
        elif isinstance(src, (str, os.PathLike)):
            p = Path(src).expanduser()
            if p.suffix == ".npz":
                if not p.is_file():
                    raise ConfigError(f"--model {src}: samples file not found")
                with np.load(p, allow_pickle=False) as z:
                    if "samples" not in z.files and "images" not in z.files:
                        raise ConfigError(f"--model {src}: .npz holds no 'samples' or 'images'")
                    arr = z["images"] if "images" in z.files else z["samples"]
                    self.samples = torch.from_numpy(np.asarray(arr, dtype=np.float32))
                    if "prompts" in z.files:  # written by `diffdiv sample --prompt/--prompts`
                        self.file_prompts = [str(p) for p in z["prompts"].tolist()]
                self.path = p
            else:
                from diffdiv.models.loading import load_denoiser, read_meta

                if not p.exists() and str(src).count("/") != 1:
                    raise ConfigError(f"--model: {src} does not exist")
                self.meta = read_meta(p) if p.exists() else {}
                self.path = p if p.exists() else None
                self.denoiser = load_denoiser(str(src), guidance_scale=guidance_scale)
        else:
            raise ConfigError(f"model '{spec.label}': expected a folder, a .npz or a Denoiser, "
                              f"got {type(src).__name__}")
        if self.denoiser is not None:
            self.denoiser.eval().requires_grad_(False)
            if device is not None:
                self.denoiser.to(device)

    @property
    def is_samples(self) -> bool:
        return self.samples is not None

    def steps_list(self) -> list[int | None]:
        if self.is_samples:
            return [None]
        if self.spec.steps:
            return list(self.spec.steps)
        kind = self.spec.kind or self.meta.get("kind", "diffusion")
        return [int(self.meta.get("default_steps", 1 if kind == "one_step" else 50))]

    def kind_for(self, steps: int | None) -> str | None:
        if self.is_samples:
            return None
        kind = self.spec.kind or self.meta.get("kind", "diffusion")
        if kind == "one_step" and steps and steps > 1:
            kind = "consistency"  # a one-step student can still be re-noised for more steps
        return kind

    def sampler(self) -> str:
        """diffusion sampler: as asked, else diffdiv.json's, else the model's own stored scheduler."""
        return self.spec.sampler or self.meta.get("default_sampler") or "stored"

    def scheduler_name(self) -> str | None:
        """The diffusers scheduler class diffusion sampling uses (None for students and sample files)."""
        if self.denoiser is None:
            return None
        from diffdiv.sampling import make_scheduler

        return type(make_scheduler(self.denoiser, self.sampler())).__name__

    def guidance_scale(self) -> float | None:
        """The classifier-free guidance scale the model samples with (1: none; students: distilled in)."""
        return None if self.denoiser is None else float(getattr(self.denoiser, "guidance_scale", 1.0))

    def text_conditioned(self) -> bool:
        from diffdiv.models.base import Denoiser

        d = self.denoiser
        return d is not None and type(d).encode_prompts is not Denoiser.encode_prompts

    def cond_for(self, prompts: list[str] | None) -> Any:
        """Condition for these prompts: text embeddings, class labels for digit prompts, else None."""
        d = self.denoiser
        if prompts is None or d is None:
            return None
        if self.text_conditioned():
            with torch.no_grad():
                return d.encode_prompts(prompts)
        if getattr(d, "conditional", False) and all(p.strip().isdigit() for p in prompts):
            return torch.tensor([int(p) for p in prompts], dtype=torch.long)
        return None

    def prompts_for(self, opts: EvalOptions, start: int, size: int) -> list[str] | None:
        """Prompts of samples [start, start + size): --prompts cycled, else those stored with a samples file."""
        if opts.prompts or self.file_prompts is None:
            return opts.prompts_for(start, size)
        return self.file_prompts[start:start + size]

    def n_available(self) -> int | None:
        return len(self.samples) if self.is_samples else None

    def probe(self) -> Tensor:
        """One output in image/data space (for shapes)."""
        if self.is_samples:
            return self.samples[:1]
        d = self.denoiser
        z = torch.zeros(1, *d.sample_shape, device=_device_of(d))
        with torch.no_grad():
            return (d.decode(z) if hasattr(d, "decode") else z).float().cpu()

    def generate(self, start: int, size: int, steps: int | None, seed: int, chunk: int,
                 prompts: list[str] | None, batch_size: int) -> tuple[Tensor, Tensor]:
        """(samples in model space, outputs in image/data space) for indices [start, start + size)."""
        if self.is_samples:
            x = self.samples[start:start + size]
            return x, x
        from diffdiv.sampling import sample

        d = self.denoiser
        times = self.meta.get(f"times_{steps}")
        x = sample(d, size, steps, seed=seed * 1000003 + chunk, sampler=self.sampler(), kind=self.kind_for(steps),
                   cond=self.cond_for(prompts), batch_size=batch_size, times=times)
        if hasattr(d, "decode"):
            dev = _device_of(d)
            with torch.no_grad():
                img = torch.cat([d.decode(x[k:k + 16].to(dev)).float().cpu() for k in range(0, len(x), 16)])
            return x, img
        return x, x


# ----------------------------------------------------------------------------- options
@dataclass
class EvalOptions:
    """Everything but the models: metrics, reference, sizes and auxiliary models."""

    metrics: list[str] = field(default_factory=lambda: ["fid", "precision_recall"])
    ref: str | None = None
    num_samples: int = 1000
    seed: int = 0
    batch_size: int = 250
    features: str | None = None
    prompts: list[str] | None = None
    clip: str | None = None
    guidance_scale: float | None = None
    pr_k: int = 3
    ref_samples: int = 5000  # samples drawn from a mixture reference
    max_pr_samples: int = 10000  # precision/recall: both sets subsampled to min(this, n_ref, n_samples)
    grid: int = 64
    progress: bool = True
    cache_dir: str | None = None
    command: str | None = None  # the command line, recorded in the report

    def validate(self) -> None:
        if self.num_samples < 2:
            raise ConfigError(f"--num-samples must be >= 2, got {self.num_samples}")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.pr_k < 1:
            raise ConfigError(f"--pr-k must be >= 1, got {self.pr_k}")
        for m in self.metrics:
            if m not in KNOWN_METRICS and not m.startswith("reward:"):
                raise ConfigError(f"--metrics: unknown metric '{m}' (fid, precision_recall, mmd, mode_stats, "
                                  "reward:<name>[:key=value...], clip_score)")
        if any(m in FEATURE_METRICS for m in self.metrics) and not self.ref:
            raise ConfigError("--ref is required for fid, precision_recall and mmd")
        if "clip_score" in self.metrics:
            if not self.clip:
                raise ConfigError("clip_score needs --clip <CLIP folder or hub id>")

    def prompts_for(self, start: int, size: int) -> list[str] | None:
        if not self.prompts:
            return None
        return [self.prompts[i % len(self.prompts)] for i in range(start, start + size)]


def as_model_specs(models: Any, steps: Any = None) -> list[ModelSpec]:
    """Normalize the `models` argument of `evaluate` (path, Denoiser, list, {label: model}, ModelSpec)."""
    from diffdiv.models.base import Denoiser

    if isinstance(models, (str, os.PathLike, Denoiser, ModelSpec)):
        models = [models]
    items: list[tuple[str | None, Any]]
    if isinstance(models, Mapping):
        items = list(models.items())
    else:
        items = [(None, m) for m in models]
    specs = []
    for i, (label, m) in enumerate(items):
        if isinstance(m, ModelSpec):
            specs.append(m)
            continue
        if isinstance(m, Denoiser):
            specs.append(ModelSpec(label or f"model{i}", m))
        else:
            lab, path = parse_model_arg(str(m))
            specs.append(ModelSpec(label or lab, path))
    if not specs:
        raise ConfigError("no model to evaluate (--model)")
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"two models share the label '{dup[0]}': name them with --model LABEL=PATH")
    if isinstance(steps, Mapping):
        for s in specs:
            if s.label in steps and not s.steps:
                s.steps = parse_steps(steps[s.label])
    elif steps is not None:
        st = parse_steps(steps)
        for s in specs:
            s.steps = s.steps or st
    return specs


# ----------------------------------------------------------------------------- reference stats
def reference_stats(ref, ext, like: Tensor, opts: EvalOptions, dist: Dist):
    """Reference feature statistics (with features), from the cache or embedded once (sharded) and cached.

    Returned on the main process; None elsewhere.
    """
    from diffdiv.eval.features import extract
    from diffdiv.eval.reference import load_reference_samples, stats_cache_path
    from diffdiv.eval.stats import FeatureStats

    if ref.kind == "stats":
        st = FeatureStats.load(ref.path) if dist.is_main else None
        if st is not None:
            st.check_extractor(ext.id, f"--ref {ref.path}")
        return st
    path = stats_cache_path(ref, ext.id, tuple(like.shape[1:]), opts.ref_samples,
                            Path(opts.cache_dir) if opts.cache_dir else None)
    cached = dist.broadcast(path.is_file() if dist.is_main else None)
    if cached:
        if not dist.is_main:
            return None
        try:
            st = FeatureStats.load(path)
            st.check_extractor(ext.id, f"cached {path}")
            return st
        except ConfigError:
            dist = Dist(None)  # a damaged cache file: the main process embeds again on its own (rare)
    data = load_reference_samples(ref, like, opts.ref_samples)
    res = sharded_map(len(data), 500, lambda c, s, b: {"f": extract(ext, data[s:s + b])}, dist,
                      desc="embedding reference", progress=opts.progress)
    if not dist.is_main:
        return None
    st = FeatureStats.from_features(_cat(res, "f"), ext.id)
    st.save(path)
    return st


# ----------------------------------------------------------------------------- the evaluation
def evaluate(models: Any, metrics: Sequence[str] | str = ("fid", "precision_recall"), ref: str | None = None,
             steps: Any = None, n: int = 1000, out: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Evaluate models at step counts against `ref`; returns the report dict (main process; {} elsewhere).

    models: a path / Denoiser / samples .npz, a list of them, {label: model}, or ModelSpec objects.
    metrics: fid, precision_recall, mmd, mode_stats, reward:<name>[:k=v...], clip_score.
    steps: int, "1,4,10", a list, or {label: steps}; default each model's own.
    options: fields of EvalOptions (features, prompts, clip, seed, batch_size, ...).
    With `out`, writes metrics.json, report.md, comparison.{md,json} and PNGs there.
    """
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    opts = EvalOptions(metrics=list(metrics), ref=ref, num_samples=int(n), **options)
    opts.validate()
    specs = as_model_specs(models, steps)
    dist = Dist.from_env()
    return run_evaluation(specs, opts, dist, Path(out) if out is not None else None)


def _build_rewards(opts: EvalOptions, device: torch.device) -> dict[str, Any]:
    from diffdiv.eval.scores import parse_reward_metric
    from diffdiv.rewards import build_reward

    out = {}
    for m in opts.metrics:
        if m.startswith("reward:"):
            spec = parse_reward_metric(m)
            if "clip_path" not in spec and spec["name"] in ("clip_similarity", "aesthetic") and opts.clip:
                spec["clip_path"] = opts.clip
            r = build_reward(spec).to(device)
            out[m] = r
    return out


def run_evaluation(specs: list[ModelSpec], opts: EvalOptions, dist: Dist, out: Path | None) -> dict[str, Any]:
    """The evaluation proper (every rank runs it; the main process computes metrics and writes files)."""
    from diffdiv.eval.features import build_features, default_feature_spec, extract
    from diffdiv.eval.reference import load_reference_samples, parse_ref

    t_start = time.time()
    refobj = parse_ref(opts.ref) if opts.ref else None
    need_feats = any(m in FEATURE_METRICS for m in opts.metrics)
    metrics = list(opts.metrics)
    if refobj is not None and refobj.kind == "mixture" and "mode_stats" not in metrics:
        metrics.append("mode_stats")
    if "mode_stats" in metrics and (refobj is None or refobj.kind != "mixture"):
        raise ConfigError("mode_stats needs --ref mixture:<config.yaml>")
    if refobj is not None and refobj.kind == "stats" and ("precision_recall" in metrics or "mmd" in metrics):
        from diffdiv.eval.stats import FeatureStats

        if FeatureStats.load(refobj.path).features is None:
            raise ConfigError(f"precision_recall and mmd need reference features; {refobj.path} holds only "
                              "mean/cov (use the samples or the folder as --ref)")
    rewards = _build_rewards(opts, dist.device)
    clip_scorer = None
    if "clip_score" in metrics:
        from diffdiv.eval.scores import ClipScorer
        from diffdiv.rewards.clip import ClipEmbedder

        clip_scorer = ClipScorer(ClipEmbedder.from_pretrained(opts.clip, reward="clip_score").to(dist.device))
    if out is not None and dist.is_main:
        out.mkdir(parents=True, exist_ok=True)

    ext = ref_stats = ref_samples = None
    feature_spec = None
    rows: list[dict[str, Any]] = []
    for spec in specs:
        model = LoadedModel(spec, opts.guidance_scale, dist.device)
        n = opts.num_samples
        if model.is_samples:
            if model.n_available() < 2:
                raise ConfigError(f"--model {spec.source}: needs at least 2 samples")
            n = min(n, model.n_available())
        if need_feats and ext is None:
            probe = model.probe()
            feature_spec = opts.features or default_feature_spec(probe, opts.clip)
            ext = build_features(feature_spec, probe).to(dist.device)
            ref_stats = reference_stats(refobj, ext, probe, opts, dist)
        if dist.is_main and refobj is not None and refobj.kind == "mixture" and ref_samples is None:
            ref_samples = load_reference_samples(refobj, None, opts.ref_samples)
        if model.prompts_for(opts, 0, 1) is None:
            need = [m for m, r in rewards.items() if getattr(r, "needs_prompts", False)]
            need += ["clip_score"] if clip_scorer is not None else []
            if need:
                raise ConfigError(f"{need[0]} needs prompts (--prompts FILE or --prompt TEXT) for model '{spec.label}'")
        for steps in model.steps_list():
            t0 = time.time()
            desc = f"{spec.label}" + (f" @ {steps} steps" if steps else "")

            def chunk_fn(c: int, start: int, size: int, model=model, steps=steps, ext=ext) -> dict[str, Any]:
                prompts = model.prompts_for(opts, start, size)
                x, img = model.generate(start, size, steps, opts.seed, c, prompts, opts.batch_size)
                if img.ndim == 4:
                    img = img.clamp(-1, 1)  # images are scored in the data range, as when saved to 8-bit files
                res: dict[str, Any] = {}
                if ext is not None:
                    res["f"] = extract(ext, img)
                for name, r in rewards.items():
                    with torch.no_grad():
                        res[name] = torch.cat([r(img[k:k + 64].to(dist.device),
                                                 None if prompts is None else prompts[k:k + 64]).double().cpu()
                                               for k in range(0, len(img), 64)])
                if clip_scorer is not None:
                    res["clip_score"] = clip_scorer(img, prompts)
                if start < opts.grid:
                    res["grid"] = img[: max(0, opts.grid - start)].float().cpu()
                if x.ndim == 2:
                    res["x"] = x.float().cpu()
                return res

            results = sharded_map(n, opts.batch_size, chunk_fn, dist, desc=desc, progress=opts.progress)
            elapsed = time.time() - t0
            if not dist.is_main:
                continue
            diffusion = model.kind_for(steps) == "diffusion"
            row = {"label": spec.label, "model": str(spec.source) if not hasattr(spec.source, "forward")
                   else type(spec.source).__name__, "steps": steps, "kind": model.kind_for(steps),
                   "sampler": model.sampler() if diffusion else None,
                   "scheduler": model.scheduler_name() if diffusion else None,
                   "guidance_scale": model.guidance_scale(), "teacher_guidance_scale":
                   model.meta.get("teacher_guidance_scale"), "num_samples": n, "time_s": round(elapsed, 3),
                   "metrics": {}}
            row["metrics"] = compute_metrics(results, metrics, ref_stats, refobj, ref_samples, ext, opts,
                                             model.prompts_for(opts, 0, n))
            row["samples_per_s"] = round(n / max(elapsed, 1e-9), 3)
            if out is not None:
                labels = model.prompts_for(opts, 0, min(n, opts.grid)) \
                    if model.text_conditioned() or model.file_prompts is not None else None
                row["grid"] = _write_grid(results, refobj, ref_samples, out, spec.label, steps, labels)
            rows.append(row)
        if dist.is_main and out is not None and model.path is not None:
            from diffdiv.eval.report import find_training_log

            log = find_training_log(model.path)
            if log is not None:
                for r in rows:
                    if r["label"] == spec.label:
                        r["training_log"] = str(log)
        del model
    if not dist.is_main:
        dist.barrier()
        return {}
    from diffdiv.guards import feature_sample_warnings, warn

    warnings = feature_sample_warnings(rows, None if ext is None else ext.num_features,
                                       None if ref_stats is None else ref_stats.n)
    for w in warnings:
        warn(w)
    report = {
        "reference": None if refobj is None else {"spec": refobj.spec, "description": refobj.describe(),
                                                   "n": None if ref_stats is None else ref_stats.n},
        "features": None if ext is None else {"spec": feature_spec, "id": ext.id, "dim": ext.num_features},
        "metrics": metrics, "num_samples": opts.num_samples, "seed": opts.seed, "batch_size": opts.batch_size,
        "processes": dist.world, "prompts": opts.prompts, "guidance_scale": opts.guidance_scale,
        "warnings": warnings, "rows": rows,
        "total_time_s": round(time.time() - t_start, 3), "command": opts.command,
    }
    if out is not None:
        from diffdiv.eval.report import write_report

        report["files"] = write_report(report, out)
    dist.barrier()
    return report


def compute_metrics(results: list[dict[str, Any]], metrics: list[str], ref_stats, refobj, ref_samples,
                    ext, opts: EvalOptions, prompts: list[str] | None = None) -> dict[str, Any]:
    """Metrics of one (model, steps) row from the gathered per-chunk results (main process)."""
    from diffdiv.eval.scores import summarize

    m: dict[str, Any] = {}
    feats = _cat(results, "f")
    if "fid" in metrics:
        from diffdiv.eval.stats import FeatureStats, fid_from_stats

        m["fid"] = fid_from_stats(ref_stats, FeatureStats.from_features(feats, ext.id, keep=False))
    if "precision_recall" in metrics:
        from diffdiv.eval.manifold import precision_recall

        real, fake = ref_stats.features, feats
        k = min(opts.max_pr_samples, len(real), len(fake))  # equal set sizes, as in Kynkäänniemi et al.
        if min(len(real), len(fake)) <= opts.pr_k:
            raise ConfigError(f"precision_recall with k={opts.pr_k} needs more than {opts.pr_k} samples per set")
        m.update(precision_recall(_subsample(real, k), _subsample(fake, k), opts.pr_k))
    if "mmd" in metrics:
        from diffdiv.eval.manifold import feature_mmd

        m["mmd"] = feature_mmd(ref_stats.features, feats)
    if "mode_stats" in metrics:
        from diffdiv.eval.mixture import mmd_rbf, mode_stats

        x = _cat(results, "x")
        if x is None or x.shape[1] != refobj.mixture.dim:
            raise ConfigError(f"mode_stats: samples are not {refobj.mixture.dim}-d vectors of the mixture")
        st = mode_stats(x, refobj.mixture)
        m.update({"mode_recall": st["recall"], "mode_mass": st["mass"], "mode_weights": st["weights"],
                  "far_fraction": st["far_fraction"], "max_rel_mass_error": st["max_rel_error"],
                  "mmd_rbf": mmd_rbf(ref_samples[:2000], x[:2000])})
    for name in [k for k in metrics if k.startswith("reward:")] + (["clip_score"] if "clip_score" in metrics else []):
        vals = _cat(results, name)
        m[name] = summarize(vals, prompts)
    return m


def _subsample(x: Tensor, k: int) -> Tensor:
    if len(x) <= k:
        return x
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:k]
    return x[idx]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _write_grid(results, refobj, ref_samples, out: Path, label: str, steps: int | None,
                labels: list[str] | None = None) -> str | None:
    grid = _cat(results, "grid")
    if grid is None:
        return None
    name = f"samples_{_safe(label)}" + (f"_{steps}steps" if steps else "") + ".png"
    if grid.ndim == 4:
        from diffdiv.data.images import save_image_grid

        save_image_grid(grid, out / name, labels=labels)
        return name
    x = _cat(results, "x")
    if x is not None and x.shape[1] == 2:
        from diffdiv.eval.plots import scatter_2d

        means = refobj.mixture.means if refobj is not None and refobj.kind == "mixture" else None
        scatter_2d(x, out / name, means, ref_samples, title=f"{label}" + (f", {steps} steps" if steps else ""))
        return name
    return None
