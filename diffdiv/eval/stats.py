"""Feature statistics (mean, covariance, count, extractor id), their files, and FID from them.

A statistics file is `.safetensors` (tensors `mean`, `cov`, optional `features`; metadata `n`,
`extractor`) or `.npz` (arrays `mean`/`mu`, `cov`/`sigma`, `n`, `extractor`, optional `features`).
The FID itself is torchmetrics' `FrechetInceptionDistance` with its running sums set from the stats.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from diffdiv.config import ConfigError

STATS_FORMAT = "diffdiv.feature_stats.v1"


@dataclass
class FeatureStats:
    """First two moments of a feature set (and optionally the features, for precision/recall/MMD)."""

    mean: Tensor  # (D,) float64
    cov: Tensor  # (D, D) float64, unbiased
    n: int
    extractor: str
    features: Tensor | None = None

    @classmethod
    def from_features(cls, feats: Tensor, extractor: str, keep: bool = True) -> FeatureStats:
        """Moments of (N, D) features; `keep` stores the features too."""
        f = feats.double()
        if len(f) < 2:
            raise ConfigError(f"feature statistics need at least 2 samples, got {len(f)}")
        mean = f.mean(0)
        c = f - mean
        cov = c.T @ c / (len(f) - 1)
        return cls(mean, cov, len(f), extractor, f if keep else None)

    def check_extractor(self, extractor: str, what: str = "reference statistics") -> None:
        """ConfigError when these stats were computed with another feature extractor."""
        if self.extractor != extractor:
            raise ConfigError(f"{what} were computed with feature extractor '{self.extractor}', but this "
                              f"evaluation uses '{extractor}' (stats from different extractors never mix)")

    def save(self, path: str | Path) -> Path:
        """Write as .safetensors or .npz (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            tens = {"mean": self.mean.double().contiguous(), "cov": self.cov.double().contiguous()}
            if self.features is not None:
                tens["features"] = self.features.float().contiguous()
            save_file(tens, str(tmp), metadata={"format": STATS_FORMAT, "n": str(self.n), "extractor": self.extractor})
        elif path.suffix == ".npz":
            arrs = {"mean": self.mean.double().numpy(), "cov": self.cov.double().numpy(), "n": np.array(self.n),
                    "extractor": np.array(self.extractor)}
            if self.features is not None:
                arrs["features"] = self.features.float().numpy()
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrs)
        else:
            raise ConfigError(f"statistics file must end in .safetensors or .npz, got {path}")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a statistics file; one-line ConfigError when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"statistics file not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    tens = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:
                raise ConfigError(f"cannot read statistics file {path} ({type(e).__name__})") from None
            if "mean" not in tens or "cov" not in tens or "n" not in meta or "extractor" not in meta:
                raise ConfigError(f"{path} is not a feature statistics file (needs mean, cov, n, extractor)")
            return cls(tens["mean"].double(), tens["cov"].double(), int(meta["n"]), meta["extractor"],
                       tens["features"].double() if "features" in tens else None)
        if path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as z:
                    d = {k: z[k] for k in z.files}
            except Exception as e:
                raise ConfigError(f"cannot read statistics file {path} ({type(e).__name__})") from None
            mean = d.get("mean", d.get("mu"))
            cov = d.get("cov", d.get("sigma"))
            if mean is None or cov is None or "n" not in d or "extractor" not in d:
                raise ConfigError(f"{path} is not a feature statistics file (needs mean|mu, cov|sigma, n, extractor)")
            feats = torch.from_numpy(d["features"]).double() if "features" in d else None
            return cls(torch.from_numpy(mean).double(), torch.from_numpy(cov).double(), int(d["n"]),
                       str(d["extractor"]), feats)
        raise ConfigError(f"statistics file must end in .safetensors or .npz, got {path}")


class _Identity(nn.Module):
    """Feature module for torchmetrics when the inputs already are features."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: Tensor) -> Tensor:
        return x


def _set_side(metric, side: str, st: FeatureStats) -> None:
    # torchmetrics keeps sum(f), sum(f f^T), n; recover them exactly from (mean, unbiased cov, n)
    mean = st.mean.double()
    setattr(metric, f"{side}_features_sum", mean * st.n)
    setattr(metric, f"{side}_features_cov_sum", st.cov.double() * (st.n - 1) + st.n * torch.outer(mean, mean))
    setattr(metric, f"{side}_features_num_samples", torch.tensor(st.n, dtype=torch.long))


def fid_from_stats(real: FeatureStats, fake: FeatureStats) -> float:
    """Fréchet distance between two Gaussians fitted to features (Heusel et al. 2017, Eq. 6), via torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake.check_extractor(real.extractor, "sample statistics")
    dim = int(real.mean.numel())
    metric = FrechetInceptionDistance(feature=_Identity(dim), reset_real_features=False, sync_on_compute=False)
    _set_side(metric, "real", real)
    _set_side(metric, "fake", fake)
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "compute called before update": the states were set directly
        return float(metric.compute())
