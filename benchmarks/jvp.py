"""Benchmark: JVP accuracy, cost and attention-JVP memory through diffusers networks (sCM / rCM time derivative).

For the tiny SD UNet (UNet2DConditionModel), the tiny SD3 transformer (SD3Transformer2DModel) and the digits
UNet2DModel (the trained teacher when present, else the same architecture at random init), through diffdiv's
TrigFlow view (CFG 2.5 for the text models):
  - accuracy: relative error of each JVP method vs a 4th-order (Richardson) central finite difference in
    fp32, and of the raw network's forward-mode JVP vs a float64 finite difference (x direction);
  - cost: JVP time / one plain forward for forward mode with diffdiv's rules (`jvp_mode("hook")`, attention
    "auto" = blockwise on CPU), the same with the O(L^2) reference attention, forward mode with PyTorch's own
    rules (SDPA math backend, `forward_math`), and the 3-forward finite difference. Times are CPU time of
    this (single) thread, methods interleaved, best of N: robust to other jobs on a shared machine;
  - attention alone (B=2, H=4, d=64): time of the reference / blockwise attention JVP vs one SDPA forward,
    and peak memory vs L: bytes of live tensors allocated during the call (outputs included), counted by a
    TorchDispatchMode; the fused Triton kernel is run under TRITON_INTERPRET=1 for correctness only (its
    GPU time and memory rows say "not run (no device)" without a GPU);
  - rCM: a 6-step tiny-SD rCM run (configs/tiny_sd_rcm.yaml) with each JVP path: per-step losses.
The previous results file's figures are kept under "before" (the state before the fused/blockwise paths).
Writes benchmarks/results/jvp.json and jvp.md (about 3-4 minutes on one core).

    OMP_NUM_THREADS=1 python benchmarks/jvp.py [--repeats 7] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from diffdiv.models.attention_jvp import attention_jvp_blockwise
from diffdiv.models.jvp import attention_jvp_reference, jvp, jvp_mode, relative_error
from diffdiv.models.loading import load_denoiser
from diffdiv.models.tiny import build_tiny_sd, build_tiny_sd3
from diffdiv.models.trigflow import TrigFlowView

OUT = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
# (label, jvp kwargs)
METHODS = {"hook": dict(method="forward"), "hook_reference": dict(method="forward", attention="reference"),
           "forward_math": dict(method="forward_math"), "fd": dict(method="fd")}
ATTN_TIME_L = (64, 256, 1024, 2048)
ATTN_MEM_L = (256, 1024, 2048, 4096)
REFERENCE_MAX_L = 2048
_SDPA = F.scaled_dot_product_attention  # the O(L^2) paths beyond this would take > 1 GiB here


def cpu_time(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def best_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` CPU time of each function, the functions interleaved within every repeat."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            ts[k].append(cpu_time(f))
    return {k: min(v) for k, v in ts.items()}


def fd(fn, primals, tangents, h):
    with torch.no_grad():
        plus = fn(*[p + h * v for p, v in zip(primals, tangents)])
        minus = fn(*[p - h * v for p, v in zip(primals, tangents)])
    return (plus - minus) / (2 * h)


def richardson(fn, primals, tangents, h):
    return (4 * fd(fn, primals, tangents, h / 2) - fd(fn, primals, tangents, h)) / 3


def _digits_unet(root: Path) -> Path:
    """The digits teacher's architecture (configs/digits_teacher.yaml) at random init."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root)
    return root


def models(root: Path, digits_teacher: str | None) -> dict:
    out = {}
    sd = load_denoiser(build_tiny_sd(root / "sd"))
    out["tiny SD UNet2DConditionModel"] = (sd, sd.encode_prompts(["a red cat", "a house on a hill"]))
    sd3 = load_denoiser(build_tiny_sd3(root / "sd3", t5=False))
    out["tiny SD3 transformer"] = (sd3, sd3.encode_prompts(["a red cat", "a house on a hill"]))
    if digits_teacher and Path(digits_teacher, "model_index.json").is_file():
        out["digits UNet2DModel (teacher)"] = (load_denoiser(digits_teacher), None)
    else:
        out["digits UNet2DModel (random init)"] = (load_denoiser(_digits_unet(root / "digits")), None)
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
    for m, kw in METHODS.items():
        row[f"relerr_{m}_vs_fd4_fp32"] = relative_error(jvp(fn, (x, t), (dx, cs), **kw)[1], ref)
    fns = {"plain_forward": lambda: torch.no_grad()(fn)(x, t)}
    fns.update({m: (lambda kw=kw: jvp(fn, (x, t), (dx, cs), **kw)) for m, kw in METHODS.items()})
    best = best_interleaved(fns, repeats)
    row["plain_forward_s"] = best["plain_forward"]
    for m in METHODS:
        row[f"{m}_s"], row[f"{m}_over_forward"] = best[m], best[m] / best["plain_forward"]
    # raw network in float64 (x direction): forward-mode JVP vs float64 central difference
    f64 = raw_network_fn(d, c, torch.float64)
    x64, tau64 = x.double(), torch.full((batch,), 400.0, dtype=torch.float64)
    dx64 = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ref64 = fd(f64, (x64, tau64), (dx64, torch.zeros_like(tau64)), 1e-6)
    _, tan64 = jvp(f64, (x64, tau64), (dx64, torch.zeros_like(tau64)), method="forward")
    row["relerr_hook_vs_fd_fp64_x"] = relative_error(tan64, ref64)
    return row


