"""Reward fine-tuning trainers end to end on tiny real pipelines: LoRA save/load round trips (diffusers and
peft formats), the frozen reference, short DPOK / IPRO / ROCM / DI* runs with their exports, resume, the
video (frames) path with the identity-pool reward, one-line errors, and the recipes parse."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffdiv.config import ConfigError, load_config
from diffdiv.models.loading import load_denoiser, save_denoiser
from diffdiv.models.lora import (
    LoRAConfig,
    adapters_disabled,
    add_lora,
    has_lora,
    load_lora,
    merged_copy,
    save_lora,
)
from diffdiv.models.tiny import build_tiny_sd, build_tiny_unet2d
from diffdiv.trainers.di_star import DIStarTrainer
from diffdiv.trainers.dpok import DPOKTrainer
from diffdiv.trainers.entry import run
from diffdiv.trainers.ipro import IPROTrainer
from diffdiv.trainers.rocm import ROCMTrainer

ROOT = Path(__file__).resolve().parents[1]
FAST = ["log_with=null", "progress=false", "checkpoint_every=0", "eval_samples=4", "eval_batch=4", "log_every=1",
        "cond.prompt_list=[a photo of a cat, a red car]"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    return build_tiny_unet2d(tmp_path_factory.mktemp("unet") / "pipe", channels=1, sample_size=8)


def _randomize(params, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(scale * torch.randn(p.shape, generator=g))


def _probe(model, cond=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *model.sample_shape, generator=g)
    return x, torch.tensor([700.0, 200.0]), cond


def test_lora_roundtrip_sd_pipeline(tiny_sd, tmp_path):
    model = load_denoiser(tiny_sd)
    model.requires_grad_(False)
    params = add_lora(model.trainable, LoRAConfig(rank=2, alpha=6.0))  # scale 3: the alpha must survive saving
    _randomize(params)
    cond = model.encode_prompts(["a cat", "a dog"])
    x, t, _ = _probe(model)
    with torch.no_grad():
        y = model(x, t, cond)
        with adapters_disabled(model.trainable):
            y0 = model(x, t, cond)
        base = load_denoiser(tiny_sd)(x, t, cond)
    torch.testing.assert_close(y0, base)  # the reference is exactly the pretrained model
    assert (y - y0).abs().max() > 1e-3
    assert all(p.requires_grad for p in params)  # flags restored after the reference pass
    save_lora(model, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh = load_denoiser(tiny_sd)
    fresh.pipeline().load_lora_weights(str(tmp_path / "lora"))  # the plain diffusers way
    merged = merged_copy(model)
    assert not has_lora(merged.trainable) and has_lora(model.trainable)
    save_denoiser(merged, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, cond), y, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged(x, t, cond), y, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(load_denoiser(tmp_path / "merged")(x, t, cond), y, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x, t, cond), y)  # merging a copy leaves the policy alone


def test_lora_roundtrip_unet2d_peft_format(tiny_unet, tmp_path):
    from peft import PeftModel

    model = load_denoiser(tiny_unet)
    model.requires_grad_(False)
    params = add_lora(model.trainable, LoRAConfig(rank=2))
    assert any("conv1" in n for n, p in model.trainable.named_parameters() if "lora_" in n)
    _randomize(params)
    x, t, _ = _probe(model)
    with torch.no_grad():
        y = model(x, t)
    save_lora(model, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    fresh = load_denoiser(tiny_unet)
    PeftModel.from_pretrained(fresh.unet, str(tmp_path / "lora"))  # plain peft loading, adapters in place
    other = load_lora(load_denoiser(tiny_unet), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t), y, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(other(x, t), y, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged_copy(model)(x, t), y, rtol=1e-4, atol=1e-5)


def _train(cls, cfg_file, tmp_path, *overrides):
    cfg = load_config(cls.config_cls, ROOT / "configs" / cfg_file, [f"output_dir={tmp_path / 'run'}", *FAST,
                                                                      *overrides])
    tr = cls(cfg)
    metrics = tr.train()
    return tr, metrics, tmp_path / "run"


def _check_export(tr, out, folder="model"):
    policy = tr.nets["policy"].module if "policy" in tr.nets else tr.nets["student"].module.denoiser
    cond = policy.encode_prompts(["a photo of a cat", "a red car"]) if policy.conditional else None
    x, t, _ = _probe(policy)
    with torch.no_grad():
        y = policy(x, t, cond)
        y2 = load_denoiser(out / folder)(x, t, cond)
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("reward_policy", "reward_reference", "mmd2", "paired_mse"):
        assert np.isfinite(metrics[k]), k
    assert (out / "samples.png").is_file() and (out / "eval_history.json").is_file()
    return metrics


def test_ipro_tiny_sd_end_to_end(tiny_sd, tmp_path):
    tr, m, out = _train(IPROTrainer, "tiny_sd_ipro.yaml", tmp_path, f"model.path={tiny_sd}", "max_steps=3",
                        "batch_size=2", "steps=3", "grad_steps=2", "eta=0.5", "lora.enabled=true",
                        "timesteps=uniform")
    assert m["steps"] == 3 and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    torch.testing.assert_close(tr.times, torch.tensor([999.0, 666.0, 333.0, 0.0], dtype=torch.float64))
    metrics = _check_export(tr, out)
    assert metrics["path_kl"] > 0  # the adapters moved the policy away from the reference
    assert {"eval_reward_policy", "eval_reward_gain"} <= set(metrics)
    lora_b = [p for n, p in tr.nets["policy"].module.trainable.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().max()) > 0 for p in lora_b)


def test_dpok_on_policy_ratio_is_one_and_run(tiny_sd, tmp_path):
    cfg = load_config(DPOKTrainer.config_cls, ROOT / "configs" / "tiny_sd_dpok.yaml",
                      [f"model.path={tiny_sd}", f"output_dir={tmp_path / 'r'}", *FAST, "batch_size=4",
                       "sample_batch=2", "steps=3", "updates_per_round=2", "max_steps=3", "value_baseline=true"])
    tr = DPOKTrainer(cfg)
    tr.setup()
    # the chain's grid is the pipeline scheduler's (SD's DDIM, 3 steps: 667, 334, 1, landing on alphas_cumprod[0])
    torch.testing.assert_close(tr.times, torch.tensor([667.0, 334.0, 1.0, 0.0], dtype=torch.float64), rtol=0,
                               atol=1e-9)
    with torch.no_grad():
        _, parts = tr.loss("policy", 0)
    # the stored log-probs are those the update recomputes with unchanged weights: ratio 1, KL 0 at init
    assert abs(parts["approx_kl_old"]) < 1e-6 and parts["clipfrac"] == 0.0 and parts["kl"] == 0.0
    assert len(tr.buffer) == 2 and tr.buffer.data["states"].shape[1] == 4
    m = tr.train()
    assert m["steps"] == 3
    _check_export(tr, tr.out)


def test_dpok_resume_is_exact(tiny_sd, tmp_path):
    """The replay buffer and reward statistics are checkpointed: resuming gives bitwise the same LoRA."""
    base = [f"model.path={tiny_sd}", *FAST, "eval_samples=0", "batch_size=4", "sample_batch=2", "steps=3",
            "updates_per_round=2", "checkpoint_every=3"]
    a = DPOKTrainer(load_config(DPOKTrainer.config_cls, ROOT / "configs/tiny_sd_dpok.yaml",
                                base + [f"output_dir={tmp_path / 'a'}", "max_steps=6"]))
    a.train()
    b1 = DPOKTrainer(load_config(DPOKTrainer.config_cls, ROOT / "configs/tiny_sd_dpok.yaml",
                                 base + [f"output_dir={tmp_path / 'b'}", "max_steps=3"]))
    b1.train()
    (tmp_path / "b" / "metrics.json").unlink()
    b2 = DPOKTrainer(load_config(DPOKTrainer.config_cls, ROOT / "configs/tiny_sd_dpok.yaml",
                                 base + [f"output_dir={tmp_path / 'b'}", "max_steps=6"]))
    b2.train()
    pa = dict(a.nets["policy"].module.trainable.named_parameters())
    pb = dict(b2.nets["policy"].module.trainable.named_parameters())
    init = dict(load_denoiser(tiny_sd).trainable.named_parameters())
    assert any(not torch.equal(v, init[k]) for k, v in pa.items())  # the recipe trains the full UNet
    for k, v in pa.items():
        assert torch.equal(v, pb[k]), k


def test_rocm_unet2d_digits_reward(tiny_unet, tmp_path):
    """ROCM through a 2-step chain of an unconditional UNet2DModel (peft-injected LoRA), digits reward."""
    tr, m, out = _train(ROCMTrainer, "tiny_sd_rocm.yaml", tmp_path, f"model.path={tiny_unet}", "max_steps=2",
                        "batch_size=4", "steps=2", "divergence=hellinger", "reward={name: digits, target: 3}",
                        "eval_reward=null", "cond.prompt_list=null", "lora.enabled=true")
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    metrics = _check_export(tr, out)
    assert metrics["path_kl"] > 0 and "path_hellinger" in metrics
    meta = json.loads((out / "model" / "diffdiv.json").read_text())
    assert meta["kind"] == "consistency" and len(meta["times"]) == 2 and meta["times_2"] == meta["times"]
    # a consistency folder's own times (rCM students write times_<steps>) are used when times is unset
    (out / "model" / "diffdiv.json").write_text(json.dumps({**meta, "times_2": [900.0, 300.0]}))
    again = ROCMTrainer(load_config(ROCMTrainer.config_cls, ROOT / "configs/tiny_sd_rocm.yaml",
                                    [f"model.path={out / 'model'}", f"output_dir={tmp_path / 'again'}", *FAST,
                                     "steps=2", "reward={name: digits, target: 3}", "eval_reward=null",
                                     "cond.prompt_list=null"]))
    again.setup()
    assert again.cm_times == [900.0, 300.0]


def test_ipro_video_frames_identity_pool(tiny_sd, tmp_path):
    """Per-frame image model -> (B, F, C, H, W) videos scored by the identity-pool reward (HOG encoder)."""
    ref = tmp_path / "faces"
    ref.mkdir()
    g = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(g.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    reward = json.dumps({"name": "identity_pool", "encoder": "hog", "reference_dir": str(ref)})
    tr, m, out = _train(IPROTrainer, "tiny_sd_ipro.yaml", tmp_path, f"model.path={tiny_sd}", "max_steps=2",
                        "batch_size=2", "steps=2", "grad_steps=1", "frames=3", "frame_noise_corr=0.5",
                        f"reward={reward}", "eval_reward=null", "eval_samples=2", "eval_batch=2")
    seen = {}
    orig = tr.rewards.fn.forward

    def spy(images, prompts=None, **kw):
        seen["shape"] = tuple(images.shape)
        return orig(images, prompts, **kw)

    tr.rewards.fn.forward = spy
    loss, parts = tr.loss("policy", 0)
    assert seen["shape"] == (2, 3, 3, 32, 32)
    assert torch.isfinite(loss) and -1.0 <= parts["reward"] <= 1.0
    assert np.isfinite(m["reward_policy"])


def test_di_star_tiny_sd_lora_cfg_out(tiny_sd, tmp_path):
    tr, m, out = _train(DIStarTrainer, "tiny_sd_di_star.yaml", tmp_path, f"teacher.path={tiny_sd}", "max_steps=2",
                        "batch_size=2", "cfg_mode=out", "lora.enabled=true", "ref_steps=2")
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    metrics = _check_export(tr, out, folder="student")
    assert "score_div_est" in metrics
    meta = json.loads((out / "student" / "diffdiv.json").read_text())
    assert meta["kind"] == "one_step" and meta["guidance_scale"] == 1.0
    hist = tr.history[-1]
    assert "student/cfg_term" in hist and "fake_score/loss" in hist


def test_one_line_errors(tiny_sd, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(IPROTrainer, ["--config", str(ROOT / "configs/tiny_sd_ipro.yaml"), f"model.path={tiny_sd}",
                          f"output_dir={tmp_path / 'x'}", "reward={name: jpeg_compressibility}", *FAST])
    assert e.value.code == 2
    assert "not differentiable" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="eta > 0"):
        load_config(DPOKTrainer.config_cls, ROOT / "configs/tiny_sd_dpok.yaml", ["eta=0"])
    with pytest.raises(ConfigError, match="uniform only"):
        load_config(DPOKTrainer.config_cls, ROOT / "configs/tiny_sd_dpok.yaml", ["t_start=990"])
    with pytest.raises(ConfigError, match="model.path"):
        DPOKTrainer(load_config(DPOKTrainer.config_cls, None, [f"model.path={tmp_path}/nope"])).preflight()
    with pytest.raises(ConfigError, match="unknown reward"):
        IPROTrainer(load_config(IPROTrainer.config_cls, None, [f"model.path={tiny_sd}",
                                                               "reward={name: nope}"])).preflight()


RECIPES = {"dpok": DPOKTrainer, "ipro": IPROTrainer, "rocm": ROCMTrainer, "di_star": DIStarTrainer}


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                        if any(k in p.name for k in RECIPES)))
def test_recipes_parse(path):
    method = next(k for k in RECIPES if k in path)
    cfg = load_config(RECIPES[method].config_cls, ROOT / "configs" / path, [])
    assert cfg.reward["name"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_dpok_two_processes_match_one(tiny_unet, tmp_path):
    """2 gloo ranks (sharded sampling, gathered reward normalization, sharded minibatches) = 1 process.

    Pixel-space UNet2DModel and the digits reward, so samples and rewards really differ between samples."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT)}
    args = ["--config", str(ROOT / "configs/tiny_sd_dpok.yaml"), f"model.path={tiny_unet}", *FAST, "eval_samples=0",
            "cond.prompt_list=null", "batch_size=4", "sample_batch=4", "steps=3", "updates_per_round=2",
            "max_steps=4", "checkpoint_every=4", "advantage=batch", "reward={name: digits, target: 3}",
            "lr=1e-4",  # small steps: Adam's first update ~ lr sign(g) would amplify reduction-order noise
            "lora.enabled=true", "timesteps=uniform"]  # the DDPM-config UNet's DDIM grid ends on alpha = 1
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "0",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    script = str(ROOT / "train" / "dpok.py")
    r2 = subprocess.run(launch + [script, *args, f"output_dir={tmp_path / 'two'}"], env=env, capture_output=True,
                        text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = subprocess.run([sys.executable, script, *args, f"output_dir={tmp_path / 'one'}"], env=env,
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]

    def curve(d):
        from diffdiv.trainers.checkpoint import list_checkpoints

        ck = list_checkpoints(d / "checkpoints")[-1]
        hist = json.loads((ck / "trainer_state.json").read_text())["history"]
        return torch.tensor([(h["policy/loss"], h["sample/reward"], h["sample/reward_std"]) for h in hist])

    c1, c2 = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert c1.shape == c2.shape == (4, 3)
    assert float(c1[:, 2].min()) > 1e-3  # the rewards really vary between samples
    torch.testing.assert_close(c2, c1, rtol=1e-3, atol=1e-4)  # losses ~1-10, some near-cancelling


def test_time_budget_and_timed_evaluation(tiny_sd, tmp_path):
    tr, m, out = _train(IPROTrainer, "tiny_sd_ipro.yaml", tmp_path, f"model.path={tiny_sd}", "max_steps=100",
                        "batch_size=2", "steps=2", "max_train_time_s=1e-6", "eval_every_s=1000")
    assert m["steps"] == 1  # the budget was spent after the first step
    hist = json.loads((out / "eval_history.json").read_text())
    assert [h["step"] for h in hist] == [0, 1]  # before training, and the final evaluation
    assert hist[0]["reward_gain"] == 0.0 and hist[0]["mmd2"] < 0.05


def test_mmd2_rbf_matches_closed_form():
    """Unbiased MMD^2 of N(0, 1) vs N(mu, 1) with an RBF kernel of bandwidth h:
    2 sqrt(h^2 / (h^2 + 2)) (1 - exp(-mu^2 / (2 (h^2 + 2))))."""
    from diffdiv.eval.manifold import median_mmd2 as mmd2_rbf

    g = torch.Generator().manual_seed(0)
    h, mu, n, reps = 1.5, 0.8, 400, 20
    vals = [mmd2_rbf(torch.randn(n, 1, generator=g, dtype=torch.float64),
                     mu + torch.randn(n, 1, generator=g, dtype=torch.float64), bandwidth=h)[0] for _ in range(reps)]
    est, se = float(np.mean(vals)), float(np.std(vals) / np.sqrt(reps))
    exact = 2 * np.sqrt(h * h / (h * h + 2)) * (1 - np.exp(-mu * mu / (2 * (h * h + 2))))
    assert abs(est - exact) < 4 * se and exact > 10 * se, (est, exact, se)
    same = [mmd2_rbf(torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g))[0] for _ in range(reps)]
    assert abs(np.mean(same)) < 4 * np.std(same) / np.sqrt(reps)  # unbiased: zero mean for equal laws
    # paired draws (y_i a small perturbation of x_i, as two models from the same noise): the plain estimator is
    # biased low for equal laws, the paired U-statistic is not
    plain, paired = [], []
    for _ in range(reps):
        x = torch.randn(64, 1, generator=g, dtype=torch.float64)
        y = (x + 0.3 * torch.randn(64, 1, generator=g, dtype=torch.float64)) / (1 + 0.09) ** 0.5  # same law N(0,1)
        plain.append(mmd2_rbf(x, y, bandwidth=h)[0])
        paired.append(mmd2_rbf(x, y, bandwidth=h, paired=True)[0])
    se_paired = np.std(paired) / np.sqrt(reps)
    assert abs(np.mean(paired)) < 4 * se_paired, (np.mean(paired), se_paired)
    assert np.mean(plain) < -4 * np.std(plain) / np.sqrt(reps), np.mean(plain)
