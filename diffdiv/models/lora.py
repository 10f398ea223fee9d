"""LoRA adapters (peft) on a Denoiser's trainable network: inject, disable, merge, save and load.

The adapted network's base weights stay frozen; `adapters_disabled` gives the base model back without a copy
(the frozen reference of reward fine-tuning, the shared base of LoRA students). Saved LoRA weights load in
plain diffusers (`pipe.load_lora_weights(dir)`) for SD-family pipelines, in peft's format otherwise.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from diffdiv.config import ConfigError, check
from diffdiv.models.base import Denoiser


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) on the trainable network; the reference is the network without them."""

    enabled: bool = True
    rank: int = 4
    alpha: float | None = None  # lora_alpha (scale alpha/rank); default: rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] | None = None  # default: attention projections (+ resnet convs for UNet2DModel)

    def validate(self) -> None:
        check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        check(self.alpha is None or self.alpha > 0, "lora.alpha must be positive")
        check(0 <= self.dropout < 1, "lora.dropout must be in [0, 1)")


def default_lora_targets(net: nn.Module) -> list[str]:
    """Attention projections; resnet convs too for UNet2DModel; every Linear for an MLP."""
    names = [n for n, _ in net.named_modules()]
    attn = [t for t in ("to_q", "to_k", "to_v", "to_out.0") if any(n.endswith(t) for n in names)]
    if type(net).__name__ == "UNet2DModel":
        return attn + ["conv1", "conv2"]
    if attn:
        return attn
    linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError(f"lora: no default target modules for {type(net).__name__}; set lora.target_modules")
    return linear


def lora_peft_config(net: nn.Module, cfg: LoRAConfig):
    from peft import LoraConfig

    targets = list(cfg.target_modules) if cfg.target_modules else default_lora_targets(net)
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                      lora_dropout=cfg.dropout, target_modules=targets, init_lora_weights=True)


