"""Users' own images from a folder, as tensors in [-1, 1]: loaded whole (small sets) or streamed (large ones)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from diffdiv.config import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def check_images(files: list[Path]) -> None:
    """Open every image header (cheap) so an unreadable file fails before training starts."""
    from PIL import Image, UnidentifiedImageError

    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ConfigError(f"cannot read image {f}: {type(e).__name__}") from None


def load_image(path: str | Path, size: int, channels: int = 3) -> torch.Tensor:
    """One image -> (C, size, size) float32 in [-1, 1] (center crop, bicubic resize)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            m = min(w, h)
            im = im.crop(((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m))
            im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"cannot read image {path}: {type(e).__name__}") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_image_folder(folder: str | Path, size: int, channels: int = 3, limit: int | None = None) -> torch.Tensor:
    """All images of a folder (recursively) -> (N, C, size, size) in [-1, 1]."""
    files = list_images(folder)[:limit]
    return torch.stack([load_image(f, size, channels) for f in files])


def folder_bytes(num_images: int, size: int, channels: int) -> int:
    """Bytes of a folder decoded into memory as float32 (N, C, size, size)."""
    return num_images * channels * size * size * 4


class ImageFolderDataset(torch.utils.data.Dataset):
    """A torch Dataset over image files: each item decoded and resized when asked for, nothing cached."""

    def __init__(self, files: list[Path], size: int, channels: int = 3):
        self.files = list(files)
        self.size = size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.files[i], self.size, self.channels)


class CurrentIndices(Sampler):
    """A batch sampler over the indices set for the next pass, split into `chunks` parts (one per worker)."""

    def __init__(self, chunks: int = 1):
        self.indices: list[int] = []
        self.chunks = max(1, chunks)

    def __iter__(self) -> Iterator[list[int]]:
        idx = list(self.indices)
        step = max(1, math.ceil(len(idx) / self.chunks))
        for k in range(0, len(idx), step):
            yield idx[k:k + step]

    def __len__(self) -> int:
        return min(self.chunks, len(self.indices))


class StreamingImages:
    """Decode given indices of an image folder through a DataLoader with (persistent) workers.

    Only the images of the batch being loaded exist in memory; the indices come from the caller (the
    trainer's shared generator), so every rank and every world size sees the same images."""

    def __init__(self, files: list[Path], size: int, channels: int = 3, num_workers: int = 2):
        self.dataset = ImageFolderDataset(files, size, channels)
        self.sampler = CurrentIndices(num_workers)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, collate_fn=torch.stack)

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, indices: torch.Tensor | list[int]) -> torch.Tensor:
        """(len(indices), C, size, size) in [-1, 1], in the order given."""
        self.sampler.indices = [int(i) for i in indices]
        if not self.sampler.indices:
            return torch.empty(0, self.dataset.channels, self.dataset.size, self.dataset.size)
        return torch.cat(list(self.loader))


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
                    labels: list[str] | None = None) -> None:
    """(N, C, H, W) in [-1, 1] -> one PNG grid; `labels` (e.g. prompts) are written under the tiles."""
    from PIL import Image

    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    pad = 1
    grid = torch.zeros(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    scale = max(1, 256 // max(h, w))  # upscale tiny images so the grid is readable
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if labels is not None:
        img = _label_rows(img, [str(t) for t in labels[:n]], nrow, ncol, (h + pad) * scale, (w + pad) * scale)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _label_rows(img, labels: list[str], nrow: int, ncol: int, tile_h: int, tile_w: int):
    """The grid with a caption strip under every row of tiles (text cut to the tile width)."""
    from PIL import Image, ImageDraw

    strip = 14
    out = Image.new(img.mode, (img.width, img.height + ncol * strip), 0)
    draw = ImageDraw.Draw(out)
    max_chars = max(4, tile_w // 6)
    for r in range(ncol):
        out.paste(img.crop((0, r * tile_h, img.width, (r + 1) * tile_h)), (0, r * (tile_h + strip)))
        for q in range(nrow):
            i = r * nrow + q
            if i < len(labels):
                text = labels[i] if len(labels[i]) <= max_chars else labels[i][: max_chars - 1] + "~"
                draw.text((q * tile_w + 2, r * (tile_h + strip) + tile_h + 1), text, fill=255 if img.mode == "L"
                          else (255, 255, 255))
    return out
