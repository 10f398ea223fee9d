"""The `data` config section and the loader that turns it into tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from diffdiv.config import check
from diffdiv.data.mixtures import MixtureConfig, build_mixture


@dataclass
class DataConfig:
    """Training data: embedded digits, a user image folder, or a Gaussian mixture."""

    kind: Literal["digits", "image_folder", "mixture"] = "digits"
    path: str | None = None  # image_folder
    image_size: int = 8
    channels: int = 1
    split: Literal["all", "train", "test"] = "train"  # digits
    limit: int | None = None
    mixture: MixtureConfig = field(default_factory=MixtureConfig)

    def validate(self) -> None:
        check(self.image_size > 0, "data.image_size must be > 0")
        check(self.channels in (1, 3), "data.channels must be 1 or 3")
        if self.kind == "image_folder":
            check(bool(self.path), "data.path: image_folder needs a folder")

    def preflight(self) -> None:
        if self.kind == "image_folder":
            from diffdiv.data.images import check_images, list_images

            check_images(list_images(self.path)[: self.limit])


class Dataset:
    """In-memory data (digits / images) or an exact mixture sampler; draws global batches from a generator."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.mixture = None
        self.data: torch.Tensor | None = None
        if cfg.kind == "digits":
            from diffdiv.data.digits import load_digits_tensor

            self.data = load_digits_tensor(cfg.split)
        elif cfg.kind == "image_folder":
            from diffdiv.data.images import load_image_folder

            self.data = load_image_folder(cfg.path, cfg.image_size, cfg.channels, cfg.limit)
        else:
            self.mixture = build_mixture(cfg.mixture)
        if self.data is not None and cfg.limit:
            self.data = self.data[: cfg.limit]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.data is not None:
            return tuple(self.data.shape[1:])
        return (self.mixture.dim,)

    @property
    def sigma_data(self) -> float:
        if self.data is not None:
            return float(self.data.std())
        from diffdiv.data.mixtures import mixture_sigma_data

        return mixture_sigma_data(self.mixture)

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n samples (with replacement for stored data)."""
        if self.data is not None:
            idx = torch.randint(len(self.data), (n,), generator=generator)
            return self.data[idx]
        return self.mixture.sample(n, generator)

    def all(self, n: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reference set: all stored data, or n mixture samples."""
        if self.data is not None:
            return self.data
        return self.mixture.sample(n or 5000, generator or torch.Generator().manual_seed(12345))