# ----------------------------------------------------------------------------------------------
# Per-op profile under forward-mode AD (digits-UNet sizes)
# ----------------------------------------------------------------------------------------------


def _op_cases() -> dict:
    g = torch.Generator().manual_seed(5)
    w, b, cw, cb, lw = (torch.randn(*s, generator=g) for s in ((64,), (64,), (64, 64, 3, 3), (64,), (64, 64)))
    x, seq = torch.randn(8, 64, 8, 8, generator=g), torch.randn(8, 64, 64, generator=g)
    qkv = torch.randn(8, 8, 16, 8, generator=g)
    return {"GroupNorm (8 groups)": (lambda a: F.group_norm(a, 8, w, b), x),
            "LayerNorm (64)": (lambda a: F.layer_norm(a, (64,), w, b), seq),
            "conv2d 3x3 64->64": (lambda a: F.conv2d(a, cw, cb, padding=1), x),
            "linear 64->64": (lambda a: F.linear(a, lw, b), seq),
            "x * 0.5 (one dual operand)": (lambda a: a * 0.5, x),
            "x + y (one dual operand)": (lambda a: a + x, x),
            "SiLU": (F.silu, x),
            "interpolate nearest x2": (lambda a: F.interpolate(a, scale_factor=2.0, mode="nearest"), x),
            "SDPA 8x8x16x8 (q = k = v dual; PyTorch: math backend)": (_sdpa_self, qkv)}


