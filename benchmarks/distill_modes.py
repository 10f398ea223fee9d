"""Mode coverage of one-step f-distill students on the imbalanced 8-component mixture (weights 0.02 .. 0.30).

Runs `train/fdistill.py --config configs/toy_fdistill_<div>.yaml` for rkl, fkl, js, jeffreys (two at a time, one
thread each), then draws 20000 one-step samples from each saved student with `diffdiv sample` and reports the
per-mode mass (fraction of samples within 3 component stds of a mode), the mass relative to the true weight,
recall (modes receiving >= 25% of their share) and the fraction of samples far from every mode.

    OMP_NUM_THREADS=1 python benchmarks/distill_modes.py [--steps N] [--out runs/bench_modes]
writes benchmarks/results/distill_modes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DIVS = ("rkl", "fkl", "js", "jeffreys")


def run(div: str, out: Path, steps: int | None) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train" / "fdistill.py"), "--config",
           str(ROOT / f"configs/toy_fdistill_{div}.yaml"), f"output_dir={out / div}", "progress=false",
           "overwrite=true", "resume=null"]
    if steps:
        cmd.append(f"max_steps={steps}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=open(out / f"{div}.log", "w"), stderr=subprocess.STDOUT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_modes"))
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    if not args.skip_train:
        pending = list(DIVS)
        running: dict[str, tuple[subprocess.Popen, float]] = {}
        while pending or running:
            while pending and len(running) < 2:
                d = pending.pop(0)
                running[d] = (run(d, out, args.steps), time.time())
            for d, (p, t0) in list(running.items()):
                if p.poll() is not None:
                    if p.returncode != 0:
                        raise SystemExit(f"{d} failed, see {out / (d + '.log')}")
                    times[d] = time.time() - t0
                    del running[d]
            time.sleep(2)

    from diffdiv.config import load_config
    from diffdiv.data.mixtures import build_mixture
    from diffdiv.eval.mixture import mmd_rbf, mode_stats
    from diffdiv.trainers.fdistill import FDistillConfig

    mix = build_mixture(load_config(FDistillConfig, ROOT / "configs/toy_fdistill_js.yaml").teacher.mixture)
    res: dict = {"weights": mix.weights.tolist(), "students": {}}
    for d in DIVS:
        npz = out / f"{d}_samples.npz"
        subprocess.run([sys.executable, "-m", "diffdiv.cli", "sample", "--model", str(out / d / "student"),
                        "--steps", "1", "--num-samples", "20000", "--seed", "1", "--out", str(npz)],
                       check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        x = torch.from_numpy(np.load(npz)["samples"]).double()
        st = mode_stats(x, mix)
        metrics = json.loads((out / d / "metrics.json").read_text())
        st["mmd"] = mmd_rbf(mix.sample(3000, torch.Generator().manual_seed(5)).double(), x[:3000])
        st["train_time_s"] = metrics["train_time_s"]
        st["wall_s"] = times.get(d)
        st["within_30pct"] = bool(all(abs(r - 1) <= 0.30 for r in st["relative_mass"]))
        res["students"][d] = st
    w = res["weights"]
    lines = ["| divergence | " + " | ".join(f"mode {k} (w={w[k]:.2f})" for k in range(len(w)))
             + " | recall | far | max rel. err | all within 30% | MMD | train s |",
             "|---|" + "---|" * len(w) + "---|---|---|---|---|---|"]
    for d, st in res["students"].items():
        cells = [f"{m:.3f} ({r:.2f})" for m, r in zip(st["mass"], st["relative_mass"])]
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {st['recall']:.2f} | {st['far_fraction']:.3f} | "
                     f"{st['max_rel_error']:.2f} | {'yes' if st['within_30pct'] else 'no'} | {st['mmd']:.4f} | "
                     f"{st['train_time_s']:.0f} |")
    steps = f"max_steps={args.steps}" if args.steps else "config max_steps"
    md = ("# Mode coverage of one-step students (imbalanced 8-mode mixture)\n\n"
          f"`OMP_NUM_THREADS=1 python benchmarks/distill_modes.py` ({steps}); cells: mass (mass / true weight), "
          "20000 samples from `diffdiv sample --steps 1`. Train time measured with other jobs sharing the 2 cores.\n\n"
          + "\n".join(lines) + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_modes.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "distill_modes.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
