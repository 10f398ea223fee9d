"""Tiny random diffusers pipelines built from configs (no hub), saved with `save_pretrained`.

Each builder writes a complete pipeline folder that `<Pipeline>.from_pretrained(path)` and
`diffdiv.models.loading.load_denoiser(path)` load offline; weights are deterministic in `seed`.
Sizes follow diffusers' own tiny test configs, so the real model code runs in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# words that get whole-word BPE merges in the tiny CLIP vocabulary (anything else tokenizes per byte)
COMMON_WORDS = (
    "a an the of in on with and photo picture painting drawing image of cat dog bird horse car house tree "
    "flower mountain city river sea sky sun moon man woman child person portrait landscape red green blue "
    "yellow black white small large beautiful old new digit zero one two three four five six seven eight "
    "nine style art high quality detailed"
).split()

TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to U+0100+
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_vocab(words: tuple[str, ...] = COMMON_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary (CLIP conventions, `</w>` word ends) with whole-word merges for `words`."""
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for w in dict.fromkeys(words):
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:  # left-to-right chain: ((c a) t</w>) -> cat</w>
            if (cur, p) not in seen:
                seen.add((cur, p))
                merges.append((cur, p))
            cur = cur + p
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer built offline from `tiny_clip_vocab`."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _clip_text_config(vocab_size: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kw = dict(
        TINY_CLIP,
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def _tiny_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    # 3 blocks -> spatial downsampling 2**(3-1) = 4: 32x32 images <-> 8x8 latents
    return AutoencoderKL(
        block_out_channels=(16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        **extra,
    )


def _sd_scheduler_kwargs() -> dict:
    # Stable Diffusion 1.x/2.x/XL training noise schedule
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )


def build_tiny_sd(path: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon", scheduler: str = "ddim",
                  zero_terminal_snr: bool = False) -> Path:
    """Tiny StableDiffusionPipeline (UNet (32, 64), CLIP 2x32, VAE /4, latents 4x8x8) saved at `path`.

    `scheduler`: "ddim" (SD 1.x/2.x's DDIM config) or "euler" (EulerDiscreteScheduler, leading spacing);
    `zero_terminal_snr`: rescaled betas with alpha(T) = 0 (Lin et al. 2024).
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(len(tok))).eval()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = _tiny_vae()
    if scheduler == "euler":
        sch = EulerDiscreteScheduler(**_sd_scheduler_kwargs(), timestep_spacing="leading",
                                     prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr)
    elif scheduler == "ddim":
        sch = DDIMScheduler(**_sd_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False,
                            prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr)
    else:
        raise ValueError(f"scheduler must be 'ddim' or 'euler', got {scheduler!r}")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=sch,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def build_tiny_sdxl(path: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny StableDiffusionXLPipeline (two CLIP encoders 32+32, text_time embedding) saved at `path`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    te = CLIPTextModel(_clip_text_config(len(tok))).eval()
    te2 = CLIPTextModelWithProjection(_clip_text_config(len(tok2), projection_dim=32)).eval()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 add_time_ids * 8 + pooled projection 32
        cross_attention_dim=64,
        norm_num_groups=8,  # 32 (CLIP) + 32 (CLIP-G stand-in)
    )
    vae = _tiny_vae(force_upcast=False)
    sch = EulerDiscreteScheduler(
        **_sd_scheduler_kwargs(), timestep_spacing="leading", prediction_type="epsilon"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=sch,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def tiny_t5_tokenizer():
    """A T5Tokenizer (Unigram) built offline: single characters plus whole-word pieces for `COMMON_WORDS`."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    pieces += [(c, -8.0) for c in chars] + [("\u2581" + c, -9.0) for c in chars]
    pieces += [("\u2581" + w, -3.0) for w in dict.fromkeys(COMMON_WORDS)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_sd3(path: str | os.PathLike, seed: int = 0, t5: bool = True) -> Path:
    """Tiny StableDiffusion3Pipeline (MMDiT 2 layers, two CLIP encoders, tiny T5 unless `t5=False`).

    Without T5 the folder loads with `from_pretrained(path, text_encoder_3=None, tokenizer_3=None)`
    (diffusers' rule for T5-less SD3); `load_denoiser` does that by itself.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    te = CLIPTextModelWithProjection(_clip_text_config(len(tok), projection_dim=32)).eval()
    te2 = CLIPTextModelWithProjection(_clip_text_config(len(tok2), projection_dim=32)).eval()
    te3 = tok3 = None
    if t5:
        tok3 = tiny_t5_tokenizer()
        te3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tok3),
                d_model=64,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                eos_token_id=1,
            )
        ).eval()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,  # joint = T5 width >= 32 + 32
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    vae = _tiny_vae(shift_factor=0.0609, scaling_factor=1.5305, force_upcast=False)  # SD3's latent affine
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=sch,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def build_tiny_unet2d(
    path: str | os.PathLike, seed: int = 0, sample_size: int = 8, channels: int = 1
) -> Path:
    """Tiny unconditional DDPMPipeline (UNet2DModel (16, 32)) saved at `path`."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        path, safe_serialization=True
    )
    return Path(path)
