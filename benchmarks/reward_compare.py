"""DPOK vs IPRO-style K-step backprop vs ROCM vs DI* on one tiny text-to-image pipeline, one reward (JPEG
compressibility), one wall-clock training budget; each with the default divergence weight and with 0.

    OMP_NUM_THREADS=1 python benchmarks/reward_compare.py [--budget 150] [--methods dpok,ipro,rocm,di_star]

Writes benchmarks/results/reward_compare.{json,md,png}. The recipes are configs/tiny_sd_<method>.yaml;
the pipeline is diffdiv.models.tiny.build_tiny_sd(seed 0), optionally pre-trained for a few minutes
(--pretrain-steps) so that the reference is a real (if tiny) text-conditional distribution.
DPOK trains on the true JPEG size; the differentiable methods train on the library's DCT surrogate and
report the true JPEG size as eval_reward. Divergences (see the markdown notes): MMD^2 of pixels between
fine-tuned and reference samples from the same noise/prompts, and each method's own path divergence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("dpok", "ipro", "rocm", "di_star")
LABELS = {"dpok": "DPOK (policy gradient)", "ipro": "IPRO (K-step backprop)", "rocm": "ROCM (consistency, 4 steps)",
          "di_star": "DI* (one-step)"}


def trainer_class(method: str):
    if method == "dpok":
        from diffdiv.trainers.dpok import DPOKTrainer as T
    elif method == "ipro":
        from diffdiv.trainers.ipro import IPROTrainer as T
    elif method == "rocm":
        from diffdiv.trainers.rocm import ROCMTrainer as T
    else:
        from diffdiv.trainers.di_star import DIStarTrainer as T
    return T


def pretrain_tiny_sd(path: Path, steps: int, seed: int = 0) -> None:
    """Denoising score matching of the tiny SD UNet on digits rendered as 32x32 RGB images, captioned by class."""
    from diffdiv.data.digits import load_digits_tensor
    from diffdiv.models.loading import load_denoiser, save_denoiser

    model = load_denoiser(path)
    x, y = load_digits_tensor("train", return_labels=True)
    names = "zero one two three four five six seven eight nine".split()
    gray = (torch.nn.functional.interpolate(x, size=32, mode="bilinear") + 1) / 2  # [0, 1]
    colors = torch.tensor([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.3, 0.4, 1.0]])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lat = []
        for c in range(3):
            img = gray * colors[c].view(1, 3, 1, 1) * 2 - 1
            lat.append(torch.cat([model.encode_images(img[i:i + 256], generator=g) for i in range(0, len(img), 256)]))
        lat = torch.stack(lat)  # (3, N, 4, 8, 8)
        prompts = [f"a {c} digit {names[k]}" for c in ("red", "green", "blue") for k in range(10)]
        conds = model.encode_prompts(prompts)
    unet = model.trainable
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    sch = model.schedule
    for step in range(steps):
        i = torch.randint(lat.shape[1], (64,), generator=g)
        c = torch.randint(3, (64,), generator=g)
        x0 = lat[c, i]
        cond = conds[(c * 10 + y[i]).tolist()]
        drop = torch.rand(64, generator=g) < 0.1  # classifier-free guidance: 10% unconditional
        null = model.null_cond().repeat_interleave(64)
        cond.embeds[drop] = null.embeds[drop]
        t = sch.t_min + (sch.t_max - sch.t_min) * torch.rand(64, generator=g)
        a, s = sch.alpha_sigma(t)
        eps = torch.randn(x0.shape, generator=g)
        x_t = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
        pred = model.network_output(x_t, t, cond)
        loss = ((pred - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0:
            print(f"pretrain {step}: {loss.item():.4f}", flush=True)
    unet.eval()
    save_denoiser(model, path, {"kind": "diffusion", "default_steps": 10, "pretrained_on": "digits (32x32 RGB)"})


def prompt_list() -> list[str]:
    names = "zero one two three four five six seven eight nine".split()
    return [f"a {c} digit {names[k]}" for c in ("red", "green", "blue") for k in (0, 3, 7)]


def run_one(method: str, weight: float | None, pipe: Path, out: Path, budget: float, eval_every: float,
            extra: list[str], max_steps: int | None = None) -> dict:
    """Train one recipe: for `budget` seconds of training, or exactly `max_steps` steps when given."""
    from diffdiv.config import load_config

    T = trainer_class(method)
    key = "teacher.path" if method == "di_star" else "model.path"
    stop = [f"max_steps={max_steps}", "max_train_time_s=0"] if max_steps else \
        ["max_steps=1000000", f"max_train_time_s={budget}"]
    overrides = [f"{key}={pipe}", f"output_dir={out}", *stop, f"eval_every_s={eval_every}", "checkpoint_every=0",
                 "log_with=null", "progress=false", "overwrite=true", "log_every=5",
                 f"cond.prompt_list={json.dumps(prompt_list())}", *extra]
    if weight is not None:
        overrides.append(f"div_weight={weight}")
    cfg = load_config(T.config_cls, ROOT / "configs" / f"tiny_sd_{method}.yaml", overrides)
    t0 = time.time()
    trainer = T(cfg)
    metrics = trainer.train()
    hist = json.loads((out / "eval_history.json").read_text())
    return {"method": method, "div_weight": cfg.div_weight, "final": metrics, "eval_history": hist,
            "train_history": trainer.history, "wall_s": time.time() - t0}


def true_reward(m: dict) -> tuple[float, float]:
    """(reference, fine-tuned) true JPEG reward (-kB): eval_reward for surrogate-trained methods."""
    if "eval_reward_policy" in m:
        return m["eval_reward_reference"], m["eval_reward_policy"]
    return m["reward_reference"], m["reward_policy"]


def method_div(method: str, m: dict) -> str:
    if method in ("dpok", "ipro", "rocm"):
        return f"path KL {m.get('path_kl', float('nan')):.3g} nats"
    return f"score div. est. {m.get('score_div_est', float('nan')):.3g}"


def write_outputs(rows: list[dict], out_dir: Path, args) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reward_compare.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=1))
    pre = f"UNet pre-trained {args.pretrain_steps} steps on captioned colored digits" if args.pretrain_steps \
        else "random weights"
    lines = [
        "# Reward fine-tuning side by side: DPOK, IPRO, ROCM, DI*",
        "",
        f"Tiny SD pipeline ({pre}), "
        f"reward = JPEG compressibility (minus the quality-95 JPEG size in kB of the decoded 32x32 image), "
        f"{args.budget:.0f} s of training per method at its default divergence weight (evaluation excluded), then "
        "the same number of steps with the divergence weight at 0; 1 CPU thread on a shared 2-core machine "
        "(timings under contention from other jobs). Command: `OMP_NUM_THREADS=1 python "
        f"benchmarks/reward_compare.py --budget {args.budget:g} --pretrain-steps {args.pretrain_steps}`.",
        "",
        "| method | div. weight | steps | train s (no eval) | true JPEG reward: reference -> fine-tuned (gain +- s.e.) "
        "| train-reward gain | MMD^2 to reference | diversity ratio | method's own divergence |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["final"]
        ref, pol = true_reward(m)
        sem = m.get("eval_reward_policy_sem", m.get("reward_policy_sem", 0.0))
        secs = r["eval_history"][-1]["train_time_s"]
        lines.append(
            f"| {LABELS[r['method']]} | {r['div_weight']:g} | {m['steps']} | {secs:.0f} "
            f"| {ref:.4f} -> {pol:.4f} "
            f"({pol - ref:+.4f} +- {sem:.4f}) | {m['reward_gain']:+.4g} | {m.get('mmd2', float('nan')):.4f} "
            f"| {m.get('diversity_ratio', float('nan')):.2f} | {method_div(r['method'], m)} |")
    lines += [
        "",
        "How the divergence is measured:",
        "- MMD^2: unbiased RBF-kernel MMD^2 between 64 decoded fine-tuned images and 64 reference images "
        "generated from the same noise and prompts (bandwidth: median distance between reference images). "
        "The reference is the pretrained pipeline with the method's own sampler: DDIM-10 eta=1 (DPOK), "
        "DDIM-10 eta=0 (IPRO), the 4-step consistency chain (ROCM), the CFG teacher with DDIM-10 (DI*).",
        "- path KL (DPOK, IPRO): exact KL between the fine-tuned and reference DDIM(eta=1) path measures, the "
        "sum over the 10 steps of the closed-form per-step Gaussian KL along the fine-tuned model's own "
        "trajectories (chain rule), in nats, summed over the 4x8x8 latent elements.",
        "- path KL (ROCM): the same for the 4-step consistency chain (the last step compared after re-noising "
        "to log-SNR 2).",
        "- DI*: a one-step generator has no path measure; its estimate E_t d_PH(D_p - D_q) uses the learned "
        "fake score and is only indicative.",
        "- diversity ratio: mean pairwise pixel distance of the fine-tuned samples over that of the reference "
        "samples; well below 1 = mode collapse (the usual face of reward hacking here).",
        "- train-reward gain: the gain in the reward each method optimizes (true JPEG for DPOK, the DCT surrogate "
        "for the others).",
        "",
        "A method is working when it raises the reward while its regularized run keeps the divergence below "
        "the unregularized (weight 0) run's. Curves: reward_compare.png.",
    ]
    (out_dir / "reward_compare.md").write_text("\n".join(lines) + "\n")
    plot(rows, out_dir / "reward_compare.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    colors = {"dpok": "C0", "ipro": "C1", "rocm": "C2", "di_star": "C3"}
    for r in rows:
        h = r["eval_history"]
        t = [e["train_time_s"] for e in h]
        gain = [true_reward(e)[1] - true_reward(e)[0] for e in h]
        mmd = [e.get("mmd2", float("nan")) for e in h]
        kl = [e.get("path_kl", float("nan")) for e in h]
        ls = "-" if r["div_weight"] > 0 else "--"
        lab = f"{r['method']} w={r['div_weight']:g}"
        axes[0].plot(t, gain, ls, color=colors[r["method"]], label=lab, marker=".")
        axes[1].plot(t, mmd, ls, color=colors[r["method"]], label=lab, marker=".")
        if r["method"] != "di_star":
            axes[2].plot(t, kl, ls, color=colors[r["method"]], label=lab, marker=".")
        div = [e.get("diversity_ratio", float("nan")) for e in h]
        axes[3].plot(t, div, ls, color=colors[r["method"]], label=lab, marker=".")
    axes[0].set_title("true JPEG reward gain (-kB) vs training time")
    axes[1].set_title("MMD^2 to the reference samples")
    axes[2].set_title("path KL to the reference (nats)")
    axes[2].set_yscale("symlog", linthresh=1e-2)
    axes[3].set_title("diversity ratio (fine-tuned / reference)")
    for ax in axes:
        ax.set_xlabel("training time (s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_sweep(spec: str, pipe: Path, work: Path, out_dir: Path, budget: float) -> None:
    """Dose-response of the regularizer: `method:key=v1,v2,...;method:key=...`, each run `budget` seconds."""
    rows = []
    cache_file = work / "sweep_rows.json"
    done = json.loads(cache_file.read_text()) if cache_file.is_file() else []
    for part in spec.split(";"):
        method, _, kv = part.partition(":")
        key, _, values = kv.partition("=")
        for v in values.split(","):
            tag = f"{method}:{key}={v}@{budget:g}"
            found = [r for r in done if r["tag"] == tag]
            if found:
                rows.append(found[0])
                continue
            print(f"=== sweep {tag}", flush=True)
            r = run_one(method, None, pipe, work / f"sweep_{method}_{key}_{v}", budget, budget / 3, [f"{key}={v}"])
            r.update(tag=tag, key=key, value=float(v))
            r.pop("train_history", None)
            done.append(r)
            rows.append(r)
            cache_file.write_text(json.dumps(done))
    (out_dir / "reward_compare_sweep.json").write_text(json.dumps({"spec": spec, "budget": budget, "runs": rows},
                                                                   indent=1))
    lines = ["# Regularizer dose-response (tiny SD, JPEG compressibility)", "",
             f"Each run: {budget:g} s of training from the same pre-trained tiny SD, one setting changed from the "
             "recipe (configs/tiny_sd_<method>.yaml). Command: `OMP_NUM_THREADS=1 python "
             f"benchmarks/reward_compare.py --sweep '{spec}' --sweep-budget {budget:g}`. Timings under contention.",
             "", "| method | setting | steps | true JPEG gain (+- s.e.) | MMD^2 | diversity ratio "
             "| path KL / score div. |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["final"]
        ref, pol = true_reward(m)
        sem = m.get("eval_reward_policy_sem", m.get("reward_policy_sem", 0.0))
        div = m.get("path_kl", m.get("score_div_est", float("nan")))
        mmd, dr = m.get("mmd2", float("nan")), m.get("diversity_ratio", float("nan"))
        lines.append(f"| {r['method']} | {r['key']}={r['value']:g} | {m['steps']} | {pol - ref:+.4f} +- {sem:.4f} "
                     f"| {mmd:.4f} | {dr:.2f} | {div:.3g} |")
    (out_dir / "reward_compare_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per run")
    p.add_argument("--eval-every", type=float, default=30.0, help="training seconds between evaluations")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--work", default=str(ROOT / "runs" / "reward_compare"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--sweep", default=None, help="e.g. 'ipro:div_weight=0,0.01;di_star:reward_weight=0.1,1'")
    p.add_argument("--sweep-budget", type=float, default=90.0)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work)
    pipe = work / f"tiny_sd_pre{args.pretrain_steps}"
    if not (pipe / "model_index.json").is_file():
        from diffdiv.models.tiny import build_tiny_sd

        build_tiny_sd(pipe, seed=0)
        if args.pretrain_steps:
            pretrain_tiny_sd(pipe, args.pretrain_steps)
    if args.sweep:
        run_sweep(args.sweep, pipe, work, Path(args.out), args.sweep_budget)
        return
    rows = []
    res_file = work / "rows.json"
    done = json.loads(res_file.read_text()) if res_file.is_file() else []

    def cached(method: str, tag: str) -> dict | None:
        found = [r for r in done if r["method"] == method and r.get("tag") == tag and r.get("budget") == args.budget]
        return found[0] if found else None

    for method in args.methods.split(","):
        # the default-weight run gets the wall-clock budget; the weight-0 run gets exactly as many steps
        r = cached(method, "default")
        if r is None:
            print(f"=== {method} default divergence weight, {args.budget:g} s", flush=True)
            r = run_one(method, None, pipe, work / f"{method}_default", args.budget, args.eval_every, [])
            r.update(tag="default", budget=args.budget)
            done.append(r)
            res_file.write_text(json.dumps(done))
        rows.append(r)
        r0 = cached(method, "zero")
        if r0 is None:
            steps = int(r["final"]["steps"])
            print(f"=== {method} divergence weight 0, {steps} steps", flush=True)
            r0 = run_one(method, 0.0, pipe, work / f"{method}_zero", args.budget, args.eval_every, [], max_steps=steps)
            r0.update(tag="zero", budget=args.budget)
            done.append(r0)
            res_file.write_text(json.dumps(done))
        rows.append(r0)
    write_outputs(rows, Path(args.out), args)
    print((Path(args.out) / "reward_compare.md").read_text())


if __name__ == "__main__":
    main()
