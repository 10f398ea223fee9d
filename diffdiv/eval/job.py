"""`diffdiv eval`: evaluate one or more models at several step counts and write a report.

    diffdiv eval --model runs/x/teacher --steps 1,4,10,50 --metrics fid,precision_recall,reward:digits \
        --ref digits:test --num-samples 2000 --out runs/x/eval
    accelerate launch -m diffdiv.eval.job --model A --model B ...      # split over processes

Several `--model` (optionally `LABEL=PATH`) give one side-by-side table; `--steps` once applies to
every model, or once per model (in order) for per-model step lists.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from diffdiv.config import ConfigError


class _Parser(argparse.ArgumentParser):
    """Argument errors become one-line ConfigErrors (exit status 2) instead of usage dumps."""

    def error(self, message: str):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffdiv eval", exit_on_error=False,
                                description="Evaluate models: FID, precision/recall, MMD, rewards, CLIP score.")
    p.add_argument("--model", action="append", required=True,
                   help="pipeline folder, hub id or samples .npz; LABEL=PATH names it (repeatable)")
    p.add_argument("--steps", action="append", default=None,
                   help="comma-separated step counts, once for all models or once per model (default: the model's)")
    p.add_argument("--metrics", default="fid,precision_recall",
                   help="comma-separated: fid, precision_recall, mmd, mode_stats, reward:<name>[:key=value...], "
                        "clip_score")
    p.add_argument("--ref", default=None, help="digits[:train|test|all], mixture:<config.yaml>, image folder, "
                                               "samples .npz, or a statistics .npz/.safetensors")
    p.add_argument("--features", default=None, help="digits | clip:<path> | inception[:weights] | raw "
                                                    "(default: raw for vectors, digits for 8x8, else clip/inception)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--out", required=True, help="output folder (metrics.json, report.md, comparison.*, PNGs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250, help="chunk size (the sample set depends on it)")
    p.add_argument("--sampler", default=None, help="ddim | ddpm | euler | heun | dpm++ | flow_euler")
    p.add_argument("--kind", default=None, help="diffusion | one_step | consistency (default: from diffdiv.json)")
    p.add_argument("--prompts", default=None, help="prompt file, one per line (cycled over the samples)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    p.add_argument("--clip", default=None, help="CLIP folder or hub id (clip_score, CLIP features/rewards)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--pr-k", type=int, default=3, help="k of the k-NN manifold (precision/recall)")
    p.add_argument("--ref-samples", type=int, default=5000, help="reference samples drawn from a mixture")
    p.add_argument("--grid", type=int, default=64, help="images in each sample grid")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache (default $DIFFDIV_CACHE)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _specs(args: argparse.Namespace):
    from diffdiv.eval.runner import ModelSpec, parse_model_arg, parse_steps

    steps = [parse_steps(s) for s in (args.steps or [])]
    if len(steps) not in (0, 1, len(args.model)):
        raise ConfigError(f"--steps given {len(steps)} times for {len(args.model)} models (give it once, or once "
                          "per model)")
    specs = []
    for i, m in enumerate(args.model):
        label, path = parse_model_arg(m)
        st = steps[0] if len(steps) == 1 else (steps[i] if steps else None)
        specs.append(ModelSpec(label, path, st, kind=args.kind, sampler=args.sampler))
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"two models share the label '{dup[0]}': name them with --model LABEL=PATH")
    return specs


def run(args: argparse.Namespace, command: str | None = None) -> dict:
    from diffdiv.eval.runner import Dist, EvalOptions, run_evaluation

    if args.kind is not None and args.kind not in ("diffusion", "one_step", "consistency"):
        raise ConfigError(f"--kind: '{args.kind}' is not diffusion, one_step or consistency")
    prompts = None
    if args.prompts:
        from diffdiv.data.prompts import load_prompts

        prompts = load_prompts(args.prompts)
    if args.prompt:
        prompts = (prompts or []) + list(args.prompt)
    opts = EvalOptions(metrics=[m.strip() for m in args.metrics.split(",") if m.strip()], ref=args.ref,
                       num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
                       features=args.features, prompts=prompts, clip=args.clip, guidance_scale=args.guidance_scale,
                       pr_k=args.pr_k, ref_samples=args.ref_samples, grid=args.grid, progress=not args.no_progress,
                       cache_dir=args.cache_dir, command=command)
    opts.validate()
    specs = _specs(args)
    if Path(args.out).suffix in (".json", ".md", ".npz"):
        raise ConfigError(f"--out is a folder, got {args.out}")
    return run_evaluation(specs, opts, Dist.from_env(), Path(args.out))


def main(argv: list[str] | None = None) -> int:
    """Entry point (`diffdiv eval ...`, `python -m diffdiv.eval.job ...`); 0 on success, 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        report = run(args, "diffdiv eval " + " ".join(shlex.quote(a) for a in argv))
    except (ConfigError, argparse.ArgumentError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if report:
        from diffdiv.eval.report import results_table

        print(results_table(report["rows"]))
        print(json.dumps({"out": str(Path(args.out)), "files": report.get("files", {})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
