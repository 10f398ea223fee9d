"""Benchmark: JVP accuracy and cost through real diffusers networks (the sCM / rCM time derivative).

For the tiny SD UNet (UNet2DConditionModel), the tiny SD3 transformer (SD3Transformer2DModel) and a
digits-size UNet2DModel, through diffdiv's TrigFlow view (CFG 2.5 for the text models):
  - accuracy: relative error of each JVP method vs a 4th-order (Richardson) central finite difference in
    fp32, and of the raw network's forward-mode JVP vs a float64 finite difference (x direction, where
    the whole network runs in float64);
  - cost: wall time of forward-mode JVP (attention-JVP hook), forward-mode with the SDPA math backend,
    and the 3-forward finite difference, as multiples of one plain forward (same process, best of N;
    the CPU may be shared by other jobs, so ratios are the meaningful numbers);
  - attention alone: the reference attention JVP (`diffdiv.models.jvp.attention_jvp_reference`, the
    function a fused FlashAttention-JVP kernel replaces) vs one SDPA forward at several sequence lengths.
Writes benchmarks/results/jvp.json and jvp.md.

    OMP_NUM_THREADS=1 python benchmarks/jvp.py [--repeats 7] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffdiv.models.jvp import attention_jvp_reference, jvp, relative_error
from diffdiv.models.loading import load_denoiser
from diffdiv.models.tiny import build_tiny_sd, build_tiny_sd3, build_tiny_unet2d
from diffdiv.models.trigflow import TrigFlowView

OUT = Path(__file__).resolve().parent / "results"
METHODS = ("forward", "forward_math", "fd")


def best_time(fn, repeats: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def fd(fn, primals, tangents, h):
    with torch.no_grad():
        plus = fn(*[p + h * v for p, v in zip(primals, tangents)])
        minus = fn(*[p - h * v for p, v in zip(primals, tangents)])
    return (plus - minus) / (2 * h)


def richardson(fn, primals, tangents, h):
    return (4 * fd(fn, primals, tangents, h / 2) - fd(fn, primals, tangents, h)) / 3


def models(root: Path, digits_teacher: str | None) -> dict:
    out = {}
    sd = load_denoiser(build_tiny_sd(root / "sd"))
    out["tiny SD UNet2DConditionModel"] = (sd, sd.encode_prompts(["a red cat", "a house on a hill"]))
    sd3 = load_denoiser(build_tiny_sd3(root / "sd3", t5=False))
    out["tiny SD3 transformer"] = (sd3, sd3.encode_prompts(["a red cat", "a house on a hill"]))
    if digits_teacher and Path(digits_teacher, "model_index.json").is_file():
        out["digits UNet2DModel (teacher)"] = (load_denoiser(digits_teacher), None)
    else:
        out["tiny UNet2DModel"] = (load_denoiser(build_tiny_unet2d(root / "u")), None)
    return out


def raw_network_fn(d, cond, dtype):
    net = copy.deepcopy(d.trainable).to(dtype)
    if cond is None:
        return lambda x, t: net(x, t).sample
    emb = cond.embeds.to(dtype)
    if hasattr(net, "transformer_blocks"):
        pooled = cond.pooled.to(dtype)
        return lambda x, t: net(hidden_states=x, timestep=t, encoder_hidden_states=emb,
                                pooled_projections=pooled).sample
    return lambda x, t: net(x, t, encoder_hidden_states=emb).sample


def bench_model(name, d, cond, batch, repeats) -> dict:
    g = torch.Generator().manual_seed(0)
    view = TrigFlowView(d, 0.5, sigma_max=80.0)
    x = torch.randn(batch, *d.sample_shape, generator=g)
    t = view.t_min + (view.t_max - view.t_min) * torch.rand(batch, generator=g) * 0.9 + 0.05
    cs = torch.cos(t) * torch.sin(t)
    dx = cs.view(-1, *[1] * len(d.sample_shape)) * torch.randn(x.shape, generator=g)
    c = None if cond is None else cond.repeat_interleave(batch // len(cond))

    def fn(x, t):
        return view(x, t, c, guidance_scale=2.5 if c is not None else None)

    ref = richardson(fn, (x, t), (dx, cs), 1e-3)
    row = {"model": name, "batch": batch, "params": sum(p.numel() for p in d.trainable.parameters())}
    with torch.no_grad():
        row["plain_forward_s"] = best_time(lambda: fn(x, t), repeats)[0]
    for m in METHODS:
        _, tan = jvp(fn, (x, t), (dx, cs), method=m)
        row[f"relerr_{m}_vs_fd4_fp32"] = relative_error(tan, ref)
        tb, tm = best_time(lambda m=m: jvp(fn, (x, t), (dx, cs), method=m), repeats)
        row[f"{m}_s"], row[f"{m}_median_s"] = tb, tm
        row[f"{m}_over_forward"] = tb / row["plain_forward_s"]
    # raw network in float64 (x direction): forward-mode JVP vs float64 central difference
    f64 = raw_network_fn(d, None if c is None else c, torch.float64)
    x64, tau64 = x.double(), torch.full((batch,), 400.0, dtype=torch.float64)
    dx64 = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ref64 = fd(f64, (x64, tau64), (dx64, torch.zeros_like(tau64)), 1e-6)
    _, tan64 = jvp(f64, (x64, tau64), (dx64, torch.zeros_like(tau64)), method="forward")
    row["relerr_forward_vs_fd_fp64_x"] = relative_error(tan64, ref64)
    return row


def _attention_row(L: int, g: torch.Generator, repeats: int) -> dict:
    q, k, v = (torch.randn(2, 4, L, 64, generator=g) for _ in range(3))
    tq, tk, tv = (torch.randn(2, 4, L, 64, generator=g) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fwd = best_time(lambda: sdpa(q, k, v), repeats)[0]
    ref = best_time(lambda: attention_jvp_reference(q, k, v, tq, tk, tv), repeats)[0]
    fm = best_time(lambda: jvp(sdpa, (q, k, v), (tq, tk, tv), method="forward_math"), repeats)[0]
    return {"shape": f"2x4x{L}x64", "sdpa_forward_s": fwd, "reference_jvp_s": ref,
            "reference_over_forward": ref / fwd, "math_backend_fwd_ad_s": fm, "math_over_forward": fm / fwd,
            "scores_bytes_fp32": 2 * 4 * L * L * 4}


def bench_attention(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [_attention_row(L, g, repeats) for L in (64, 256, 1024)]


def markdown(res: dict) -> str:
    lines = ["# JVP through diffusers networks (CPU)", "",
             f"{res['machine']}; torch {res['torch']}; {res['threads']} thread(s); batch {res['batch']}; "
             f"best of {res['repeats']}. The CPU may be shared: compare the ratios (same process).", "",
             "## Accuracy: relative error vs central finite differences", "",
             "Through the TrigFlow view (time map + CFG 2.5), fp32, tangent (cos t sin t dx, cos t sin t); "
             "reference = 4th-order Richardson difference, h = 1e-3 (measured fp32 optimum; its own error is "
             "~5e-4). Last column: raw network in float64, x direction, vs a float64 central difference.", "",
             "| model | forward (hook) | forward (SDPA math) | finite diff (h=3e-4) | raw fp64 forward vs FD |",
             "|---|---|---|---|---|"]
    for r in res["models"]:
        lines.append(f"| {r['model']} | {r['relerr_forward_vs_fd4_fp32']:.1e} | "
                     f"{r['relerr_forward_math_vs_fd4_fp32']:.1e} | {r['relerr_fd_vs_fd4_fp32']:.1e} | "
                     f"{r['relerr_forward_vs_fd_fp64_x']:.1e} |")
    lines += ["", "## Cost: JVP time / one forward", "",
              "| model | params | forward ms | forward-mode (hook) | forward-mode (math) | finite diff (3 fwd) |",
              "|---|---|---|---|---|---|"]
    for r in res["models"]:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {1e3 * r['plain_forward_s']:.1f} | "
                     f"{r['forward_over_forward']:.2f}x | {r['forward_math_over_forward']:.2f}x | "
                     f"{r['fd_over_forward']:.2f}x |")
    lines += ["", "## Attention alone (B=2, H=4, d=64)", "",
              "The reference attention JVP materializes the L x L probabilities and their tangent (what a "
              "fused FlashAttention-JVP kernel avoids); `set_attention_jvp` installs such a kernel.", "",
              "| shape | SDPA forward ms | reference JVP | math-backend forward AD | L x L scores (fp32) |",
              "|---|---|---|---|---|"]
    for r in res["attention"]:
        lines.append(f"| {r['shape']} | {1e3 * r['sdpa_forward_s']:.2f} | {r['reference_over_forward']:.1f}x | "
                     f"{r['math_over_forward']:.1f}x | {r['scores_bytes_fp32'] / 2**20:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--digits-teacher", default="runs/digits_teacher/teacher")
    args = ap.parse_args()
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "batch": args.batch, "repeats": args.repeats, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (d, cond) in models(Path(tmp), args.digits_teacher).items():
            d.eval()
            res["models"].append(bench_model(name, d, cond, args.batch, args.repeats))
            print(json.dumps(res["models"][-1]), flush=True)
    res["attention"] = bench_attention(args.repeats)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "jvp.json").write_text(json.dumps(res, indent=2))
    (OUT / "jvp.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
