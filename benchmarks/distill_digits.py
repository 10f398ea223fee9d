"""Quality per step and sampling speed on digits: one-step students (f-distill JS, Uni-Instruct FKL) vs the teacher.

Trains both students with their recipes (`train/fdistill.py --config configs/digits_fdistill_js.yaml`,
`train/uni_instruct.py --config configs/digits_uni_instruct_fkl.yaml`, two at a time, one thread each) unless
--skip-train, then in ONE process: Fréchet distance in the digits-CNN feature space (diffdiv.eval.fid.digits_fid)
of 2000 samples against the train and the test split for the teacher at 1, 4, 10, 50 DDIM steps and for each
1-step student; and images per second of the 1-step student vs the 50-step teacher (same batch size, same
process, best of 3 repeats).

    OMP_NUM_THREADS=1 python benchmarks/distill_digits.py [--teacher runs/digits_teacher/teacher] [overrides]
writes benchmarks/results/distill_digits.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JOBS = {"fdistill_js": ("train/fdistill.py", "configs/digits_fdistill_js.yaml"),
        "uni_instruct_fkl": ("train/uni_instruct.py", "configs/digits_uni_instruct_fkl.yaml")}


def train(out: Path, teacher: str, overrides: list[str]) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {}
    for name, (script, cfg) in JOBS.items():
        cmd = [sys.executable, str(ROOT / script), "--config", str(ROOT / cfg), f"teacher.path={teacher}",
               f"output_dir={out / name}", "progress=false", "overwrite=true", "resume=null", *overrides]
        procs[name] = (subprocess.Popen(cmd, env=env, stdout=open(out / f"{name}.log", "w"),
                                        stderr=subprocess.STDOUT), time.time())
    wall = {}
    for name, (p, t0) in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"{name} failed, see {out / (name + '.log')}")
        wall[name] = time.time() - t0
    return wall


def images_per_second(fn, n: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=str(ROOT / "runs/digits_teacher/teacher"))
    ap.add_argument("--out", default=str(ROOT / "runs/bench_digits"))
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--train-times", default=None, help="name=seconds,... when the students were trained elsewhere")
    ap.add_argument("--speed-batch", type=int, default=500)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both recipes")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall = {} if args.skip_train else train(out, args.teacher, args.overrides)

    from diffdiv.data.digits import load_digits_tensor
    from diffdiv.eval.fid import digits_fid
    from diffdiv.models.loading import load_denoiser, read_meta
    from diffdiv.sampling import sample

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train_x, test_x = load_digits_tensor("train"), load_digits_tensor("test")
    teacher = load_denoiser(args.teacher).eval()
    rows, res = [], {"teacher": {}, "students": {}, "reference_fid_train_vs_test": digits_fid(train_x, test_x)}
    for steps in (1, 4, 10, 50):
        x = sample(teacher, args.samples, steps, seed=0, sampler="ddim")
        res["teacher"][steps] = {"fid_train": digits_fid(train_x, x), "fid_test": digits_fid(test_x, x)}
        rows.append((f"teacher DDIM {steps} steps", res["teacher"][steps], None))
    t50 = res["teacher"][50]["fid_train"]
    students = {}
    for name in JOBS:
        d = out / name / "student"
        meta = read_meta(d)
        m = load_denoiser(d).eval()
        students[name] = (m, meta)
        x = sample(m, args.samples, 1, seed=0, kind="consistency", times=meta.get("times_1"))
        mf = out / name / "metrics.json"
        metrics = json.loads(mf.read_text()) if mf.is_file() else {}
        st = {"fid_train": digits_fid(train_x, x), "fid_test": digits_fid(test_x, x),
              "train_time_s": metrics.get("train_time_s"), "steps": metrics.get("steps"), "wall_s": wall.get(name)}
        st["ratio_to_teacher50"] = st["fid_train"] / t50
        res["students"][name] = st
        rows.append((f"{name} student, 1 step", st, st["train_time_s"]))
    if args.train_times:  # measured elsewhere (e.g. a staged run): name=seconds
        for kv in args.train_times.split(","):
            k, v = kv.split("=")
            res["students"][k]["train_time_s"] = float(v)
        rows = [(lab, st, st.get("train_time_s")) for lab, st, _ in rows]
    # speed: one process, same batch
    b = args.speed_batch
    m, meta = students["fdistill_js"]
    with torch.no_grad():
        ips_student = images_per_second(
            lambda n: sample(m, n, 1, seed=1, kind="consistency", times=meta.get("times_1"), batch_size=b), b)
        ips_teacher = images_per_second(lambda n: sample(teacher, n, 50, seed=1, sampler="ddim", batch_size=b), b)
    res["speed"] = {"student_1step_img_per_s": ips_student, "teacher_50step_img_per_s": ips_teacher,
                    "speedup": ips_student / ips_teacher, "batch": b, "threads": torch.get_num_threads()}
    lines = ["| model | FD vs train | FD vs test | FD / teacher-50 (train) | train time (s) |", "|---|---|---|---|---|"]
    for label, st, tt in rows:
        lines.append(f"| {label} | {st['fid_train']:.2f} | {st['fid_test']:.2f} | {st['fid_train'] / t50:.2f} | "
                     f"{'' if tt is None else f'{tt:.0f}'} |")
    sp = res["speed"]
    md = ("# Digits: quality per step and sampling speed\n\n"
          f"`OMP_NUM_THREADS=1 python benchmarks/distill_digits.py {' '.join(args.overrides)}`; "
          f"{args.samples} samples per model, Fréchet distance in the digits-CNN feature space "
          f"(reference: train vs test split = {res['reference_fid_train_vs_test']:.2f}). Train times were "
          "measured with other jobs sharing the 2 cores.\n\n" + "\n".join(lines) + "\n\n"
          f"Sampling speed (one process, batch {b}, {sp['threads']} thread(s), best of 3): 1-step student "
          f"{sp['student_1step_img_per_s']:.0f} img/s, 50-step teacher {sp['teacher_50step_img_per_s']:.1f} img/s, "
          f"speedup {sp['speedup']:.1f}x.\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_digits.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "distill_digits.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
