"""Benchmark: rCM vs plain sCM students on the digits teacher (Fréchet distance in the digits-CNN space).

Trains (unless --collect-only) configs/digits_rcm.yaml and configs/digits_scm.yaml (the same recipe with
the DMD weight at 0) from runs/digits_teacher/teacher, then tabulates the Fréchet distance (2000 samples,
seed 0, vs the digits train and test splits, `diffdiv.eval.fid.digits_fid`) of each student at 1, 2 and 4
steps next to the teacher (DDIM) at 50 steps and at the same few step counts. Writes
benchmarks/results/rcm_digits.json and rcm_digits.md.

    OMP_NUM_THREADS=1 python benchmarks/rcm_digits.py [--collect-only] [--runs runs] [key=value ...]

Extra key=value arguments are passed to both training runs (e.g. max_steps=600).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
RUNS = {"rCM (DMD weight 1)": "digits_rcm", "sCM (DMD weight 0)": "digits_scm"}


def launch(config: str, out_dir: Path, teacher: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "train" / "rcm.py"), "--config", str(REPO / "configs" / f"{config}.yaml"),
           f"output_dir={out_dir}", f"teacher.path={teacher}", "progress=false", "overwrite=true", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(out_dir.with_suffix(".log"), "w"),
                            stderr=subprocess.STDOUT)


def teacher_rows(teacher: Path, teacher_metrics: Path, steps: list[int]) -> list[dict]:
    """Teacher DDIM at 50 steps (from its own metrics.json when present) and at the few step counts."""
    import torch

    from diffdiv.data.digits import load_digits_tensor
    from diffdiv.eval.fid import digits_fid
    from diffdiv.models.loading import load_denoiser
    from diffdiv.sampling import sample

    torch.set_num_threads(1)
    rows = []
    tm = json.loads(teacher_metrics.read_text()) if teacher_metrics.is_file() else {}
    model = load_denoiser(teacher).eval()
    train_set, test_set = load_digits_tensor("train"), load_digits_tensor("test")
    for k in sorted(set(steps) | {50}):
        if k == 50 and "fid_vs_train" in tm:
            rows.append({"model": "teacher (DDIM)", "steps": 50, "fd_train": tm["fid_vs_train"],
                         "fd_test": tm["fid_vs_test"], "source": str(teacher_metrics)})
            continue
        x = sample(model, 2000, k, seed=0, sampler="ddim")
        rows.append({"model": "teacher (DDIM)", "steps": k, "fd_train": digits_fid(train_set, x),
                     "fd_test": digits_fid(test_set, x), "source": "computed here"})
    return rows


def student_rows(name: str, run: Path) -> list[dict]:
    m = json.loads((run / "metrics.json").read_text())
    meta = json.loads((run / "student" / "diffdiv.json").read_text())
    rows = []
    for k in (1, 2, 4):
        key = "" if k == 1 else f"_{k}step"
        if f"student_fid_vs_train{key}" not in m:
            continue
        rows.append({"model": name, "steps": k, "fd_train": m[f"student_fid_vs_train{key}"],
                     "fd_test": m[f"student_fid_vs_test{key}"], "times": meta.get(f"times_{k}"),
                     "train_steps": m["steps"], "train_time_s": m["train_time_s"], "run": str(run)})
    return rows


def one_step_rows(path: Path) -> list[dict]:
    """The one-step f-distill / Uni-Instruct students of benchmarks/distill_digits.py, for comparison."""
    if not path.is_file():
        return []
    students = json.loads(path.read_text()).get("students", {})
    return [{"model": f"{name} (benchmarks/distill_digits.py)", "steps": 1, "fd_train": s["fid_train"],
             "fd_test": s["fid_test"], "source": str(path.name)} for name, s in students.items()]


def markdown(res: dict) -> str:
    t50 = next(r for r in res["rows"] if r["model"].startswith("teacher") and r["steps"] == 50)
    lines = ["# rCM vs sCM on the digits teacher", "",
             "Fréchet distance in the digits-CNN feature space (`diffdiv.eval.fid.digits_fid`), 2000 samples, "
             "seed 0, against the digits train split (1438 images) and test split (359). Students sample with "
             "the times stored in their diffdiv.json (`times_<k>`, chosen at export by a small search of the "
             "intermediate noise levels against the train split with a different seed). Ratio = student / "
             "teacher-50-step distance (train split). Target: 2-step rCM within 1.2x.", "",
             "| model | steps | FD vs train | FD vs test | ratio to teacher 50 |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['steps']} | {r['fd_train']:.3f} | {r['fd_test']:.3f} | "
                     f"{r['fd_train'] / t50['fd_train']:.2f}x |")
    lines += ["", "Training runs:", ""]
    for name, info in res["runs"].items():
        lines.append(f"- {name}: `{info['command']}` ({info.get('train_steps', '?')} steps, "
                     f"{info.get('train_time_s', float('nan')) / 60:.1f} min of training on a shared 2-core CPU)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collect-only", action="store_true", help="read existing runs, do not train")
    ap.add_argument("--runs", default="runs", help="parent folder of the run directories")
    ap.add_argument("--teacher", default="runs/digits_teacher/teacher")
    ap.add_argument("--sequential", action="store_true", help="train one run after the other (default: both "
                    "at once, one thread each)")
    ap.add_argument("--train-times", default=None, help="digits_rcm=SECONDS,digits_scm=SECONDS: training time "
                    "when the runs were trained in resumed stages elsewhere (their metrics.json then times only "
                    "the last stage)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    teacher = (REPO / args.teacher).resolve()
    if not (teacher / "model_index.json").is_file():
        sys.exit(f"error: no digits teacher at {teacher} (train it: python train/teacher.py --config "
                 "configs/digits_teacher.yaml)")
    res: dict = {"rows": [], "runs": {}}
    given_times = dict(kv.split("=", 1) for kv in args.train_times.split(",")) if args.train_times else {}
    runs = {name: (REPO / args.runs / cfg).resolve() for name, cfg in RUNS.items()}
    if not args.collect_only:
        t0 = time.time()
        procs = []
        for name, cfg in RUNS.items():
            procs.append(launch(cfg, runs[name], teacher, args.overrides))
            if args.sequential:
                procs[-1].wait()
        codes = [p.wait() for p in procs]
        if any(codes):
            sys.exit(f"error: a training run failed (exit codes {codes}); see {runs[name].parent}/*.log")
        res["wall_time_s"] = time.time() - t0
    for name, cfg in RUNS.items():
        run = runs[name]
        cmd = (f"python train/rcm.py --config configs/{cfg}.yaml output_dir={run} teacher.path={teacher} "
               + " ".join(args.overrides)).strip()
        rows = student_rows(name, run)
        for r in rows:
            if cfg in given_times:
                r["train_time_s"] = float(given_times[cfg])
        res["rows"] += rows
        res["runs"][name] = {"command": cmd, "train_steps": rows[0]["train_steps"] if rows else None,
                             "train_time_s": rows[0]["train_time_s"] if rows else float("nan")}
    res["rows"] = teacher_rows(teacher, teacher.parent / "metrics.json", [1, 2, 4]) + res["rows"]
    res["rows"] += one_step_rows(OUT / "distill_digits.json")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rcm_digits.json").write_text(json.dumps(res, indent=2))
    (OUT / "rcm_digits.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
