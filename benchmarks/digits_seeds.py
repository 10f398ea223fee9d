"""Seed spread of the digits Fréchet distance: each model sampled with several seeds, FD mean and spread.

    OMP_NUM_THREADS=2 python benchmarks/digits_seeds.py teacher=runs/digits_teacher/teacher:50 \
        rcm=runs/digits_rcm/student:1,2,4 fdistill=runs/digits_fdistill_js/student:1 --seeds 0,1,2

LABEL=FOLDER:STEPS[,STEPS...]; diffusion teachers sample with DDIM, students with their stored times.
Writes benchmarks/results/digits_seeds.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="LABEL=FOLDER:STEPS[,STEPS]")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "digits_seeds"))
    args = ap.parse_args()

    from diffdiv.data.digits import load_digits_tensor
    from diffdiv.eval.fid import digits_fid
    from diffdiv.eval.runner import LoadedModel, ModelSpec
    from diffdiv.sampling import sample

    seeds = [int(s) for s in args.seeds.split(",")]
    train_x, test_x = load_digits_tensor("train"), load_digits_tensor("test")
    rows = []
    for spec in args.models:
        label, rest = spec.split("=", 1)
        folder, steps = rest.rsplit(":", 1)
        m = LoadedModel(ModelSpec(label, folder))  # the sampler, kind and stored times `diffdiv eval` would use
        for k in (int(s) for s in steps.split(",")):
            fd_train, fd_test = [], []
            for seed in seeds:
                x = sample(m.denoiser, args.samples, k, seed=seed, sampler=m.sampler(), kind=m.kind_for(k),
                           times=m.meta.get(f"times_{k}"))
                fd_train.append(digits_fid(train_x, x))
                fd_test.append(digits_fid(test_x, x))
            rows.append({"model": label, "folder": folder, "steps": k, "seeds": seeds, "fd_train": fd_train,
                         "fd_test": fd_test})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    ref = next((r for r in rows if r["model"] == "teacher" and r["steps"] == 50), None)
    ref_mean = statistics.mean(ref["fd_train"]) if ref else None
    md = ["# Digits Fréchet distance across sampling seeds", "",
          f"{args.samples} samples per seed, seeds {seeds}, digits-CNN features; mean ± sample std over seeds "
          "(per-seed values in digits_seeds.json). Ratio = mean FD vs train / the 50-step teacher's mean.", "",
          "| model | steps | FD vs train | FD vs test | per-seed FD vs train | ratio to teacher 50 |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        m, s = statistics.mean(r["fd_train"]), statistics.stdev(r["fd_train"]) if len(seeds) > 1 else 0.0
        mt, st = statistics.mean(r["fd_test"]), statistics.stdev(r["fd_test"]) if len(seeds) > 1 else 0.0
        ratio = f"{m / ref_mean:.2f}x" if ref_mean else "-"
        md.append(f"| {r['model']} | {r['steps']} | {m:.2f} ± {s:.2f} | {mt:.2f} ± {st:.2f} | "
                  f"{', '.join(f'{v:.2f}' for v in r['fd_train'])} | {ratio} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
