"""Evaluation reports: metrics.json, report.md, the side-by-side comparison table and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# scalar metrics in table order, with the column title and how many decimals to print
SCALARS = {
    "fid": ("FID", 3),
    "precision": ("precision", 3),
    "recall": ("recall", 3),
    "mmd": ("MMD", 5),
    "mode_recall": ("mode recall", 3),
    "far_fraction": ("far frac.", 3),
    "max_rel_mass_error": ("max mass err.", 3),
    "mmd_rbf": ("MMD (rbf)", 5),
}


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flatten a row's metrics to scalars (rewards / CLIP score -> their mean; stderr as `<name>.stderr`)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, dict) and "mean" in v:
            out[k] = float(v["mean"])
            out[f"{k}.stderr"] = float(v["stderr"])
    return out


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k in scalar_metrics(r["metrics"]):
            if not k.endswith(".stderr") and k not in keys:
                keys.append(k)
    order = list(SCALARS)
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.4g}"


UNRELIABLE = " †"  # marks metrics computed from too few samples for the feature dimension (report warnings)


def _cell(metrics: dict[str, Any], key: str, unreliable: list[str] | None = None) -> str:
    s = scalar_metrics(metrics)
    if key not in s:
        return "–"
    digits = SCALARS.get(key, ("", 4))[1]
    mark = UNRELIABLE if key in (unreliable or []) else ""
    if f"{key}.stderr" in s:
        return f"{_fmt(s[key], digits)} ± {_fmt(s[f'{key}.stderr'], digits)}{mark}"
    return _fmt(s[key], digits) + mark


def _guidance(r: dict[str, Any]) -> str:
    w = r.get("guidance_scale")
    if w is None:
        return "–"
    tw = r.get("teacher_guidance_scale")
    return f"{w:g}" + (f" (teacher {tw:g}, distilled)" if tw is not None else "")


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one row per (model, steps); † marks metrics flagged unreliable."""
    cols = _columns(rows)
    head = ["model", "steps", "kind", "n", "guidance"] + [SCALARS.get(c, (c,))[0] for c in cols] + ["time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], "–" if r["steps"] is None else str(r["steps"]), r.get("kind") or "samples",
                 str(r["num_samples"]), _guidance(r)] + [_cell(r["metrics"], c, r.get("unreliable")) for c in cols] \
            + [f"{r['time_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{metric: {model label: {steps: value}}} over every scalar metric (stderr kept as `<metric>.stderr`)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        steps = "-" if r["steps"] is None else str(r["steps"])
        for k, v in scalar_metrics(r["metrics"]).items():
            out.setdefault(k, {}).setdefault(r["label"], {})[steps] = v
        out.setdefault("time_s", {}).setdefault(r["label"], {})[steps] = float(r["time_s"])
    return out


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """Side-by-side: one table per metric, models as rows, step counts as columns."""
    comp = comparison(rows)
    step_cols: list[str] = []
    for r in rows:
        s = "-" if r["steps"] is None else str(r["steps"])
        if s not in step_cols:
            step_cols.append(s)
    step_cols.sort(key=lambda s: (s == "-", int(s) if s != "-" else 0))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    parts = []
    for key in [*_columns(rows), "time_s"]:
        title = SCALARS.get(key, (key,))[0]
        digits = SCALARS.get(key, ("", 4))[1]
        head = ["model"] + [f"{s} steps" if s != "-" else "samples" for s in step_cols]
        lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for lab in labels:
            vals = comp.get(key, {}).get(lab, {})
            errs = comp.get(f"{key}.stderr", {}).get(lab, {})
            cells = []
            for s in step_cols:
                if s not in vals:
                    cells.append("–")
                elif s in errs:
                    cells.append(f"{_fmt(vals[s], digits)} ± {_fmt(errs[s], digits)}")
                else:
                    cells.append(_fmt(vals[s], digits if key != "time_s" else 1))
            lines.append("| " + " | ".join([lab, *cells]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- training logs
def find_training_log(model_dir: str | Path) -> Path | None:
    """train_log.jsonl next to / above the model, else the newest checkpoint's trainer_state.json."""
    d = Path(model_dir)
    if not d.is_dir():
        return None
    for base in (d, d.parent):
        f = base / "train_log.jsonl"
        if f.is_file():
            return f
    for base in (d, d.parent):
        ck = base / "checkpoints"
        if ck.is_dir():
            states = sorted(p / "trainer_state.json" for p in ck.iterdir()
                            if p.is_dir() and p.name.startswith("step_") and (p / "trainer_state.json").is_file())
            if states:
                return states[-1]
    return None


def read_history(path: str | Path) -> list[dict[str, float]]:
    """Logged steps from train_log.jsonl (one JSON object a line) or trainer_state.json's `history`."""
    p = Path(path)
    if p.suffix == ".jsonl":
        out = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line while training is still writing
        return out
    return list(json.loads(p.read_text()).get("history", []))


def plot_training_log(path: str | Path, out_png: Path, title: str = "") -> str | None:
    """Reward curve (keys with 'reward') or else loss curves from a training log; None if nothing to plot."""
    hist = [h for h in read_history(path) if isinstance(h, dict)]
    if not hist:
        return None
    keys = sorted({k for h in hist for k, v in h.items() if isinstance(v, (int, float)) and "reward" in k})
    ylabel = "reward"
    if not keys:
        keys = sorted({k for h in hist for k, v in h.items() if isinstance(v, (int, float)) and k.endswith("loss")})
        ylabel = "loss"
    if not keys:
        return None
    xs = [h.get("step", i) for i, h in enumerate(hist)]
    series = {}
    for k in keys:
        pts = [(x, h[k]) for x, h in zip(xs, hist, strict=True) if k in h and math.isfinite(h[k])]
        if pts:
            series[k] = ([p[0] for p in pts], [p[1] for p in pts])
    if not series:
        return None
    from diffdiv.eval.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for k, (x, y) in series.items():
        ax.plot(x, y, lw=1.2, label=k)
    if ylabel == "loss" and all(v > 0 for _, ys in series.values() for v in ys):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png.name


# ----------------------------------------------------------------------------- the report
def metric_vs_steps(rows: list[dict[str, Any]], out_png: Path) -> str | None:
    """Panels of each scalar metric against the number of steps (models with >= 2 step counts)."""
    from diffdiv.eval.plots import panels_plot

    labels = [lab for lab in dict.fromkeys(r["label"] for r in rows)
              if len([r for r in rows if r["label"] == lab and r["steps"]]) >= 2]
    if not labels:
        return None
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for key in _columns(rows):
        for lab in labels:
            pts = sorted((r["steps"], scalar_metrics(r["metrics"])[key]) for r in rows
                         if r["label"] == lab and r["steps"] and key in scalar_metrics(r["metrics"]))
            if len(pts) >= 2:
                panels.setdefault(SCALARS.get(key, (key,))[0], {})[lab] = ([p[0] for p in pts], [p[1] for p in pts])
    if not panels:
        return None
    panels_plot(panels, out_png, xlabel="sampling steps", logx=True)
    return out_png.name


def _steps(k: int) -> str:
    return f"{k} step" + ("s" if k != 1 else "")


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, str]:
    """Write metrics.json, report.md, comparison.{md,json} and plots into `out`; returns the file names."""
    from diffdiv.models.loading import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    files = {"metrics": "metrics.json", "report": "report.md", "comparison_md": "comparison.md",
             "comparison_json": "comparison.json"}
    plot = metric_vs_steps(rows, out / "metric_vs_steps.png")
    if plot:
        files["metric_vs_steps"] = plot
    curves: dict[str, str] = {}
    for r in rows:
        lab = r["label"]
        if r.get("training_log") and lab not in curves:
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in lab)
            name = plot_training_log(r["training_log"], out / f"training_curve_{safe}.png",
                                     title=f"{lab}: training log")
            if name:
                curves[lab] = name
    if curves:
        files["training_curves"] = ", ".join(curves.values())
    report = dict(report, files=files)
    write_json_atomic(out / "metrics.json", report)
    write_json_atomic(out / "comparison.json", {"reference": report.get("reference"),
                                                "features": report.get("features"),
                                                "num_samples": report.get("num_samples"),
                                                "table": comparison(rows)})
    (out / "comparison.md").write_text(comparison_markdown(rows) + "\n")

    md = ["# diffdiv evaluation report", ""]
    if report.get("command"):
        md += ["```", report["command"], "```", ""]
    ref, feats = report.get("reference"), report.get("features")
    if ref:
        n_ref = f", n = {ref['n']}" if ref.get("n") else ""
        md.append(f"- reference: `{ref['spec']}` ({ref['description']}{n_ref})")
    if feats:
        md.append(f"- features: `{feats['spec']}` (id `{feats['id']}`, {feats['dim']}-d)")
    md.append(f"- samples per row: {report['num_samples']} (seed {report['seed']}, chunk {report['batch_size']}, "
              f"{report['processes']} process(es)); metrics: {', '.join(report['metrics'])}")
    if report.get("guidance_scale") is not None:
        md.append(f"- guidance scale asked: {report['guidance_scale']:g} (per row: the `guidance` column)")
    samplers = {f"{r['label']}: {r['scheduler']}" for r in rows if r.get("scheduler")}
    if samplers:
        md.append(f"- diffusion schedulers (stored settings unless overridden): {', '.join(sorted(samplers))}")
    if report.get("warnings"):
        md += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
        md += ["", "† unreliable at this sample size (see the warnings)."]
    md += ["", "## Results", "", results_table(rows), ""]
    md += ["FID: Fréchet distance of Gaussian fits to the features (torchmetrics). precision / recall: k-NN "
           "manifold estimate (Kynkäänniemi et al. 2019). MMD: unbiased squared MMD, RBF kernels at 0.5/1/2 x the "
           "median feature distance. Rewards / CLIP score: mean ± standard error. time: sampling + scoring.", ""]
    if plot:
        md += ["## Metrics vs steps", "", f"![metrics vs steps]({plot})", ""]
    grids = [r for r in rows if r.get("grid")]
    if grids:
        md += ["## Samples", ""]
        for r in grids:
            w = f", guidance {_guidance(r)}" if r.get("guidance_scale") is not None else ""
            md += [f"**{r['label']}**" + (f", {_steps(r['steps'])}" if r["steps"] else "") + w, "",
                   f"![{r['label']} {r['steps']}]({r['grid']})", ""]
    if curves:
        md += ["## Training logs", ""]
        for lab, name in curves.items():
            md += [f"**{lab}**", "", f"![{lab} training]({name})", ""]
    per_prompt = [(r, k, v) for r in rows for k, v in r["metrics"].items() if isinstance(v, dict) and "per_prompt" in v]
    if per_prompt:
        md += ["## Per prompt", "", "| model | steps | metric | prompt | mean ± se | n |", "|---|---|---|---|---|---|"]
        for r, k, v in per_prompt:
            for p, s in v["per_prompt"].items():
                md.append(f"| {r['label']} | {r['steps'] or '–'} | {k} | {p} | {_fmt(s['mean'])} ± "
                          f"{_fmt(s['stderr'])} | {s['n']} |")
        md.append("")
    if len({r["label"] for r in rows}) > 1 or len(rows) > 1:
        md += ["## Side by side", "", comparison_markdown(rows), ""]
    (out / "report.md").write_text("\n".join(md))
    return files
