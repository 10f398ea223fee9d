"""f-distill: method functions against exact answers, discriminator heads, the trainer's contract on the toy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffdiv.config import ConfigError, load_config
from diffdiv.divergence import RatioBinNormalizer, f_weight
from diffdiv.methods import fdistill as fd
from diffdiv.models.heads import ConvHead, DiscriminatorHeads, VectorHead
from diffdiv.trainers.fdistill import FDistillConfig, FDistillTrainer
from diffdiv.trainers.steps import fake_score_step
from diffdiv.trainers.uni_instruct import UniInstructConfig, UniInstructTrainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_generator_loss_gradient_is_weighted_score_difference():
    g = torch.Generator().manual_seed(0)
    B, C = 6, 5
    x0 = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    d_p, d_q = torch.randn(B, C, generator=g, dtype=torch.float64), torch.randn(B, C, generator=g, dtype=torch.float64)
    logits = torch.randn(B, generator=g, dtype=torch.float64)
    h = fd.fdistill_weight(fd.density_ratio(logits), "js")
    assert abs(float(h.mean()) - 1.0) < 1e-6  # normalized by its batch mean
    lf = (x0 * torch.linspace(-1, 1, C, dtype=torch.float64)).sum(1)  # logits with a graph to x0
    total, dist, gan = fd.generator_loss(x0, d_p, d_q, h, normalize=True, logits_fake=lf, gan_weight=0.1)
    (G,) = torch.autograd.grad(total.sum(), x0)
    n = (x0 - d_p).abs().mean(1, keepdim=True).detach()
    sig = torch.sigmoid(-lf).detach()[:, None]  # d softplus(-l)/dl = -sigmoid(-l)
    expect = h.double()[:, None] * (d_q - d_p) / n / C - 0.1 * sig * torch.linspace(-1, 1, C, dtype=torch.float64)
    torch.testing.assert_close(G, expect)


def test_density_ratio_clip_and_bins():
    logits = torch.tensor([-20.0, 0.0, math.log(3.0), 20.0])
    r = fd.density_ratio(logits)
    torch.testing.assert_close(r, torch.tensor([0.1, 1.0, 3.0, 20.0]))
    bins = RatioBinNormalizer(2, decay=0.0, t_min=0.0, t_max=1.0)
    t = torch.tensor([0.1, 0.2, 0.7, 0.9])
    rn = fd.density_ratio(logits, t, bins)
    # each bin divided by its own mean: (0.1, 1) / 0.55 and (3, 20) / 11.5
    torch.testing.assert_close(rn, torch.tensor([0.1 / 0.55, 1 / 0.55, 3 / 11.5, 20 / 11.5]), rtol=1e-5, atol=1e-6)


def test_critic_loss_parts():
    g = torch.Generator().manual_seed(1)
    d_q, x0 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    a, s = torch.full((4,), 0.8), torch.full((4,), 0.6)
    lr, lf = torch.randn(4, generator=g), torch.randn(4, generator=g)
    dsm, extra = fake_score_step(lambda x_t, t, c: (x_t + d_q, lf, lr), x0, torch.zeros(4),
                                 lambda x, t: (torch.zeros_like(x), None, a, s), None, "eps")
    torch.testing.assert_close(dsm, (0.8 / 0.6) ** 2 * ((d_q - x0) ** 2).mean(1))  # w_eps = alpha^2 / sigma^2
    assert extra[0] is lf and extra[1] is lr
    total, dsm2, disc = fd.critic_loss(dsm, logits_real=lr, logits_fake=lf, disc_weight=0.5)
    assert dsm2 is dsm
    torch.testing.assert_close(disc, torch.nn.functional.softplus(-lr) + torch.nn.functional.softplus(lf))
    torch.testing.assert_close(total, dsm + 0.5 * disc)


def test_heads_shapes():
    heads = DiscriminatorHeads([(32,), (8, 4, 4), (16, 2, 2)], hidden=8)
    assert isinstance(heads.heads[0], VectorHead) and isinstance(heads.heads[1], ConvHead)
    out = heads([torch.randn(3, 32), torch.randn(3, 8, 4, 4), torch.randn(3, 16, 2, 2)])
    assert out.shape == (3,)
    with pytest.raises(ValueError):
        DiscriminatorHeads([(2, 3)])


def test_head_logit_estimates_log_density_ratio():
    # logistic loss on samples of p = N(1, 0.6^2) vs q = N(-0.5, 1): the optimal logit is log p/q (exact)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = DiscriminatorHeads([(1,)], hidden=32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 800)
    for _ in range(800):
        real = 1 + 0.6 * torch.randn(1024, 1, generator=g)
        fake = -0.5 + torch.randn(1024, 1, generator=g)
        loss = fd.critic_loss(torch.zeros(1), logits_real=head([real]), logits_fake=head([fake]))[2].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    def log_ratio(x):
        return (-0.5 * ((x - 1) / 0.6) ** 2 - math.log(0.6)) - (-0.5 * (x + 0.5) ** 2)

    m = torch.cat([1 + 0.6 * torch.randn(4000, 1, generator=g), -0.5 + torch.randn(4000, 1, generator=g)])
    with torch.no_grad():  # compare the ratios training uses: r clipped to [0.1, 20]
        r_est = fd.density_ratio(head([m]))
    err = torch.log(r_est) - log_ratio(m)[:, 0].clamp(math.log(0.1), math.log(20.0))
    # RMS log-error under (p + q)/2 of a small MLP fit on 800 x 2048 samples
    assert float(err.pow(2).mean().sqrt()) < 0.1, float(err.pow(2).mean().sqrt())


def _distill_recipes() -> list[Path]:
    import yaml

    return [p for p in sorted(CONFIGS.glob("*.yaml"))
            if (yaml.safe_load(p.read_text()) or {}).get("method") in ("fdistill", "uni_instruct")]


@pytest.mark.parametrize("path", _distill_recipes(), ids=lambda p: p.name)
def test_recipes_parse(path):
    import yaml

    method = yaml.safe_load(path.read_text())["method"]
    cls = UniInstructConfig if method == "uni_instruct" else FDistillConfig
    cfg = load_config(cls, path)
    assert cfg.method == method
    f_weight(torch.tensor([1.0]), cfg.divergence)
    if path.name.startswith(("sd15_", "sdxl_")):
        assert cfg.teacher.path in ("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                    "stabilityai/stable-diffusion-xl-base-1.0")


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown divergence"):
        load_config(FDistillConfig, CONFIGS / "toy_fdistill_js.yaml", ["divergence=kl2"])
    with pytest.raises(ConfigError, match="no generator weight"):  # tv is in the table but has no h(r)
        load_config(UniInstructConfig, None, ["divergence=tv"])
    with pytest.raises(ConfigError, match="ratio.clip"):
        load_config(FDistillConfig, CONFIGS / "toy_fdistill_js.yaml", ["ratio.clip=[2, 1]"])
    with pytest.raises(ConfigError, match="variant"):
        load_config(UniInstructConfig, None, ["variant=dmd3"])
    cfg = load_config(FDistillConfig, CONFIGS / "toy_fdistill_js.yaml", ["method=uni_instruct"])
    with pytest.raises(ConfigError, match="method"):
        FDistillTrainer(cfg).preflight()


# ----------------------------------------------------------------------------------------------
# The trainer on the toy mixture (tiny sizes)
# ----------------------------------------------------------------------------------------------

TINY = ["max_steps=6", "batch_size=32", "student.hidden=32", "student.depth=2", "student.pretrain_steps=30",
        "gan.head_hidden=16", "eval_samples=200", "checkpoint_every=3", "log_every=1", "progress=false",
        "log_with=null", "ratio.num_bins=4"]


def _toy(out, *extra, cls=FDistillConfig, config="toy_fdistill_js.yaml"):
    return load_config(cls, CONFIGS / config, TINY + [f"output_dir={out}", *extra])


def test_toy_output_contract_and_cli_sample(tmp_path):
    from diffdiv.cli import main as cli
    from diffdiv.models.loading import load_denoiser
    from diffdiv.sampling import sample

    out = tmp_path / "run"
    metrics = FDistillTrainer(_toy(out)).train()
    for name in ("student", "checkpoints", "metrics.json", "samples.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 6 and 0 <= saved["student_mode_recall"] <= 1
    assert metrics["nonfinite_total"] == 0
    meta = json.loads((out / "student" / "diffdiv.json").read_text())
    assert meta["kind"] == "one_step" and meta["divergence"] == "js"
    assert cli(["sample", "--model", str(out / "student"), "--steps", "1", "--num-samples", "50", "--seed", "3",
                "--out", str(tmp_path / "s.npz")]) == 0
    import numpy as np

    x = np.load(tmp_path / "s.npz")["samples"]
    assert x.shape == (50, 2) and np.isfinite(x).all()
    # the CLI draws exactly what the saved one-step generator gives: x0 = D(sigma(t_init) z, t_init)
    model = load_denoiser(out / "student")
    ref = sample(model, 50, 1, seed=3, kind="consistency", times=meta["times_1"])
    np.testing.assert_allclose(x, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_resume_is_exact_with_ratio_bins(tmp_path):
    a = tmp_path / "a"
    FDistillTrainer(_toy(a, "eval_samples=0")).train()
    b = tmp_path / "b"
    FDistillTrainer(_toy(b, "eval_samples=0", "max_steps=3")).train()
    (b / "metrics.json").unlink()
    (b / "student").rename(tmp_path / "old_student")
    tr = FDistillTrainer(_toy(b, "eval_samples=0"))
    tr.train()
    wa = load_file(str(a / "student" / "net" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(b / "student" / "net" / "diffusion_pytorch_model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert tr.bins is not None and int(tr.bins.count.sum()) == 6 * 32  # the resumed EMA state saw every batch


def test_uni_instruct_variants_run(tmp_path):
    for variant in ("uni_instruct", "dmd", "sid"):
        out = tmp_path / variant
        m = UniInstructTrainer(_toy(out, "max_steps=2", "eval_samples=0", "checkpoint_every=0",
                                    "method=uni_instruct", f"variant={variant}", cls=UniInstructConfig)).train()
        assert m["steps"] == 2 and m["nonfinite_total"] == 0
        assert json.loads((out / "student" / "diffdiv.json").read_text())["variant"] == variant
