"""LoRA students (issue 12): student and fake score as peft adapters on the teacher's own network, so a run holds
one base; the export is a diffusers LoRA that `pipe.load_lora_weights` loads onto the teacher, plus the fused
student that `from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffdiv.config import load_config
from diffdiv.models.lora import AdapterView, use_adapter
from diffdiv.trainers.fdistill import FDistillTrainer

ROOT = Path(__file__).resolve().parents[1]
FAST = ["log_with=null", "progress=false", "checkpoint_every=0", "eval_samples=0", "log_every=1"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from diffdiv.models.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "teacher")


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    emb = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([700, 300]), encoder_hidden_states=emb).sample


def test_lora_student_fdistill_shares_one_base_and_exports_a_diffusers_lora(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    cfg = load_config(FDistillTrainer.config_cls, ROOT / "configs" / "tiny_sd_fdistill_js.yaml",
                      [f"teacher.path={tiny_sd}", f"output_dir={out}", *FAST, "max_steps=3", "lr_gen=3e-3",
                       "lr_fake=3e-3", "student.lora.enabled=true", "student.lora.rank=4"])
    tr = FDistillTrainer(cfg)
    tr.setup()
    student, fake = tr.nets["student"].module, tr.nets["fake_score"].module.fake
    assert isinstance(student, AdapterView) and isinstance(tr.teacher, AdapterView)
    assert student.base is tr.teacher.base is fake.base  # one base network
    # memory: the unique parameter storage of teacher + every trained network is one base (UNet, text encoder,
    # VAE, both adapters) plus the discriminator heads; full students would hold three UNets
    def unique(modules) -> int:
        return sum({p.data_ptr(): p.numel() for m in modules for p in m.parameters()}.values())

    heads = sum(p.numel() for p in tr.critic.heads.parameters())
    assert unique([tr.teacher, *(n.module for n in tr.nets.values())]) == unique([tr.teacher.base]) + heads
    unet = tr.teacher.base.trainable
    adapters = sum(p.numel() for p in student.lora_params + fake.lora_params)
    assert 0 < adapters < 0.2 * sum(p.numel() for p in unet.parameters())
    # at init (LoRA B = 0) the student is the teacher network exactly
    x = torch.randn(2, *tr.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 400.0])
    cond = tr.conds.encode(torch.tensor([0, 1]))
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, cond), tr.teacher(x, t, cond, guidance_scale=1.0), rtol=0, atol=0)
    teacher_before = _unet_out(StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None).unet)
    m = tr.train()
    assert m["steps"] == 3
    with torch.no_grad():  # training moved the adapter, so the student now differs from the teacher ...
        assert float((student(x, t, cond) - tr.teacher(x, t, cond, guidance_scale=1.0)).abs().max()) > 1e-5
        # ... while the teacher's calls (adapters off) are the untouched base network
        use_adapter(tr.teacher.base.trainable, None)
        torch.testing.assert_close(_unet_out(tr.teacher.base.trainable), teacher_before)
    # plain diffusers: the fused student, and the teacher + the LoRA, give the same network
    fused = StableDiffusionPipeline.from_pretrained(out / "student", safety_checker=None)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_lora_weights(str(out / "student_lora"))
    a, b = _unet_out(fused.unet), _unet_out(pipe.unet)
    assert float((a - _unet_out(StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None).unet))
                 .abs().max()) > 1e-5  # the fused student is not the teacher
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and diffdiv's own student view (EMA weights, as exported) matches the fused export
    with tr.ema_weights(), torch.no_grad():
        student.activate()
        ours = _unet_out(student.base.trainable)
    torch.testing.assert_close(ours, a, rtol=1e-4, atol=1e-5)
