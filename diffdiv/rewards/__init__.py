"""Reward functions for reward fine-tuning (DPOK, IPRO, ROCM, DI*).

Every reward is a frozen `Reward(nn.Module)`: `reward(images, prompts=None) -> (B,)` float32, with
images in [-1, 1] of shape (B, C, H, W) or videos (B, F, C, H, W) (mean over frames). The class
attribute `differentiable` says whether first-order methods may back-propagate through it.
Build one from config with `build_reward({"name": ..., **kwargs})`; `available_rewards()` lists names:

    {name: jpeg_compressibility}                     # DDPO: -JPEG size (kB), not differentiable
    {name: jpeg_incompressibility}                   # DDPO: +JPEG size (kB), not differentiable
    {name: jpeg_compressibility_surrogate, kind: dct}  # differentiable JPEG-size proxy (or kind: tv)
    {name: aesthetic, clip_path: DIR_OR_HUB_ID, head_path: FILE.safetensors}
    {name: clip_similarity, clip_path: DIR_OR_HUB_ID, scale: 1.0}
    {name: identity_pool, encoder: clip|hog|"pkg.mod:factory", clip_path: ..., reference_dir: DIR}
    {name: digits, target: 3, classifier_path: FILE}  # log p(target | x), trains + caches if missing
    {name: callable, target: "pkg.module:fn", differentiable: false, kwargs: {...}}
"""

from diffdiv.rewards.aesthetic import AestheticHead, AestheticReward
from diffdiv.rewards.base import REWARDS, Reward, register_reward
from diffdiv.rewards.build import available_rewards, build_reward
from diffdiv.rewards.clip import ClipEmbedder, ClipSimilarityReward, clip_preprocess
from diffdiv.rewards.custom import CallableReward
from diffdiv.rewards.digits import (
    DigitsClassReward,
    DigitsCNN,
    load_digits_classifier,
    save_digits_classifier,
    train_digits_classifier,
)
from diffdiv.rewards.identity import HOGEncoder, IdentityPoolReward, embed_references, pool_similarity
from diffdiv.rewards.jpeg import (
    JpegCompressibility,
    JpegCompressibilitySurrogate,
    JpegIncompressibility,
    JpegIncompressibilitySurrogate,
    JpegSurrogate,
    jpeg_rate_proxy_kb,
    jpeg_sizes_kb,
)

__all__ = [
    "REWARDS",
    "AestheticHead",
    "AestheticReward",
    "CallableReward",
    "ClipEmbedder",
    "ClipSimilarityReward",
    "DigitsCNN",
    "DigitsClassReward",
    "HOGEncoder",
    "IdentityPoolReward",
    "JpegCompressibility",
    "JpegCompressibilitySurrogate",
    "JpegIncompressibility",
    "JpegIncompressibilitySurrogate",
    "JpegSurrogate",
    "Reward",
    "available_rewards",
    "build_reward",
    "clip_preprocess",
    "embed_references",
    "jpeg_rate_proxy_kb",
    "jpeg_sizes_kb",
    "load_digits_classifier",
    "pool_similarity",
    "register_reward",
    "save_digits_classifier",
    "train_digits_classifier",
]
