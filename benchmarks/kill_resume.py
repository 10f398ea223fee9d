"""Kill a training run with SIGKILL at random moments, resume it, and compare with an uninterrupted run.

    python benchmarks/kill_resume.py --trials 5
    python benchmarks/kill_resume.py --job train/fdistill.py --config configs/toy_fdistill_js.yaml --trials 3

Writes benchmarks/results/kill_resume.{json,md}: runs tried, kills delivered, runs bitwise identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TOY_TEACHER = ["data.kind=mixture", "data.mixture.num_modes=4", "model.kind=mlp", "model.hidden=64",
               "model.depth=2", "batch_size=64", "lr=1e-3", "warmup_steps=10", "eval_samples=0", "log_with=null",
               "progress=false", "max_steps=300", "checkpoint_every=20", "keep_last=2", "log_every=10"]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(p for p in out.rglob("*.safetensors") if "checkpoints" not in p.parts)
    if not files:
        raise RuntimeError(f"no exported weights under {out}")
    w: dict[str, torch.Tensor] = {}
    for f in files:
        w.update({f"{f.relative_to(out)}:{k}": v for k, v in load_file(str(f)).items()})
    return w


def run_cmd(job: str, config: str | None, extra: list[str], out: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / job)]
    if config:
        cmd += ["--config", str(ROOT / config)]
    return cmd + extra + [f"output_dir={out}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="train/teacher.py")
    ap.add_argument("--config", default=None)
    ap.add_argument("--overrides", nargs="*", default=None)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--kills-per-trial", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kill_resume"))
    args = ap.parse_args()
    extra = args.overrides if args.overrides is not None else (TOY_TEACHER if args.config is None else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill_resume_"))
    try:
        ref_out = work / "reference"
        t0 = time.time()
        subprocess.run(run_cmd(args.job, args.config, extra, ref_out), env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ref_time = time.time() - t0
        ref = final_weights(ref_out)
        rows = []
        for trial in range(args.trials):
            out = work / f"trial{trial}"
            kills = []
            for _ in range(args.kills_per_trial):
                delay = rng.uniform(0.3, 0.9) * ref_time
                p = subprocess.Popen(run_cmd(args.job, args.config, extra, out), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    p.wait(timeout=delay)
                    kills.append(None)  # finished before the kill
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    kills.append(round(delay, 2))
            r = subprocess.run(run_cmd(args.job, args.config, extra, out), env=env, capture_output=True, text=True)
            ok = r.returncode == 0
            identical = False
            max_diff = None
            if ok:
                w = final_weights(out)
                identical = w.keys() == ref.keys() and all(torch.equal(w[k], ref[k]) for k in ref)
                max_diff = max(float((w[k].double() - ref[k].double()).abs().max()) for k in ref) if \
                    w.keys() == ref.keys() else None
            rows.append({"trial": trial, "kill_times_s": kills, "resumed_ok": ok, "identical": identical,
                         "max_abs_diff": max_diff, "stderr_tail": "" if ok else r.stderr[-300:]})
            print(json.dumps(rows[-1]), flush=True)
        summary = {"job": args.job, "config": args.config, "overrides": extra, "reference_time_s": ref_time,
                   "runs_tried": len(rows),
                   "kills_delivered": sum(k is not None for r in rows for k in r["kill_times_s"]),
                   "runs_identical": sum(r["identical"] for r in rows), "rows": rows}
        out_base = Path(args.out)
        out_base.parent.mkdir(parents=True, exist_ok=True)
        out_base.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        lines = [f"# Kill / resume ({args.job} {args.config or 'toy teacher'})", "",
                 f"Uninterrupted run: {ref_time:.1f} s. Each trial SIGKILLs the run {args.kills_per_trial} times at "
                 "random moments (30-90% of the reference time, saves included), then resumes to the end.", "",
                 "| trial | kill times (s) | resumed | bitwise identical | max abs diff |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['trial']} | {r['kill_times_s']} | {r['resumed_ok']} | {r['identical']} | "
                         f"{r['max_abs_diff']} |")
        lines += ["", f"**runs tried: {summary['runs_tried']}, kills delivered: {summary['kills_delivered']}, "
                      f"runs identical: {summary['runs_identical']}**"]
        out_base.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
