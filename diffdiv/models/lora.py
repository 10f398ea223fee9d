"""LoRA adapters (peft) on a Denoiser's trainable network: inject, disable, merge, save and load.

The adapted network's base weights stay frozen; `adapters_disabled` gives the base model back without a copy
(the frozen reference of reward fine-tuning, the shared base of LoRA students). Saved LoRA weights load in
plain diffusers (`pipe.load_lora_weights(dir)`) for SD-family pipelines, in peft's format otherwise.
"""

from __future__ import annotations

import contextlib
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


def add_lora(net: nn.Module, cfg: LoRAConfig) -> list[nn.Parameter]:
    """Inject LoRA adapters into `net` in place; freeze everything else; return the adapter parameters."""
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import inject_adapter_in_model

    config = lora_peft_config(net, cfg)
    try:
        if isinstance(net, PeftAdapterMixin):
            net.add_adapter(config)
        else:
            inject_adapter_in_model(config, net)
            net._diffdiv_lora_config = config
    except ValueError as e:
        raise ConfigError(f"lora: cannot add adapters ({e})") from None
    net.requires_grad_(False)
    params = [p for n, p in net.named_parameters() if "lora_" in n]
    if not params:
        raise ConfigError(f"lora: target_modules {config.target_modules} matched no layer")
    for p in params:
        p.requires_grad_(True)
    return params


def lora_config_of(net: nn.Module):
    cfg = getattr(net, "peft_config", None)
    if isinstance(cfg, dict) and cfg:
        return next(iter(cfg.values()))
    return getattr(net, "_diffdiv_lora_config", None)


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
    for attr in ("peft_config", "_diffdiv_lora_config"):
        if hasattr(net, attr):
            delattr(net, attr)
    if hasattr(net, "_hf_peft_config_loaded"):
        net._hf_peft_config_loaded = False
    return net


def merged_copy(model: Denoiser) -> Denoiser:
    """A copy of a Denoiser with its LoRA merged into plain weights (frozen parts stay shared)."""
    out = model.clone()
    merge_lora_(out.trainable)
    return out


def save_lora(model: Denoiser, out_dir: str | Path) -> Path:
    """LoRA weights: diffusers format for SD-family pipelines, peft format (adapter_model.safetensors) otherwise."""
    from peft import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = model.trainable
    config = lora_config_of(net)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net).items()}
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
    net._diffdiv_lora_config = config
    return model