def _sdpa_self(a: torch.Tensor) -> torch.Tensor:
    """SDPA(a, a, a); a dual tensor outside jvp_mode goes to the math backend (the only one with rules)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if F.scaled_dot_product_attention is not _SDPA or fwAD.unpack_dual(a).tangent is None:
        return F.scaled_dot_product_attention(a, a, a)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(a, a, a)


def _op_row(name: str, fn, x: torch.Tensor, repeats: int) -> dict:
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), fwAD.dual_level():
        xd = fwAD.make_dual(x, dx)
        plain = best_interleaved({"p": lambda: fn(x)}, repeats)["p"]
        pytorch = best_interleaved({"p": lambda: fn(xd)}, repeats)["p"]
        with jvp_mode("hook"):
            ours = best_interleaved({"p": lambda: fn(xd)}, repeats)["p"]
    return {"op": name, "forward_us": 1e6 * plain, "pytorch_fwd_ad_over_forward": pytorch / plain,
            "diffdiv_rules_over_forward": ours / plain}


def bench_ops(repeats: int = 200) -> list[dict]:
    return [_op_row(name, fn, x, repeats) for name, (fn, x) in _op_cases().items()]


# ----------------------------------------------------------------------------------------------
# Attention alone
# ----------------------------------------------------------------------------------------------


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of live tensors allocated by ops run inside (per storage; views are free)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.refs = 0, 0, {}

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if key not in self.refs:
                if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == key for a in args):
                    continue  # in-place / view of an input: no new memory
                self.refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key, nbytes)
        return out


def peak_live_bytes(fn) -> int:
    with PeakLiveBytes() as m:
        out = fn()
    del out
    return m.peak


def _qkv(L: int, g: torch.Generator, d: int = 64) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(2, 4, L, d, generator=g) for _ in range(6))


def _attention_time_row(L: int, g: torch.Generator, repeats: int) -> dict:
    q, k, v, tq, tk, tv = _qkv(L, g)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fns = {"sdpa": lambda: sdpa(q, k, v), "reference": lambda: attention_jvp_reference(q, k, v, tq, tk, tv),
           "blockwise": lambda: attention_jvp_blockwise(q, k, v, tq, tk, tv)}
    if L <= 1024:
        fns["math_fwd_ad"] = lambda: jvp(sdpa, (q, k, v), (tq, tk, tv), method="forward_math")
    best = best_interleaved(fns, repeats if L <= 1024 else 2)
    row = {"shape": f"2x4x{L}x64", "L": L, "sdpa_forward_s": best["sdpa"]}
    for key in ("reference", "blockwise", "math_fwd_ad"):
        if key in best:
            row[f"{key}_s"], row[f"{key}_over_forward"] = best[key], best[key] / best["sdpa"]
    return row


def bench_attention_time(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [_attention_time_row(L, g, repeats) for L in ATTN_TIME_L]


def _attention_memory_row(L: int, g: torch.Generator) -> dict:
    q, k, v, tq, tk, tv = _qkv(L, g)
    row = {"shape": f"2x4x{L}x64", "L": L, "outputs_bytes": 2 * q.numel() * 4, "scores_bytes_fp32": 2 * 4 * L * L * 4,
           "blockwise_peak_bytes": peak_live_bytes(lambda: attention_jvp_blockwise(q, k, v, tq, tk, tv))}
    if L <= REFERENCE_MAX_L:
        row["reference_peak_bytes"] = peak_live_bytes(lambda: attention_jvp_reference(q, k, v, tq, tk, tv))
    return row


def bench_attention_memory() -> list[dict]:
    g = torch.Generator().manual_seed(2)
    return [_attention_memory_row(L, g) for L in ATTN_MEM_L]


FUSED_WORKER = r"""
import json, sys, time, torch
from diffdiv.models.attention_jvp import attention_jvp_triton
from diffdiv.models.jvp import attention_jvp_reference, relative_error
rows = []
g = torch.Generator().manual_seed(3)
for L, dtype in [(64, torch.float32), (200, torch.float32), (200, torch.bfloat16)]:
    xs = [torch.randn(1, 2, L, 64, generator=g).to(dtype) for _ in range(6)]
    ref_o, ref_t = attention_jvp_reference(*[x.double() for x in xs])
    nan = lambda: torch.full((1, 2, L, 64), float("nan"), dtype=dtype)
    t0 = time.perf_counter()
    o, t = attention_jvp_triton(*xs, out=nan(), tout=nan())
    rows.append({"shape": f"1x2x{L}x64", "dtype": str(dtype).replace("torch.", ""),
                 "relerr_out": relative_error(o, ref_o), "relerr_tangent": relative_error(t, ref_t),
                 "interpreter_s": time.perf_counter() - t0})
print(json.dumps(rows))
"""


def bench_fused_interpreter() -> list[dict] | str:
    """The fused kernel under TRITON_INTERPRET=1 (a subprocess: the variable is read at import)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", FUSED_WORKER], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"not run ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'worker failed'})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# rCM: losses with each JVP path
# ----------------------------------------------------------------------------------------------

RCM_PATHS = {"forward (auto attention)": ["jvp=forward", "attention_jvp=auto"],
             "forward (reference attention)": ["jvp=forward", "attention_jvp=reference"],
             "forward_math (PyTorch rules)": ["jvp=forward_math"], "fd": ["jvp=fd"]}


