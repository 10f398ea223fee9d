"""`diffdiv` console entry: sample, eval, info, plan."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffdiv.config import ConfigError
from diffdiv.models.base import Denoiser


def _positive(kind: str):
    def parse(v: str) -> int:
        try:
            i = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind} must be an integer, got '{v}'") from None
        if i <= 0:
            raise argparse.ArgumentTypeError(f"{kind} must be positive, got {i}")
        return i

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffdiv", description="Distill and reward-fine-tune diffusion models.",
                                exit_on_error=False)
    p.add_argument("--version", action="version", version=f"diffdiv {version()}")
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("sample", help="draw samples from a teacher or student folder", exit_on_error=False)
    s.add_argument("--model", required=True, help="pipeline folder (or hub id)")
    s.add_argument("--num-samples", type=_positive("--num-samples"), default=64)
    s.add_argument("--steps", type=_positive("--steps"), default=None,
                   help="sampling steps (default: the model's own; 1-4 for students)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output .npz (images also get a .png grid)")
    s.add_argument("--sampler", default=None,
                   help="stored | ddim | ddpm | euler | heun | dpm++ | flow_euler (default: diffdiv.json's, else "
                        "the model's own scheduler class)")
    s.add_argument("--scheduler-set", action="append", default=None, metavar="KEY=VALUE",
                   help="override a stored scheduler setting for diffusion sampling, e.g. timestep_spacing=trailing "
                        "(repeatable; printed and recorded in the output)")
    s.add_argument("--kind", default=None, help="diffusion | one_step | consistency (default: from diffdiv.json)")
    s.add_argument("--prompt", action="append", default=None,
                   help="text prompt (repeatable; required for text-to-image models, --prompt '' for unconditional)")
    s.add_argument("--prompts", default=None, help="prompt file, one per line")
    s.add_argument("--guidance-scale", type=float, default=None)
    s.add_argument("--class-label", type=int, default=None)
    s.add_argument("--batch-size", type=_positive("--batch-size"), default=256)
    s.add_argument("--times", default=None, help="comma-separated model times for consistency sampling")

    i = sub.add_parser("info", help="describe a model folder", exit_on_error=False)
    i.add_argument("--model", required=True)

    pl = sub.add_parser("plan", help="memory per GPU of a recipe (weights, grads, AdamW, EMA, activations)",
                        exit_on_error=False)
    pl.add_argument("--config", required=True, help="recipe YAML")
    pl.add_argument("--gpus", type=_positive("--gpus"), default=8)
    pl.add_argument("--gpu-mem-gb", type=float, default=80.0)
    pl.add_argument("--arch", default=None, help="stored architecture (diffdiv/models/arch) if the path names none")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    sub.add_parser("eval", help="evaluate models (FID, precision/recall, rewards); see `diffdiv eval -h`",
                   add_help=False)
    return p


def version() -> str:
    """The installed package version (the source tree's pyproject.toml when not installed)."""
    try:
        from importlib.metadata import version as dist_version

        return dist_version("diffdiv")
    except Exception:
        import re

        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        return m.group(1) if m else "unknown"


def parse_scheduler_settings(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings -> {key: YAML-parsed value} (true/false/numbers/null as in configs)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--scheduler-set: expected KEY=VALUE, got '{item}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_scheduler_settings(model: Any, settings: dict[str, Any]) -> dict[str, list[Any]]:
    """Override the model's stored scheduler config in place; {key: [stored, new]} for the record."""
    cfg = getattr(model, "scheduler_config", None)
    if cfg is None:
        raise ConfigError("--scheduler-set: this model has no stored diffusers scheduler config")
    changed = {}
    for k, v in settings.items():
        changed[k] = [cfg.get(k), v]
        cfg[k] = v
    return changed


def _resolve_prompts(args: argparse.Namespace, n: int) -> list[str] | None:
    prompts: list[str] | None = None
    if args.prompts:
        from diffdiv.data.prompts import load_prompts

        prompts = load_prompts(args.prompts)
    if args.prompt:
        prompts = (prompts or []) + list(args.prompt)
    if prompts is None:
        return None
    return [prompts[k % len(prompts)] for k in range(n)]


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    from diffdiv.models.loading import TEXT2IMG_PIPELINES, load_denoiser, read_meta, read_model_index
    from diffdiv.sampling import sample

    out = Path(args.out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out must end in .npz, got {out}")
    if not Path(args.model).exists() and args.model.count("/") != 1:
        raise ConfigError(f"--model: {args.model} does not exist")
    meta = read_meta(args.model) if Path(args.model).exists() else {}
    kind = args.kind or meta.get("kind", "diffusion")
    steps = args.steps or meta.get("default_steps", 1 if kind == "one_step" else 50)
    if kind == "one_step" and steps != 1:
        kind = "consistency"  # a one-step student can still be re-noised for more steps
    sampler = args.sampler or meta.get("default_sampler") or "stored"
    times = [float(t) for t in args.times.split(",")] if args.times else meta.get(f"times_{steps}")
    settings = parse_scheduler_settings(args.scheduler_set)
    if settings and kind != "diffusion":
        raise ConfigError(f"--scheduler-set applies to diffusion sampling; this is a {kind} model (use --times)")
    prompts = _resolve_prompts(args, args.num_samples)
    need_prompt = ConfigError(f"{args.model} is a text-to-image model: pass --prompt TEXT (repeatable) or --prompts "
                              "FILE (--prompt '' for unconditional samples)")
    if prompts is None and read_model_index(args.model).get("_class_name") in TEXT2IMG_PIPELINES:
        raise need_prompt  # before loading it
    model = load_denoiser(args.model, guidance_scale=args.guidance_scale)
    model.eval()
    if prompts is None and type(model).encode_prompts is not Denoiser.encode_prompts:
        raise need_prompt
    overrides = apply_scheduler_settings(model, settings) if settings else {}
    for k, (old, new) in overrides.items():
        print(f"note: scheduler setting {k} = {new!r} (stored: {old!r})", file=sys.stderr, flush=True)
    scheduler = None
    if kind == "diffusion":
        from diffdiv.sampling import make_scheduler

        scheduler = type(make_scheduler(model, sampler)).__name__
    cond = None
    if prompts is not None:
        cond = model.encode_prompts(prompts)
    elif args.class_label is not None:
        cond = torch.full((args.num_samples,), args.class_label, dtype=torch.long)
    x = sample(model, args.num_samples, steps, seed=args.seed, sampler=sampler, kind=kind, cond=cond,
               batch_size=args.batch_size, times=times, progress=True)
    images = None
    if hasattr(model, "decode"):
        with torch.no_grad():
            images = torch.cat([model.decode(x[k:k + 16]) for k in range(0, len(x), 16)]).float().cpu()
    elif x.ndim == 4:
        images = x
    out.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"samples": x.numpy()}
    if images is not None and images is not x:
        payload["images"] = images.numpy()
    if prompts is not None:
        payload["prompts"] = np.array(prompts)
    info: dict[str, Any] = {"out": str(out), "num_samples": len(x), "steps": steps, "kind": kind,
                            "sampler": sampler if kind == "diffusion" else None, "scheduler": scheduler,
                            "scheduler_overrides": {k: v[1] for k, v in overrides.items()} or None,
                            "times": times if kind != "diffusion" else None, "seed": args.seed,
                            "guidance_scale": float(getattr(model, "guidance_scale", 1.0))}
    payload["meta"] = np.array(json.dumps(info))  # how these samples were drawn
    np.savez(out, **payload)
    if images is not None:
        from diffdiv.data.images import save_image_grid

        png = out.with_suffix(".png")
        save_image_grid(images[:64], png, labels=prompts[:64] if prompts is not None else None)
        info["grid"] = str(png)
    elif x.ndim == 2 and x.shape[1] == 2:
        from diffdiv.eval.plots import scatter_2d

        png = out.with_suffix(".png")
        scatter_2d(x, png, title=f"{kind}, {steps} steps")
        info["plot"] = str(png)
    print(json.dumps(info))
    return info


def cmd_info(args: argparse.Namespace) -> None:
    from diffdiv.models.hub import read_model_index
    from diffdiv.models.loading import read_meta

    index = read_model_index(args.model)
    meta = read_meta(args.model)
    comps = {k: v for k, v in index.items() if not k.startswith("_")}
    print(json.dumps({"pipeline": index.get("_class_name"), "components": comps, "diffdiv": meta}, indent=2))


def cmd_plan(args: argparse.Namespace) -> None:
    from diffdiv.plan import run_plan

    out = run_plan(args.config, args.gpus, args.gpu_mem_gb, args.arch)
    print(json.dumps(out, indent=1) if args.json else out["text"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        from diffdiv.eval.job import main as eval_main

        return eval_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "sample":
            cmd_sample(args)
        elif args.command == "info":
            cmd_info(args)
        elif args.command == "plan":
            cmd_plan(args)
        return 0
    except (ConfigError, argparse.ArgumentError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
