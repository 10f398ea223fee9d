"""Reference sets for evaluation (`--ref`) and their cached feature statistics.

    digits | digits:train | digits:test | digits:all   embedded sklearn digits (`digits` = train split)
    <folder>                                           an image folder (resized to the samples' size)
    <file>.npz with `images` or `samples`              a set of samples (e.g. from `diffdiv sample`)
    <file>.npz / .safetensors with mean + cov          cached statistics (see diffdiv.eval.stats)
    mixture:<config.yaml>                              a Gaussian mixture (a `mixture:` / `data.mixture:`
                                                       section, or the mixture mapping itself)

Reference features are embedded once and cached under `$DIFFDIV_CACHE/ref_stats/`, keyed by the
reference's identity *and* the feature extractor id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffdiv.config import ConfigError, from_dict, read_yaml
from diffdiv.eval.stats import FeatureStats

REF_HELP = ("digits[:train|test|all], mixture:<config.yaml>, an image folder, a samples .npz, or a statistics "
            ".npz/.safetensors")
MIXTURE_SEED = 12345
CACHE_VERSION = "v1"


@dataclass
class Reference:
    """A parsed `--ref`: what it is and where it lives."""

    spec: str
    kind: str  # digits | folder | samples | stats | mixture
    path: Path | None = None
    split: str = "train"
    mixture: Any = None  # GaussianMixture for kind == mixture
    mixture_cfg: dict[str, Any] | None = None

    @property
    def has_samples(self) -> bool:
        return self.kind != "stats"

    def describe(self) -> str:
        if self.kind == "digits":
            return f"sklearn digits, {self.split} split"
        if self.kind == "mixture":
            return f"Gaussian mixture from {self.path} ({self.mixture.num_components} components)"
        return f"{self.kind}: {self.path}"


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except Exception as e:
        raise ConfigError(f"--ref: cannot read {path} as .npz ({type(e).__name__})") from None


def mixture_from_yaml(path: str | Path):
    """A GaussianMixture from a YAML file holding `data.mixture`, `mixture`, or the mixture mapping."""
    from diffdiv.data.mixtures import MixtureConfig, build_mixture

    data = read_yaml(path)
    if isinstance(data.get("data"), dict) and isinstance(data["data"].get("mixture"), dict):
        m = data["data"]["mixture"]
    elif isinstance(data.get("mixture"), dict):
        m = data["mixture"]
    else:
        m = data
    try:
        cfg = from_dict(MixtureConfig, m, prefix="mixture.")
    except ConfigError as e:
        raise ConfigError(f"--ref mixture:{path}: {e}") from None
    from diffdiv.config import to_dict

    return build_mixture(cfg), to_dict(cfg)


def parse_ref(spec: str) -> Reference:
    """Parse and check a `--ref` value (one-line ConfigError when it is not usable)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--ref: empty (expected {REF_HELP})")
    spec = spec.strip()
    if spec == "digits" or spec.startswith("digits:"):
        split = spec.partition(":")[2] or "train"
        if split not in ("train", "test", "all"):
            raise ConfigError(f"--ref {spec}: split must be train, test or all")
        return Reference(spec, "digits", split=split)
    if spec.startswith("mixture:"):
        p = Path(spec[len("mixture:"):]).expanduser()
        if not p.is_file():
            raise ConfigError(f"--ref {spec}: mixture config file not found: {p}")
        mix, cfg = mixture_from_yaml(p)
        return Reference(spec, "mixture", path=p, mixture=mix, mixture_cfg=cfg)
    p = Path(spec).expanduser()
    if p.is_dir():
        from diffdiv.data.images import list_images

        list_images(p)  # ConfigError if it holds no images
        return Reference(spec, "folder", path=p)
    if p.is_file() and p.suffix == ".safetensors":
        FeatureStats.load(p)
        return Reference(spec, "stats", path=p)
    if p.is_file() and p.suffix == ".npz":
        keys = _npz_keys(p)
        if ("cov" in keys or "sigma" in keys) and ("mean" in keys or "mu" in keys):
            FeatureStats.load(p)
            return Reference(spec, "stats", path=p)
        if "images" in keys or "samples" in keys:
            return Reference(spec, "samples", path=p)
        raise ConfigError(f"--ref {p}: .npz holds neither samples (images|samples) nor statistics (mean, cov)")
    if not p.exists() and ("/" in spec or "." in spec):
        raise ConfigError(f"--ref: {spec} does not exist (expected {REF_HELP})")
    raise ConfigError(f"--ref: '{spec}' is not {REF_HELP}")


def load_reference_samples(ref: Reference, like: Tensor | None = None, n_mixture: int = 5000) -> Tensor:
    """The reference set as a tensor (images in [-1, 1] or vectors); folders are resized like `like`."""
    if ref.kind == "digits":
        from diffdiv.data.digits import load_digits_tensor

        return load_digits_tensor(ref.split)
    if ref.kind == "mixture":
        return ref.mixture.sample(n_mixture, torch.Generator().manual_seed(MIXTURE_SEED)).float()
    if ref.kind == "samples":
        with np.load(ref.path, allow_pickle=False) as z:
            arr = z["images"] if "images" in z.files else z["samples"]
        return torch.from_numpy(np.asarray(arr, dtype=np.float32))
    if ref.kind == "folder":
        from diffdiv.data.images import load_image_folder

        if like is None or like.ndim != 4:
            raise ConfigError(f"--ref {ref.path}: an image folder needs image samples to compare with")
        c, h, w = like.shape[1:]
        if h != w:
            raise ConfigError(f"--ref {ref.path}: image folders need square samples, got {h}x{w}")
        return load_image_folder(ref.path, int(h), int(c))
    raise ConfigError(f"--ref {ref.spec}: holds statistics only, no samples")


def reference_identity(ref: Reference, like_shape: tuple[int, ...] | None, n_mixture: int) -> dict[str, Any]:
    """What determines the reference features besides the extractor (the cache key)."""
    ident: dict[str, Any] = {"kind": ref.kind, "version": CACHE_VERSION}
    if ref.kind == "digits":
        ident["split"] = ref.split
    elif ref.kind == "mixture":
        ident.update(mixture=ref.mixture_cfg, n=n_mixture, seed=MIXTURE_SEED)
    elif ref.kind == "samples":
        st = ref.path.stat()
        ident.update(path=str(ref.path.resolve()), size=st.st_size, mtime=st.st_mtime_ns)
    elif ref.kind == "folder":
        from diffdiv.data.images import list_images

        files = list_images(ref.path)
        h = hashlib.sha256()
        for f in files:
            s = f.stat()
            h.update(f"{f.relative_to(ref.path)}:{s.st_size}:{s.st_mtime_ns}".encode())
        ident.update(path=str(ref.path.resolve()), files=h.hexdigest(), shape=list(like_shape or ()))
    return ident


def stats_cache_path(ref: Reference, extractor_id: str, like_shape: tuple[int, ...] | None,
                     n_mixture: int, cache_dir: Path | None = None) -> Path:
    """Cache file for this reference under this extractor."""
    from diffdiv.eval.digits_cnn import cache_dir as default_cache

    key = json.dumps({"ref": reference_identity(ref, like_shape, n_mixture), "extractor": extractor_id},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = ref.kind + (f"-{ref.split}" if ref.kind == "digits" else "")
    return Path(cache_dir or default_cache()) / "ref_stats" / f"{slug}-{extractor_id}-{digest}.safetensors"
