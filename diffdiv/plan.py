"""Memory plan of a recipe before renting GPUs: weights, gradients, AdamW state, EMA, activations per GPU.

Every network of a recipe is built on the meta device from a stored public architecture config
(`diffdiv/models/arch/*.json`; no weights, no download), its parameters are counted exactly, and the
bytes per GPU follow from the distribution strategy (DDP, FSDP2 over N ranks) and LoRA. Activation
memory is an estimate: a meta forward of the real architecture at the recipe's resolution counts the
bytes autograd saves for backward (`S`, flash-style attention), and a factor `k` measured on a tiny
diffusers UNet on this CPU (peak live bytes of a real training step / the same count `S`) scales it:

    activation bytes ~= k * S(architecture, resolution, local batch, gradient checkpointing)

The config keys the planner reads are defined once below (read with `.get()` and defaults, so
today's configs plan as they run now); the trainer switches for the new ones are the lead's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from diffdiv.config import ConfigError, read_yaml

# ------------------------------------------------------------------------------------------------
# Config keys the planner assumes (dotted paths into the recipe YAML) and their defaults.
# ------------------------------------------------------------------------------------------------
KEY_STRATEGY = "distributed.strategy"  # ddp | fsdp2
KEY_GRAD_CKPT = "gradient_checkpointing"  # bool: diffusers enable_gradient_checkpointing() on the trained nets
KEY_TEACHER_DTYPE = "teacher.dtype"  # frozen teacher / text encoders / VAE of distillation recipes
KEY_MODEL_DTYPE = "model.dtype"  # frozen base of reward fine-tuning recipes (DPOK, IPRO, ROCM)
KEY_STUDENT_LORA_ENABLED = "student.lora.enabled"  # distillation students (f-distill, Uni-Instruct, rCM)
KEY_STUDENT_LORA_RANK = "student.lora.rank"
KEY_LORA_ENABLED = "lora.enabled"  # DI* generator and reward fine-tuning policies (existing keys)
KEY_LORA_RANK = "lora.rank"
KEY_EMA = "ema_decay"  # > 0: an EMA copy of the networks that keep one (generator / rCM student)
KEY_MIXED_PRECISION = "mixed_precision"  # no | fp16 | bf16
DEFAULTS: dict[str, Any] = {
    KEY_STRATEGY: "ddp",
    KEY_GRAD_CKPT: False,
    KEY_TEACHER_DTYPE: "float32",
    KEY_MODEL_DTYPE: "float32",
    KEY_STUDENT_LORA_ENABLED: False,
    KEY_STUDENT_LORA_RANK: 64,
    KEY_LORA_ENABLED: None,  # per trainer: DI* off, DPOK/IPRO/ROCM on
    KEY_LORA_RANK: 4,
    KEY_EMA: 0.999,  # TrainConfig's default
    KEY_MIXED_PRECISION: "no",
}
STRATEGIES = ("ddp", "fsdp2")

ARCH_DIR = Path(__file__).parent / "models" / "arch"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# bytes per parameter of a trained fp32 network under AdamW: weights, gradients, two moments, EMA copy
MASTER_BYTES, GRAD_BYTES, ADAM_BYTES, EMA_BYTES = 4, 4, 8, 4
GPU_RESERVED_BYTES = 2 * 10**9  # CUDA context, NCCL buffers, allocator slack: not usable by tensors
GB = 1e9


def cfg_get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """A dotted key of a nested mapping, or `default` (then DEFAULTS) when any level is missing."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return DEFAULTS.get(dotted) if default is None else default
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------------
# Architectures: stored configs -> meta-device modules
# ------------------------------------------------------------------------------------------------
def list_archs() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def load_arch(name: str) -> dict[str, Any]:
    """A stored architecture (components with library/class/config) by name."""
    p = ARCH_DIR / f"{name}.json"
    if not p.is_file():
        raise ConfigError(f"unknown architecture '{name}' (stored: {', '.join(list_archs())})")
    return json.loads(p.read_text())


def arch_from_folder(folder: str | Path) -> dict[str, Any]:
    """A local diffusers pipeline folder's component configs as an architecture (no weights read)."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    comps: dict[str, Any] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        cfg_file = folder / name / "config.json"
        if spec[0] not in ("diffusers", "transformers") or not cfg_file.is_file():
            continue
        cfg = json.loads(cfg_file.read_text())
        comp = {"library": spec[0], "class": spec[1], "config": cfg}
        if spec[0] == "transformers":
            comp["config_class"] = None  # AutoConfig from model_type
        comps[name] = comp
    trainable = "unet" if "unet" in comps else "transformer" if "transformer" in comps else None
    if trainable is None:
        raise ConfigError(f"{folder}: no unet or transformer component to plan")
    res = comps[trainable]["config"].get("sample_size", 64)
    res = res[0] if isinstance(res, list) else res
    return {"_source": str(folder), "name": folder.name, "trainable": trainable, "resolution": [res * 8, res * 8],
            "frames": 0, "text_tokens": 77, "components": comps}


def build_meta(comp: dict[str, Any]) -> nn.Module:
    """One component on the meta device (accelerate.init_empty_weights): shapes only, no memory."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        if comp["library"] == "diffusers":
            import diffusers

            return getattr(diffusers, comp["class"]).from_config(comp["config"])
        import transformers

        if comp.get("config_class"):
            cfg = getattr(transformers, comp["config_class"])(**comp["config"])
        else:
            cfg = transformers.AutoConfig.for_model(**comp["config"])
        return getattr(transformers, comp["class"])(cfg)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_targets(module: nn.Module) -> list[str]:
    """The LoRA target suffixes the trainers use by default (attention projections)."""
    from diffdiv.models.lora import default_lora_targets

    return default_lora_targets(module)


def lora_param_count(module: nn.Module, rank: int, targets: list[str] | None = None) -> int:
    """Adapter parameters peft adds: r (in + out) per targeted Linear, r (in k k + out) per Conv2d."""
    targets = targets if targets is not None else lora_targets(module)
    n = 0
    for name, m in module.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            n += rank * (m.in_channels * kh * kw + m.out_channels)
    return n


