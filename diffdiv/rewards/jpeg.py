"""JPEG (in)compressibility rewards (DDPO) and a differentiable JPEG-size surrogate.

True rewards (not differentiable): encode each image with PIL as JPEG at quality 95 and return
minus (compressibility) or plus (incompressibility) the file size in kB (bytes / 1000), as in DDPO
(Black et al. 2023, arXiv 2305.13301). Videos: mean over frames.

Surrogate (differentiable): an estimate of the JPEG entropy-coded size computed the way the encoder
sees the image: RGB -> YCbCr (JFIF), chroma 2x2 average (4:2:0, Pillow's default), 8x8 block DCT,
division by the quality-95 quantization tables, and a smooth bit count per coefficient
`log2(1 + sqrt(c^2 + delta^2) / q) - log2(1 + delta / q)` summed over coefficients (AC coefficients, plus
DC differences to the previous block in raster order, which is how DC is coded). Returned in
"kB" = bits / 8000; it is a monotone proxy of the JPEG size, not a calibrated predictor (see the
test for its rank correlation with the true size). A total-variation proxy (`kind="tv"`) is also
provided.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from PIL import Image

from diffdiv.config import ConfigError
from diffdiv.rewards.base import Reward, register_reward, to_uint8, to_unit

# ITU-T T.81 Annex K example quantization tables (luminance, chrominance), row-major.
_LUMA_Q = [
    16,
    11,
    10,
    16,
    24,
    40,
    51,
    61,
    12,
    12,
    14,
    19,
    26,
    58,
    60,
    55,
    14,
    13,
    16,
    24,
    40,
    57,
    69,
    56,
    14,
    17,
    22,
    29,
    51,
    87,
    80,
    62,
    18,
    22,
    37,
    56,
    68,
    109,
    103,
    77,
    24,
    35,
    55,
    64,
    81,
    104,
    113,
    92,
    49,
    64,
    78,
    87,
    103,
    121,
    120,
    101,
    72,
    92,
    95,
    98,
    112,
    100,
    103,
    99,
]
_CHROMA_Q = [
    17,
    18,
    24,
    47,
    99,
    99,
    99,
    99,
    18,
    21,
    26,
    66,
    99,
    99,
    99,
    99,
    24,
    26,
    56,
    99,
    99,
    99,
    99,
    99,
    47,
    66,
    99,
    99,
    99,
    99,
    99,
    99,
] + [99] * 32


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """PIL JPEG file size in kB (bytes / 1000) of each [-1, 1] image (N, C, H, W), C in {1, 3}."""
    arr = to_uint8(images).numpy()
    sizes = []
    for a in arr:
        if a.shape[-1] == 1:
            img = Image.fromarray(a[..., 0], mode="L")
        elif a.shape[-1] == 3:
            img = Image.fromarray(a, mode="RGB")
        else:
            raise ValueError(f"JPEG reward expects 1 or 3 channels, got {a.shape[-1]}")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility(Reward):
    """DDPO reward: minus the JPEG (quality 95) size in kB. Not differentiable."""

    name = "jpeg_compressibility"
    differentiable = False
    sign = -1.0

    def __init__(self, quality: int = 95):
        super().__init__()
        self.quality = int(quality)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return (self.sign * jpeg_sizes_kb(images, self.quality)).to(images.device)


class JpegIncompressibility(JpegCompressibility):
    """DDPO reward: plus the JPEG (quality 95) size in kB. Not differentiable."""

    name = "jpeg_incompressibility"
    sign = 1.0


def quant_table(quality: int, chroma: bool) -> torch.Tensor:
    """libjpeg's quality-scaled quantization table (8, 8) (IJG jcparam.c scaling rule)."""
    q = min(max(int(quality), 1), 100)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    base = torch.tensor(_CHROMA_Q if chroma else _LUMA_Q, dtype=torch.float64)
    return ((base * scale + 50) // 100).clamp(1, 255).reshape(8, 8).float()


def dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): block DCT = D X D^T (equals JPEG's FDCT for n = 8)."""
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB (N, 3, H, W) -> JFIF YCbCr in [0, 255], level-shifted by -128."""
    r, g, b = (x[:, i] * 255.0 for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b - 128.0
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return torch.stack([y, cb, cr], dim=1)


def block_dct(plane: torch.Tensor) -> torch.Tensor:
    """(N, H, W) plane -> DCT coefficients (N, H/8, W/8, 8, 8), edge-replicate padded to 8 | H, W."""
    n, h, w = plane.shape
    ph, pw = (-h) % 8, (-w) % 8
    if ph or pw:
        plane = F.pad(plane[:, None], (0, pw, 0, ph), mode="replicate")[:, 0]
    h, w = plane.shape[-2:]
    blocks = plane.reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    d = dct_matrix(8).to(plane)
    return d @ blocks @ d.T


def soft_bits(c: torch.Tensor, q: torch.Tensor, delta: float) -> torch.Tensor:
    """Smooth bits for a quantized coefficient: log2(1 + |c|/q), |c| ~ sqrt(c^2 + delta^2), 0 at c = 0."""
    mag = torch.sqrt(c * c + delta * delta)
    return torch.log2(1.0 + mag / q) - torch.log2(1.0 + delta / q)


def jpeg_rate_proxy_kb(images: torch.Tensor, quality: int = 95, delta: float = 1.0) -> torch.Tensor:
    """Differentiable estimate of the JPEG size (bits / 8000) of [-1, 1] images (N, C, H, W)."""
    x = to_unit(images if images.dtype == torch.float64 else images.float())
    if x.shape[1] == 3:
        ycc = rgb_to_ycbcr(x)
        chroma = F.avg_pool2d(ycc[:, 1:], 2, ceil_mode=True)
        planes = [(ycc[:, 0], False), (chroma[:, 0], True), (chroma[:, 1], True)]
    elif x.shape[1] == 1:
        planes = [(x[:, 0] * 255.0 - 128.0, False)]
    else:
        raise ValueError(f"JPEG surrogate expects 1 or 3 channels, got {x.shape[1]}")
    total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for plane, is_chroma in planes:
        q = quant_table(quality, is_chroma).to(x)
        coef = block_dct(plane)  # (N, bh, bw, 8, 8)
        ac = soft_bits(coef, q, delta)
        ac = ac.flatten(3)[..., 1:].sum(dim=(1, 2, 3))
        dc = coef[..., 0, 0].flatten(1)  # DC is coded as the difference to the previous block
        ddc = torch.diff(dc, dim=1, prepend=torch.zeros_like(dc[:, :1]))
        total = total + ac + soft_bits(ddc, q[0, 0], delta).sum(dim=1)
    return total / 8000.0


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV) per image (N,)."""
    x = to_unit(images.float())
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


class JpegSurrogate(Reward):
    """Differentiable JPEG-size proxy: `sign * jpeg_rate_proxy_kb` (kind='dct') or `sign * TV` ('tv').

    sign = -1 rewards compressibility, +1 incompressibility.
    """

    name = "jpeg_surrogate"
    differentiable = True

    def __init__(self, sign: float = -1.0, kind: str = "dct", quality: int = 95, delta: float = 1.0):
        super().__init__()
        if kind not in ("dct", "tv"):
            raise ConfigError(f"reward '{self.name}': kind must be 'dct' or 'tv', got {kind!r}")
        self.sign, self.kind, self.quality, self.delta = float(sign), kind, int(quality), float(delta)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        if self.kind == "tv":
            return self.sign * total_variation(images)
        return self.sign * jpeg_rate_proxy_kb(images, self.quality, self.delta)


class JpegCompressibilitySurrogate(JpegSurrogate):
    """Differentiable stand-in for `JpegCompressibility`: minus the JPEG-size proxy."""

    name = "jpeg_compressibility_surrogate"

    def __init__(self, kind: str = "dct", quality: int = 95, delta: float = 1.0):
        super().__init__(-1.0, kind, quality, delta)


class JpegIncompressibilitySurrogate(JpegSurrogate):
    """Differentiable stand-in for `JpegIncompressibility`: plus the JPEG-size proxy."""

    name = "jpeg_incompressibility_surrogate"

    def __init__(self, kind: str = "dct", quality: int = 95, delta: float = 1.0):
        super().__init__(1.0, kind, quality, delta)


@register_reward("jpeg_compressibility")
def _build_compress(quality: int = 95) -> Reward:
    return JpegCompressibility(quality)


@register_reward("jpeg_incompressibility")
def _build_incompress(quality: int = 95) -> Reward:
    return JpegIncompressibility(quality)


@register_reward("jpeg_compressibility_surrogate")
def _build_compress_surrogate(kind: str = "dct", quality: int = 95, delta: float = 1.0) -> Reward:
    return JpegCompressibilitySurrogate(kind, quality, delta)


@register_reward("jpeg_incompressibility_surrogate")
def _build_incompress_surrogate(kind: str = "dct", quality: int = 95, delta: float = 1.0) -> Reward:
    return JpegIncompressibilitySurrogate(kind, quality, delta)
