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
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("sample", help="draw samples from a teacher or student folder", exit_on_error=False)
    s.add_argument("--model", required=True, help="pipeline folder (or hub id)")
    s.add_argument("--num-samples", type=_positive("--num-samples"), default=64)
    s.add_argument("--steps", type=_positive("--steps"), default=None,
                   help="sampling steps (default: the model's own; 1-4 for students)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output .npz (images also get a .png grid)")
    s.add_argument("--sampler", default=None, help="ddim | ddpm | euler | heun | dpm++ | flow_euler")
    s.add_argument("--kind", default=None, help="diffusion | one_step | consistency (default: from diffdiv.json)")
    s.add_argument("--prompt", action="append", default=None, help="text prompt (repeatable)")
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
    from diffdiv.models.loading import load_denoiser, read_meta
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
    sampler = args.sampler or meta.get("default_sampler", "ddim")
    times = [float(t) for t in args.times.split(",")] if args.times else meta.get(f"times_{steps}")
    model = load_denoiser(args.model, guidance_scale=args.guidance_scale)
    model.eval()
    prompts = _resolve_prompts(args, args.num_samples)
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
    np.savez(out, **payload)
    info: dict[str, Any] = {"out": str(out), "num_samples": len(x), "steps": steps, "kind": kind,
                            "sampler": sampler if kind == "diffusion" else None}
    if images is not None:
        from diffdiv.data.images import save_image_grid

        png = out.with_suffix(".png")
        save_image_grid(images[:64], png)
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