def fsdp_unit_sizes(module: nn.Module, threshold: int) -> list[int]:
    """Parameters of the innermost ModuleList elements holding >= `threshold` parameters (FSDP2 wrapping units)."""
    sizes: list[int] = []
    for child in module.children():
        if isinstance(child, nn.ModuleList) and any(count_params(c) >= threshold for c in child):
            for c in child:
                inner = fsdp_unit_sizes(c, threshold)
                sizes += inner if inner else [count_params(c)]
        else:
            sizes += fsdp_unit_sizes(child, threshold)
    return sizes


def largest_unit_params(module: nn.Module, fraction: float = 0.01) -> int:
    """The largest FSDP2 unit: a block (transformer block, resnet) holding >= `fraction` of the model."""
    total = count_params(module)
    return max(fsdp_unit_sizes(module, max(1, int(fraction * total))) or [total])


# ------------------------------------------------------------------------------------------------
# Activation bytes saved for backward (meta forward) and live bytes of a real step (CPU measurement)
# ------------------------------------------------------------------------------------------------
class _FlashLikeAttention(torch.autograd.Function):
    """Attention that saves what flash/memory-efficient kernels save: q, k, v, out, log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if q.ndim == 4:  # (B, H, L, D) as a view of a (B, L, H, D) buffer, the layout flash kernels return
            out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)
        else:
            out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        raise RuntimeError("meta-only attention: counts saved bytes, has no backward")


@contextlib.contextmanager
def flash_attention_on_meta() -> Iterator[None]:
    """Meta tensors take SDPA's math path (saves the N x N scores); count flash-style instead, as on a GPU."""
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention

    def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
             is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
        if query.device.type != "meta":
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        return _FlashLikeAttention.apply(query, key, value)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


class SavedBytes:
    """Pack hook that sums the bytes of distinct non-parameter tensors autograd saves for backward."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.bytes = 0
        self._seen: dict[Any, Tensor] = {}

    @staticmethod
    def _key(t: Tensor) -> Any:
        if t.device.type == "meta":
            return id(t if t._base is None else t._base)
        return t.untyped_storage().data_ptr()

    def add(self, t: Tensor) -> None:
        base = t if t._base is None else t._base
        if id(base) in self.exclude or id(t) in self.exclude:
            return
        key = self._key(t)
        if key not in self._seen:
            self._seen[key] = base  # keeps ids stable while counting
            self.bytes += base.numel() * base.element_size() if t.device.type == "meta" else \
                base.untyped_storage().nbytes()

    def pack(self, t: Tensor) -> Tensor:
        self.add(t)
        return t

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield


@dataclass
class ActivationCount:
    """Bytes saved for backward by one forward: everything (`total`) or with checkpointed segments."""

    total: int  # without checkpointing
    outside: int  # with checkpointing: saved outside the segments, plus the segments' inputs
    max_segment: int  # with checkpointing: the largest segment, recomputed in backward
    segments: int

    @property
    def checkpointed(self) -> int:
        return self.outside + self.max_segment


def saved_activation_bytes(model: nn.Module, forward: Callable[[], Any]) -> ActivationCount:
    """Count saved-for-backward bytes of `forward()` without and with diffusers' gradient checkpointing."""
    exclude = {id(p) for p in model.parameters()}
    plain = SavedBytes(exclude)
    with flash_attention_on_meta(), plain.hooks():
        forward()
    if not hasattr(model, "enable_gradient_checkpointing"):
        return ActivationCount(plain.bytes, plain.bytes, 0, 0)
    outer = SavedBytes(exclude)
    segments: list[int] = []

    def counting_checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
        for a in args:  # a checkpoint keeps its inputs alive for the recompute
            if isinstance(a, Tensor):
                outer.add(a)
        inner = SavedBytes(exclude)
        with inner.hooks():
            out = fn(*args)
        segments.append(inner.bytes)
        return out

    try:
        model.enable_gradient_checkpointing(counting_checkpoint)
    except ValueError:  # the class does not support checkpointing
        return ActivationCount(plain.bytes, plain.bytes, 0, 0)
    was_training = model.training
    model.train()  # diffusers checkpoints only in training mode with grad enabled
    try:
        with flash_attention_on_meta(), outer.hooks():
            forward()
    finally:
        model.disable_gradient_checkpointing()
        model.train(was_training)
    return ActivationCount(plain.bytes, outer.bytes, max(segments, default=0), len(segments))


