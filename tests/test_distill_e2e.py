"""End-to-end distillation jobs on real (tiny) diffusers pipelines built offline: the entry scripts, the output
contract, loading the student with `diffdiv sample` and with diffusers' own `from_pretrained`, and a 2-process
`accelerate launch` run on CPU that must match the 1-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
QUIET = ["progress=false", "log_with=null"]


def _run(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from diffdiv.models.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "teacher")


def _unet_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_tiny_sd_fdistill_end_to_end(tiny_sd, tmp_path):
    out = tmp_path / "one"
    p = _run([sys.executable, "train/fdistill.py", "--config", "configs/tiny_sd_fdistill_js.yaml",
              f"teacher.path={tiny_sd}", f"output_dir={out}", *QUIET])
    assert "| steps" in p.stdout and "final_student_loss" in p.stdout  # the metrics table
    for name in ("student", "checkpoints", "metrics.json", "samples.png"):
        assert (out / name).exists(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 4 and m["nonfinite_total"] == 0
    # diffusers loads the student as a plain StableDiffusionPipeline
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "student", safety_checker=None)
    torch.testing.assert_close(pipe.unet.state_dict()["conv_in.weight"], _unet_weights(out)["conv_in.weight"])
    # the project's CLI draws one-step samples with the prompt
    npz = tmp_path / "s.npz"
    _run([sys.executable, "-m", "diffdiv.cli", "sample", "--model", str(out / "student"), "--steps", "1",
          "--num-samples", "3", "--seed", "2", "--prompt", "a photo of a cat", "--out", str(npz)])
    data = np.load(npz)
    assert data["samples"].shape == (3, 4, 8, 8) and data["images"].shape == (3, 3, 32, 32)
    assert np.isfinite(data["images"]).all()
    # the student moved away from the teacher
    teacher_w = load_file(str(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(teacher_w["conv_in.weight"], _unet_weights(out)["conv_in.weight"])


@pytest.mark.slow
def test_two_process_accelerate_launch_matches_one_process(tiny_sd, tmp_path):
    common = ["--config", "configs/tiny_sd_fdistill_js.yaml", f"teacher.path={tiny_sd}", "max_steps=2",
              "checkpoint_every=2", "eval_samples=0", *QUIET]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "train/fdistill.py", *common, f"output_dir={one}"])
    env = dict(ENV, ACCELERATE_USE_CPU="true")
    # the default tracker (tensorboard): closing it must not end the process group under the other rank (exit 0)
    p = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "0",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "train/fdistill.py", *common, "log_with=tensorboard", f"output_dir={two}"], env=env)
    assert p.stdout.count("| steps") == 1  # only the main process prints the table
    assert list((two / "logs").rglob("events.out.tfevents*"))  # the tracker wrote its log
    wa, wb = _unet_weights(one), _unet_weights(two)
    teacher_w = load_file(str(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors"))
    # same global batches and statistics, so the same updates up to floating-point reduction order (Adam
    # amplifies that noise only on elements whose gradient is ~0): compare the update vectors in norm
    da = torch.cat([(wa[k] - teacher_w[k]).flatten() for k in wa])
    db = torch.cat([(wb[k] - teacher_w[k]).flatten() for k in wa])
    assert float(da.norm()) > 1e-4  # training moved the weights, so the comparison is not vacuous
    assert float((da - db).norm() / da.norm()) < 1e-2
    ck = sorted((two / "checkpoints").iterdir())
    assert [c.name for c in ck] == ["step_00000002"] and json.loads((ck[0] / "COMPLETE.json").read_text())["world"] == 2


@pytest.mark.slow
def test_dispatch_uni_instruct_on_tiny_unet_teacher(tmp_path):
    from diffdiv.models.tiny import build_tiny_unet2d

    teacher = build_tiny_unet2d(tmp_path / "teacher", sample_size=8, channels=1)
    out = tmp_path / "ui"
    p = _run([sys.executable, "train/distill.py", "--config", "configs/digits_uni_instruct_fkl.yaml",
              f"teacher.path={teacher}", f"output_dir={out}", "max_steps=2", "batch_size=8", "eval_samples=64",
              "checkpoint_every=1", "gan.head_hidden=8", *QUIET])
    assert "student_fid_vs_test" in p.stdout
    meta = json.loads((out / "student" / "diffdiv.json").read_text())
    assert meta["method"] == "uni_instruct" and meta["variant"] == "uni_instruct"
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(out / "student")
    assert pipe.unet.config.sample_size == 8
    # bad input: one line, exit status 2
    bad = subprocess.run([sys.executable, "train/distill.py", "--config", "configs/digits_uni_instruct_fkl.yaml",
                          "method=gan"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: method")


@pytest.mark.slow
def test_flow_matching_transformer_teacher(tmp_path):
    # SD3-style MMDiT + rectified flow: both trainers run (Uni-Instruct backpropagates through the teacher and
    # fake transformers), and the student loads as a diffusers StableDiffusion3Pipeline
    from diffusers import StableDiffusion3Pipeline

    from diffdiv.config import load_config
    from diffdiv.models.tiny import build_tiny_sd3
    from diffdiv.trainers.fdistill import FDistillConfig, FDistillTrainer
    from diffdiv.trainers.uni_instruct import UniInstructConfig, UniInstructTrainer

    teacher = build_tiny_sd3(tmp_path / "sd3", t5=False)
    ov = [f"teacher.path={teacher}", "max_steps=2", "eval_samples=2", "checkpoint_every=0", "gan.pool_steps=2",
          "gan.pool_size=4", "gan.head_hidden=8"]
    cfg = load_config(UniInstructConfig, ROOT / "configs/tiny_sd_fdistill_js.yaml",
                      ov + [f"output_dir={tmp_path / 'ui'}", "method=uni_instruct", "divergence=fkl"])
    m = UniInstructTrainer(cfg).train()
    assert m["nonfinite_total"] == 0 and 0 < m["final_student_r_mean"] < 20
    cfg = load_config(FDistillConfig, ROOT / "configs/tiny_sd_fdistill_js.yaml",
                      ov + [f"output_dir={tmp_path / 'fd'}", "gan.features=fake"])
    assert FDistillTrainer(cfg).train()["nonfinite_total"] == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "fd" / "student", text_encoder_3=None, tokenizer_3=None)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
