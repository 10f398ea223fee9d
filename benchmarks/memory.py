"""Benchmark: the memory plan of every real-scale recipe, and the activation model against measured peaks.

1. Activation model check (this CPU): a tiny diffusers UNet2DConditionModel training step (forward +
   backward, batch 2) at latent sizes 8, 16 (the fit) and 24 (held out), fp32, bf16 autocast, and with
   diffusers' `enable_gradient_checkpointing()`. Peak live tensor bytes are measured with
   `diffdiv.plan.LiveTensorBytes` (storages created in the step, gradients excluded); S is the bytes
   autograd saves for backward, counted on the meta device. The plan fits peak = a + k S on the first
   two sizes and predicts the third, and predicts the checkpointing saving as S_ckpt / S.
2. Plan table (8 x 80 GB): every `configs/{sd15,sdxl,sd3,wan21}_*.yaml` under DDP-8, FSDP2-8 and
   LoRA (DDP-8), whether it fits as configured, and the first switch set that makes it fit; plus the
   Wan 2.1 14B architecture under the Wan rCM recipe.
3. Placeholders for the measured FSDP2/LoRA rows (filled once the trainer switches exist).
Writes benchmarks/results/memory.json and memory.md.

    OMP_NUM_THREADS=1 python benchmarks/memory.py [--gpus 8] [--gpu-mem-gb 80]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from diffdiv import plan as P

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results"
PREFIXES = ("sd15_", "sdxl_", "sd3_", "wan21_")
EXTRA = [("configs/wan21_t2v_rcm.yaml", "wan21_t2v_14b")]
HELD_OUT = 24
PENDING = [
    "FSDP2 on GPUs (NCCL, bf16 blocks): not run (no device); on CPU/gloo `tests/test_fsdp.py` measures each rank's "
    "local shard at 0.500 of every sharded network (0.501 / 0.499 for the 48k-parameter value net)",
]


def state_bytes(tr) -> dict[str, float]:
    """Measured bytes a trainer holds after one step: unique parameter storages (teacher + every trained network,
    shared storages once), AdamW state, EMA shadows; and the plan's byte rules for the same parameters."""
    seen: dict[int, int] = {}
    for m in [*tr.frozen.values(), *(n.module for n in tr.nets.values())]:
        for p in m.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    opt = sum(v.numel() * v.element_size() for n in tr.nets.values() if n.optimizer is not None
              for st in n.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim > 0)
    ema = sum(sum(t.numel() * t.element_size() for t in n.ema.shadow_params) for n in tr.nets.values()
              if n.ema is not None)
    trained = {id(p): p for n in tr.nets.values() if n.optimizer is not None for p in n.params}
    n_trained = sum(p.numel() for p in trained.values())
    n_ema = sum(sum(p.numel() for p in n.params) for n in tr.nets.values() if n.ema is not None)
    measured = sum(seen.values()) + opt + ema
    frozen_bytes = sum(seen.values()) - sum(p.numel() * p.element_size() for p in trained.values())
    predicted = frozen_bytes + n_trained * (P.MASTER_BYTES + P.ADAM_BYTES) + n_ema * P.EMA_BYTES
    return {"measured": float(measured), "predicted": float(predicted), "trained_params": n_trained}


def lora_student_check(root: Path) -> dict:
    """Tiny-SD f-distill: full student + fake score vs LoRA students (adapters on the teacher), one step each."""
    from diffdiv.config import load_config
    from diffdiv.models.tiny import build_tiny_sd
    from diffdiv.trainers.fdistill import FDistillTrainer

    teacher = build_tiny_sd(root / "tiny_sd")
    out = {}
    for label, extra in [("full", []), ("lora r4", ["student.lora.enabled=true", "student.lora.rank=4"])]:
        cfg = load_config(FDistillTrainer.config_cls, ROOT / "configs" / "tiny_sd_fdistill_js.yaml",
                          [f"teacher.path={teacher}", f"output_dir={root / label.replace(' ', '_')}", "max_steps=1",
                           "log_with=null", "progress=false", "checkpoint_every=0", "eval_samples=0", *extra])
        tr = FDistillTrainer(cfg)
        tr.train()
        out[label] = state_bytes(tr)
    return out


