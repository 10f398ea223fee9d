"""Text-to-image wrappers (SD, SDXL, SD3) on tiny pipelines built from configs and loaded back offline.

Every wrapper output is checked against a computation done by hand from an independently loaded
diffusers pipeline (its raw network output and its own `encode_prompt`), or against diffusers' own
`__call__`, never against the wrapper itself.
"""

from __future__ import annotations

import copy
import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffdiv.models.loading import load_denoiser, save_denoiser
from diffdiv.models.text2img import SD3Denoiser, SDDenoiser, SDXLDenoiser, TextCond
from diffdiv.models.tiny import (
    build_tiny_sd,
    build_tiny_sd3,
    build_tiny_sdxl,
    build_tiny_unet2d,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)
from diffdiv.models.unet import UNetDenoiser
from diffdiv.param import prediction_from_x0

KINDS = ("sd", "sd_v", "sdxl", "sd3", "sd3_no_t5")
PIPE = {
    "sd": diffusers.StableDiffusionPipeline,
    "sd_v": diffusers.StableDiffusionPipeline,
    "sdxl": diffusers.StableDiffusionXLPipeline,
    "sd3": diffusers.StableDiffusion3Pipeline,
    "sd3_no_t5": diffusers.StableDiffusion3Pipeline,
}
WRAPPER = {"sd": SDDenoiser, "sd_v": SDDenoiser, "sdxl": SDXLDenoiser, "sd3": SD3Denoiser,
           "sd3_no_t5": SD3Denoiser}
PROMPTS = ["a photo of a cat", "a red car in the city"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # 2 shared cores: oversubscribed OpenMP threads make tiny convolutions ~100x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return {
        "sd": build_tiny_sd(root / "sd"),
        "sd_v": build_tiny_sd(root / "sd_v", seed=1, prediction_type="v_prediction"),
        "sdxl": build_tiny_sdxl(root / "sdxl"),
        "sd3": build_tiny_sd3(root / "sd3"),
        "sd3_no_t5": build_tiny_sd3(root / "sd3_no_t5", seed=2, t5=False),
    }


@pytest.fixture(scope="module")
def models(folders):
    return {k: load_denoiser(p) for k, p in folders.items()}


def load_pipe(kind, folder):
    kw = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3_no_t5" else {}
    pipe = PIPE[kind].from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def times(kind):
    # integer timesteps for VP models (diffusers' alphas_cumprod table exactly), sigma in (0, 1) for flow
    return torch.tensor([0.7, 0.25]) if kind.startswith("sd3") else torch.tensor([700.0, 250.0])


def hand_prompts(kind, pipe):
    """(cond, uncond) network kwargs built with the pipeline's own encode_prompt (CFG negatives = "")."""
    if kind in ("sd", "sd_v"):
        pos, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        return {"encoder_hidden_states": pos}, {"encoder_hidden_states": neg}
    extra = (None, None) if kind.startswith("sd3") else ()  # SD3: prompt_2 / prompt_3 default to prompt
    pos, neg, pooled, npooled = pipe.encode_prompt(PROMPTS, *extra, device="cpu",
                                                   do_classifier_free_guidance=True)
    if kind == "sdxl":
        ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32,
                                     text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        ids = ids.repeat(len(PROMPTS), 1)
        return (
            {"encoder_hidden_states": pos, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}},
            {"encoder_hidden_states": neg, "added_cond_kwargs": {"text_embeds": npooled, "time_ids": ids}},
        )
    return ({"encoder_hidden_states": pos, "pooled_projections": pooled},
            {"encoder_hidden_states": neg, "pooled_projections": npooled})


def hand_x0(kind, pipe, x, t, net_kw, pred=None):
    """x0 from the raw network output, written out per parameterization."""
    if kind.startswith("sd3"):
        u = pipe.transformer(hidden_states=x, timestep=t * 1000, **net_kw).sample if pred is None else pred
        return x - t.view(-1, 1, 1, 1) * u  # rectified flow: x_t = (1-t) x0 + t eps, u = eps - x0
    out = pipe.unet(x, t, **net_kw).sample if pred is None else pred
    acp = pipe.scheduler.alphas_cumprod[t.long()].view(-1, 1, 1, 1).float()
    a, s = acp.sqrt(), (1 - acp).sqrt()
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return a * x - s * out  # v = a eps - s x0
    return (x - s * out) / a  # x_t = a x0 + s eps


