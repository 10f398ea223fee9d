"""The `data` config section and the loader that turns it into tensors (in memory, or streamed from disk)."""

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
    stream: bool | None = None  # image_folder: decode per batch from disk; null = when the folder exceeds the cap
    max_memory_mb: float = 2048.0  # image_folder: largest decoded (float32) folder held in RAM
    num_workers: int = 2  # image_folder streaming: DataLoader decode workers (0 = in the training process)

    def validate(self) -> None:
        check(self.image_size > 0, "data.image_size must be > 0")
        check(self.channels in (1, 3), "data.channels must be 1 or 3")
        check(self.max_memory_mb > 0, "data.max_memory_mb must be > 0")
        check(self.num_workers >= 0, "data.num_workers must be >= 0")
        if self.kind == "image_folder":
            check(bool(self.path), "data.path: image_folder needs a folder")

    def preflight(self) -> None:
        if self.kind == "image_folder":
            from diffdiv.data.images import check_images, list_images

            check_images(list_images(self.path)[: self.limit])


SIGMA_DATA_IMAGES = 512  # images a streamed folder's sigma_data is estimated from


def should_stream(cfg: DataConfig, num_images: int) -> bool:
    """Stream an image folder when asked to, or (stream: null) when decoding it whole exceeds max_memory_mb."""
    if cfg.stream is not None:
        return cfg.stream
    from diffdiv.data.images import folder_bytes

    return folder_bytes(num_images, cfg.image_size, cfg.channels) > cfg.max_memory_mb * 2**20


class Dataset:
    """Digits / images in memory, an image folder streamed from disk, or an exact mixture sampler.

    Batches are drawn from a generator shared by all ranks: `batch(n, g)` is the global batch,
    `local_batch(n, g, rank, world)` this rank's slice of the same draw (a streamed folder decodes only
    that slice), so N processes see exactly the data one process would."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.mixture = None
        self.data: torch.Tensor | None = None
        self.stream = None
        self._sigma: float | None = None
        if cfg.kind == "digits":
            from diffdiv.data.digits import load_digits_tensor

            self.data = load_digits_tensor(cfg.split)
        elif cfg.kind == "image_folder":
            from diffdiv.data.images import StreamingImages, list_images, load_image_folder

            files = list_images(cfg.path)[: cfg.limit]
            if should_stream(cfg, len(files)):
                self.stream = StreamingImages(files, cfg.image_size, cfg.channels, cfg.num_workers)
            else:
                self.data = load_image_folder(cfg.path, cfg.image_size, cfg.channels, cfg.limit)
        else:
            self.mixture = build_mixture(cfg.mixture)
        if self.data is not None and cfg.limit:
            self.data = self.data[: cfg.limit]

    def __len__(self) -> int:
        if self.data is not None:
            return len(self.data)
        if self.stream is not None:
            return len(self.stream)
        raise TypeError("a mixture has no length")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.data is not None:
            return tuple(self.data.shape[1:])
        if self.stream is not None:
            return (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        return (self.mixture.dim,)

    @property
    def sigma_data(self) -> float:
        """Data std: exact for stored data and mixtures; over a fixed subset of a streamed folder."""
        if self.data is not None:
            return float(self.data.std())
        if self.stream is not None:
            if self._sigma is None:
                n = len(self.stream)
                g = torch.Generator().manual_seed(0)
                idx = torch.randperm(n, generator=g)[:SIGMA_DATA_IMAGES].sort().values
                x = torch.cat([self.stream.load(idx[k:k + 64]) for k in range(0, len(idx), 64)])
                self._sigma = float(x.std())
            return self._sigma
        from diffdiv.data.mixtures import mixture_sigma_data

        return mixture_sigma_data(self.mixture)

    def _indices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(len(self), (n,), generator=generator)

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n samples (with replacement for stored data)."""
        if self.mixture is not None:
            return self.mixture.sample(n, generator)
        idx = self._indices(n, generator)
        return self.data[idx] if self.data is not None else self.stream.load(idx)

    def local_batch(self, n: int, generator: torch.Generator, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Rank `rank`'s slice (n // world samples) of the global batch `batch(n, generator)` would draw."""
        if self.mixture is not None:
            b = n // world
            return self.mixture.sample(n, generator)[rank * b:(rank + 1) * b]
        idx = self._indices(n, generator)
        b = n // world
        idx = idx[rank * b:(rank + 1) * b]
        return self.data[idx] if self.data is not None else self.stream.load(idx)

    def all(self, n: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reference set: all stored data, the first n (default 2000) images of a stream, or n mixture samples."""
        if self.data is not None:
            return self.data
        if self.stream is not None:
            return self.stream.load(list(range(min(len(self.stream), n or 2000))))
        return self.mixture.sample(n or 5000, generator or torch.Generator().manual_seed(12345))