def activation_check() -> dict:
    cal = P.calibrate(with_checkpointing=True)
    held = P.calibration_point(HELD_OUT, with_checkpointing=True)
    rows = []
    for p in cal.points + [held]:
        pred32 = cal.a_fp32 + cal.k_fp32 * p.saved
        pred_amp = cal.a_amp + cal.k_amp * p.saved
        pred_ck = cal.a_fp32 + cal.k_fp32 * p.saved_ckpt
        rows.append({
            "latent": p.latent, "fit": p.latent != HELD_OUT, "saved_S": p.saved, "saved_S_ckpt": p.saved_ckpt,
            "peak_fp32": p.peak_fp32, "peak_amp": p.peak_amp, "peak_ckpt": p.peak_ckpt,
            "pred_fp32": pred32, "pred_amp": pred_amp, "pred_ckpt": pred_ck,
            "ckpt_ratio_measured": p.peak_ckpt / p.peak_fp32, "ckpt_ratio_predicted_S": p.saved_ckpt / p.saved,
            "ckpt_ratio_predicted_with_a": pred_ck / pred32,
            "amp_ratio_measured": p.peak_amp / p.peak_fp32, "amp_ratio_model": cal.k_amp / cal.k_fp32,
        })
    return {"k_fp32": cal.k_fp32, "a_fp32": cal.a_fp32, "k_amp": cal.k_amp, "a_amp": cal.a_amp, "rows": rows,
            "model": P.TINY_UNET, "batch": P.CALIB_BATCH}


def recipes() -> list[tuple[str, str | None]]:
    paths = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name.startswith(PREFIXES))
    return [(str(p.relative_to(ROOT)), None) for p in paths] + EXTRA


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.chdir(ROOT)  # recipe paths relative to the repository in the tables
    t0 = time.time()
    act = activation_check()
    t_act = time.time() - t0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        lora_check = lora_student_check(Path(tmp))
    rows = []
    for path, arch in recipes():
        out = P.run_plan(path, args.gpus, args.gpu_mem_gb, arch)
        by = {p["label"].split(" (")[0]: p for p in out["plans"]}
        ddp = next(p for p in out["plans"] if p["scenario"]["strategy"] == "ddp" and
                   p["scenario"]["lora"] == out["plans"][0]["scenario"]["lora"])
        fsdp = next(p for p in out["plans"] if p["scenario"]["strategy"] == "fsdp2")
        lora = next(p for p in out["plans"] if p["scenario"]["strategy"] == "ddp" and p["scenario"]["lora"])
        rows.append({"recipe": path, "arch": out["arch"], "shape": out["shape"], "by_label": by,
                     "configured": out["plans"][0], "ddp": ddp, "fsdp2": fsdp, "lora": lora, "fit": out["fit"],
                     "fit_overrides": out["fit_overrides"], "activation_formula": out["activation_formula"],
                     "params": out["params"], "lora_params": out["lora_params"], "text": out["text"]})
    result = {"gpus": args.gpus, "gpu_mem_gb": args.gpu_mem_gb, "reserved_gb": P.GPU_RESERVED_BYTES / P.GB,
              "activation_check": act, "lora_check": lora_check, "recipes": rows, "pending": PENDING,
              "seconds": time.time() - t0,
              "seconds_activation_check": t_act, "torch": torch.__version__, "machine": platform.machine()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "memory.json").write_text(json.dumps(result, indent=1, default=str))
    (OUT / "memory.md").write_text(markdown(result))
    print((OUT / "memory.md").read_text())