def raw_out(kind, pipe, x, t, net_kw):
    if kind.startswith("sd3"):
        return pipe.transformer(hidden_states=x, timestep=t * 1000, **net_kw).sample
    return pipe.unet(x, t, **net_kw).sample


# ---------------------------------------------------------------------------------------------


def test_tiny_tokenizers_cover_common_words():
    tok = tiny_clip_tokenizer()
    pieces = tok.tokenize("A photo of a cat")
    assert pieces == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    ids = tok("a zebra!").input_ids  # unknown word: byte pieces, never the unknown token
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) > 4 and tok.unk_token_id not in ids[1:-1]
    t5 = tiny_t5_tokenizer()
    assert t5.tokenize("a photo of a dog") == ["\u2581a", "\u2581photo", "\u2581of", "\u2581a", "\u2581dog"]


def test_builders_are_deterministic(tmp_path):
    a = load_file(build_tiny_sd(tmp_path / "a", seed=3) / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(build_tiny_sd(tmp_path / "b", seed=3) / "unet" / "diffusion_pytorch_model.safetensors")
    c = load_file(build_tiny_sd(tmp_path / "c", seed=4) / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("kind", KINDS)
def test_load_structure(kind, folders, models):
    d = models[kind]
    assert type(d) is WRAPPER[kind]
    assert d.sample_shape == (4, 8, 8) and d.vae_scale_factor == 4
    assert d.prediction_type == {"sd": "epsilon", "sd_v": "v_prediction", "sdxl": "epsilon"}.get(kind, "flow")
    # parameters() / state_dict() hold only the trainable network; frozen parts are eval + no grad
    assert {id(p) for p in d.parameters()} == {id(p) for p in d.trainable.parameters()}
    assert set(d.state_dict()) == {f"{d.trainable_name}.{k}" for k in d.trainable.state_dict()}
    for m in d.frozen.modules.values():
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert (d.frozen.parts.get("text_encoder_3") is None) == (kind != "sd3")
    assert type(load_pipe(kind, folders[kind])).__name__ == WRAPPER[kind].pipeline_cls_name


@pytest.mark.parametrize("kind", KINDS)
def test_x0_and_cfg_match_hand_computation(kind, folders, models):
    d, pipe = models[kind], load_pipe(kind, folders[kind])
    g = torch.Generator().manual_seed(0)
    x, t, w = torch.randn(2, 4, 8, 8, generator=g), times(kind), 4.5
    cond = d.encode_prompts(PROMPTS)
    with torch.no_grad():
        kw_c, kw_u = hand_prompts(kind, pipe)
        out_c, out_u = raw_out(kind, pipe, x, t, kw_c), raw_out(kind, pipe, x, t, kw_u)
        want_c, want_u = hand_x0(kind, pipe, x, t, None, out_c), hand_x0(kind, pipe, x, t, None, out_u)
        # CFG as diffusers applies it: on the raw prediction, then converted to x0
        want_w = hand_x0(kind, pipe, x, t, None, out_u + w * (out_c - out_u))
        got_c, got_u, got_w = d(x, t, cond, guidance_scale=1.0), d(x, t), d(x, t, cond, guidance_scale=w)
        got_raw = d.network_output(x, t, cond)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_raw, out_c, **tol)
    torch.testing.assert_close(got_c, want_c, **tol)
    torch.testing.assert_close(got_u, want_u, **tol)
    torch.testing.assert_close(got_w, want_w, **tol)
    assert (want_c - want_u).abs().max() > 1e-3  # the condition matters, so the CFG check is not vacuous
    # eps derived from x0 (the model's default guidance is 1) recovers the raw eps prediction
    if d.prediction_type == "epsilon":
        assert d.guidance_scale == 1.0
        with torch.no_grad():
            torch.testing.assert_close(d.eps(x, t, cond), out_c, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_sampler_on_wrapper_reproduces_pipeline_call(kind, folders, models):
    """Two guided steps of diffusers' scheduler driven by the wrapper's x0 == the pipeline's own __call__."""
    d, pipe = models[kind], load_pipe(kind, folders[kind])
    w, steps = 3.0, 2
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=w, latents=noise.clone(),
               output_type="latent").images
    sch = d.make_scheduler()
    sch.set_timesteps(steps)
    x = noise * getattr(sch, "init_noise_sigma", 1.0)
    cond = d.encode_prompts(PROMPTS)
    with torch.no_grad():
        for ts in sch.timesteps:
            x_in = sch.scale_model_input(x, ts) if hasattr(sch, "scale_model_input") else x
            t = torch.full((2,), float(ts) / (1000.0 if kind.startswith("sd3") else 1.0))
            x0 = d(x_in, t, cond, guidance_scale=w)
            a, s = d.alpha_sigma(t)
            x = sch.step(prediction_from_x0(x0, d.prediction_type, x_in, a, s), ts, x).prev_sample
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)
    # the folder is a real pipeline: diffusers decodes and post-processes it unchanged
    img = pipe("a photo of a dog", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 32, 32, 3) and img.min() >= 0 and img.max() <= 1


