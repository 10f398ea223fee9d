"""Benchmark: fused weighted score difference vs the unfused eager PyTorch formulation.

Measures forward + backward of the per-sample f-distill / DMD surrogate loss
    n = sg(mean|x0 - D_p|), g = sg(h (D_q - D_p) / n), loss_b = 1/2 mean (x0 - sg(x0 - g))^2
w.r.t. x0 at several latent sizes, in fp32 and bf16:
  - unfused:       eager PyTorch as written in the references (normalizer, pseudo-target, MSE; autograd)
  - fused (torch): diffdiv's PyTorch reference backend (custom autograd, no g stored, bounded temporaries)
  - fused (triton): the Triton kernels (CUDA only; on CPU those rows read "not run: no GPU")
Reports the best-of-N wall time (the machine may be shared: the minimum is the least disturbed run;
medians are kept in the JSON) and peak extra memory (CPU: allocator events from torch.profiler; CUDA:
max_memory_allocated), the fused/unfused ratios and, on CUDA, bytes moved by the Triton path vs the
device's measured copy bandwidth. Writes benchmarks/results/core.json and core.md.

    python benchmarks/core.py [--quick] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffdiv.divergence.kernels import weighted_score_difference

SIZES = [  # (label, shape): pixel CIFAR, SD-1.5 latent, SDXL latent, 16-channel 1024px latent, video latent
    ("cifar 64x3x32x32", (64, 3, 32, 32)),
    ("sd15 16x4x64x64", (16, 4, 64, 64)),
    ("sdxl 8x4x128x128", (8, 4, 128, 128)),
    ("flux 4x16x128x128", (4, 16, 128, 128)),
    ("video 2x16x21x60x104", (2, 16, 21, 60, 104)),
]
QUICK = SIZES[:2]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def unfused_loss(x0, d_p, d_q, h, eps=1e-5):
    """The eager formulation of the references (normalizer in fp32, pseudo-target in the input dtype)."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        n = (x0.float() - d_p.float()).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
        w = (h.float().view(-1, *([1] * (x0.ndim - 1))) / n).to(x0.dtype)
        g = (d_q - d_p) * w
        target = x0 - g
    return 0.5 * torch.nn.functional.mse_loss(x0, target, reduction="none").float().mean(dim=dims)


def fused_loss(backend):
    def fn(x0, d_p, d_q, h):
        return weighted_score_difference(x0, d_p, d_q, h, backend, return_g=False)[2]
    return fn


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    d_p = (x0.float() + 0.5 * torch.randn(shape, generator=g).to(device)).to(dtype)
    d_q = (d_p.float() + 0.2 * torch.randn(shape, generator=g).to(device)).to(dtype)
    h = (torch.rand(shape[0], generator=g) + 0.5).to(device)
    return x0.requires_grad_(True), d_p, d_q, h


def step(fn, x0, d_p, d_q, h):
    x0.grad = None
    fn(x0, d_p, d_q, h).sum().backward()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, inputs, device, repeats):
    for _ in range(2):
        step(fn, *inputs)
    _sync(device)
    ts = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(fn, *inputs)
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step(fn, *inputs)
            ts.append((time.perf_counter() - t0) * 1e3)
    return min(ts), statistics.median(ts)


def peak_bytes(fn, inputs, device):
    """Peak bytes allocated during one forward+backward beyond what existed before (x0.grad included)."""
    inputs[0].grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, *inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, *inputs)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        events = json.load(open(path))["traceEvents"]
    mem = [e for e in events if e.get("name") == "[memory]"]
    mem.sort(key=lambda e: (e["ts"], e["args"]["Ev Idx"]))
    cur = peak = 0
    for e in mem:
        if e["args"].get("Device Type", 0) != 0:
            continue
        cur += e["args"]["Bytes"]
        peak = max(peak, cur)
    return peak


def copy_bandwidth(device):
    """Measured device-memory bandwidth (GB/s) of a large copy: 2 x bytes / time."""
    n = 256 * 2**20
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 4 * 10 / (e0.elapsed_time(e1) * 1e-3) / 1e9


def check_same(inputs, fns):
    """All methods must produce the same gradient (the benchmark compares equal computations)."""
    grads = []
    for fn in fns:
        step(fn, *inputs)
        grads.append(inputs[0].grad.float().clone())
    ref = grads[0]
    tol = 2e-2 if inputs[0].dtype == torch.bfloat16 else 1e-5
    for g in grads[1:]:
        err = float((g - ref).abs().max() / ref.abs().max())
        assert err < tol, f"methods disagree: rel err {err}"