def markdown(r: dict) -> str:
    g, mem = r["gpus"], r["gpu_mem_gb"]
    a = r["activation_check"]
    mb = 2**20
    lines = [
        "# Memory plan of the real-scale recipes",
        "",
        f"`python benchmarks/memory.py` ({r['seconds']:.0f} s on CPU; torch {r['torch']}). Per GPU, GB = 1e9 bytes; "
        f"a plan fits when total + {r['reserved_gb']:.0f} GB (CUDA context, NCCL, allocator slack) <= {mem:g} GB.",
        "",
        "## Activation model (measured on this CPU)",
        "",
        f"Tiny `UNet2DConditionModel` {a['model']['block_out_channels']}, batch {a['batch']}, one forward + "
        "backward. S = bytes autograd saves for backward, counted on the meta device with flash-style attention "
        "(equal to the count on real CPU tensors, tested). Peak = live bytes of storages made in the step "
        "(gradients excluded). Fit on latents 8 and 16: "
        f"peak = {a['a_fp32'] / mb:.2f} MB + {a['k_fp32']:.3f} S (fp32), "
        f"peak = {a['a_amp'] / mb:.2f} MB + {a['k_amp']:.3f} S (bf16 autocast). The plan uses k S (the intercept "
        "is the tiny model's weight-gradient temporaries, which do not scale).",
        "",
        "| latent | role | S MB | S ckpt MB | peak fp32 MB (pred) | peak bf16 MB (pred) | peak ckpt MB (pred) | "
        "ckpt/plain measured | predicted S_ckpt/S | predicted incl. a |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in a["rows"]:
        lines.append(
            f"| {row['latent']} | {'fit' if row['fit'] else 'held out'} | {row['saved_S'] / mb:.2f} | "
            f"{row['saved_S_ckpt'] / mb:.2f} | {row['peak_fp32'] / mb:.2f} ({row['pred_fp32'] / mb:.2f}) | "
            f"{row['peak_amp'] / mb:.2f} ({row['pred_amp'] / mb:.2f}) | {row['peak_ckpt'] / mb:.2f} "
            f"({row['pred_ckpt'] / mb:.2f}) | {row['ckpt_ratio_measured']:.3f} | "
            f"{row['ckpt_ratio_predicted_S']:.3f} | {row['ckpt_ratio_predicted_with_a']:.3f} |")
    lines += [
        "",
        "Activations of a real recipe: `k * S(architecture, resolution, gradient checkpointing) * local batch * "
        "forwards alive at the peak phase` (e.g. f-distill's generator step keeps the generator's and the fake "
        "score's activations: 2). An estimate: transients of no-grad forwards (teacher, JVP, VAE encode) are not "
        "counted, and k comes from a 2-level UNet on CPU.",
        "",
        f"## Plan at {g} x {mem:g} GB",
        "",
        "| recipe | method | architecture | DDP-8 GB | FSDP2-8 GB | LoRA (DDP-8) GB | fits as configured | "
        "switch that fits | GB/GPU with it |",
        "|---|---|---|---:|---:|---:|---|---|---:|",
    ]
    for row in r["recipes"]:
        name = row["recipe"] + ("" if row["arch"] != "wan21_t2v_14b" else " (--arch wan21_t2v_14b)")
        fit = row["fit"]
        conf_fits = fit is not None and not row["fit_overrides"]
        fit_gb = f"{fit['total_gb']:.1f}" if fit else "-"
        switch = "-" if conf_fits else ("none found" if fit is None else "`" + " ".join(row["fit_overrides"]) + "`")
        lines.append(
            f"| {name} | {row['shape']} | {row['arch']} | {row['ddp']['total_gb']:.1f} | {row['fsdp2']['total_gb']:.1f}"
            f" | {row['lora']['total_gb']:.1f} | {'yes' if conf_fits else 'no'} | {switch} | "
            f"{fit_gb} |")
    lines += [
        "",
        "Columns use each recipe's own batch_size, gradient checkpointing off and frozen dtype as written; the "
        "LoRA column trains the student/policy through LoRA adapters (rank from the config, default 64 for "
        "distillation students) with the fake score still full. Reward recipes (DPOK, IPRO, ROCM) already use "
        "LoRA: their DDP and LoRA columns coincide.",
        "",
        "## LoRA students (measured on this CPU)",
        "",
        "Tiny-SD f-distill after one step (`configs/tiny_sd_fdistill_js.yaml`): bytes of the unique parameter "
        "storages of teacher + trained networks, AdamW state and EMA shadows; predicted = the plan's byte rules "
        "(frozen bytes + 12 B per trained parameter + 4 B per EMA'd parameter; gradients are freed after the step).",
        "",
        "| students | trained params | measured MB | plan's rule MB | ratio to full (measured) | ratio (rule) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    full = r["lora_check"]["full"]
    for label, row in r["lora_check"].items():
        lines.append(f"| {label} | {row['trained_params']:,} | {row['measured'] / mb:.2f} | "
                     f"{row['predicted'] / mb:.2f} | {row['measured'] / full['measured']:.3f} | "
                     f"{row['predicted'] / full['predicted']:.3f} |")
    lines += [
        "",
        "## Not measured here",
        "",
    ]
    lines += [f"- {p}" for p in r["pending"]]
    lines += ["", "## Per-recipe plans", ""]
    for row in r["recipes"]:
        lines += ["```", row["text"], "```", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
