"""Throw bad inputs at the training jobs and the CLI; record the exit status and what each printed.

    python benchmarks/bad_inputs.py

Every case runs as its own process (the way a user runs it). A case passes when the process exits with status 2,
stderr is exactly one line starting with `error: `, it names the problem, and the output folder given to it is
untouched. Writes benchmarks/results/bad_inputs.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TEACHER = [PY, "train/teacher.py", "--config", "configs/digits_teacher.yaml"]
TOY_FD = [PY, "train/fdistill.py", "--config", "configs/toy_fdistill_js.yaml"]
DIFFDIV = [PY, "-m", "diffdiv.cli"]


def cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(description, argv with {out} for the output folder, text the one-line error must contain)."""
    empty_prompts = tmp / "empty_prompts.txt"
    empty_prompts.write_text("\n\n")
    broken = tmp / "broken_images"
    broken.mkdir(exist_ok=True)
    (broken / "a.png").write_bytes(b"not a png")
    from diffdiv.models.tiny import build_tiny_sd

    tiny_sd = build_tiny_sd(tmp / "tiny_sd")  # a valid model, so that the case's own problem is the one reported
    done = tmp / "done"
    done.mkdir(exist_ok=True)
    (done / "metrics.json").write_text('{"keep": 1}')
    launch = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "0", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [
        ("unknown config key", [*TEACHER, "output_dir={out}", "learning_rate=1"], "unknown config key"),
        ("negative learning rate", [*TEACHER, "output_dir={out}", "lr=-1e-3"], "lr must be a positive number"),
        ("wrong type", [*TEACHER, "output_dir={out}", "max_steps=ten"], "expected an integer"),
        ("zero batch size", [*TEACHER, "output_dir={out}", "batch_size=0"], "batch_size must be > 0"),
        ("empty mixture weights", [*TOY_FD, "output_dir={out}", "teacher.mixture.weights=[]"], "weights"),
        ("negative mixture std", [*TOY_FD, "output_dir={out}", "teacher.mixture.stds=[-0.15" + ",0.15" * 7 + "]"],
         "std"),
        ("unknown divergence", [*TOY_FD, "output_dir={out}", "divergence=kl2"], "kl2"),
        ("missing teacher path", [PY, "train/fdistill.py", "--config", "configs/digits_fdistill_js.yaml",
                                  "output_dir={out}", "teacher.path=/nonexistent/teacher"], "/nonexistent/teacher"),
        ("image size not divisible by the UNet downsampling",
         [*TEACHER, "output_dir={out}", "data.image_size=10", "model.block_out_channels=[8,16,16]"], "divisible"),
        ("missing image folder", [*TEACHER, "output_dir={out}", "data.kind=image_folder",
                                  "data.path=/nonexistent/images"], "image folder not found"),
        ("unreadable image", [*TEACHER, "output_dir={out}", "data.kind=image_folder", f"data.path={broken}",
                              "data.image_size=8", "model.block_out_channels=[8,16]"], "cannot read image"),
        ("empty prompt file", [PY, "train/dpok.py", "--config", "configs/tiny_sd_dpok.yaml", "output_dir={out}",
                               f"model.path={tiny_sd}", f"cond.prompts={empty_prompts}", "cond.prompt_list=null"],
         "prompt"),
        ("missing config file", [PY, "train/teacher.py", "--config", "/nonexistent.yaml", "output_dir={out}"],
         "config file not found"),
        ("existing results are not overwritten", [*TOY_FD, f"output_dir={done}"], "already holds results"),
        ("rCM: unknown jvp mode", [PY, "train/rcm.py", "--config", "configs/digits_rcm.yaml", "output_dir={out}",
                                   "jvp=magic"], "jvp"),
        ("ROCM: unknown f-divergence", [PY, "train/rocm.py", "--config", "configs/tiny_sd_rocm.yaml",
                                        "output_dir={out}", f"model.path={tiny_sd}", "divergence=foo"], "foo"),
        ("under accelerate launch (2 processes)",
         [*launch, "train/teacher.py", "--config", "configs/digits_teacher.yaml", "output_dir={out}", "lr=-1"],
         "lr must be a positive number"),
        ("CLI sample: missing model", [*DIFFDIV, "sample", "--model", "/nonexistent/model", "--num-samples", "4",
                                       "--steps", "1", "--seed", "0", "--out", "{out}/s.npz"], "/nonexistent/model"),
        ("CLI sample: zero steps", [*DIFFDIV, "sample", "--model", "configs", "--num-samples", "4", "--steps", "0",
                                    "--seed", "0", "--out", "{out}/s.npz"], "steps"),
        ("CLI eval: unknown metric", [*DIFFDIV, "eval", "--model", "/nonexistent/model", "--metrics", "fidd",
                                      "--out", "{out}"], "fidd"),
        ("CLI eval: empty prompt file", [*DIFFDIV, "eval", "--model", "/nonexistent/model", "--metrics",
                                         "clip_score", "--prompts", str(empty_prompts), "--out", "{out}"], "prompt"),
    ]


def run_case(desc: str, argv: list[str], needle: str, tmp: Path, idx: int) -> dict:
    out = tmp / f"out_{idx}"
    argv = [a.replace("{out}", str(out)) for a in argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true")
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    launched = "accelerate.commands.launch" in argv
    one_line = first.startswith("error: ") and (launched or len(lines) == 1)
    ok = p.returncode in ((2, 1) if launched else (2,)) and one_line and needle in first and not out.exists()
    return {"case": desc, "command": " ".join(Path(a).name if a == PY else a for a in argv).replace(str(tmp), "$TMP"),
            "exit": p.returncode, "stderr_lines": len(lines), "first_line": first.replace(str(tmp), "$TMP"),
            "expected_text": needle, "output_untouched": not out.exists(), "ok": ok,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bad_inputs"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i, (desc, argv, needle) in enumerate(cases(tmp)):
            rows.append(run_case(desc, argv, needle, tmp, i))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    md = ["# Bad inputs: what each printed", "",
          "`python benchmarks/bad_inputs.py`; each case is its own process. ok = exit status 2, stderr is one line "
          "`error: ...` naming the problem, and the output folder is untouched. Under `accelerate launch` the "
          "child's line is printed first; the launcher then adds its own trace of the failed child and exits 1.", "",
          "| case | exit | stderr lines | first line printed | ok |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['exit']} | {r['stderr_lines']} | `{r['first_line']}` | "
                  f"{'yes' if r['ok'] else 'NO'} |")
    md += ["", f"{sum(r['ok'] for r in rows)} of {len(rows)} cases as specified. Commands are in bad_inputs.json."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} ok -> {out.with_suffix('.md')}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
