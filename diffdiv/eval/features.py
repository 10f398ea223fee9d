"""Feature extractors for Fréchet distance, precision/recall and MMD.

Every extractor maps images in [-1, 1] (N, C, H, W) (or vectors (N, D)) to features (N, F) and has
an `id` naming the network *and* its weights, so statistics from different extractors never mix:

    digits            the project's digits CNN (64-d penultimate layer), for 1x8x8 digits
    clip:<path|id>    CLIP projected image embeddings of any local (or cached hub) CLIPModel
    inception[:file]  the standard FID Inception-v3 (2048-d pool features); needs torch-fidelity
    raw               the samples themselves, flattened (2-D mixtures, small vectors)
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import Tensor, nn

from diffdiv.config import ConfigError

RAW_MAX_DIM = 4096  # covariance of raw features is dim x dim


def weights_fingerprint(module: nn.Module, extra: str = "") -> str:
    """Short hash of a module's parameter/buffer shapes and a strided subset of their values."""
    h = hashlib.sha256(extra.encode())
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::step].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:12]


class FeatureExtractor(nn.Module):
    """Base: `forward(x) -> (N, num_features)` float; `id` identifies network and weights."""

    id: str = "base"
    num_features: int = 0

    def check_input(self, x: Tensor) -> None:
        """Raise ConfigError when the extractor cannot take inputs of this shape."""


class DigitsFeatureExtractor(FeatureExtractor):
    """The digits CNN's 64-d penultimate features (for 1x8x8 digits in [-1, 1])."""

    num_features = 64

    def __init__(self, cnn: nn.Module | None = None):
        super().__init__()
        from diffdiv.eval.digits_cnn import CACHE_VERSION, load_digits_cnn

        self.cnn = (cnn if cnn is not None else load_digits_cnn()).eval().requires_grad_(False)
        self.id = f"digits_cnn-{CACHE_VERSION}-{weights_fingerprint(self.cnn)}"

    def check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise ConfigError(f"feature extractor 'digits' needs 1x8x8 images, got {tuple(x.shape[1:])}; "
                              "use --features clip:<path> or inception")

    def forward(self, x: Tensor) -> Tensor:
        return self.cnn.features(x)


class ClipFeatureExtractor(FeatureExtractor):
    """CLIP projected image embeddings (un-normalized), from any local or cached hub CLIPModel."""

    def __init__(self, path: str, embedder: nn.Module | None = None):
        super().__init__()
        from diffdiv.rewards.clip import ClipEmbedder

        self.embedder = embedder if embedder is not None else ClipEmbedder.from_pretrained(path, reward="clip features")
        self.embedder.requires_grad_(False).eval()
        cfg = self.embedder.model.config
        self.num_features = int(cfg.projection_dim)
        cfg_text = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        self.id = f"clip-{weights_fingerprint(self.embedder.model, cfg_text)}"

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"CLIP features need images (N, 1|3, H, W), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        return self.embedder.embed_images(x)


class RawFeatureExtractor(FeatureExtractor):
    """The samples themselves, flattened (for 2-D mixtures and other small vectors)."""

    id = "raw"

    def __init__(self, dim: int):
        super().__init__()
        if dim > RAW_MAX_DIM:
            raise ConfigError(f"feature extractor 'raw' is limited to {RAW_MAX_DIM} dims (got {dim}); "
                              "use digits, clip:<path> or inception")
        self.num_features = int(dim)
        self.id = f"raw-{dim}"

    def check_input(self, x: Tensor) -> None:
        if x[0].numel() != self.num_features:
            raise ConfigError(f"raw features: samples have {x[0].numel()} values, expected {self.num_features}")

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(len(x), -1).float()


class InceptionFeatureExtractor(FeatureExtractor):
    """FID Inception-v3 2048-d pool features through torch-fidelity (when installed and its weights exist)."""

    num_features = 2048

    def __init__(self, weights: str | None = None):
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ConfigError("feature extractor 'inception' is unavailable: the torch-fidelity package (FID "
                              "Inception-v3 network + weights) is not installed; use --features digits, "
                              "clip:<path> or raw")
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=weights)
        except Exception as e:  # offline: weights cannot be downloaded
            raise ConfigError(f"feature extractor 'inception' is unavailable: its weights could not be loaded "
                              f"({type(e).__name__}); pass inception:<pt_inception-2015-12-05 .pth file>") from None
        self.id = f"inception-v3-compat-2048-{weights_fingerprint(self.net)}"

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"Inception features need images (N, 1|3, H, W), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if u8.shape[1] == 1:
            u8 = u8.expand(-1, 3, -1, -1)
        return self.net(u8).reshape(len(x), -1)


def default_feature_spec(sample: Tensor, clip: str | None = None) -> str:
    """The extractor used when none is named: raw for vectors, digits for 1x8x8, else CLIP or Inception."""
    if sample.ndim <= 2 or sample[0].ndim == 1:
        return "raw"
    if tuple(sample.shape[1:]) == (1, 8, 8):
        return "digits"
    return f"clip:{clip}" if clip else "inception"


def build_features(spec: str, sample: Tensor | None = None) -> FeatureExtractor:
    """Extractor from a spec: digits | clip:<path> | inception[:weights] | raw (needs a sample for its size)."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"--features: expected digits, clip:<path>, inception or raw, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name == "digits" and not arg:
        ext: FeatureExtractor = DigitsFeatureExtractor()
    elif name == "clip":
        if not arg:
            raise ConfigError("--features clip needs a CLIP folder or hub id: clip:<path>")
        ext = ClipFeatureExtractor(arg)
    elif name == "inception":
        ext = InceptionFeatureExtractor(arg or None)
    elif name == "raw" and not arg:
        if sample is None:
            raise ConfigError("raw features need to know the sample size")
        ext = RawFeatureExtractor(int(sample[0].numel()))
    else:
        raise ConfigError(f"--features: unknown extractor '{spec}' (digits, clip:<path>, inception[:weights], raw)")
    return ext.eval().requires_grad_(False)


@torch.no_grad()
def extract(ext: FeatureExtractor, x: Tensor, batch_size: int = 500) -> Tensor:
    """Features of a tensor of samples, in batches, as float64 on CPU."""
    ext.check_input(x)
    dev = next((p.device for p in ext.parameters()), torch.device("cpu"))
    out = [ext(x[i:i + batch_size].to(dev)).double().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, ext.num_features, dtype=torch.float64)