def run(device, sizes, repeats):
    rows = []
    methods = {"unfused": unfused_loss, "fused_torch": fused_loss("torch")}
    if device.type == "cuda":
        methods["fused_triton"] = fused_loss("triton")
    for label, shape in sizes:
        for dname, dtype in DTYPES.items():
            inputs = make_inputs(shape, dtype, device)
            check_same(inputs, list(methods.values()))
            row = dict(size=label, shape=list(shape), dtype=dname, device=device.type,
                       elements=math.prod(shape))
            for name, fn in methods.items():
                row[f"{name}_ms"], row[f"{name}_median_ms"] = time_ms(fn, inputs, device, repeats)
                row[f"{name}_peak_MiB"] = peak_bytes(fn, inputs, device) / 2**20
            for name in methods:
                if name != "unfused":
                    row[f"{name}_time_ratio"] = row[f"{name}_ms"] / row["unfused_ms"]
                    row[f"{name}_mem_ratio"] = row[f"{name}_peak_MiB"] / max(row["unfused_peak_MiB"], 1e-9)
            if device.type == "cuda":
                es = torch.finfo(dtype).bits // 8
                moved = 6 * row["elements"] * es  # fwd reads x0, D_p, D_q; bwd reads D_p, D_q, writes grad
                row["triton_bytes_moved"] = moved
                row["triton_GBps"] = moved / (row["fused_triton_ms"] * 1e-3) / 1e9
            rows.append(row)
            print(json.dumps(row))
            del inputs
    return rows


def markdown(result) -> str:
    out = ["# Divergence core benchmark: fused weighted score difference vs unfused eager PyTorch", "",
           f"Forward + backward of the per-sample surrogate loss w.r.t. x0. Best of {result['repeats']} runs "
           "(medians in core.json). "
           "Peak = extra bytes allocated during one step (CPU: profiler allocator events; CUDA: "
           "max_memory_allocated), the x0 gradient included. Ratios are fused / unfused (lower is better).",
           "",
           f"## CPU ({result['cpu']}, threads: {result['threads']}, torch {result['torch']})", "",
           "| size | dtype | elements | unfused ms | fused (torch) ms | time ratio | unfused peak MiB | "
           "fused peak MiB | memory ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in result["cpu_rows"]:
        out.append(f"| {r['size']} | {r['dtype']} | {r['elements']:,} | {r['unfused_ms']:.2f} | "
                   f"{r['fused_torch_ms']:.2f} | {r['fused_torch_time_ratio']:.2f} | "
                   f"{r['unfused_peak_MiB']:.1f} | {r['fused_torch_peak_MiB']:.1f} | "
                   f"{r['fused_torch_mem_ratio']:.2f} |")
    out += ["", "The Triton kernels cannot be timed meaningfully on CPU (interpreter only).", "",
            "## GPU", ""]
    if not result["gpu_rows"]:
        out.append(f"not run: {result['gpu_status']}")
    else:
        out += [f"Device: {result['gpu']}; measured copy bandwidth {result['gpu_copy_GBps']:.0f} GB/s.", "",
                "| size | dtype | unfused ms | fused (torch) ms | fused (triton) ms | triton time ratio | "
                "unfused peak MiB | triton peak MiB | triton memory ratio | triton GB/s (6 x N x bytes) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["gpu_rows"]:
            out.append(f"| {r['size']} | {r['dtype']} | {r['unfused_ms']:.3f} | {r['fused_torch_ms']:.3f} | "
                       f"{r['fused_triton_ms']:.3f} | {r['fused_triton_time_ratio']:.2f} | "
                       f"{r['unfused_peak_MiB']:.1f} | {r['fused_triton_peak_MiB']:.1f} | "
                       f"{r['fused_triton_mem_ratio']:.2f} | {r['triton_GBps']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small sizes only")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: stable timings on a shared machine)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else SIZES
    torch.set_num_threads(args.threads)
    result = dict(torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), repeats=args.repeats)
    result["cpu_rows"] = run(torch.device("cpu"), sizes, args.repeats)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        result["gpu"] = torch.cuda.get_device_name(dev)
        result["gpu_copy_GBps"] = copy_bandwidth(dev)
        result["gpu_rows"] = run(dev, sizes, max(args.repeats, 20))
        result["gpu_status"] = "run"
    else:
        result["gpu_rows"] = []
        result["gpu_status"] = "no GPU"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "core.json").write_text(json.dumps(result, indent=1))
    (out / "core.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
