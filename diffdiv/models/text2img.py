"""Text-to-image teachers/students as Denoisers: Stable Diffusion 1.x/2.x, SDXL, SD3 (MMDiT + flow matching).

Each wrapper works in VAE latent space. The network that training updates (`trainable`: the UNet or
the transformer) is a registered submodule; the frozen parts (text encoders, tokenizers, VAE) live in
a `FrozenParts` container that is *shared* by `clone()` and `copy.deepcopy` and is not part of
`parameters()`/`state_dict()` (optimizers, DDP and checkpoints see only the trainable network), but
moves with the wrapper on `.to(...)`. Prompts are encoded by the diffusers pipeline's own
`encode_prompt`, so tokenization, penultimate-layer choice, pooling and T5 padding match diffusers.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffdiv.models.base import Denoiser
from diffdiv.models.hub import read_model_index
from diffdiv.models.unet import prediction_type_of, schedule_from_scheduler
from diffdiv.param import x0_from_prediction


@dataclass
class TextCond:
    """Text condition for one batch: token embeddings, pooled embeddings (SDXL/SD3), SDXL time ids."""

    embeds: Tensor  # (B, L, D) encoder_hidden_states
    pooled: Tensor | None = None  # (B, P) pooled text embeddings (SDXL text_embeds, SD3 pooled_projections)
    time_ids: Tensor | None = None  # (B, 6) SDXL micro-conditioning; None = derived from the latent size

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> TextCond:
        return TextCond(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            }
        )

    def to(self, *args: Any, **kwargs: Any) -> TextCond:
        return self._map(lambda v: v.to(*args, **kwargs))

    def __getitem__(self, idx: Any) -> TextCond:
        return self._map(lambda v: v[idx])

    def repeat_interleave(self, n: int) -> TextCond:
        """Each prompt repeated n times in a row (diffusers' num_images_per_prompt layout)."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(a: TextCond, b: TextCond) -> TextCond:
        out = {}
        for f in fields(TextCond):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if (va is None) != (vb is None):
                raise ValueError(f"cannot concatenate conditions: '{f.name}' present in only one")
            out[f.name] = None if va is None else torch.cat([va, vb])
        return TextCond(**out)


class FrozenParts:
    """Frozen pipeline components shared between a model and its clones; deepcopy returns the same object."""

    def __init__(self, **parts: Any):
        self.parts = dict(parts)
        self.modules = nn.ModuleDict({k: v for k, v in parts.items() if isinstance(v, nn.Module)})
        for m in self.modules.values():
            m.eval()
            m.requires_grad_(False)
        self.cache: dict[Any, TextCond] = {}

    def __deepcopy__(self, memo: dict) -> FrozenParts:
        return self

    def __getitem__(self, name: str) -> Any:
        return self.parts[name]

    def __contains__(self, name: str) -> bool:
        return name in self.parts


class Text2ImgDenoiser(Denoiser):
    """Shared machinery of the latent text-to-image wrappers; subclasses name pipeline and network call."""

    pipeline_cls_name: ClassVar[str]
    trainable_name: ClassVar[str]  # "unet" or "transformer"
    frozen_names: ClassVar[tuple[str, ...]]
    pipeline_extra: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        net: nn.Module,
        scheduler: Any,
        guidance_scale: float = 1.0,
        resolution: int | tuple[int, int] | None = None,
        frozen: FrozenParts | None = None,
        **parts: Any,
    ):
        super().__init__()
        setattr(self, self.trainable_name, net)
        self._frozen = (
            frozen if frozen is not None else FrozenParts(**{k: parts.get(k) for k in self.frozen_names})
        )
        self.scheduler_cls = type(scheduler)
        self.scheduler_config = dict(scheduler.config)
        self.schedule = schedule_from_scheduler(scheduler)
        self.prediction_type = prediction_type_of(scheduler)
        self.guidance_scale = float(guidance_scale)
        self.conditional = True
        vae = self._frozen["vae"]
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        cfg = net.config
        if resolution is None:
            size = cfg.sample_size
            hw = (size, size) if isinstance(size, int) else tuple(size)
        else:
            res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
            hw = (res[0] // self.vae_scale_factor, res[1] // self.vae_scale_factor)
        self.sample_shape = (cfg.in_channels, *hw)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, guidance_scale: float = 1.0, **kw: Any) -> Text2ImgDenoiser:
        """Wrap a loaded diffusers pipeline (its modules are used, not copied)."""
        comps = pipe.components
        return cls(
            comps[cls.trainable_name],
            comps["scheduler"],
            guidance_scale=guidance_scale,
            **{k: comps.get(k) for k in cls.frozen_names},
            **kw,
        )

    @property
    def trainable(self) -> nn.Module:
        """The network training updates (UNet or transformer)."""
        return getattr(self, self.trainable_name)

    @trainable.setter
    def trainable(self, net: nn.Module) -> None:
        setattr(self, self.trainable_name, net)

    @property
    def frozen(self) -> FrozenParts:
        """The shared frozen components (text encoders, tokenizers, VAE)."""
        return self._frozen

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            frozen = self.__dict__.get("_frozen")
            if frozen is not None and name in frozen:
                return frozen[name]
            raise

    def _apply(self, fn: Any, recurse: bool = True) -> Text2ImgDenoiser:
        # .to()/.cuda()/.half() also move the (shared) frozen modules, which parameters() does not list
        super()._apply(fn, recurse)
        if recurse:
            self._frozen.modules._apply(fn)
        return self

    def clone(self) -> Text2ImgDenoiser:
        """A new wrapper with a deep copy of the trainable network; frozen parts are shared, not copied."""
        return copy.deepcopy(self)

    def make_scheduler(self, cls: Any = None) -> Any:
        """A fresh diffusers scheduler (any compatible class) with this model's training config."""
        return (cls or self.scheduler_cls).from_config(self.scheduler_config)

    def pipeline(self, scheduler: Any = None) -> Any:
        """A diffusers pipeline over this wrapper's current modules (no copies)."""
        import diffusers

        pipe_cls = getattr(diffusers, self.pipeline_cls_name)
        comps = {k: self._frozen[k] for k in self.frozen_names}
        comps[self.trainable_name] = self.trainable
        pipe = pipe_cls(**comps, scheduler=scheduler or self.make_scheduler(), **self._pipeline_kwargs())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _pipeline_kwargs(self) -> dict[str, Any]:
        return dict(self.pipeline_extra)

    def save_pipeline(self, path: str | os.PathLike, scheduler: Any = None) -> Path:
        """Write a complete diffusers pipeline folder with the current trainable network (and `scheduler`)."""
        self.pipeline(scheduler).save_pretrained(path, safe_serialization=True)
        return Path(path)

    # --- text conditions ----------------------------------------------------------------------
    @property
    def text_device(self) -> torch.device:
        return next(self._frozen["text_encoder"].parameters()).device

    def encode_prompts(self, prompts: list[str] | str) -> TextCond:
        """Prompts -> TextCond on the text encoders' device (no gradient; encoders are frozen)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with torch.no_grad():
            return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> TextCond:
        raise NotImplementedError

    def _encode_null(self) -> TextCond:
        """The unconditional condition for one sample."""
        return self._encode([""])

    def null_cond(self) -> TextCond:
        """Cached unconditional condition (batch 1), on the text encoders' device and dtype."""
        te = self._frozen["text_encoder"]
        key = (self.text_device, te.dtype, type(self).__name__, self._null_key())
        if key not in self._frozen.cache:
            with torch.no_grad():
                self._frozen.cache[key] = self._encode_null()
        return self._frozen.cache[key]

    def _null_key(self) -> Any:
        return None

    def uncond_like(self, cond: TextCond) -> TextCond:
        null = self.null_cond().to(cond.embeds.device)
        out = null.repeat_interleave(len(cond))
        return replace(out, time_ids=cond.time_ids)  # diffusers reuses the positive micro-conditioning

    def cat_cond(self, a: TextCond, b: TextCond) -> TextCond:
        return TextCond.cat(a, b)

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Any = None, guidance_scale: float | None = None
    ) -> Tensor:
        if isinstance(cond, (str, list, tuple)):
            cond = self.encode_prompts(list(cond) if not isinstance(cond, str) else [cond])
        return super().forward(x_t, t, cond, guidance_scale)

    def _batch_cond(self, cond: TextCond | None, batch: int) -> TextCond:
        if cond is None:
            cond = self.null_cond()
        if len(cond) != batch:
            if batch % len(cond):
                raise ValueError(f"condition batch {len(cond)} does not divide sample batch {batch}")
            cond = cond.repeat_interleave(batch // len(cond))
        return cond

    # --- denoising ----------------------------------------------------------------------------
    def network_output(self, x_t: Tensor, t: Tensor, cond: TextCond | None = None) -> Tensor:
        """Raw network prediction (eps / v / flow velocity) in fp32, time fed in fp32, no guidance."""
        t = self._as_time(t, x_t)
        net = self.trainable
        dtype = next(net.parameters()).dtype
        c = self._batch_cond(cond, x_t.shape[0]).to(device=x_t.device, dtype=dtype)
        return self._call_net(x_t.to(dtype), self.schedule.model_time(t).float(), c).float()

    def _call_net(self, x: Tensor, t_model: Tensor, cond: TextCond) -> Tensor:
        raise NotImplementedError

    def _denoise(self, x_t: Tensor, t: Tensor, cond: TextCond | None = None, return_features: bool = False):
        a, s = self.schedule.alpha_sigma(t)
        feats: list[Tensor] = []
        hooks = self._feature_hooks(feats, x_t) if return_features else []
        try:
            pred = self.network_output(x_t, t, cond)
        finally:
            for h in hooks:
                h.remove()
        x0 = x0_from_prediction(pred, self.prediction_type, x_t.float(), a.float(), s.float()).to(x_t.dtype)
        return (x0, feats) if return_features else x0

    def _feature_hooks(self, feats: list[Tensor], x_t: Tensor) -> list[Any]:
        return [self.trainable.mid_block.register_forward_hook(lambda m, i, o: feats.append(o))]

    def features(self, x_t: Tensor, t: Tensor, cond: TextCond | None = None) -> tuple[Tensor, list[Tensor]]:
        """x0 (no guidance) and mid-network activations (B, C, h, w) for discriminator heads."""
        if isinstance(cond, (str, list, tuple)):
            cond = self.encode_prompts(cond)
        return self._denoise(x_t, self._as_time(t, x_t), cond, return_features=True)

    # --- latent <-> image ---------------------------------------------------------------------
    def _latent_affine(self) -> tuple[float, float]:
        cfg = self._frozen["vae"].config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    def decode(self, latents: Tensor, clamp: bool = False) -> Tensor:
        """Latents -> images, nominally in [-1, 1] (clamped only if asked; gradients flow through the VAE)."""
        vae = self._frozen["vae"]
        scale, shift = self._latent_affine()
        img = vae.decode((latents / scale + shift).to(vae.dtype)).sample.float()
        return img.clamp(-1, 1) if clamp else img

    def encode_images(
        self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents (a posterior sample, or its mode)."""
        vae = self._frozen["vae"]
        scale, shift = self._latent_affine()
        dist = vae.encode(images.to(device=next(vae.parameters()).device, dtype=vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return ((z.float() - shift) * scale).to(images.dtype)


class SDDenoiser(Text2ImgDenoiser):
    """Stable Diffusion 1.x/2.x: UNet2DConditionModel + CLIPTextModel; epsilon or v-prediction."""

    pipeline_cls_name = "StableDiffusionPipeline"
    trainable_name = "unet"
    frozen_names = ("vae", "text_encoder", "tokenizer")
    pipeline_extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def _encode(self, prompts: list[str]) -> TextCond:
        emb, _ = self.pipeline().encode_prompt(prompts, self.text_device, 1, False)
        return TextCond(embeds=emb)

    def _call_net(self, x: Tensor, t_model: Tensor, cond: TextCond) -> Tensor:
        return self.unet(x, t_model, encoder_hidden_states=cond.embeds).sample


class SDXLDenoiser(Text2ImgDenoiser):
    """SDXL: two CLIP encoders (penultimate layers concatenated), pooled embeds and add_time_ids."""

    pipeline_cls_name = "StableDiffusionXLPipeline"
    trainable_name = "unet"
    frozen_names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def __init__(self, *args: Any, force_zeros_for_empty_prompt: bool = True, **kw: Any):
        super().__init__(*args, **kw)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @classmethod
    def from_pipeline(cls, pipe: Any, guidance_scale: float = 1.0, **kw: Any) -> SDXLDenoiser:
        kw.setdefault(
            "force_zeros_for_empty_prompt", bool(pipe.config.get("force_zeros_for_empty_prompt", True))
        )
        return super().from_pipeline(pipe, guidance_scale, **kw)

    def _pipeline_kwargs(self) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}

    @property
    def text_device(self) -> torch.device:
        te = self._frozen["text_encoder"] or self._frozen["text_encoder_2"]
        return next(te.parameters()).device

    def add_time_ids(
        self,
        batch: int,
        original_size: tuple[int, int],
        crops_coords_top_left: tuple[int, int],
        target_size: tuple[int, int],
        device: Any = None,
    ) -> Tensor:
        """SDXL micro-conditioning (original size, crop top-left, target size), as the pipeline builds it."""
        ids = list(original_size) + list(crops_coords_top_left) + list(target_size)
        expected = self.unet.add_embedding.linear_1.in_features
        te2 = self._frozen["text_encoder_2"]
        proj = (
            te2.config.projection_dim
            if te2 is not None
            else expected - self.unet.config.addition_time_embed_dim * 6
        )
        if self.unet.config.addition_time_embed_dim * len(ids) + proj != expected:
            raise ValueError(
                f"UNet expects an added embedding of {expected}; the time ids and pooled projection "
                f"({proj}) give {self.unet.config.addition_time_embed_dim * len(ids) + proj}"
            )
        return torch.tensor([ids], dtype=torch.float32, device=device).repeat(batch, 1)

    def encode_prompts(
        self,
        prompts: list[str] | str,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> TextCond:
        """Prompts -> TextCond; time ids fixed here if a size is given, else derived from the latent size."""
        cond = super().encode_prompts(prompts)
        if original_size is not None or target_size is not None or tuple(crops_coords_top_left) != (0, 0):
            hw = self._pixel_size(self.sample_shape[1:])
            cond = replace(
                cond,
                time_ids=self.add_time_ids(
                    len(cond),
                    original_size or hw,
                    crops_coords_top_left,
                    target_size or hw,
                    device=cond.embeds.device,
                ),
            )
        return cond

    def _pixel_size(self, latent_hw: tuple[int, ...]) -> tuple[int, int]:
        return (int(latent_hw[0]) * self.vae_scale_factor, int(latent_hw[1]) * self.vae_scale_factor)

    def _encode(self, prompts: list[str]) -> TextCond:
        emb, _, pooled, _ = self.pipeline().encode_prompt(
            prompts, device=self.text_device, do_classifier_free_guidance=False
        )
        return TextCond(embeds=emb, pooled=pooled)

    def _encode_null(self) -> TextCond:
        cond = self._encode([""])
        if self.force_zeros_for_empty_prompt:  # the SDXL pipeline's null condition
            cond = TextCond(embeds=torch.zeros_like(cond.embeds), pooled=torch.zeros_like(cond.pooled))
        return cond

    def _null_key(self) -> Any:
        return self.force_zeros_for_empty_prompt

    def _call_net(self, x: Tensor, t_model: Tensor, cond: TextCond) -> Tensor:
        time_ids = cond.time_ids
        if time_ids is None:
            hw = self._pixel_size(x.shape[-2:])
            time_ids = self.add_time_ids(x.shape[0], hw, (0, 0), hw, device=x.device)
        added = {"text_embeds": cond.pooled, "time_ids": time_ids.to(device=x.device, dtype=x.dtype)}
        return self.unet(x, t_model, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample


class SD3Denoiser(Text2ImgDenoiser):
    """SD3: SD3Transformer2DModel, rectified flow (alpha = 1 - t, sigma = t, net time 1000 t), x0 = x_t - t u.

    `text_encoder_3` (T5) may be None; the T5 tokens are then zeros, as in diffusers.
    """

    pipeline_cls_name = "StableDiffusion3Pipeline"
    trainable_name = "transformer"
    frozen_names = (
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    )

    def __init__(self, *args: Any, max_sequence_length: int = 256, **kw: Any):
        super().__init__(*args, **kw)
        self.max_sequence_length = int(max_sequence_length)

    def _encode(self, prompts: list[str]) -> TextCond:
        emb, _, pooled, _ = self.pipeline().encode_prompt(
            prompts,
            None,
            None,
            device=self.text_device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return TextCond(embeds=emb, pooled=pooled)

    def _null_key(self) -> Any:
        return self.max_sequence_length

    def _call_net(self, x: Tensor, t_model: Tensor, cond: TextCond) -> Tensor:
        return self.transformer(
            hidden_states=x,
            timestep=t_model,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
        ).sample

    def _feature_hooks(self, feats: list[Tensor], x_t: Tensor) -> list[Any]:
        blocks = self.transformer.transformer_blocks
        p = self.transformer.config.patch_size
        h, w = x_t.shape[-2] // p, x_t.shape[-1] // p

        def grab(m: nn.Module, i: Any, o: Any) -> None:
            tokens = o[1]  # JointTransformerBlock returns (encoder_hidden_states, hidden_states)
            feats.append(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w))

        return [blocks[len(blocks) // 2].register_forward_hook(grab)]


WRAPPERS: dict[str, type[Text2ImgDenoiser]] = {
    "StableDiffusionPipeline": SDDenoiser,
    "StableDiffusionXLPipeline": SDXLDenoiser,
    "StableDiffusion3Pipeline": SD3Denoiser,
}
WRAPPER_KWARGS = {"resolution": tuple(WRAPPERS), "max_sequence_length": ("StableDiffusion3Pipeline",)}


def load_text2img(
    path_or_id: str | os.PathLike,
    cls_name: str,
    guidance_scale: float = 1.0,
    torch_dtype: torch.dtype | None = None,
    **kw: Any,
) -> Text2ImgDenoiser:
    """Load a SD / SDXL / SD3 pipeline (hub id or folder) with `from_pretrained` and wrap it.

    Extra keyword arguments go to `from_pretrained`, except `resolution` and `max_sequence_length`
    which go to the wrapper. Components stored as null (e.g. SD3 without T5) are passed as None.
    """
    import diffusers

    if cls_name not in WRAPPERS:
        raise ValueError(f"unsupported text-to-image pipeline {cls_name!r}")
    wrap_kw = {k: kw.pop(k) for k, owners in WRAPPER_KWARGS.items() if k in kw and cls_name in owners}
    if cls_name == "StableDiffusionPipeline":
        kw.setdefault("safety_checker", None)
        kw.setdefault("requires_safety_checker", False)
    for name, value in read_model_index(path_or_id).items():
        if isinstance(value, list) and len(value) == 2 and value[0] is None:
            kw.setdefault(name, None)
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    pipe = getattr(diffusers, cls_name).from_pretrained(path_or_id, **kw)
    return WRAPPERS[cls_name].from_pipeline(pipe, guidance_scale=guidance_scale, **wrap_kw)
