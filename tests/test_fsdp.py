"""FSDP2 sharded training (`distributed.strategy: fsdp2`) on 2 gloo ranks: equal to one process (f-distill on a tiny
SD pipeline, rCM on a tiny UNet, DPOK), 1/2 of every sharded network per rank, bitwise resume from a sharded
checkpoint, every other method sharded in bf16 with fp32 masters; gradient checkpointing gives the same
gradients; a bf16 teacher gives an fp32-master student that trains like one from an fp32 teacher.

The 2-rank runs go through `tests/fsdp_runner.py` (several jobs per `accelerate launch`, start-up paid once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           ACCELERATE_USE_CPU="true", PYTHONPATH=str(ROOT))
QUIET = ["progress=false", "log_with=null"]
SHARDED = ["distributed.strategy=fsdp2"]
UNET_FILE = "student/unet/diffusion_pytorch_model.safetensors"


def launch(jobs: list[dict], tmp: Path, mixed_precision: str = "no") -> None:
    """All jobs in one 2-process `accelerate launch` (gloo)."""
    spec = tmp / f"jobs_{len(list(tmp.glob('jobs_*')))}.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", "--num_machines", "1", "--mixed_precision", mixed_precision,
           "--dynamo_backend", "no",
           str(ROOT / "tests" / "fsdp_runner.py"), str(spec)]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, FSDP_RUNNER_TIMEOUT="280"), capture_output=True, text=True,
                       timeout=320)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]


def job(trainer: str, config: str, *overrides: str) -> dict:
    return {"trainer": trainer, "config": str(ROOT / "configs" / config), "overrides": [*overrides, *QUIET]}


def run_here(spec: dict) -> dict:
    """The same job in this process (one process: plain, no sharding)."""
    import importlib

    from diffdiv.config import load_config

    mod, cls = spec["trainer"].split(":")
    trainer_cls = getattr(importlib.import_module(mod), cls)
    return trainer_cls(load_config(trainer_cls.config_cls, spec["config"], spec["overrides"])).train()


def history(out: Path) -> list[dict]:
    ck = sorted((out / "checkpoints").iterdir())[-1]
    return json.loads((ck / "trainer_state.json").read_text())["history"]


def rel_update_diff(a: dict, b: dict, init: dict) -> tuple[float, float]:
    """(||update_a||, ||update_a - update_b|| / ||update_a||) with update = final - initial weights."""
    da = torch.cat([(a[k] - init[k]).flatten() for k in a])
    db = torch.cat([(b[k] - init[k]).flatten() for k in a])
    return float(da.norm()), float((da - db).norm() / da.norm())


FD = "diffdiv.trainers.fdistill:FDistillTrainer"
RCM = "diffdiv.trainers.rcm:RCMTrainer"
DPOK = "diffdiv.trainers.dpok:DPOKTrainer"


def fd_job(sd: Path, out: Path, *extra: str) -> dict:
    return job(FD, "tiny_sd_fdistill_js.yaml", f"teacher.path={sd}", f"output_dir={out}", "max_steps=2",
               "checkpoint_every=1", "eval_samples=0", *extra)


def rcm_job(unet: Path, out: Path, *extra: str) -> dict:
    return job(RCM, "digits_rcm.yaml", f"teacher.path={unet}", f"output_dir={out}", "max_steps=3", "batch_size=8",
               "dmd_start=1", "tangent_warmup=2", "eval_samples=0", "times_search=false", "checkpoint_every=3",
               "log_every=1", *extra)


def dpok_job(sd: Path, out: Path, *extra: str) -> dict:
    return job(DPOK, "tiny_sd_dpok.yaml", f"model.path={sd}", f"output_dir={out}", "lora.enabled=true", "lora.rank=4",
               "max_steps=3", "batch_size=4",
               "sample_batch=4", "updates_per_round=2", "buffer_rounds=1", "steps=3", "eval_samples=0",
               "checkpoint_every=3", "log_every=1", "value_baseline=true", *extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from diffdiv.models.tiny import build_tiny_sd, build_tiny_unet2d

    d = tmp_path_factory.mktemp("fsdp_models")
    return {"sd": build_tiny_sd(d / "sd"), "unet": build_tiny_unet2d(d / "unet", sample_size=8, channels=1)}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory) -> Path:
    """Launch 1: f-distill 2 steps, f-distill 1 step (to resume), rCM, DPOK, sharded; launch 2: resume to 2 steps."""
    tmp = tmp_path_factory.mktemp("fsdp_runs")
    launch([fd_job(models["sd"], tmp / "fd", *SHARDED), fd_job(models["sd"], tmp / "fd_half", "max_steps=1", *SHARDED),
            rcm_job(models["unet"], tmp / "rcm", *SHARDED), dpok_job(models["sd"], tmp / "dpok", *SHARDED)], tmp)
    launch([fd_job(models["sd"], tmp / "fd_half", *SHARDED)], tmp)  # same output_dir, max_steps=2: resumes at 1
    return tmp


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_sharded_ranks_match_one_process(models, runs, tmp_path):
    # same global batches, so the same updates up to the reduction order of sums; Adam amplifies that noise only
    # on elements whose gradient is ~0, so compare update vectors in norm (DDP is no closer: in a 4-step f-distill
    # run 2 DDP ranks differ from 1 process by 3.1e-3, 2 FSDP2 ranks by 3.0e-3; rCM 3 steps: 3.1e-4 both)
    cases = [("fd", fd_job(models["sd"], tmp_path / "fd"), models["sd"] / "unet", 1e-2),
             ("rcm", rcm_job(models["unet"], tmp_path / "rcm"), models["unet"] / "unet", 2e-3)]
    for name, spec, init_dir, tol in cases:
        m = run_here(spec)
        assert m["nonfinite_total"] == 0
        one, two = tmp_path / name, runs / name
        for h1, h2 in zip(history(one), history(two), strict=True):
            for k in h1:
                if k.endswith("/loss"):
                    assert abs(h1[k] - h2[k]) <= 1e-4 * max(1.0, abs(h1[k])), (name, k, h1[k], h2[k])
        init = load_file(str(init_dir / "diffusion_pytorch_model.safetensors"))
        norm, rel = rel_update_diff(load_file(str(one / UNET_FILE)), load_file(str(two / UNET_FILE)), init)
        assert norm > 1e-3 and rel < tol, (name, norm, rel)  # measured: fd 4.6e-3, rcm 3.1e-4
    # DPOK: LoRA policy + value net; lora_B starts at 0, so its final value is the update (measured 1.7e-5)
    run_here(dpok_job(models["sd"], tmp_path / "dpok"))
    for h1, h2 in zip(history(tmp_path / "dpok"), history(runs / "dpok"), strict=True):
        for k in ("policy/pg", "policy/value_mean", "value/loss"):
            assert abs(h1[k] - h2[k]) <= 1e-4 * max(1.0, abs(h1[k])), (k, h1[k], h2[k])
    a = load_file(str(tmp_path / "dpok" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(runs / "dpok" / "lora" / "pytorch_lora_weights.safetensors"))
    zero = {k: torch.zeros_like(v) for k, v in a.items()}
    up = {k: v for k, v in a.items() if "lora.up" in k}
    norm, rel = rel_update_diff(up, {k: b[k] for k in up}, zero)
    assert norm > 1e-2 and rel < 1e-3, (norm, rel)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_each_rank_holds_half_of_every_sharded_network(runs):
    for name, nets in [("fd", ("student", "fake_score", "frozen.teacher")),
                       ("rcm", ("student", "fake_score", "frozen.teacher")),
                       ("dpok", ("policy", "value"))]:
        table = json.loads((runs / name / "sharding.json").read_text())
        assert table["world"] == 2 and set(nets) <= set(table["networks"])
        for net in nets:
            row = table["networks"][net]
            assert sum(row["local_numel"]) == row["full_numel"] > 0  # the local shards partition the parameters
            for n in row["local_numel"]:  # measured: 0.500 each, 0.501 / 0.499 for the 48k-parameter value net
                assert abs(n / row["full_numel"] - 0.5) < 0.01, (name, net, row)
        info = json.loads((runs / name / "rank0.json").read_text())
        assert info["sharded"] and all(d == ["torch.float32"] for d in info["master_dtypes"].values())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharded_resume_is_bitwise(runs):
    straight, resumed = runs / "fd", runs / "fd_half"
    assert [c.name for c in sorted((resumed / "checkpoints").iterdir())] == ["step_00000001", "step_00000002"]
    sealed = json.loads((resumed / "checkpoints" / "step_00000001" / "COMPLETE.json").read_text())
    assert sealed["world"] == 2 and any(f.startswith("sharded/") and f.endswith(".distcp") for f in sealed["files"])
    a, b = load_file(str(straight / UNET_FILE)), load_file(str(resumed / UNET_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exported (EMA) student
    for h1, h2 in zip(history(straight), history(resumed), strict=True):  # every logged value, exactly
        assert {k: v for k, v in h1.items() if k != "elapsed_s"} == {k: v for k, v in h2.items() if k != "elapsed_s"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_method_runs_sharded_in_bf16(models, tmp_path):
    """Uni-Instruct (with gradient checkpointing), DI*, IPRO and ROCM (LoRA on a bf16 model) and sCM (JVP through
    the sharded student), in bf16: fp32 master shards, bf16 block compute, finite, exported."""
    sd, unet = models["sd"], models["unet"]
    bf = [*SHARDED, "mixed_precision=bf16", "checkpoint_every=1", "max_steps=1"]
    jobs = {
        "ui": job("diffdiv.trainers.uni_instruct:UniInstructTrainer", "tiny_sd_fdistill_js.yaml", f"teacher.path={sd}",
                  "method=uni_instruct", "divergence=fkl", "eval_samples=2", "gradient_checkpointing=true", *bf),
        "di_star": job("diffdiv.trainers.di_star:DIStarTrainer", "tiny_sd_di_star.yaml", f"teacher.path={sd}",
                       "batch_size=2", "eval_samples=2", "eval_batch=2", "ref_steps=2", *bf),
        "ipro": job("diffdiv.trainers.ipro:IPROTrainer", "tiny_sd_ipro.yaml", f"model.path={sd}",
                    "model.dtype=bfloat16", "batch_size=2", "steps=3", "eval_samples=2", "eval_batch=2", *bf),
        "rocm": job("diffdiv.trainers.rocm:ROCMTrainer", "tiny_sd_rocm.yaml", f"model.path={sd}",
                    "model.dtype=bfloat16", "batch_size=2", "steps=2", "eval_samples=2", "eval_batch=2", *bf),
        "scm": job(RCM, "digits_scm.yaml", f"teacher.path={unet}", "batch_size=8", "eval_samples=8", "eval_steps=[1]",
                   "times_search=false", *bf),
    }
    for name, spec in jobs.items():
        spec["overrides"].append(f"output_dir={tmp_path / name}")
    launch(list(jobs.values()), tmp_path, mixed_precision="bf16")
    for name in jobs:
        out = tmp_path / name
        m = json.loads((out / "metrics.json").read_text())
        assert m["steps"] == 1 and m["nonfinite_total"] == 0, name
        assert (out / ("model" if name in ("ipro", "rocm") else "student") / "model_index.json").is_file(), name
        for r in (0, 1):
            info = json.loads((out / f"rank{r}.json").read_text())
            assert info["sharded"], name
            assert all(d == ["torch.float32"] for d in info["master_dtypes"].values()), (name, info)
            assert info["compute_dtypes"] and all(d == "torch.bfloat16" for d in info["compute_dtypes"].values()), \
                (name, info)


# ---------------------------------------------------------------------------------------------- one process
def test_shard_plan_looks_through_wrappers(models):
    from diffdiv.models.heads import DiscriminatorHeads
    from diffdiv.models.loading import load_denoiser
    from diffdiv.models.nets import OneStepGenerator
    from diffdiv.trainers.dpok import ValueNet
    from diffdiv.trainers.fdistill import Critic
    from diffdiv.trainers.sharding import block_units, shard_roots

    den = load_denoiser(models["sd"])
    heads = DiscriminatorHeads([(32, 4, 4)], hidden=8)
    assert shard_roots(Critic(den, heads, own_features=False)) == [den.unet, heads]
    assert shard_roots(OneStepGenerator(den)) == [den.unet]
    names = {id(m): n for n, m in den.unet.named_modules()}
    assert sorted(names[id(b)] for b in block_units(den.unet)) == \
        ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    value = ValueNet((4, 8, 8), width=8)
    assert shard_roots(value) == [value] and block_units(value) == []  # a small net: the root only


def test_fsdp2_rejects_fp16():
    from diffdiv.config import ConfigError, load_config
    from diffdiv.trainers.base import TrainConfig

    with pytest.raises(ConfigError, match="fsdp2 supports mixed_precision no or bf16"):
        load_config(TrainConfig, None, ["distributed.strategy=fsdp2", "mixed_precision=fp16"])


def test_gradient_checkpointing_same_gradients(models):
    """diffusers' checkpointing recomputes the blocks in backward (counted) and gives the same gradients: exactly
    equal here on CPU (the recomputation repeats the same kernels); tolerance 1e-6 relative per tensor."""
    from diffdiv.models.loading import load_denoiser
    from diffdiv.trainers.networks import enable_gradient_checkpointing

    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        den = load_denoiser(models["sd"])
        den.requires_grad_(True).train()
        if checkpointing:
            on, off = enable_gradient_checkpointing(den)
            assert on == ["unet"] and off == []
        calls = []
        den.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda m, i: calls.append(1))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *den.sample_shape, generator=g)
        cond = den.encode_prompts(["a photo of a cat", "a red car"])
        loss = (den(x, torch.tensor([300.0, 700.0]), cond) ** 2).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in den.unet.named_parameters()}, len(calls)

    plain, calls_plain = grads(False)
    ckpt, calls_ckpt = grads(True)
    assert calls_plain == 1 and calls_ckpt == 2  # forward + recomputation in backward (pre-hook: the
    # recomputation stops early once it has what backward needs, so a post-forward hook would not see it)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-9)
    assert sum(float(v.norm()) for v in plain.values()) > 0


def test_gradient_checkpointing_switch_on_trained_networks(models, tmp_path, capsys):
    from diffdiv.config import load_config
    from diffdiv.trainers.fdistill import FDistillConfig, FDistillTrainer

    cfg = load_config(FDistillConfig, ROOT / "configs" / "tiny_sd_fdistill_js.yaml",
                      [f"teacher.path={models['sd']}", f"output_dir={tmp_path}", "gradient_checkpointing=true",
                       "gan.pool_size=2", "gan.pool_steps=1", *QUIET])
    tr = FDistillTrainer(cfg)
    tr.setup()
    assert tr.nets["student"].module.unet.is_gradient_checkpointing
    assert tr.nets["fake_score"].module.fake.unet.is_gradient_checkpointing
    assert not tr.teacher.unet.is_gradient_checkpointing  # frozen: not trained
    out = capsys.readouterr().out
    assert "gradient checkpointing on for: student.unet, fake_score.fake.unet" in out
    assert "not applied (not a diffusers model that supports it): fake_score.heads" in out


def test_bf16_teacher_gives_fp32_master_student(models, tmp_path):
    """A student copied from a bf16 teacher trains fp32 master weights: after 3 sCM steps (lr 1e-4) nearly every
    weight moved, as with an fp32 teacher (AdamW on bf16 weights moved ~1% of them: steps below half a bf16 ulp
    are rounded away), by an update of the same size."""
    from diffdiv.config import load_config
    from diffdiv.trainers.rcm import RCMConfig, RCMTrainer

    moved, size = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(RCMConfig, ROOT / "configs" / "digits_scm.yaml",
                          [f"teacher.path={models['unet']}", f"output_dir={tmp_path / dtype}", f"teacher.dtype={dtype}",
                           "max_steps=3", "batch_size=8", "eval_samples=0", "times_search=false",
                           "checkpoint_every=0", *QUIET])
        tr = RCMTrainer(cfg)
        tr.setup()
        assert next(tr.teacher.unet.parameters()).dtype == getattr(torch, dtype)
        params = tr.nets["student"].params
        assert {p.dtype for p in params} == {torch.float32}
        w0 = [p.detach().clone() for p in params]
        tr.train()
        d = torch.cat([(p.detach() - w).flatten() for p, w in zip(params, w0)])
        moved[dtype] = float((d != 0).double().mean())
        size[dtype] = float(d.norm())
    assert moved["float32"] > 0.99 and moved["bfloat16"] > 0.99, moved  # measured: 0.99999 / 0.99998
    assert 0.6 < size["bfloat16"] / size["float32"] < 1.6, size  # measured: 0.063 / 0.073 = 0.87
