"""`diffdiv eval` under `accelerate launch` with 2 CPU processes reproduces the 1-process numbers."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffdiv.eval.job import main as eval_main
from diffdiv.models.loading import save_denoiser
from diffdiv.models.unet import UNetDenoiser

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    save_denoiser(UNetDenoiser(unet, DDPMScheduler(clip_sample=False)), tmp_path / "m")
    # 70 samples in chunks of 16: 5 chunks, split 3 / 2 over the ranks, the last one short
    args = ["--model", str(tmp_path / "m"), "--steps", "1,2", "--metrics", "fid,precision_recall,mmd,reward:digits",
            "--ref", "digits:test", "--num-samples", "70", "--batch-size", "16", "--no-progress",
            "--cache-dir", str(tmp_path / "cache")]
    assert eval_main([*args, "--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "diffdiv.eval.job", *args,
           "--out", str(tmp_path / "two")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert len(one["rows"]) == len(two["rows"]) == 2
    for a, b in zip(one["rows"], two["rows"], strict=True):
        ma, mb = a["metrics"], b["metrics"]
        assert mb["fid"] == pytest.approx(ma["fid"], rel=1e-9, abs=1e-9)
        assert (mb["precision"], mb["recall"]) == (ma["precision"], ma["recall"])
        assert mb["mmd"] == pytest.approx(ma["mmd"], rel=1e-9, abs=1e-12)
        assert mb["reward:digits"]["mean"] == pytest.approx(ma["reward:digits"]["mean"], rel=1e-9)
        assert mb["reward:digits"]["n"] == 70
    assert (tmp_path / "two" / "samples_m_2steps.png").is_file()