def meta_forward(model: nn.Module, arch: dict[str, Any], batch: int, resolution: tuple[int, int] | None = None,
                 frames: int | None = None) -> Callable[[], Any]:
    """A closure running `model` on meta inputs of the recipe's shape (batch, resolution, text tokens)."""
    m = "meta"
    h_px, w_px = resolution or tuple(arch["resolution"])
    frames = arch.get("frames", 0) if frames is None else frames
    cls = type(model).__name__
    cfg = getattr(model, "config", None)
    L = int(arch.get("text_tokens", 77))
    scale = int(arch.get("vae_scale", 8))
    h, w = h_px // scale, w_px // scale

    def e(*shape: int, grad: bool = False) -> Tensor:
        return torch.empty(*shape, device=m, requires_grad=grad)

    if cls == "UNet2DConditionModel":
        kw: dict[str, Any] = dict(sample=e(batch, cfg.in_channels, h, w, grad=True), timestep=e(batch),
                                  encoder_hidden_states=e(batch, L, cfg.cross_attention_dim))
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": e(batch, pooled), "time_ids": e(batch, 6)}
        return lambda: model(**kw)
    if cls == "UNet2DModel":
        kw = dict(sample=e(batch, cfg.in_channels, h_px, w_px, grad=True), timestep=e(batch))
        return lambda: model(**kw)
    if cls == "SD3Transformer2DModel":
        kw = dict(hidden_states=e(batch, cfg.in_channels, h, w, grad=True), timestep=e(batch),
                  encoder_hidden_states=e(batch, L, cfg.joint_attention_dim),
                  pooled_projections=e(batch, cfg.pooled_projection_dim))
        return lambda: model(**kw)
    if cls == "FluxTransformer2DModel":
        n = (h // 2) * (w // 2)
        kw = dict(hidden_states=e(batch, n, cfg.in_channels, grad=True), timestep=e(batch),
                  encoder_hidden_states=e(batch, L, cfg.joint_attention_dim),
                  pooled_projections=e(batch, cfg.pooled_projection_dim), img_ids=e(n, 3), txt_ids=e(L, 3),
                  guidance=e(batch))
        return lambda: model(**kw)
    if cls == "WanTransformer3DModel":
        f = (frames - 1) // int(arch.get("vae_time_scale", 4)) + 1
        kw = dict(hidden_states=e(batch, cfg.in_channels, f, h, w, grad=True), timestep=e(batch),
                  encoder_hidden_states=e(batch, L, cfg.text_dim))
        return lambda: model(**kw)
    if cls == "AutoencoderKL":  # the decoder, with gradients to the latents (reward back-propagation)
        z = e(batch, cfg.latent_channels, h, w, grad=True)
        return lambda: model.decode(z)
    if cls == "CLIPModel":  # the image tower of a CLIP reward
        px = e(batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, grad=True)
        return lambda: model.get_image_features(pixel_values=px)
    raise ConfigError(f"plan: no meta inputs for {cls}")


def _storage_nbytes_tree(out: Any, fn: Callable[[Tensor], None]) -> None:
    if isinstance(out, Tensor):
        fn(out)
    elif isinstance(out, (list, tuple)):
        for o in out:
            _storage_nbytes_tree(o, fn)


class LiveTensorBytes(TorchDispatchMode):
    """Live bytes of tensor storages created inside the mode (forward and backward); `peak` is their maximum.

    Storages made before entering (weights, existing gradients) are not counted; gradients accumulated into
    parameters during backward are uncounted once stored (`exclude_grads`), so the peak is activations plus
    transient buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._cells: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, cell: list[int]) -> None:
        self.live -= cell[0]
        cell[0] = 0

    def _track(self, t: Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        if st in self._cells:
            return
        cell = [st.nbytes()]
        self._cells[st] = cell
        self.live += cell[0]
        weakref.finalize(st, self._free, cell)

    def untrack(self, t: Tensor) -> None:
        cell = self._cells.get(t.untyped_storage())
        if cell is not None:
            self._free(cell)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        _storage_nbytes_tree(out, self._track)
        self.peak = max(self.peak, self.live)
        return out


def measure_step_peak(model: nn.Module, forward: Callable[[], Tensor], amp: torch.dtype | None = None) -> int:
    """Peak live bytes (activations + transients, gradients excluded) of one forward + backward on CPU."""
    model.zero_grad(set_to_none=True)
    mode = LiveTensorBytes()
    hooks = [p.register_post_accumulate_grad_hook(lambda p: mode.untrack(p.grad))
             for p in model.parameters() if p.requires_grad]
    ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
    try:
        with mode:
            with ctx:
                out = forward()
            out.float().square().mean().backward()
            del out
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    return mode.peak


# ------------------------------------------------------------------------------------------------
# Calibration: k = measured peak / counted saved bytes, on a tiny diffusers UNet at two resolutions
# ------------------------------------------------------------------------------------------------
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",
                 "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, sample_size=16, in_channels=4,
                 out_channels=4)
CALIB_RESOLUTIONS = (8, 16)  # latent sizes
CALIB_BATCH = 2


@dataclass
class CalibrationPoint:
    latent: int
    saved: int  # S counted on the meta device (fp32)
    saved_ckpt: int  # S with gradient checkpointing
    peak_fp32: int  # measured on CPU
    peak_amp: int  # measured on CPU under bf16 autocast
    peak_ckpt: int | None = None  # measured with enable_gradient_checkpointing() (benchmark only)


@dataclass
class Calibration:
    """Activation model fitted on the tiny UNet: peak = a + k S (fp32 step; bf16-autocast step: k_amp, a_amp).

    The slope k scales to real models; the intercept a (the tiny model's weight-gradient temporaries) does not."""

    points: list[CalibrationPoint]
    k_fp32: float
    a_fp32: float
    k_amp: float
    a_amp: float

    def k(self, mixed_precision: str) -> float:
        return self.k_amp if mixed_precision in ("bf16", "fp16") else self.k_fp32


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    # least squares y = a + k x: k = cov(x, y) / var(x), a = mean(y) - k mean(x)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    k = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    return k, my - k * mx


def tiny_unet_step(latent: int, seed: int = 0) -> tuple[nn.Module, Callable[[], Tensor]]:
    """The calibration model (a small UNet2DConditionModel) and a closure for its training forward."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**TINY_UNET)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(CALIB_BATCH, 4, latent, latent, generator=g)
    t = torch.tensor([10, 500])[:CALIB_BATCH]
    c = torch.randn(CALIB_BATCH, 7, TINY_UNET["cross_attention_dim"], generator=g)
    return model, lambda: model(x, t, encoder_hidden_states=c).sample


def tiny_unet_saved(latent: int) -> ActivationCount:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights(include_buffers=True):
        meta = UNet2DConditionModel(**TINY_UNET)
    arch = {"resolution": [latent * 8, latent * 8], "text_tokens": 7}
    return saved_activation_bytes(meta, meta_forward(meta, arch, CALIB_BATCH))


def calibration_point(latent: int, with_checkpointing: bool = False) -> CalibrationPoint:
    """S (meta count) and measured CPU peaks of the tiny UNet's training step at one latent size."""
    s = tiny_unet_saved(latent)
    model, fwd = tiny_unet_step(latent)
    p32 = measure_step_peak(model, fwd)
    pamp = measure_step_peak(model, fwd, amp=torch.bfloat16)
    pck = None
    if with_checkpointing:
        model.enable_gradient_checkpointing()
        pck = measure_step_peak(model, fwd)
        model.disable_gradient_checkpointing()
    return CalibrationPoint(latent, s.total, s.checkpointed, p32, pamp, pck)


@functools.cache
def calibrate(with_checkpointing: bool = False, resolutions: tuple[int, ...] = CALIB_RESOLUTIONS) -> Calibration:
    """Measure the tiny UNet's peak at `resolutions` (fp32 and bf16 autocast) and fit peak = a + k S."""
    points = [calibration_point(latent, with_checkpointing) for latent in resolutions]
    xs = [float(p.saved) for p in points]
    k32, a32 = fit_line(xs, [float(p.peak_fp32) for p in points])
    kamp, aamp = fit_line(xs, [float(p.peak_amp) for p in points])
    return Calibration(points, k32, a32, kamp, aamp)


# ------------------------------------------------------------------------------------------------
# Recipes -> networks and the forwards whose activations meet at the peak
# ------------------------------------------------------------------------------------------------
RECIPE_SHAPES = ("fdistill", "uni_instruct", "rcm", "di_star", "dpok", "ipro", "rocm")
DISTILL_SHAPES = ("fdistill", "uni_instruct", "rcm", "di_star")
DIFFERENTIABLE_REWARDS = ("aesthetic", "clip", "identity_pool", "identity")


def recipe_shape(cfg: dict[str, Any], path: Path) -> str:
    """Which trainer a recipe is for: its `method` key, else its file name (rcm/scm, dpok, ipro, rocm, di_star)."""
    method = cfg.get("method")
    if method in RECIPE_SHAPES:
        return method
    if method is not None:
        raise ConfigError(f"{path}: unknown recipe shape (method '{method}'; plan knows {', '.join(RECIPE_SHAPES)})")
    stem = path.stem
    for shape, tokens in (("di_star", ("di_star",)), ("rcm", ("rcm", "scm")), ("dpok", ("dpok",)),
                          ("ipro", ("ipro",)), ("rocm", ("rocm",)), ("fdistill", ("fdistill",)),
                          ("uni_instruct", ("uni_instruct",))):
        if any(t in stem.split("_") or t in stem for t in tokens):
            return shape
    raise ConfigError(f"{path}: unknown recipe shape (no `method` key and the file name names no trainer; "
                      f"plan knows {', '.join(RECIPE_SHAPES)})")


def model_path(cfg: dict[str, Any], shape: str) -> str | None:
    section = cfg.get("teacher") if shape in DISTILL_SHAPES else cfg.get("model")
    if not isinstance(section, dict):
        return None
    if shape in DISTILL_SHAPES and section.get("kind", "gmm") != "pipeline":
        return None
    return section.get("path")


def resolve_arch(cfg: dict[str, Any], shape: str, path: Path, arch: str | None = None) -> dict[str, Any]:
    """The architecture: --arch, else a stored hub id, else a local pipeline folder, else the file-name prefix."""
    if arch:
        return load_arch(arch)
    mp = model_path(cfg, shape)
    if mp is None:
        raise ConfigError(f"{path}: unknown recipe shape (no pipeline teacher/model path to plan)")
    stored = [load_arch(n) for n in list_archs()]
    for a in stored:
        if mp in a.get("hub_ids", []):
            return a
    if (Path(mp) / "model_index.json").is_file():
        return arch_from_folder(mp)
    for a in stored:
        if any(path.name.startswith(p) for p in a.get("recipe_prefixes", [])):
            return a
    raise ConfigError(f"{path}: no stored architecture for '{mp}' (stored: {', '.join(list_archs())}; "
                      "pass --arch NAME)")


@dataclass(frozen=True)
class Net:
    """One network's parameters and how it is held: trained (fp32 master + AdamW), LoRA, or frozen."""

    name: str
    params: int
    trained: bool = False
    lora_params: int = 0  # > 0: only the adapters train; `params` are the frozen base
    frozen_bytes: int = 4  # bytes per frozen parameter (its dtype)
    ema: bool = False
    shard: bool = True  # FSDP2 shards it (trained nets and the big frozen ones)
    unit_params: int = 0  # largest FSDP2 unit (all-gathered whole)


@dataclass(frozen=True)
class Forward:
    """A forward whose saved activations are alive at a phase's backward: component x batch multiple x count."""

    component: str  # "trainable" | "vae" | "reward"
    batch_mult: float = 1.0
    count: int = 1
    checkpointable: bool = True  # gradient_checkpointing applies to it


@dataclass
class Recipe:
    """What the planner read from a recipe."""

    path: str
    shape: str
    arch: str
    batch_size: int
    grad_accum: int
    mixed_precision: str
    resolution: tuple[int, int]
    frames: int
    ema: bool
    lora_rank: int
    lora_enabled: bool
    lora_key: str
    dtype_key: str
    gradient_checkpointing: bool
    strategy: str
    frozen_dtype: str
    nets_full: list[Net]  # nets with the student trained in full
    nets_lora: list[Net]  # the same with LoRA on the student/policy
    phases: dict[str, list[Forward]]
    counts: dict[str, ActivationCount]  # per component, batch 1
    n_prompts: int | None
    prompt_bytes: int  # bytes of one encoded prompt (cached on the GPU by today's trainers)
    notes: list[str] = field(default_factory=list)


def _dtype_bytes(name: str, key: str) -> int:
    if name not in DTYPE_BYTES:
        raise ConfigError(f"{key}: '{name}' is not one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _count_prompts(cfg: dict[str, Any]) -> int | None:
    cond = cfg.get("cond") or {}
    n = len(cond.get("prompt_list") or [])
    if cond.get("prompts"):
        p = Path(cond["prompts"])
        if not p.is_file():
            return None
        n += sum(1 for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()
                 if ln.strip() and not ln.strip().startswith("#"))
    return n


def _text_embed_dim(arch: dict[str, Any], trainable: nn.Module) -> int:
    cfg = trainable.config
    for key in ("cross_attention_dim", "joint_attention_dim", "text_dim"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return 768


def read_recipe(path: str | Path, arch_name: str | None = None) -> Recipe:
    """Parse a recipe YAML into networks, phases and meta activation counts (batch 1)."""
    path = Path(path)
    cfg = read_yaml(path)
    shape = recipe_shape(cfg, path)
    arch = resolve_arch(cfg, shape, path, arch_name)
    distill = shape in DISTILL_SHAPES
    strategy = cfg_get(cfg, KEY_STRATEGY)
    if strategy not in STRATEGIES:
        raise ConfigError(f"{KEY_STRATEGY}: '{strategy}' is not one of {', '.join(STRATEGIES)}")
    mp = cfg_get(cfg, KEY_MIXED_PRECISION)
    if mp not in ("no", "fp16", "bf16"):
        raise ConfigError(f"{KEY_MIXED_PRECISION}: '{mp}' is not one of no, fp16, bf16")
    dkey = KEY_TEACHER_DTYPE if distill else KEY_MODEL_DTYPE
    frozen_dtype = cfg_get(cfg, dkey)
    fb = _dtype_bytes(frozen_dtype, dkey)
    if shape in ("fdistill", "uni_instruct", "rcm"):
        lora_key, rank_key = KEY_STUDENT_LORA_ENABLED, KEY_STUDENT_LORA_RANK
        lora_on = bool(cfg_get(cfg, lora_key))
    else:
        lora_key, rank_key = KEY_LORA_ENABLED, KEY_LORA_RANK
        default_on = shape != "di_star"
        lora_on = bool(cfg_get(cfg, lora_key, default_on))
    rank = int(cfg_get(cfg, rank_key))
    ema = float(cfg_get(cfg, KEY_EMA)) > 0
    batch = int(cfg.get("batch_size", 64 if distill else 8))
    accum = int(cfg.get("grad_accum", 1))
    data = cfg.get("data") or {}
    res = tuple(arch["resolution"])
    if data.get("kind") == "image_folder" and data.get("image_size"):
        res = (int(data["image_size"]), int(data["image_size"]))
    frames = int(arch.get("frames", 0))

    comps = arch["components"]
    trainable = build_meta(comps[arch["trainable"]])
    p_train = count_params(trainable)
    unit = largest_unit_params(trainable)
    p_lora = lora_param_count(trainable, rank)
    frozen_extra = [Net(name, count_params(build_meta(c)), frozen_bytes=fb, shard=False)
                    for name, c in comps.items() if name != arch["trainable"]]
    counts: dict[str, ActivationCount] = {
        "trainable": saved_activation_bytes(trainable, meta_forward(trainable, arch, 1, res, frames))}
    notes: list[str] = []

    reward = cfg.get("reward") or {}
    reward_name = reward.get("name") if isinstance(reward, dict) else None
    reward_nets: list[Net] = []
    reward_grad = False
    if reward_name in DIFFERENTIABLE_REWARDS:
        clip = build_meta(load_arch("clip_vit_l14")["components"]["clip"])
        reward_nets.append(Net("reward (CLIP ViT-L/14)", count_params(clip), frozen_bytes=4, shard=False))
        counts["reward"] = saved_activation_bytes(clip, meta_forward(clip, load_arch("clip_vit_l14"), 1))
        reward_grad = True
    elif reward_name:
        notes.append(f"reward '{reward_name}': no network counted")
    if "vae" in comps and type(build_meta(comps["vae"])).__name__ == "AutoencoderKL":
        vae = build_meta(comps["vae"])
        counts["vae"] = saved_activation_bytes(vae, meta_forward(vae, arch, 1, res, frames))

    def student(name: str, lora: bool, ema_on: bool) -> Net:
        if lora:
            return Net(name, p_train, trained=True, lora_params=p_lora, frozen_bytes=fb, ema=ema_on, unit_params=unit)
        return Net(name, p_train, trained=True, ema=ema_on, unit_params=unit)

    def shared_lora(name: str, ema_on: bool) -> Net:
        # LoRA students (student.lora): an adapter on the teacher's own network, no base copy of its own
        return Net(f"{name} (LoRA on the teacher)", 0, trained=True, lora_params=p_lora, ema=ema_on, shard=False)

    small: list[Net] = []
    phases: dict[str, list[Forward]]
    if shape in ("fdistill", "uni_instruct"):
        gan = cfg.get("gan") or {}
        gan_on = bool(gan.get("enabled", False))
        feats_fake = gan_on and gan.get("features", "teacher") == "fake"
        if gan_on:
            heads = _heads_params(trainable, arch, res, int(gan.get("head_hidden", 128)))
            small.append(Net("discriminator heads", heads, trained=True, shard=False))
        teacher = Net("teacher", p_train, frozen_bytes=fb, unit_params=unit)
        nets = [teacher, Net("fake score", p_train, trained=True, unit_params=unit)]
        gen_fw = [Forward("trainable")]
        if feats_fake and float(gan.get("gen_weight", 0.0)) > 0:
            gen_fw.append(Forward("trainable"))  # generator gradients through the fake score's features
        if shape == "uni_instruct":
            cfg_on = float((cfg.get("teacher") or {}).get("guidance_scale", 1.0)) != 1.0
            gen_fw += [Forward("trainable", 2.0 if cfg_on else 1.0), Forward("trainable")]  # teacher (CFG), fake
        phases = {"student": gen_fw, "fake_score": [Forward("trainable", count=2 if gan_on else 1)]}
        full = [student("generator", False, ema)] + nets
        lora = [shared_lora("generator", ema), teacher, shared_lora("fake score", False)]
    elif shape == "rcm":
        dmd = float(cfg.get("dmd_weight", 1.0)) > 0
        nets = [Net("teacher", p_train, frozen_bytes=fb, unit_params=unit)]
        if dmd:
            nets.append(Net("fake score", p_train, trained=True, unit_params=unit))
        phases = {"student": [Forward("trainable", 2.0 if dmd else 1.0)]}  # sCM and DMD points in one forward
        if dmd:
            phases["fake_score"] = [Forward("trainable")]
        full = [student("student", False, ema)] + nets
        lora = [shared_lora("student", ema), nets[0]] + ([shared_lora("fake score", False)] if dmd else [])
        notes.append("rCM: the JVP runs without grad (transient, not counted)")
    elif shape == "di_star":
        nets = [Net("teacher", p_train, frozen_bytes=fb, unit_params=unit),
                Net("fake score", p_train, trained=True, unit_params=unit)]
        gen_fw = [Forward("trainable")]
        if reward_grad and float(cfg.get("reward_weight", 1.0)) > 0:
            gen_fw += [Forward("vae", checkpointable=False), Forward("reward", checkpointable=False)]
        phases = {"student": gen_fw, "fake_score": [Forward("trainable")]}
        full = [student("generator", False, False)] + nets
        lora = [student("generator", True, False)] + nets
    else:  # dpok, ipro, rocm: policy = pretrained model (+ LoRA); reference = adapters off, or a frozen clone
        ref = Net("reference (frozen clone)", p_train, frozen_bytes=fb, unit_params=unit)
        full = [student("policy", False, False), ref]
        lora = [student("policy", True, False)]
        frames_per = max(1, int(cfg.get("frames", 0) or 1))
        if shape == "dpok":
            phases = {"policy": [Forward("trainable")]}
            if cfg.get("value_baseline", False):
                value = _value_params(trainable, int(cfg.get("value_width", 64)), res, _text_embed_dim(arch, trainable))
                small.append(Net("value net", value, trained=True, shard=False))
        else:
            k = int(cfg.get("grad_steps", 1)) if shape == "ipro" else int(cfg.get("steps", 4))
            if shape == "ipro" and k == -1:
                k = int(cfg.get("steps", 10))
            if shape == "ipro" and cfg.get("grad_checkpointing", False):
                notes.append(f"ipro grad_checkpointing: {k} differentiated steps, one kept at a time")
                k = 1
            fw = [Forward("trainable", frames_per, count=k)]
            if reward_grad:
                fw += [Forward("vae", frames_per, checkpointable=False),
                       Forward("reward", frames_per, checkpointable=False)]
            phases = {"policy": fw}
    prompt_bytes = int(arch.get("text_tokens", 77)) * _text_embed_dim(arch, trainable) * fb
    return Recipe(path=str(path), shape=shape, arch=arch["name"], batch_size=batch, grad_accum=accum,
                  mixed_precision=mp, resolution=res, frames=frames, ema=ema, lora_rank=rank, lora_enabled=lora_on,
                  lora_key=lora_key, dtype_key=dkey, gradient_checkpointing=bool(cfg_get(cfg, KEY_GRAD_CKPT)),
                  strategy=strategy,
                  frozen_dtype=frozen_dtype, nets_full=full + small + frozen_extra + reward_nets,
                  nets_lora=lora + small + frozen_extra + reward_nets, phases=phases, counts=counts,
                  n_prompts=_count_prompts(cfg), prompt_bytes=prompt_bytes, notes=notes)


def _heads_params(trainable: nn.Module, arch: dict[str, Any], res: tuple[int, int], hidden: int) -> int:
    """Discriminator heads on the mid-block features (their shape from a meta forward)."""
    from diffdiv.models.heads import DiscriminatorHeads

    block = getattr(trainable, "mid_block", None)
    if block is None:
        return 0
    shapes: list[tuple[int, ...]] = []
    h = block.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    try:
        with torch.no_grad(), flash_attention_on_meta():
            meta_forward(trainable, arch, 1, res)()
    finally:
        h.remove()
    return count_params(DiscriminatorHeads(shapes[:1], hidden))


def _value_params(trainable: nn.Module, width: int, res: tuple[int, int], cond_dim: int) -> int:
    from diffdiv.trainers.dpok import ValueNet

    c = int(trainable.config.in_channels)
    return count_params(ValueNet((c, res[0] // 8, res[1] // 8), cond_dim, width))


# ------------------------------------------------------------------------------------------------
# Byte arithmetic per GPU
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """How a recipe runs: strategy over `gpus` ranks, checkpointing, LoRA, global batch per micro-step."""

    gpus: int
    strategy: str = "ddp"
    gradient_checkpointing: bool = False
    lora: bool = False
    batch_size: int = 64
    grad_accum: int = 1
    frozen_bf16: bool = False  # frozen networks (teacher, text encoders, VAE, LoRA base) held in bf16

    @property
    def local_batch(self) -> int:
        return max(1, math.ceil(self.batch_size / self.gpus))


def shard(n: int, scenario: Scenario, shardable: bool = True) -> float:
    """Per-GPU share of n bytes: all of it (DDP), 1/N of it (FSDP2)."""
    return n / scenario.gpus if scenario.strategy == "fsdp2" and shardable else float(n)


def net_bytes(net: Net, scenario: Scenario) -> dict[str, float]:
    """Per-GPU bytes of one network: weights, grads, optimizer (AdamW: 2 fp32 moments), ema, ddp buckets."""
    out = {"weights": 0.0, "grads": 0.0, "optimizer": 0.0, "ema": 0.0, "comm": 0.0}
    multi = scenario.gpus > 1
    fb = min(net.frozen_bytes, 2) if scenario.frozen_bf16 else net.frozen_bytes
    if not net.trained:
        out["weights"] = shard(net.params * fb, scenario, net.shard)
        return out
    n_train = net.lora_params if net.lora_params else net.params
    if net.lora_params:
        out["weights"] += shard(net.params * fb, scenario, net.shard)
    out["weights"] += shard(n_train * MASTER_BYTES, scenario, net.shard)
    out["grads"] = shard(n_train * GRAD_BYTES, scenario, net.shard)
    out["optimizer"] = shard(n_train * ADAM_BYTES, scenario, net.shard)
    if net.ema:
        out["ema"] = shard(n_train * EMA_BYTES, scenario, net.shard)
    if multi and (scenario.strategy == "ddp" or not net.shard):
        out["comm"] = float(n_train * GRAD_BYTES)  # DDP reducer buckets (gradient_as_bucket_view=False)
    return out


def fsdp_gather_bytes(nets: list[Net], scenario: Scenario, mixed_precision: str) -> float:
    # FSDP2 transient: two units all-gathered (current + prefetch) + one unit's fp32 gradient reduce-scatter
    if scenario.strategy != "fsdp2" or scenario.gpus == 1:
        return 0.0
    unit = max([n.unit_params for n in nets if n.shard] + [0])
    pbytes = 2 if mixed_precision in ("bf16", "fp16") else 4
    return float(unit * (2 * pbytes + GRAD_BYTES))


def autocast_copy_bytes(nets: list[Net], scenario: Scenario, mixed_precision: str, n_trained_fwd: int) -> float:
    # DDP + autocast: the low-precision copies of fp32 weights cached for backward in the step
    if mixed_precision == "no" or scenario.strategy == "fsdp2":
        return 0.0
    fp32_trained = [n for n in nets if n.trained and not n.lora_params and n.shard]
    biggest = max([n.params for n in fp32_trained] + [0])
    return float(2 * biggest * min(n_trained_fwd, max(1, len(fp32_trained))))


def activation_bytes(recipe: Recipe, scenario: Scenario, cal: Calibration) -> tuple[float, str]:
    """Estimated activation peak per GPU (max over phases) and the phase it is in."""
    k = cal.k(recipe.mixed_precision)
    best, where = 0.0, ""
    for phase, fws in recipe.phases.items():
        total = 0.0
        for f in fws:
            c = recipe.counts.get(f.component)
            if c is None:
                continue
            s = c.checkpointed if scenario.gradient_checkpointing and f.checkpointable else c.total
            total += k * s * scenario.local_batch * f.batch_mult * f.count
        if total > best:
            best, where = total, phase
    return best, where


@dataclass
class Plan:
    recipe: Recipe
    scenario: Scenario
    gpu_mem_gb: float
    lines: dict[str, float]  # bytes per GPU by category
    per_net: dict[str, float]
    peak_phase: str

    @property
    def total(self) -> float:
        return sum(self.lines.values())

    @property
    def fits(self) -> bool:
        return self.total + GPU_RESERVED_BYTES <= self.gpu_mem_gb * GB


def plan_memory(recipe: Recipe, scenario: Scenario, gpu_mem_gb: float, cal: Calibration) -> Plan:
    """Per-GPU bytes of a recipe under a scenario."""
    nets = recipe.nets_lora if scenario.lora else recipe.nets_full
    lines = {"weights": 0.0, "grads": 0.0, "optimizer": 0.0, "ema": 0.0, "comm": 0.0}
    per_net = {}
    for n in nets:
        b = net_bytes(n, scenario)
        per_net[n.name] = sum(b.values())
        for key, v in b.items():
            lines[key] += v
    lines["comm"] += fsdp_gather_bytes(nets, scenario, recipe.mixed_precision)
    act, phase = activation_bytes(recipe, scenario, cal)
    n_fwd = max(sum(f.count for f in fws if f.component == "trainable") for fws in recipe.phases.values())
    lines["autocast"] = autocast_copy_bytes(nets, scenario, recipe.mixed_precision, n_fwd)
    lines["activations"] = act
    lines["prompt_cache"] = float((recipe.n_prompts or 0) * recipe.prompt_bytes)
    return Plan(recipe, scenario, gpu_mem_gb, lines, per_net, phase)


def base_scenario(recipe: Recipe, gpus: int) -> Scenario:
    return Scenario(gpus=gpus, strategy=recipe.strategy, gradient_checkpointing=recipe.gradient_checkpointing,
                    lora=recipe.lora_enabled, batch_size=recipe.batch_size, grad_accum=recipe.grad_accum)


def overrides(recipe: Recipe, base: Scenario, s: Scenario) -> list[str]:
    """The `key=value` switches that turn scenario `base` into `s`."""
    out = []
    if s.strategy != base.strategy:
        out.append(f"{KEY_STRATEGY}={s.strategy}")
    if s.gradient_checkpointing != base.gradient_checkpointing:
        out.append(f"{KEY_GRAD_CKPT}={str(s.gradient_checkpointing).lower()}")
    if s.frozen_bf16 != base.frozen_bf16:
        out.append(f"{recipe.dtype_key}=bfloat16")
    if s.lora != base.lora:
        out.append(f"{recipe.lora_key}={str(s.lora).lower()}")
    if s.batch_size != base.batch_size:
        out += [f"batch_size={s.batch_size}", f"grad_accum={s.grad_accum}"]
    return out


def candidate_scenarios(recipe: Recipe, base: Scenario) -> Iterator[Scenario]:
    """Switch sets from cheapest to dearest: frozen nets in bf16 (under mixed precision), gradient checkpointing,
    FSDP2, their combinations, a smaller micro-batch with more accumulation (same effective batch), LoRA."""
    r = dataclasses.replace
    bf16 = [False, True] if recipe.mixed_precision != "no" and recipe.frozen_dtype == "float32" else [False]
    for strategy in ("ddp", "fsdp2") if base.strategy == "ddp" else ("fsdp2",):
        for gc in (False, True):
            for b16 in bf16:
                yield r(base, strategy=strategy, gradient_checkpointing=gc or base.gradient_checkpointing,
                        frozen_bf16=b16)
    most = r(base, strategy="fsdp2", gradient_checkpointing=True, frozen_bf16=bf16[-1])
    yield from _halved(most)
    if recipe.shape in ("fdistill", "uni_instruct", "rcm"):  # LoRA students run with DDP, no checkpointing (yet)
        if not base.gradient_checkpointing:
            yield r(base, strategy="ddp", lora=True, frozen_bf16=bf16[-1])
        return
    for gc in (False, True):
        yield r(base, lora=True, gradient_checkpointing=gc or base.gradient_checkpointing, frozen_bf16=bf16[-1])
    yield r(most, lora=True)
    yield from _halved(r(most, lora=True))


def _halved(s: Scenario) -> Iterator[Scenario]:
    """Half the micro-batch, twice the accumulation, while the batch still splits evenly over the GPUs."""
    b, a = s.batch_size, s.grad_accum
    while b % 2 == 0 and (b // 2) % s.gpus == 0:
        b, a = b // 2, a * 2
        yield dataclasses.replace(s, batch_size=b, grad_accum=a)


def find_fit(recipe: Recipe, base: Scenario, gpu_mem_gb: float, cal: Calibration) -> Plan | None:
    """The first candidate scenario that fits, or None."""
    seen = set()
    for s in candidate_scenarios(recipe, base):
        if s in seen:
            continue
        seen.add(s)
        p = plan_memory(recipe, s, gpu_mem_gb, cal)
        if p.fits:
            return p
    return None


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------
COLUMNS = ("weights", "grads", "optimizer", "ema", "comm", "autocast", "activations", "prompt_cache")


def gb(x: float) -> str:
    return f"{x / GB:.1f}"


def scenario_label(s: Scenario) -> str:
    parts = [f"{s.strategy.upper()}-{s.gpus}"]
    if s.gradient_checkpointing:
        parts.append("ckpt")
    if s.lora:
        parts.append("LoRA")
    if s.frozen_bf16:
        parts.append("bf16-frozen")
    return "+".join(parts) + f" (local batch {s.local_batch})"


def plan_dict(p: Plan) -> dict[str, Any]:
    return {"scenario": dataclasses.asdict(p.scenario), "label": scenario_label(p.scenario),
            "bytes": {k: int(v) for k, v in p.lines.items()}, "total_bytes": int(p.total),
            "total_gb": round(p.total / GB, 2), "fits": p.fits, "peak_phase": p.peak_phase,
            "per_net_gb": {k: round(v / GB, 2) for k, v in p.per_net.items()}}


def activation_formula(recipe: Recipe, cal: Calibration) -> str:
    k = cal.k(recipe.mixed_precision)
    s = recipe.counts["trainable"]
    kind = "bf16 autocast" if recipe.mixed_precision in ("bf16", "fp16") else "fp32"
    return (f"activations ~= k * S * local_batch * forwards; k = {k:.3f} ({kind}"
            f", fitted on a tiny UNet), S = {s.total / GB:.3f} GB/sample saved for backward by the "
            f"{recipe.arch} network at {recipe.resolution[0]}x{recipe.resolution[1]}"
            f"{f' x {recipe.frames} frames' if recipe.frames else ''} (fp32 count, flash attention), "
            f"{s.checkpointed / GB:.3f} GB/sample with gradient checkpointing ({s.segments} segments)")


def format_plan(recipe: Recipe, plans: list[Plan], fit: Plan | None, base: Scenario, cal: Calibration) -> str:
    lines = [f"plan: {recipe.path} ({recipe.shape}, architecture {recipe.arch}, "
             f"{recipe.resolution[0]}x{recipe.resolution[1]}, batch_size {recipe.batch_size}, "
             f"mixed_precision {recipe.mixed_precision}, frozen dtype {recipe.frozen_dtype})"]
    lora = {n.name: n.lora_params for n in recipe.nets_lora if n.lora_params}
    lines.append("networks: " + ", ".join(
        f"{n.name} {n.params / 1e9:.3f}B" + (" trained" if n.trained else " frozen")
        + (f" (LoRA r{recipe.lora_rank}: {lora[n.name] / 1e6:.1f}M)" if n.name in lora else "")
        + (" +EMA" if n.ema else "") for n in recipe.nets_full))
    head = f"{'scenario':<38}" + "".join(f"{c:>13}" for c in COLUMNS) + f"{'total GB':>10}  fits"
    lines.append(head)
    for p in plans:
        lines.append(f"{scenario_label(p.scenario):<38}" + "".join(f"{gb(p.lines.get(c, 0.0)):>13}" for c in COLUMNS)
                     + f"{gb(p.total):>10}  {'yes' if p.fits else 'NO'}")
    lines.append(activation_formula(recipe, cal))
    if recipe.n_prompts is None:
        lines.append(f"prompt file not found: its cache is not counted ({recipe.prompt_bytes / 1e3:.0f} KB per prompt)")
    for note in recipe.notes:
        lines.append(f"note: {note}")
    if recipe.batch_size % base.gpus:
        lines.append(f"note: batch_size {recipe.batch_size} is not divisible by {base.gpus} GPUs (the trainers refuse "
                     f"it); planned with local batch {base.local_batch}")
    if fit is None:
        lines.append(f"does not fit on {base.gpus} x {plans[0].gpu_mem_gb:g} GB with any planned switch")
    elif fit.scenario == base:
        lines.append(f"fits: {gb(fit.total)} GB/GPU on {base.gpus} x {fit.gpu_mem_gb:g} GB as configured")
    else:
        lines.append(f"does not fit as configured; fits with: {' '.join(overrides(recipe, base, fit.scenario))} "
                     f"-> {gb(fit.total)} GB/GPU on {base.gpus} x {fit.gpu_mem_gb:g} GB")
    return "\n".join(lines)


def run_plan(config: str, gpus: int, gpu_mem_gb: float, arch: str | None = None) -> dict[str, Any]:
    """The plan of one recipe: configured, FSDP2 and LoRA scenarios and the first one that fits."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if not gpu_mem_gb > 0:
        raise ConfigError(f"--gpu-mem-gb must be > 0, got {gpu_mem_gb}")
    recipe = read_recipe(config, arch)
    cal = calibrate()
    base = base_scenario(recipe, gpus)
    r = dataclasses.replace
    scenarios = [base, r(base, strategy="ddp"), r(base, strategy="fsdp2"), r(base, strategy="ddp", lora=True)]
    uniq: list[Scenario] = []
    for s in scenarios:
        if s not in uniq:
            uniq.append(s)
    plans = [plan_memory(recipe, s, gpu_mem_gb, cal) for s in uniq]
    fit = find_fit(recipe, base, gpu_mem_gb, cal)
    text = format_plan(recipe, plans, fit, base, cal)
    return {"recipe": recipe.path, "shape": recipe.shape, "arch": recipe.arch, "gpus": gpus, "gpu_mem_gb": gpu_mem_gb,
            "params": {n.name: n.params for n in recipe.nets_full},
            "lora_params": next((n.lora_params for n in recipe.nets_lora if n.lora_params), 0),
            "plans": [plan_dict(p) for p in plans], "fit": plan_dict(fit) if fit else None,
            "fit_overrides": overrides(recipe, base, fit.scenario) if fit else None,
            "activation_formula": activation_formula(recipe, cal),
            "calibration": {"k_fp32": cal.k_fp32, "k_amp": cal.k_amp, "a_fp32": cal.a_fp32, "a_amp": cal.a_amp},
            "text": text}
