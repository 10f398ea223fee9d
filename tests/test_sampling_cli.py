"""Samplers on the exact teacher, and the `diffdiv sample` CLI on saved pipelines."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffdiv.data.mixtures import MixtureConfig, build_mixture
from diffdiv.eval.mixture import mmd_rbf, mode_stats
from diffdiv.models.gmm import GaussianMixtureTeacher
from diffdiv.models.loading import load_denoiser, save_denoiser
from diffdiv.models.nets import MLPNet, NetDenoiser
from diffdiv.models.unet import UNetDenoiser
from diffdiv.sampling import sample


@pytest.fixture(scope="module")
def ring():
    mix = build_mixture(MixtureConfig(kind="ring", num_modes=8, radius=2.0, std=0.15))
    return mix, GaussianMixtureTeacher(mix)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpm++"])
def test_samplers_reproduce_exact_teacher(ring, sampler):
    """With the exact denoiser, 50 steps of any sampler recover the mixture (MMD near the
    sample-vs-sample noise floor, every mode within 25% of its mass)."""
    mix, teacher = ring
    x = sample(teacher, 1500, 50, seed=0, sampler=sampler)
    ref = mix.sample(1500, torch.Generator().manual_seed(7))
    ref2 = mix.sample(1500, torch.Generator().manual_seed(8))
    floor = abs(mmd_rbf(ref, ref2))
    st = mode_stats(x, mix)
    assert mmd_rbf(ref, x) < floor + 0.006
    assert st["recall"] == 1.0 and st["max_rel_error"] < 0.25 and st["far_fraction"] < 0.01


def test_same_seed_same_samples(ring):
    _, teacher = ring
    a = sample(teacher, 64, 10, seed=3)
    b = sample(teacher, 64, 10, seed=3)
    c = sample(teacher, 64, 10, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _run_cli(*args):
    r = subprocess.run([sys.executable, "-m", "diffdiv.cli", *args], capture_output=True, text=True)
    return r


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    d = tmp_path_factory.mktemp("unet") / "model"
    save_denoiser(UNetDenoiser(unet, DDPMScheduler(clip_sample=False)), d, {"default_steps": 4})
    return d


def test_cli_sample_images_is_reproducible(unet_dir, tmp_path):
    r1 = _run_cli("sample", "--model", str(unet_dir), "--num-samples", "6", "--steps", "3", "--seed", "1",
                  "--out", str(tmp_path / "a.npz"))
    assert r1.returncode == 0, r1.stderr
    info = json.loads(r1.stdout.strip().splitlines()[-1])
    assert info["num_samples"] == 6 and info["steps"] == 3
    r2 = _run_cli("sample", "--model", str(unet_dir), "--num-samples", "6", "--steps", "3", "--seed", "1",
                  "--out", str(tmp_path / "b.npz"))
    assert r2.returncode == 0
    a, b = np.load(tmp_path / "a.npz")["samples"], np.load(tmp_path / "b.npz")["samples"]
    assert a.shape == (6, 1, 8, 8) and np.array_equal(a, b)
    assert (tmp_path / "a.png").stat().st_size > 100
    # the folder is a real diffusers pipeline
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(unet_dir)
    assert pipe.unet.config.sample_size == 8


def test_cli_vector_model_and_errors(tmp_path):
    den = NetDenoiser(MLPNet(in_dim=2, hidden=16, depth=1), sigma_data=0.7)
    save_denoiser(den, tmp_path / "mlp")
    loaded = load_denoiser(tmp_path / "mlp")
    x = torch.randn(5, 2)
    t = torch.full((5,), 300.0)
    torch.testing.assert_close(loaded(x, t), den(x, t))
    r = _run_cli("sample", "--model", str(tmp_path / "mlp"), "--num-samples", "10", "--steps", "2",
                 "--out", str(tmp_path / "v.npz"))
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "v.npz")["samples"].shape == (10, 2)
    bad = [
        (["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o.npz")], "does not exist"),
        (["--model", str(tmp_path / "mlp"), "--num-samples", "0", "--out", str(tmp_path / "o.npz")], "positive"),
        (["--model", str(tmp_path / "mlp"), "--out", str(tmp_path / "o.txt")], "must end in .npz"),
        (["--model", str(tmp_path / "mlp"), "--sampler", "magic", "--out", str(tmp_path / "o.npz")], "unknown sampler"),
    ]
    for args, needle in bad:
        r = _run_cli("sample", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_samples_tiny_sd_pipeline_with_cfg(tmp_path):
    """A tiny SD pipeline built from configs, saved, loaded back offline and sampled with CFG."""
    from diffdiv.models.tiny import build_tiny_sd

    model = build_tiny_sd(tmp_path / "sd")
    outs = {}
    for name, gs in [("g1", "1.0"), ("g45", "4.5"), ("g45b", "4.5")]:
        r = _run_cli("sample", "--model", str(model), "--num-samples", "4", "--steps", "3", "--seed", "5",
                     "--prompt", "a photo of a cat", "--guidance-scale", gs, "--out", str(tmp_path / f"{name}.npz"))
        assert r.returncode == 0, r.stderr
        outs[name] = np.load(tmp_path / f"{name}.npz")
    assert outs["g45"]["images"].shape == (4, 3, 32, 32)
    assert outs["g45"]["samples"].shape == (4, 4, 8, 8)
    assert np.array_equal(outs["g45"]["samples"], outs["g45b"]["samples"])
    assert np.abs(outs["g45"]["samples"] - outs["g1"]["samples"]).max() > 1e-3
    assert list(outs["g45"]["prompts"]) == ["a photo of a cat"] * 4
    assert (tmp_path / "g45.png").is_file()