def bench_rcm(root: Path, steps: int) -> dict:
    from diffdiv.config import load_config
    from diffdiv.models.tiny import build_tiny_sd
    from diffdiv.trainers.rcm import RCMConfig, RCMTrainer

    teacher = build_tiny_sd(root / "rcm_teacher")
    out = {}
    for i, (label, extra) in enumerate(RCM_PATHS.items()):
        cfg = load_config(RCMConfig, REPO / "configs" / "tiny_sd_rcm.yaml",
                          [f"teacher.path={teacher}", f"output_dir={root / f'rcm_run{i}'}", "log_with=null",
                           "progress=false", f"max_steps={steps}", "checkpoint_every=1000", "eval_samples=0",
                           *extra])
        tr = RCMTrainer(cfg)
        t0 = time.perf_counter()
        tr.train()
        out[label] = {"seconds": time.perf_counter() - t0,
                      "student_loss": [h.get("student/loss", math.nan) for h in tr.history],
                      "student_scm": [h.get("student/scm", math.nan) for h in tr.history]}
    base = out["forward_math (PyTorch rules)"]["student_loss"]
    for r in out.values():
        r["max_rel_diff_vs_forward_math"] = max(abs(a - b) / abs(b) for a, b in zip(r["student_loss"], base))
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def carried_before(path: Path) -> dict | None:
    """The "before" figures: kept from the existing results file (its own "before", or its rows if it predates
    the fused/blockwise paths)."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    if "before" in old:
        return old["before"]
    return {"note": "benchmarks/results/jvp.json before the fused/blockwise attention JVP (wall time, best of "
                    f"{old.get('repeats')}; forward = torch.func.jvp + O(L^2) reference attention)",
            "models": [{k: r[k] for k in ("model", "params", "plain_forward_s", "forward_over_forward",
                                          "forward_math_over_forward", "fd_over_forward")} for r in old["models"]],
            "attention": old.get("attention", [])}


def _mib(b: float | None) -> str:
    return "not run" if b is None else f"{b / 2**20:.1f} MiB"


def markdown(res: dict) -> str:
    gpu = "not run (no device)" if not res["cuda"] else "see GPU section"
    lines = ["# JVP through diffusers networks (CPU)", "",
             f"{res['machine']}; torch {res['torch']}; {res['threads']} thread(s); batch {res['batch']}; "
             f"best of {res['repeats']} (CPU time of the benchmark thread, methods interleaved). "
             "`forward` = forward-mode AD with diffdiv's rules (`jvp_mode(\"hook\")`: attention primal + tangent "
             "in one `attention_jvp` call, auto = blockwise on CPU; closed-form GroupNorm/LayerNorm tangents; "
             "conv/linear without the zero weight-tangent term; one-dual elementwise arithmetic without "
             "ZeroTensors). `forward_math` = `torch.func.jvp` with PyTorch's own rules and the SDPA math "
             "backend.", "",
             "## Accuracy: relative error vs central finite differences", "",
             "Through the TrigFlow view (time map + CFG 2.5), fp32, tangent (cos t sin t dx, cos t sin t); "
             "reference = 4th-order Richardson difference, h = 1e-3 (its own error is ~5e-4). Last column: raw "
             "network in float64, x direction, diffdiv's forward mode vs a float64 central difference.", "",
             "| model | forward | forward (reference attn) | forward_math | finite diff (h=3e-4) | raw fp64 vs FD |",
             "|---|---|---|---|---|---|"]
    for r in res["models"]:
        lines.append(f"| {r['model']} | {r['relerr_hook_vs_fd4_fp32']:.1e} | "
                     f"{r['relerr_hook_reference_vs_fd4_fp32']:.1e} | {r['relerr_forward_math_vs_fd4_fp32']:.1e} | "
                     f"{r['relerr_fd_vs_fd4_fp32']:.1e} | {r['relerr_hook_vs_fd_fp64_x']:.1e} |")
    lines += ["", "## Cost: JVP time / one forward (after)", "",
              "| model | params | forward ms | forward | forward (reference attn) | forward_math | finite diff (3 fwd) "
              "|",
              "|---|---|---|---|---|---|---|"]
    for r in res["models"]:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {1e3 * r['plain_forward_s']:.1f} | "
                     f"{r['hook_over_forward']:.2f}x | {r['hook_reference_over_forward']:.2f}x | "
                     f"{r['forward_math_over_forward']:.2f}x | {r['fd_over_forward']:.2f}x |")
    before = res.get("before")
    if before:
        lines += ["", "### Before (previous results file)", "", before["note"] + ".", "",
                  "| model | params | forward ms | forward (hook) | forward (SDPA math) | finite diff (3 fwd) |",
                  "|---|---|---|---|---|---|"]
        for r in before["models"]:
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {1e3 * r['plain_forward_s']:.1f} | "
                         f"{r['forward_over_forward']:.2f}x | {r['forward_math_over_forward']:.2f}x | "
                         f"{r['fd_over_forward']:.2f}x |")
    lines += ["", "## Per-op cost under forward-mode AD (digits-UNet sizes): time / the op's forward", "",
              "One op on a dual tensor (made once, outside the timing), best of 200. PyTorch's rules: the "
              "constant operand / parameters get a ZeroTensor tangent and ZeroTensor arithmetic is slow on CPU; "
              "GroupNorm's rule is a decomposition. diffdiv's rules: `jvp_mode(\"hook\")`.", "",
              "| op | forward us | PyTorch forward AD | diffdiv rules |", "|---|---|---|---|"]
    for r in res["ops"]:
        lines.append(f"| {r['op']} | {r['forward_us']:.0f} | {r['pytorch_fwd_ad_over_forward']:.1f}x | "
                     f"{r['diffdiv_rules_over_forward']:.1f}x |")
    lines += ["", "## Attention alone (B=2, H=4, d=64): time / one SDPA forward", "",
              "reference = `attention_jvp_reference` (O(L^2): P and its tangent materialized); blockwise = "
              "`attention_jvp_blockwise` (query chunks of ~2^20 scores); both return primal and tangent.", "",
              "| shape | SDPA forward ms | reference | blockwise | math-backend forward AD | fused Triton (GPU) |",
              "|---|---|---|---|---|---|"]
    for r in res["attention_time"]:
        m = f"{r['math_fwd_ad_over_forward']:.1f}x" if "math_fwd_ad_over_forward" in r else "not run"
        lines.append(f"| {r['shape']} | {1e3 * r['sdpa_forward_s']:.2f} | {r['reference_over_forward']:.1f}x | "
                     f"{r['blockwise_over_forward']:.1f}x | {m} | {gpu} |")
    if before and before.get("attention"):
        lines += ["", "Before: " + "; ".join(f"{r['shape']} reference {r['reference_over_forward']:.1f}x, math "
                                               f"{r['math_over_forward']:.1f}x" for r in before["attention"]) + "."]
    lines += ["", "## Attention JVP peak memory vs L (B=2, H=4, d=64, fp32)", "",
              "Peak bytes of live tensors allocated during one call (outputs included; inputs excluded), counted "
              "per storage by a TorchDispatchMode. Fused kernel: only its two outputs are allocated (tiles stay "
              "on chip), by construction; not measurable on CPU.", "",
              "| shape | L x L scores (fp32) | reference | blockwise | outputs (O, O') | fused Triton (GPU) |",
              "|---|---|---|---|---|---|"]
    for r in res["attention_memory"]:
        lines.append(f"| {r['shape']} | {_mib(r['scores_bytes_fp32'])} | {_mib(r.get('reference_peak_bytes'))} | "
                     f"{_mib(r['blockwise_peak_bytes'])} | {_mib(r['outputs_bytes'])} | {gpu} |")
    lines += ["", "## Fused Triton kernel under TRITON_INTERPRET=1 (correctness only)", ""]
    fused = res["fused_interpreter"]
    if isinstance(fused, str):
        lines.append(fused)
    else:
        lines += ["Relative error vs the float64 reference (same rounded inputs); interpreter wall time is not "
                  "a GPU speed.", "", "| shape | dtype | rel. err O | rel. err O' | interpreter s |",
                  "|---|---|---|---|---|"]
        for r in fused:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['relerr_out']:.1e} | {r['relerr_tangent']:.1e} | "
                         f"{r['interpreter_s']:.1f} |")
    rcm = res["rcm"]
    lines += ["", f"## rCM (configs/tiny_sd_rcm.yaml, {res['rcm_steps']} steps): student loss per step", "",
              "Same seed; only the JVP path differs. Max relative difference vs forward_math (PyTorch's own "
              "rules) over the steps.", "", "| JVP path | student loss per step | max rel. diff | seconds |",
              "|---|---|---|---|"]
    for label, r in rcm.items():
        lines.append(f"| {label} | {', '.join(f'{x:.5f}' for x in r['student_loss'])} | "
                     f"{r['max_rel_diff_vs_forward_math']:.1e} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rcm-steps", type=int, default=6)
    ap.add_argument("--digits-teacher", default="runs/digits_teacher/teacher")
    args = ap.parse_args()
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "batch": args.batch, "repeats": args.repeats,
           "cuda": torch.cuda.is_available(), "rcm_steps": args.rcm_steps, "models": []}
    res["before"] = carried_before(OUT / "jvp.json")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (d, cond) in models(Path(tmp), args.digits_teacher).items():
            d.eval()
            res["models"].append(bench_model(name, d, cond, args.batch, args.repeats))
            print(json.dumps(res["models"][-1]), flush=True)
        res["ops"] = bench_ops()
        print(json.dumps(res["ops"]), flush=True)
        res["attention_time"] = bench_attention_time(args.repeats)
        print(json.dumps(res["attention_time"]), flush=True)
        res["attention_memory"] = bench_attention_memory()
        print(json.dumps(res["attention_memory"]), flush=True)
        res["fused_interpreter"] = bench_fused_interpreter()
        print(json.dumps(res["fused_interpreter"]), flush=True)
        res["rcm"] = bench_rcm(Path(tmp), args.rcm_steps)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "jvp.json").write_text(json.dumps(res, indent=2))
    (OUT / "jvp.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