@pytest.mark.parametrize("kind", ("sd", "sdxl", "sd3"))
def test_clone_shares_frozen_and_copies_trainable(kind, models):
    d = models[kind]
    c = d.clone()
    assert c.frozen is d.frozen and c.text_encoder is d.text_encoder and c.vae is d.vae
    assert c.trainable is not d.trainable
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(c.parameters(), d.parameters()))
    e = copy.deepcopy(d)  # deepcopy (e.g. for EMA) follows the same rule
    assert e.frozen is d.frozen and e.trainable is not d.trainable
    x, t = torch.randn(2, 4, 8, 8), times(kind)
    cond = d.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = d(x, t, cond, guidance_scale=2.0)
        torch.testing.assert_close(c(x, t, cond, guidance_scale=2.0), base, rtol=0, atol=0)
        for p in c.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert (c(x, t, cond, guidance_scale=2.0) - base).abs().max() > 1e-3
        torch.testing.assert_close(d(x, t, cond, guidance_scale=2.0), base, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pipeline_roundtrip(kind, models, tmp_path):
    d = models[kind]
    student = d.clone()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = save_denoiser(student, tmp_path / "student", meta={"kind": "one_step", "guidance_scale": 2.5})
    assert json.loads((out / "diffdiv.json").read_text())["kind"] == "one_step"
    back = load_denoiser(out)
    assert type(back) is type(d) and back.guidance_scale == 2.5
    x, t = torch.randn(2, 4, 8, 8), times(kind)
    cond = student.encode_prompts(PROMPTS)
    with torch.no_grad():
        want = student(x, t, cond, guidance_scale=2.5)
        torch.testing.assert_close(back(x, t, back.encode_prompts(PROMPTS)), want, rtol=0, atol=0)
        assert (d(x, t, cond, guidance_scale=2.5) - want).abs().max() > 1e-3
    # plain diffusers loads it too, and its network is the student's
    pipe = load_pipe(kind, student.save_pipeline(tmp_path / "plain"))
    net = pipe.transformer if kind.startswith("sd3") else pipe.unet
    sd = student.trainable.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("kind", ("sd", "sd3"))
def test_decode_encode(kind, models):
    d = models[kind]
    vae = d.vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        img = d.decode(z)
        assert img.shape == (2, 3, 32, 32)
        torch.testing.assert_close(img, vae.decode(z / scale + shift).sample, rtol=0, atol=0)
        assert d.decode(3 * z, clamp=True).abs().max() <= 1
        lat = d.encode_images(img.clamp(-1, 1), sample=False)
        assert lat.shape == (2, 4, 8, 8)
        want = (vae.encode(img.clamp(-1, 1)).latent_dist.mode() - shift) * scale
        torch.testing.assert_close(lat, want, rtol=0, atol=0)
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        torch.testing.assert_close(d.encode_images(img, generator=g1), d.encode_images(img, generator=g2))
    if kind == "sd3":
        assert shift != 0.0  # the SD3 latent shift is exercised


@pytest.mark.parametrize("kind", ("sd", "sdxl", "sd3"))
def test_features(kind, models):
    d = models[kind]
    x, t = torch.randn(3, 4, 8, 8), times(kind)[:1].expand(3)
    cond = d.encode_prompts(["a cat", "a dog", "a tree"])
    with torch.no_grad():
        x0, feats = d.features(x, t, cond)
        torch.testing.assert_close(x0, d(x, t, cond, guidance_scale=1.0), rtol=0, atol=0)
    assert len(feats) == 1 and feats[0].ndim == 4 and feats[0].shape[0] == 3
    assert feats[0].shape[-2:] == ((4, 4))


def test_cond_broadcast_and_errors(models):
    d = models["sdxl"]
    x, t = torch.randn(4, 4, 8, 8), torch.full((4,), 400.0)
    one = d.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        got = d(x, t, one, guidance_scale=2.0)  # each prompt for 2 consecutive samples
        want = d(x, t, one.repeat_interleave(2), guidance_scale=2.0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(d(x, t, ["a cat", "a dog"], guidance_scale=2.0), want, rtol=0, atol=0)
    with pytest.raises(ValueError):
        d(torch.randn(3, 4, 8, 8), torch.full((3,), 400.0), one)
    with pytest.raises(ValueError):
        TextCond.cat(one, TextCond(embeds=one.embeds))


def test_sdxl_micro_conditioning(models, folders):
    """Explicit sizes and the resolution option reach the UNet as diffusers builds add_time_ids."""
    d, pipe = models["sdxl"], load_pipe("sdxl", folders["sdxl"])
    x, t = torch.randn(2, 4, 8, 8), times("sdxl")
    cond = d.encode_prompts(PROMPTS, original_size=(64, 48), crops_coords_top_left=(4, 0))
    kw_c, _ = hand_prompts("sdxl", pipe)
    kw_c["added_cond_kwargs"]["time_ids"] = torch.tensor([[64.0, 48, 4, 0, 32, 32]]).repeat(2, 1)
    with torch.no_grad():
        torch.testing.assert_close(d(x, t, cond), hand_x0("sdxl", pipe, x, t, kw_c), rtol=1e-4, atol=1e-4)
    big = load_denoiser(folders["sdxl"], resolution=64)
    assert big.sample_shape == (4, 16, 16)
    xb = torch.randn(2, 4, 16, 16)
    kw_c["added_cond_kwargs"]["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(2, 1)
    with torch.no_grad():
        got = big(xb, t, big.encode_prompts(PROMPTS))
        torch.testing.assert_close(got, hand_x0("sdxl", pipe, xb, t, kw_c), rtol=1e-4, atol=1e-4)


def test_unet2d_builder_and_clone(tmp_path):
    d = load_denoiser(build_tiny_unet2d(tmp_path / "u", sample_size=8, channels=1))
    assert isinstance(d, UNetDenoiser) and d.sample_shape == (1, 8, 8)
    c = d.clone()
    assert c.trainable is not d.trainable and c.trainable is c.unet
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([900.0, 10.0])
    with torch.no_grad():
        eps = d.unet(x, t).sample
        acp = d.make_scheduler().alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        torch.testing.assert_close(d(x, t), (x - (1 - acp).sqrt() * eps) / acp.sqrt(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c(x, t), d(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ("sd", "sd3"))
def test_jvp_through_network(kind, models):
    """forward-mode JVP in (x_t, t) through the guided wrapper matches a central finite difference."""
    d = models[kind]
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 4, 8, 8, generator=g), times(kind) + (0.3 if kind == "sd" else 0.013)
    dx, dt = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1.0, -0.5]) * (1.0 if kind == "sd" else 1e-2)
    cond = d.encode_prompts(PROMPTS)

    def f(x, t):
        return d(x, t, cond, guidance_scale=2.0)

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU/GPU attention kernels have no forward-AD rule
        y, jv = torch.func.jvp(f, (x, t), (dx, dt))
    h = 1e-2
    with torch.no_grad():
        torch.testing.assert_close(y, f(x, t), rtol=1e-5, atol=1e-5)
        fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
    rel = ((jv - fd).norm() / fd.norm()).item()
    assert rel < 1e-3, rel


def test_to_moves_frozen_parts_and_dtype_loading(folders):
    """.to(dtype) converts the shared frozen modules too; torch_dtype reaches every component."""
    d = load_denoiser(folders["sd3"])
    x, t = torch.randn(2, 4, 8, 8), times("sd3")
    with torch.no_grad():
        want = d(x, t, PROMPTS, guidance_scale=2.0)
        c = d.clone().to(torch.float64)
        assert d.text_encoder.dtype == torch.float64 and d.vae.dtype == torch.float64  # shared with the clone
        got = c(x.double(), t.double(), PROMPTS, guidance_scale=2.0)
    assert got.dtype == torch.float64 and next(d.parameters()).dtype == torch.float32
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
    b = load_denoiser(folders["sdxl"], torch_dtype=torch.bfloat16)
    dtypes = {p.dtype for m in [b.trainable, *b.frozen.modules.values()] for p in m.parameters()}
    assert dtypes == {torch.bfloat16}
    with torch.no_grad():
        y = b(torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), PROMPTS, guidance_scale=3.0)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
