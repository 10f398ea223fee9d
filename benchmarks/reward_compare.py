"""Reward gain per second of DPOK, IPRO, ROCM and DI* against a DDPO-style baseline, on tiny SD pipelines.

    OMP_NUM_THREADS=1 python benchmarks/reward_compare.py [--budget 60] [--seeds 0,1,2] [--pretrain-steps 0,1500]

Every method trains its shipped recipe (configs/tiny_sd_<method>.yaml; only the pipeline, prompts, seed, time
budget and evaluation are overridden) for `budget` seconds of training (evaluation excluded) per seed; the
reference row is `benchmarks/ddpo_baseline.py` (policy gradient, PPO clip, no KL, full UNet, diffusers only).
Reward = JPEG compressibility (minus the quality-95 JPEG size in kB; the differentiable methods train on the
DCT surrogate and are scored on the true size). Each pipeline is `diffdiv.models.tiny.build_tiny_sd(seed 0)`,
with random weights (--pretrain-steps 0) or pre-trained on captioned colored digits. Reported per method:
the true reward gain over the initial model on 32 fixed noises, gain per training second (mean +- sd over
seeds), the drift at that gain (`paired_mse`: mean squared pixel difference to the initial model's image from
the same noise and prompt), and the gain per second at no larger drift than the baseline's (read off the
evaluation curve). Writes benchmarks/results/reward_compare.{json,md,png}.
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

METHODS = ("ddpo", "dpok", "ipro", "rocm", "di_star")
LABELS = {"ddpo": "DDPO-style baseline (reference)", "dpok": "DPOK (policy gradient + KL)",
          "ipro": "IPRO (K-step backprop)", "rocm": "ROCM (consistency, 4 steps)", "di_star": "DI* (one-step)"}
RANDOM_PROMPTS = ["a cat", "a dog"]


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




def digit_prompts() -> list[str]:
    names = "zero one two three four five six seven eight nine".split()
    return [f"a {c} digit {names[k]}" for c in ("red", "green", "blue") for k in (0, 3, 7)]


def run_one(method: str, pipe: Path, out: Path, budget: float, eval_every: float, prompts: list[str], seed: int,
            extra: list[str] | None = None) -> dict:
    """One recipe (or the DDPO baseline) for `budget` training seconds; its evaluation curve and final metrics."""
    t0 = time.time()
    if method == "ddpo":
        from ddpo_baseline import train as ddpo_train

        res = ddpo_train(str(pipe), budget, seed=seed, prompts=prompts, eval_every=eval_every)
        hist = res["eval_history"]
        return {"method": method, "seed": seed, "steps": res["steps"], "final": hist[-1], "eval_history": hist,
                "config": res["config"], "wall_s": time.time() - t0}
    from diffdiv.config import load_config

    T = trainer_class(method)
    key = "teacher.path" if method == "di_star" else "model.path"
    overrides = [f"{key}={pipe}", f"output_dir={out}", "max_steps=1000000", f"max_train_time_s={budget}",
                 f"eval_every_s={eval_every}", "checkpoint_every=0", "log_with=null", "progress=false",
                 "overwrite=true", "log_every=5", f"seed={seed}", "eval_samples=32", "eval_batch=32",
                 f"cond.prompt_list={json.dumps(prompts)}", *(extra or [])]
    cfg = load_config(T.config_cls, ROOT / "configs" / f"tiny_sd_{method}.yaml", overrides)
    trainer = T(cfg)
    metrics = trainer.train()
    hist = json.loads((out / "eval_history.json").read_text())
    return {"method": method, "seed": seed, "steps": metrics["steps"], "final": metrics, "eval_history": hist,
            "div_weight": cfg.div_weight, "wall_s": time.time() - t0}


def true_reward(m: dict) -> tuple[float, float]:
    """(reference, fine-tuned) true JPEG reward (-kB): eval_reward for surrogate-trained methods."""
    if "eval_reward_policy" in m:
        return m["eval_reward_reference"], m["eval_reward_policy"]
    return m["reward_reference"], m["reward_policy"]


def curve(run: dict) -> list[tuple[float, float, float]]:
    """(training seconds, true reward gain since the first evaluation, drift) at each evaluation. The first
    evaluation is at step 0: gain 0 except for DI*, whose one-step generator starts apart from its reference
    (the teacher's DDIM samples)."""
    out = []
    for e in run["eval_history"]:
        ref, pol = true_reward(e)
        out.append((float(e["train_time_s"]), pol - ref, float(e["paired_mse"])))
    g0 = out[0][1]
    return [(t, g - g0, d) for t, g, d in out]


def rate_at_drift(points: list[tuple[float, float, float]], drift: float) -> float:
    """Gain per second where the evaluation curve first reaches `drift` (linear between evaluations, from the
    first); the final gain per second if it never does (its drift stays lower)."""
    prev = points[0]
    for t, g, d in points[1:]:
        if d >= drift:
            f = (drift - prev[2]) / (d - prev[2]) if d > prev[2] else 1.0
            ts, gs = prev[0] + f * (t - prev[0]), prev[1] + f * (g - prev[1])
            return gs / max(ts, 1e-9)
        prev = (t, g, d)
    t, g, _ = points[-1]
    return g / max(t, 1e-9)


def mean_sd(v: list[float]) -> tuple[float, float]:
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(v) > 1 else 0.0


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per method: gain, gain/s, drift (mean, sd over seeds) and the gain/s at no larger drift than the baseline."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    out: dict[str, dict] = {}
    base_drift = None
    if "ddpo" in by:
        base_drift = mean_sd([curve(r)[-1][2] for r in by["ddpo"]])[0]
    for method, rs in by.items():
        pts = [curve(r) for r in rs]
        s = {"seeds": [r["seed"] for r in rs], "steps": mean_sd([r["steps"] for r in rs]),
             "train_s": mean_sd([p[-1][0] for p in pts]), "gain": mean_sd([p[-1][1] for p in pts]),
             "gain_per_s": mean_sd([p[-1][1] / max(p[-1][0], 1e-9) for p in pts]),
             "drift": mean_sd([p[-1][2] for p in pts]),
             "reference": mean_sd([true_reward(r["final"])[0] for r in rs]),
             "train_gain": mean_sd([float(r["final"]["reward_gain"]) for r in rs]),
             "diversity_ratio": mean_sd([float(r["final"].get("diversity_ratio", float("nan"))) for r in rs])}
        if base_drift is not None:
            s["gain_per_s_at_base_drift"] = mean_sd([rate_at_drift(p, base_drift) for p in pts])
        out[method] = s
    if "ddpo" in out and base_drift is not None:
        b = out["ddpo"]["gain_per_s_at_base_drift"][0]
        for s in out.values():
            s["x_baseline"] = s["gain_per_s_at_base_drift"][0] / b if b > 0 else float("nan")
    return out


def fmt(ms: tuple[float, float], f: str = "+.4f") -> str:
    return f"{ms[0]:{f}} +- {ms[1]:{f.lstrip('+')}}"


def table(summary: dict[str, dict]) -> list[str]:
    lines = ["| method | seeds | steps | train s | reference reward | true JPEG gain | gain / s | drift (paired MSE) "
             "| gain / s at <= baseline drift | x baseline | train-reward gain | diversity ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        if method not in summary:
            continue
        s = summary[method]
        div = "n/a" if s["diversity_ratio"][0] != s["diversity_ratio"][0] else f"{s['diversity_ratio'][0]:.2f}"
        lines.append(
            f"| {LABELS[method]} | {len(s['seeds'])} | {s['steps'][0]:.0f} | {s['train_s'][0]:.0f} "
            f"| {s['reference'][0]:.4f} | {fmt(s['gain'])} | {fmt(s['gain_per_s'], '+.2e')} "
            f"| {fmt(s['drift'], '.4f')} | {fmt(s.get('gain_per_s_at_base_drift', (float('nan'),) * 2), '+.2e')} "
            f"| {s.get('x_baseline', float('nan')):.1f} | {fmt(s['train_gain'])} | {div} |")
    return lines


def write_outputs(results: dict[str, list[dict]], out_dir: Path, args) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {k: summarize(v) for k, v in results.items()}
    (out_dir / "reward_compare.json").write_text(json.dumps({"args": vars(args), "summary": summaries,
                                                              "runs": results}, indent=1))
    lines = [
        "# Reward fine-tuning: gain per second against a DDPO-style baseline",
        "",
        f"Reward = JPEG compressibility (minus the quality-95 JPEG size in kB of the decoded 32x32 image). Each method "
        f"trains its shipped recipe `configs/tiny_sd_<method>.yaml` for {args.budget:g} s of training (evaluation "
        f"excluded), seeds {args.seeds}; the DDPO-style baseline is `benchmarks/ddpo_baseline.py` (diffusers only: "
        "DDIM-10 eta 1, CFG 5, PPO clip 1e-4, no KL, full UNet, lr 1e-3, 16 trajectories per round). Evaluation: "
        "32 fixed noises and prompts in turn, the fine-tuned and the initial model on the same noise. 1 CPU thread "
        "on a shared 2-core machine: seconds are wall-clock under contention from other jobs (the spread includes "
        "it). Reduced budget: the former table (git history) ran the LoRA recipes 150 s, one seed, 64 samples, "
        "guidance 1, on the evenly spaced grid 999 ... 0 (now the pipeline's DDIM grid 901 ... 1). Command: "
        f"`OMP_NUM_THREADS=1 python benchmarks/reward_compare.py --budget {args.budget:g} --seeds {args.seeds} "
        f"--pretrain-steps {args.pretrain_steps}`" + (f" --override '{args.override}'" if args.override else "") + ".",
        "",
    ]
    for name, summ in summaries.items():
        lines += [f"## {name}", ""] + table(summ) + [""]
    lines += [
        "Columns:",
        "- true JPEG gain: reward of the fine-tuned minus the initial model (mean +- sd over seeds); "
        "gain / s = that gain over the training seconds.",
        "- drift: mean squared pixel difference (images in [-1, 1]) between the fine-tuned and the initial model's "
        "image from the same noise and prompt (`paired_mse`), at the end of the run.",
        "- gain / s at <= baseline drift: the gain per second where the run's evaluation curve first reaches the "
        "baseline's mean final drift (linear between evaluations, from the first), or its final gain per second if "
        "it stays below; x baseline = that over the baseline's own (~ its final gain / s). This is the comparison at "
        "no larger drift: the differentiable methods pass the baseline's drift within seconds and then keep gaining "
        "(their final gain / s is at a larger drift).",
        "- reference reward: the initial model under the method's own sampler (DDPO, DPOK, IPRO: DDIM-10 eta 1 CFG 5, "
        "the same images; ROCM: the 4-step consistency chain; DI*: the CFG teacher, DDIM-10).",
        "- train-reward gain: the reward the method optimizes (true JPEG for DDPO/DPOK, the DCT surrogate otherwise).",
        "- diversity ratio: mean pairwise pixel distance of fine-tuned over initial samples (< 1: less diverse; "
        "n/a: not recorded by that run).",
        "- On the pre-trained pipeline the drift is large for every method, the baseline included: a small weight "
        "change sends the stochastic DDIM(eta 1) trajectory of a digit elsewhere, so the paired MSE there measures "
        "trajectory sensitivity more than a change of the distribution; compare the diversity ratio too.",
        "",
        "Curves: reward_compare.png (gain vs training seconds, gain vs drift).",
    ]
    (out_dir / "reward_compare.md").write_text("\n".join(lines) + "\n")
    plot(results, out_dir / "reward_compare.png")


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    colors = {"ddpo": "k", "dpok": "C0", "ipro": "C1", "rocm": "C2", "di_star": "C3"}
    for row, (name, runs) in enumerate(results.items()):
        seen = set()
        for r in runs:
            pts = curve(r)
            lab = r["method"] if r["method"] not in seen else None
            seen.add(r["method"])
            kw = {"color": colors[r["method"]], "marker": ".", "label": lab}
            axes[row, 0].plot([p[0] for p in pts], [p[1] for p in pts], **kw)
            axes[row, 1].plot([p[2] for p in pts], [p[1] for p in pts], **kw)
        short = name.split(" (")[0]
        axes[row, 0].set_title(f"{short}: true JPEG gain vs training s")
        axes[row, 1].set_title(f"{short}: true JPEG gain vs drift (paired MSE)")
        axes[row, 0].set_xlabel("training seconds")
        axes[row, 1].set_xlabel("paired MSE to the initial model")
        axes[row, 1].set_xscale("symlog", linthresh=1e-3)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def build_pipe(work: Path, pretrain_steps: int) -> Path:
    pipe = work / (f"tiny_sd_pre{pretrain_steps}" if pretrain_steps else "tiny_sd_random")
    if not (pipe / "model_index.json").is_file():
        from diffdiv.models.tiny import build_tiny_sd

        build_tiny_sd(pipe, seed=0)
        if pretrain_steps:
            pretrain_tiny_sd(pipe, pretrain_steps)
    return pipe


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=40.0, help="training seconds per run")
    p.add_argument("--eval-every", type=float, default=None, help="training seconds between evaluations "
                   "(default budget / 6)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pretrain-steps", default="0,1500", help="pipelines: 0 = random weights, N = pre-trained N steps")
    p.add_argument("--override", default="", help="space-separated recipe overrides for the diffdiv methods (a lever "
                   "run, e.g. 'lora.enabled=true div_weight=0.01'; cached and reported separately)")
    p.add_argument("--work", default=str(ROOT / "runs" / "reward_compare"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    every = args.eval_every or args.budget / 6
    res_file = work / "runs.json"
    done = json.loads(res_file.read_text()) if res_file.is_file() else []
    results: dict[str, list[dict]] = {}
    for steps in (int(v) for v in args.pretrain_steps.split(",")):
        pipe = build_pipe(work, steps)
        name = f"pre-trained tiny SD ({steps} steps on captioned digits)" if steps else "random-weight tiny SD"
        prompts = digit_prompts() if steps else RANDOM_PROMPTS
        for method in args.methods.split(","):
            for seed in (int(v) for v in args.seeds.split(",")):
                tag = {"pipe": pipe.name, "method": method, "seed": seed, "budget": args.budget}
                extra = args.override.split() if method != "ddpo" else []
                if extra:
                    tag["override"] = args.override
                found = [r for r in done if r.get("tag") == tag]
                if found:
                    r = found[0]
                else:
                    print(f"=== {name}: {method} seed {seed}, {args.budget:g} s", flush=True)
                    r = run_one(method, pipe, work / f"{pipe.name}_{method}_{seed}", args.budget, every, prompts, seed,
                                extra)
                    r["tag"] = tag
                    done.append(r)
                    res_file.write_text(json.dumps(done))
                    c = curve(r)[-1]
                    print(f"    gain {c[1]:+.4f} in {c[0]:.0f} s, drift {c[2]:.4f}, {r['steps']} steps", flush=True)
                results.setdefault(name, []).append(r)
    write_outputs(results, Path(args.out), args)
    print((Path(args.out) / "reward_compare.md").read_text())


if __name__ == "__main__":
    main()
