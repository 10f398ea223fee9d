"""`diffdiv plan`: meta-built architectures, exact byte arithmetic, saved-activation counting, CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from diffdiv import plan as P

ROOT = Path(__file__).resolve().parents[1]

# Published parameter counts (model cards / diffusers and transformers counts of the released weights).
KNOWN = [
    ("sd15", "unet", 859.52e6),
    ("sd15", "text_encoder", 123.06e6),  # CLIP ViT-L/14 text tower
    ("sd15", "vae", 83.65e6),
    ("sdxl", "unet", 2.567e9),
    ("sdxl", "text_encoder_2", 694.7e6),  # OpenCLIP ViT-bigG/14 text tower with projection
    ("sd3_medium", "transformer", 2.028e9),
    ("sd3_medium", "text_encoder_3", 4.762e9),  # T5-XXL encoder
    ("flux_dev", "transformer", 11.90e9),
    # Wan 2.1 "1.3B": its transformer holds 1.42B parameters (diffusion_pytorch_model.safetensors: 5.68 GB fp32)
    ("wan21_t2v_1.3b", "transformer", 1.419e9),
    ("wan21_t2v_14b", "transformer", 14.29e9),
    ("clip_vit_l14", "clip", 427.6e6),
]


@pytest.mark.parametrize("arch,comp,known", KNOWN, ids=[f"{a}-{c}" for a, c, _ in KNOWN])
def test_meta_architectures_match_published_parameter_counts(arch, comp, known):
    a = P.load_arch(arch)
    assert a["_source"] and "hub" in a["_source"]
    m = P.build_meta(a["components"][comp])
    assert all(p.device.type == "meta" for p in m.parameters())
    n = P.count_params(m)
    assert abs(n - known) / known < 0.005, (arch, comp, n)


# ------------------------------------------------------------------------------------------------ bytes
def test_trained_net_bytes_equal_a_real_adamw_and_ema_state():
    """16 B/param (fp32 weights, grads, 2 AdamW moments) + 4 B EMA, counted from the tensors that exist."""
    from diffusers.training_utils import EMAModel

    net = nn.Sequential(nn.Linear(10, 20), nn.SiLU(), nn.Linear(20, 3))
    n = P.count_params(net)
    assert n == 10 * 20 + 20 + 20 * 3 + 3
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 10)).square().mean().backward()
    opt.step()
    ema = EMAModel(list(net.parameters()))
    real = {"weights": sum(p.nbytes for p in net.parameters()), "grads": sum(p.grad.nbytes for p in net.parameters()),
            "optimizer": sum(v.nbytes for st in opt.state.values() for k, v in st.items() if k != "step"),
            "ema": sum(t.nbytes for t in ema.shadow_params)}
    got = P.net_bytes(P.Net("x", n, trained=True, ema=True), P.Scenario(gpus=1))
    assert {k: got[k] for k in real} == real and got["comm"] == 0


def test_ddp_fsdp2_lora_and_frozen_byte_arithmetic():
    n, r = 1000, 40
    ddp4, fsdp4 = P.Scenario(gpus=4), P.Scenario(gpus=4, strategy="fsdp2")
    full = P.Net("s", n, trained=True, ema=True)
    assert P.net_bytes(full, ddp4) == {"weights": 4000, "grads": 4000, "optimizer": 8000, "ema": 4000,
                                       "comm": 4000}  # DDP reducer buckets: one more gradient copy
    assert P.net_bytes(full, fsdp4) == {"weights": 1000, "grads": 1000, "optimizer": 2000, "ema": 1000, "comm": 0}
    lora = P.Net("s", n, trained=True, lora_params=r, frozen_bytes=2, ema=True)
    assert P.net_bytes(lora, ddp4) == {"weights": 2 * n + 4 * r, "grads": 4 * r, "optimizer": 8 * r, "ema": 4 * r,
                                       "comm": 4 * r}
    assert P.net_bytes(lora, fsdp4)["weights"] == (2 * n + 4 * r) / 4
    frozen = P.Net("t", n, frozen_bytes=4)
    assert P.net_bytes(frozen, ddp4)["weights"] == 4000 and P.net_bytes(frozen, fsdp4)["weights"] == 1000
    assert P.net_bytes(frozen, P.Scenario(gpus=4, frozen_bf16=True))["weights"] == 2000
    replicated = P.Net("te", n, frozen_bytes=2, shard=False)
    assert P.net_bytes(replicated, fsdp4)["weights"] == 2000


def test_lora_count_equals_peft():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**P.TINY_UNET)
    targets = P.lora_targets(unet)
    predicted = P.lora_param_count(unet, 6, targets)
    unet.add_adapter(LoraConfig(r=6, lora_alpha=6, target_modules=targets))
    real = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    assert predicted == real > 0


def test_fsdp_units_are_the_innermost_blocks():
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(10, 10), nn.ModuleList([nn.Linear(10, 10), nn.Linear(10, 30)])),
                            nn.Linear(10, 5)])
    net = nn.Module()
    net.blocks = blocks
    net.head = nn.Linear(3, 3)
    total = P.count_params(net)
    assert P.fsdp_unit_sizes(net, 1) == [110, 330, 55]
    assert P.largest_unit_params(net, fraction=0.0) == 330
    assert P.largest_unit_params(net, fraction=0.9) == total  # no block that big: the whole model


# ------------------------------------------------------------------------------------------------ activations
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_saved_bytes_of_an_mlp_are_its_inputs_and_hidden_activation(device):
    """Linear saves its input, ReLU its output (which the next Linear saves again: counted once)."""
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    x = torch.randn(5, 8, device=device, requires_grad=True)
    c = P.saved_activation_bytes(net, lambda: net(x))
    assert c.total == 5 * (8 + 16) * 4 and c.segments == 0


def test_meta_count_equals_the_count_on_real_tensors():
    """The meta forward (flash-style attention) saves exactly what the CPU forward of the same UNet saves."""
    for latent in (8, 16):
        model, fwd = P.tiny_unet_step(latent)
        real = P.SavedBytes({id(p) for p in model.parameters()})
        with real.hooks():
            fwd()
        meta = P.tiny_unet_saved(latent)
        assert meta.total == real.bytes
        assert meta.segments > 0 and meta.checkpointed < meta.total


def test_live_tensor_bytes_peak():
    mode = P.LiveTensorBytes()
    with mode:
        a = torch.zeros(1000)
        b = torch.zeros(2000)
        del a
        c = b.view(40, 50)  # a view allocates nothing
        d = torch.zeros(500)
    assert mode.peak == 12000 and mode.live == 10000
    del b, c, d
    assert mode.live == 0


def test_activation_estimate_is_k_S_batch_forwards():
    recipe = P.read_recipe(ROOT / "configs/sd15_rcm.yaml")
    cal = P.Calibration([], k_fp32=1.0, a_fp32=0.0, k_amp=0.5, a_amp=0.0)
    s = recipe.counts["trainable"]
    base = P.base_scenario(recipe, 8)  # batch_size 64 over 8 GPUs: local batch 8; sCM + DMD points: 2 x
    act, phase = P.activation_bytes(recipe, base, cal)
    assert recipe.mixed_precision == "bf16" and phase == "student"
    assert act == pytest.approx(0.5 * s.total * 8 * 2)
    act_ck, _ = P.activation_bytes(recipe, P.Scenario(gpus=8, gradient_checkpointing=True, batch_size=64), cal)
    assert act_ck == pytest.approx(0.5 * s.checkpointed * 8 * 2)


def test_sdxl_fdistill_plan_counts_every_network():
    recipe = P.read_recipe(ROOT / "configs/sdxl_fdistill_js.yaml")
    nets = {n.name: n for n in recipe.nets_full}
    unet = P.count_params(P.build_meta(P.load_arch("sdxl")["components"]["unet"]))
    assert nets["generator"].params == nets["fake score"].params == nets["teacher"].params == unet
    assert nets["generator"].trained and not nets["generator"].ema  # ema_decay: 0.0
    assert not nets["teacher"].trained and nets["teacher"].frozen_bytes == 4  # teacher.dtype: float32 (default)
    cal = P.Calibration([], 1.0, 0.0, 1.0, 0.0)
    p = P.plan_memory(recipe, P.Scenario(gpus=1, batch_size=1), 80, cal)
    frozen = sum(n.params * n.frozen_bytes for n in recipe.nets_full if not n.trained)
    trained = sum(n.params for n in recipe.nets_full if n.trained)
    assert p.lines["weights"] + p.lines["grads"] + p.lines["optimizer"] == frozen + 16 * trained
    assert p.lines["weights"] + p.lines["grads"] + p.lines["optimizer"] > 80e9 and not p.fits


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("args,msg", [
    (["--config", "configs/nope.yaml"], "config file not found"),
    (["--config", "configs/digits_teacher.yaml"], "unknown recipe shape"),
    (["--config", "configs/toy_fdistill_js.yaml"], "unknown recipe shape"),
    (["--config", "configs/sd15_rcm.yaml", "--gpus", "0"], "--gpus must be positive"),
    (["--config", "configs/sd15_rcm.yaml", "--gpu-mem-gb", "-1"], "--gpu-mem-gb must be > 0"),
    (["--config", "configs/sd15_rcm.yaml", "--arch", "sd99"], "unknown architecture 'sd99'"),
])
def test_cli_bad_input_is_one_line_exit_2(args, msg, capsys, monkeypatch):
    from diffdiv.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err


def test_cli_unknown_method_and_bad_strategy(tmp_path, capsys):
    from diffdiv.cli import main

    bad = tmp_path / "x.yaml"
    bad.write_text("method: magic\nteacher: {kind: pipeline, path: stabilityai/stable-diffusion-xl-base-1.0}\n")
    assert main(["plan", "--config", str(bad)]) == 2
    assert "unknown recipe shape" in capsys.readouterr().err
    bad.write_text("method: fdistill\ndistributed: {strategy: zero3}\n"
                   "teacher: {kind: pipeline, path: stabilityai/stable-diffusion-xl-base-1.0}\n")
    assert main(["plan", "--config", str(bad)]) == 2
    assert "distributed.strategy: 'zero3'" in capsys.readouterr().err
