"""Aesthetic-style reward: a linear / MLP head on (L2-normalized) CLIP image embeddings.

The head is stored as safetensors with keys `layers.<i>.weight` / `layers.<i>.bias` (the layout of
the LAION aesthetic predictor v2 used by DDPO, whose Linear layers sit at indices 0, 2, 4, 6, 7 with
dropouts between and no activation). The file's metadata records the activation and whether the
embedding is normalized; a file without metadata is read LAION-style (no activation, normalized).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from diffdiv.config import ConfigError
from diffdiv.rewards.base import Reward, at_least_fp32, existing_path, register_reward
from diffdiv.rewards.clip import ClipEmbedder

_ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
HEAD_FORMAT = "diffdiv.aesthetic_head.v1"


class AestheticHead(nn.Module):
    """MLP `dims[0] -> ... -> dims[-1]` (dims[-1] == 1). Linear layers at the indices in `linear_at`."""

    def __init__(
        self,
        dims: list[int],
        activation: str = "none",
        normalize: bool = True,
        linear_at: list[int] | None = None,
    ):
        super().__init__()
        if len(dims) < 2 or dims[-1] != 1:
            raise ValueError(f"aesthetic head dims must end in 1, got {dims}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        n_lin = len(dims) - 1
        if linear_at is None:  # Linear, act, Linear, act, ..., Linear
            linear_at = [2 * i for i in range(n_lin)]
        if len(linear_at) != n_lin or sorted(linear_at) != list(linear_at):
            raise ValueError(f"linear_at {linear_at} does not match {n_lin} linear layers")
        mods: list[nn.Module] = [nn.Identity() for _ in range(linear_at[-1] + 1)]
        for k, i in enumerate(linear_at):
            mods[i] = nn.Linear(dims[k], dims[k + 1])
            if k < n_lin - 1:  # activation right after every hidden Linear (if there is room)
                if i + 1 < linear_at[k + 1]:
                    mods[i + 1] = _ACTIVATIONS[activation]()
                elif activation != "none":
                    raise ValueError("no room for an activation between adjacent linear layers")
        self.layers = nn.Sequential(*mods)
        self.dims, self.activation, self.normalize, self.linear_at = (
            list(dims),
            activation,
            normalize,
            linear_at,
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, D) -> scores (N,)."""
        if self.normalize:
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return at_least_fp32(self.layers(emb.to(self.layers[0].weight.dtype)).squeeze(-1))

    def save(self, path: str | Path) -> None:
        """Write the head as safetensors (weights + architecture metadata)."""
        meta = {
            "format": HEAD_FORMAT,
            "dims": ",".join(map(str, self.dims)),
            "activation": self.activation,
            "normalize": str(self.normalize).lower(),
            "linear_at": ",".join(map(str, self.linear_at)),
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> AestheticHead:
        """Read a head saved by `save`, or a LAION-layout safetensors file without metadata."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        idx = sorted(
            {int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")}
        )
        if not idx:
            raise ValueError(f"{path}: no 'layers.<i>.weight' tensors in the file")
        dims = [state[f"layers.{idx[0]}.weight"].shape[1]] + [
            state[f"layers.{i}.weight"].shape[0] for i in idx
        ]
        head = cls(
            dims,
            activation=meta.get("activation", "none"),
            normalize=meta.get("normalize", "true") == "true",
            linear_at=idx,
        )
        head.load_state_dict(state)
        return head


class AestheticReward(Reward):
    """head(CLIP image embedding) -- e.g. the LAION aesthetic score. Differentiable."""

    name = "aesthetic"
    differentiable = True

    def __init__(self, embedder: ClipEmbedder, head: AestheticHead):
        super().__init__()
        self.embedder = embedder
        self.head = head
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.head(self.embedder.embed_images(images))


@register_reward("aesthetic")
def _build_aesthetic(clip_path: str, head_path: str, dtype: str | None = None) -> Reward:
    head_file = existing_path(head_path, "head_path", "aesthetic", kind="file")
    emb = ClipEmbedder.from_pretrained(clip_path, dtype=dtype, reward="aesthetic")
    try:
        head = AestheticHead.load(head_file)
    except (ValueError, RuntimeError, OSError) as e:
        raise ConfigError(
            f"reward 'aesthetic': cannot read head {head_file}: {str(e).splitlines()[0]}"
        ) from None
    proj = int(emb.model.config.projection_dim)
    if head.dims[0] != proj:
        raise ConfigError(
            f"reward 'aesthetic': head input is {head.dims[0]}-d but the CLIP projection is {proj}-d"
        )
    if dtype is not None:
        head = head.to(emb.dtype)
    return AestheticReward(emb, head)