def add_lora(net: nn.Module, cfg: LoRAConfig, adapter_name: str = "default") -> list[nn.Parameter]:
    """Inject LoRA adapter `adapter_name` into `net` in place; freeze everything else; return its parameters."""
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import inject_adapter_in_model

    config = lora_peft_config(net, cfg)
    try:
        with warnings.catch_warnings():  # a second adapter (LoRA students) is intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            if isinstance(net, PeftAdapterMixin):
                net.add_adapter(config, adapter_name=adapter_name)
            else:
                inject_adapter_in_model(config, net, adapter_name=adapter_name)
                net.diffdiv_lora_configs = {**getattr(net, "diffdiv_lora_configs", {}), adapter_name: config}
    except ValueError as e:
        raise ConfigError(f"lora: cannot add adapters ({e})") from None
    net.requires_grad_(False)
    params = adapter_params(net, adapter_name)
    if not params:
        raise ConfigError(f"lora: target_modules {config.target_modules} matched no layer")
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_params(net: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The LoRA parameters of one adapter (peft names them `...lora_A.<adapter>.weight`)."""
    tag = re.compile(rf"\.lora_\w+\.{re.escape(adapter_name)}\.")
    return [p for n, p in net.named_parameters() if tag.search(f".{n}")]


def use_adapter(net: nn.Module, adapter_name: str | None) -> None:
    """Make `adapter_name` the active LoRA adapter of every layer (None: adapters off, the base network);
    requires_grad flags are left as they were (peft's own switch would change them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    flags = [(p, p.requires_grad) for p in net.parameters()]
    for m in net.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(adapter_name is not None)
            if adapter_name is not None:
                m.set_adapter(adapter_name)
    for p, f in flags:
        p.requires_grad_(f)


class AdapterView(Denoiser):
    """One role of a Denoiser whose network carries several LoRA adapters on one shared frozen base.

    Calls run `base` with adapter `adapter` active (None: every adapter off, i.e. the base model itself), so a
    LoRA-student run holds one base network: teacher = AdapterView(base, None), student and fake score =
    AdapterView(base, "student" / "fake_score"). `lora_params` are the view's own trainable parameters.
    """

    def __init__(self, base: Denoiser, adapter: str | None, guidance_scale: float | None = None,
                 lora_params: list[nn.Parameter] | None = None):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.schedule = base.schedule
        self.sample_shape = base.sample_shape
        self.conditional = base.conditional
        self.guidance_scale = base.guidance_scale if guidance_scale is None else guidance_scale
        self.lora_params = list(lora_params or [])

    def activate(self) -> None:
        use_adapter(self.base.trainable, self.adapter)

    def _denoise(self, x_t, t, cond=None):
        self.activate()
        return self.base._denoise(x_t, t, cond)

    def features(self, x_t, t, cond=None):
        self.activate()
        return self.base.features(x_t, t, cond)

    def uncond_like(self, cond):
        return self.base.uncond_like(cond)

    def cat_cond(self, a, b):
        return self.base.cat_cond(a, b)

    def encode_prompts(self, prompts):
        return self.base.encode_prompts(prompts)

    @property
    def trainable(self) -> nn.Module:
        return self.base.trainable

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)


def lora_config_of(net: nn.Module, adapter_name: str | None = None):
    """The peft LoraConfig of an adapter (the first one if that name is not there)."""
    cfg = getattr(net, "peft_config", None) or getattr(net, "diffdiv_lora_configs", None)
    if isinstance(cfg, dict) and cfg:
        return cfg.get(adapter_name) or next(iter(cfg.values()))
    return None


def has_lora(net: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in net.modules())


@contextlib.contextmanager
def adapters_disabled(net: nn.Module) -> Iterator[nn.Module]:
    """The base network: LoRA adapters switched off (requires_grad flags restored afterwards)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for p in net.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield net
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, f in flags:
            p.requires_grad_(f)


def merge_lora_(net: nn.Module) -> nn.Module:
    """Merge LoRA weights into the base layers and remove the adapter modules (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "diffdiv_lora_configs"):
        if hasattr(net, attr):
            delattr(net, attr)
    if hasattr(net, "_hf_peft_config_loaded"):
        net._hf_peft_config_loaded = False
    return net


def merged_copy(model: Denoiser, adapter_name: str | None = None) -> Denoiser:
    """A copy of a Denoiser with its (or one named) LoRA adapter merged into plain weights; other adapters are
    dropped; frozen parts stay shared."""
    out = model.clone()
    if adapter_name is not None:
        use_adapter(out.trainable, adapter_name)
    merge_lora_(out.trainable)
    return out


def save_lora(model: Denoiser, out_dir: str | Path, adapter_name: str = "default") -> Path:
    """LoRA weights: diffusers format for SD-family pipelines, peft format (adapter_model.safetensors) otherwise."""
    from peft import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = model.trainable
    config = lora_config_of(net, adapter_name)
    state = {k: v.detach().cpu().contiguous()
             for k, v in get_peft_model_state_dict(net, adapter_name=adapter_name).items()}
    pipe_name = getattr(model, "pipeline_cls_name", None)
    if pipe_name is not None:
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers

        pipe_cls = getattr(diffusers, pipe_name)
        layers = convert_state_dict_to_diffusers(state)
        key = model.trainable_name
        meta = config.to_dict() if config is not None else None
        if meta is not None:
            meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        pipe_cls.save_lora_weights(out, **{f"{key}_lora_layers": layers, f"{key}_lora_adapter_metadata": meta},
                                   safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(out / "adapter_model.safetensors"))
        config.save_pretrained(str(out))
    return out


def load_lora(model: Denoiser, lora_dir: str | Path) -> Denoiser:
    """Load LoRA weights written by `save_lora` into `model` (in place; adapters stay separate)."""
    d = Path(lora_dir)
    if (d / "pytorch_lora_weights.safetensors").is_file():
        pipe = model.pipeline()
        pipe.load_lora_weights(str(d))
        return model
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(d))
    net = model.trainable
    inject_adapter_in_model(config, net)
    prefix = "base_model.model."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in
             load_file(str(d / "adapter_model.safetensors")).items()}
    res = set_peft_model_state_dict(net, state)
    if getattr(res, "unexpected_keys", None):
        raise ConfigError(f"LoRA weights in {d} do not match the model (unexpected keys)")
    net.diffdiv_lora_configs = {"default": config}
    return model
