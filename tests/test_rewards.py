"""Tests for diffdiv.rewards: real numbers against independent computations (PIL, CLIPModel, sklearn)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from scipy.stats import spearmanr

from diffdiv.config import ConfigError
from diffdiv.rewards import (
    AestheticHead,
    ClipEmbedder,
    DigitsClassReward,
    HOGEncoder,
    IdentityPoolReward,
    Reward,
    available_rewards,
    build_reward,
    embed_references,
    jpeg_rate_proxy_kb,
    jpeg_sizes_kb,
    load_digits_classifier,
    pool_similarity,
    train_digits_classifier,
)
from diffdiv.rewards.digits import accuracy, load_digits_data
from diffdiv.rewards.jpeg import total_variation
from diffdiv.rewards.tiny import build_tiny_clip

# ----------------------------------------------------------------------------- helpers / fixtures


def u8_to_pm1(u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], exactly invertible by rounding."""
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pil_jpeg_kb(u8: np.ndarray) -> float:
    buf = io.BytesIO()
    img = Image.fromarray(u8[..., 0], "L") if u8.shape[-1] == 1 else Image.fromarray(u8, "RGB")
    img.save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000.0


def smooth_and_noisy(seed: int = 0, n: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """n smooth images (bicubic upsampled 4x4 noise) and the same images plus strong pixel noise."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=(size, size), mode="bicubic")
    smooth = base.clamp(-1, 1)
    noisy = (base + 0.3 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)
    return smooth, noisy


def one_line_config_error(spec) -> str:
    with pytest.raises(ConfigError) as e:
        build_reward(spec)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def check_grad(reward: Reward, images: torch.Tensor, prompts=None) -> torch.Tensor:
    """Gradient of sum(reward) wrt images: finite, not all zero."""
    x = images.clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    return x.grad


def directional_fd(reward: Reward, x: torch.Tensor, prompts=None, eps: float = 1e-4) -> tuple[float, float]:
    """(autograd, central finite difference) directional derivative of sum(reward) in float64."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    x = x.double().clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    auto = (x.grad * v).sum().item()
    with torch.no_grad():
        fd = (reward(x + eps * v, prompts).sum() - reward(x - eps * v, prompts).sum()).item() / (2 * eps)
    return auto, fd


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return str(build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0))


@pytest.fixture(scope="module")
def digits_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("digits") / "clf.safetensors"
    load_digits_classifier(path)  # trains (deterministic, a few seconds) and caches
    return str(path)


# ----------------------------------------------------------------------------- base / registry


def test_registry_lists_all_rewards():
    assert {
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "jpeg_compressibility_surrogate",
        "jpeg_incompressibility_surrogate",
        "aesthetic",
        "clip_similarity",
        "identity_pool",
        "digits",
        "callable",
    } <= set(available_rewards())


def test_build_reward_errors_are_one_line(tmp_path, tiny_clip):
    assert "unknown reward 'nope'" in one_line_config_error({"name": "nope"})
    assert "unknown reward" in one_line_config_error("nope")
    assert "missing 'name'" in one_line_config_error({"quality": 3})
    assert "unknown key 'qualty'" in one_line_config_error({"name": "jpeg_compressibility", "qualty": 9})
    msg = one_line_config_error({"name": "aesthetic", "clip_path": "x"})
    assert "missing required key 'head_path'" in msg
    missing = str(tmp_path / "missing.safetensors")
    assert "head_path file not found" in one_line_config_error(
        {"name": "aesthetic", "clip_path": tiny_clip, "head_path": missing}
    )
    head = tmp_path / "h.safetensors"
    AestheticHead([32, 1]).save(head)
    assert "CLIP folder not found" in one_line_config_error(
        {"name": "aesthetic", "clip_path": str(tmp_path / "no_clip"), "head_path": str(head)}
    )
    assert "CLIP folder not found" in one_line_config_error(
        {"name": "clip_similarity", "clip_path": "./not/a/folder"}
    )
    assert "cannot import module" in one_line_config_error({"name": "callable", "target": "no_such_mod:f"})
    assert "has no attribute" in one_line_config_error({"name": "callable", "target": "math:nope"})
    assert "not 'module:function'" in one_line_config_error({"name": "callable", "target": "nodots"})
    assert "reference_dir folder not found" in one_line_config_error(
        {"name": "identity_pool", "encoder": "hog", "reference_dir": str(tmp_path / "none")}
    )
    assert "needs clip_path" in one_line_config_error({"name": "identity_pool", "encoder": "clip"})
    assert "classifier file not found" in one_line_config_error(
        {"name": "digits", "classifier_path": missing, "train_if_missing": False}
    )
    assert "target must be an integer" in one_line_config_error(
        {"name": "digits", "target": 12, "classifier_path": missing}
    )


def test_video_is_mean_over_frames_and_shapes_are_checked():
    r = build_reward("jpeg_compressibility_surrogate")
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 3, 16, 16, generator=g) * 2 - 1
    per_frame = torch.stack([r(video[:, f]) for f in range(3)], dim=1)
    torch.testing.assert_close(r(video), per_frame.mean(dim=1))
    with pytest.raises(ValueError, match="must be"):
        r(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="prompts"):
        r(torch.zeros(2, 3, 16, 16), ["a"])


# ----------------------------------------------------------------------------- JPEG


def test_jpeg_rewards_match_pil_and_order_smooth_vs_noisy():
    smooth, noisy = smooth_and_noisy()
    # quantize to exact uint8 values so the reward's own [-1,1] -> uint8 conversion is lossless
    u8 = ((torch.cat([smooth, noisy]) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    x = u8_to_pm1(u8)
    expected = torch.tensor([pil_jpeg_kb(a) for a in u8])
    comp, incomp = build_reward("jpeg_compressibility"), build_reward({"name": "jpeg_incompressibility"})
    assert comp.differentiable is False and incomp.differentiable is False
    torch.testing.assert_close(comp(x), -expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(incomp(x), expected, rtol=0, atol=1e-6)
    n = smooth.shape[0]
    # every smooth image is more compressible than every noisy one (by a wide margin)
    assert comp(x)[:n].min() > comp(x)[n:].max() + 1.0
    # grayscale images use PIL mode "L"
    gray = u8[:, :, :, :1].copy()
    torch.testing.assert_close(jpeg_sizes_kb(u8_to_pm1(gray)), torch.tensor([pil_jpeg_kb(a) for a in gray]))


def _surrogate_test_set() -> torch.Tensor:
    """64x64 RGB images of varying smoothness and noise: random fields + natural photos (skimage)."""
    import skimage.data as sd

    g = torch.Generator().manual_seed(0)
    imgs = []
    for k in (2, 4, 8, 16, 32):
        for s in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4):
            base = F.interpolate(torch.rand(1, 3, k, k, generator=g) * 2 - 1, size=(64, 64), mode="bicubic")
            imgs.append((base + s * torch.randn(1, 3, 64, 64, generator=g)).clamp(-1, 1))
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        a = torch.from_numpy(getattr(sd, name)()).permute(2, 0, 1)[None].float() / 127.5 - 1
        a = F.interpolate(a, size=(64, 64), mode="area")
        blurred = F.interpolate(F.avg_pool2d(a, 4), size=(64, 64), mode="bilinear")
        for y in (a, blurred):
            for s in (0.0, 0.05, 0.15):
                imgs.append((y + s * torch.randn(y.shape, generator=g)).clamp(-1, 1))
    return torch.cat(imgs)


def test_surrogate_rank_correlates_with_true_jpeg_size():
    x = _surrogate_test_set()  # 30 synthetic + 24 natural
    true = jpeg_sizes_kb(x).numpy()
    dct = jpeg_rate_proxy_kb(x).numpy()
    tv = total_variation(x).numpy()
    rho_dct, rho_tv = spearmanr(true, dct).statistic, spearmanr(true, tv).statistic
    rho_nat = spearmanr(true[30:], dct[30:]).statistic
    print(f"spearman dct={rho_dct:.4f} tv={rho_tv:.4f} dct(natural only)={rho_nat:.4f}")
    assert rho_dct > 0.95 and rho_tv > 0.9 and rho_nat > 0.9
    surrogate = build_reward("jpeg_compressibility_surrogate")
    torch.testing.assert_close(surrogate(x), -torch.from_numpy(dct))
    assert build_reward("jpeg_incompressibility_surrogate")(x[:3]).gt(0).all()


def test_surrogate_gradient_is_correct_and_lowers_true_jpeg_size():
    r = build_reward("jpeg_compressibility_surrogate")
    assert r.differentiable is True
    _, noisy = smooth_and_noisy(n=2, size=32)
    auto, fd = directional_fd(r, noisy)
    assert abs(auto - fd) <= 1e-4 * max(1.0, abs(fd))
    # first-order ascent on the surrogate reduces the real (non-differentiable) JPEG size
    x = noisy.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        (-r(x).sum()).backward()
        opt.step()
    before, after = jpeg_sizes_kb(noisy), jpeg_sizes_kb(x.detach().clamp(-1, 1))
    assert (after < 0.75 * before).all(), (before, after)  # measured ratio ~0.64


# ----------------------------------------------------------------------------- CLIP


def test_tiny_clip_roundtrip_and_torch_preprocessing_matches_processor(tiny_clip):
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip)
    assert model.config.vision_config.image_size == 32 and model.config.text_config.hidden_size == 32
    emb = ClipEmbedder.from_pretrained(tiny_clip)
    proc = CLIPImageProcessor.from_pretrained(tiny_clip)
    rng = np.random.default_rng(0)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    for h, w in ((32, 32), (64, 64), (48, 80), (57, 41)):
        small = rng.integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
        u8 = np.stack([np.asarray(Image.fromarray(s).resize((w, h), Image.BICUBIC)) for s in small])
        ref = proc(images=list(u8), return_tensors="pt")["pixel_values"]
        ours = emb.preprocess(u8_to_pm1(u8))
        assert ours.shape == ref.shape == (2, 3, 32, 32)
        err = (ours - ref).abs() * std * 255  # in 8-bit grey levels
        if (h, w) == (32, 32):  # no resize: identical up to float rounding
            assert err.max() < 1e-3
        else:  # PIL rounds its resized image to uint8 (mean 0.25 levels) and its fixed-point bicubic
            # differs slightly from torch's antialiased bicubic on these smooth images
            assert err.max() < 2.5 and err.mean() < 0.4


def test_clip_similarity_equals_hand_computed_cosine(tiny_clip):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    r = build_reward({"name": "clip_similarity", "clip_path": tiny_clip})
    assert r.differentiable is True
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    prompts = ["a photo of the cat", "and the dog", "zebra 42!"]
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip)
    inputs = tok(prompts, padding="max_length", max_length=32, return_tensors="pt")
    pixel_values = CLIPImageProcessor.from_pretrained(tiny_clip)(images=list(u8), return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixel_values["pixel_values"], **inputs)
    expected = (out.image_embeds * out.text_embeds).sum(-1)  # both L2-normalized by CLIPModel
    got = r(u8_to_pm1(u8), prompts)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the reward tells prompts apart: the matrix of (image, prompt) scores is not constant per image
    other = r(u8_to_pm1(u8), prompts[::-1])
    assert (got - other).abs().max() > 1e-3
    grad = check_grad(r, u8_to_pm1(u8), prompts)
    assert grad.shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="prompt"):
        r(u8_to_pm1(u8))


def test_clip_similarity_gradient_matches_finite_difference(tiny_clip):
    r = build_reward({"name": "clip_similarity", "clip_path": tiny_clip}).double()
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1
    auto, fd = directional_fd(r, x, ["the cat", "a dog"], eps=1e-5)
    assert abs(auto - fd) <= 1e-5 * max(1.0, abs(fd))


def test_aesthetic_head_roundtrip_and_reward(tmp_path, tiny_clip):
    from transformers import CLIPModel

    torch.manual_seed(0)
    head = AestheticHead([32, 16, 8, 1], activation="gelu")
    path = tmp_path / "head.safetensors"
    head.save(path)
    loaded = AestheticHead.load(path)
    assert loaded.activation == "gelu" and loaded.dims == [32, 16, 8, 1] and loaded.normalize
    r = build_reward({"name": "aesthetic", "clip_path": tiny_clip, "head_path": str(path)})
    assert r.differentiable is True
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        e = ClipEmbedder(model).embed_images(x)  # OpenAI mean/std == the tiny config's
        e = e / e.norm(dim=-1, keepdim=True)
        lin = [m for m in head.layers if isinstance(m, torch.nn.Linear)]
        h = F.gelu(lin[0](e))
        h = F.gelu(lin[1](h))
        expected = lin[2](h).squeeze(-1)
    torch.testing.assert_close(r(x), expected, rtol=1e-5, atol=1e-6)
    check_grad(r, x)
    # projection-dim mismatch is a one-line config error
    AestheticHead([768, 1]).save(tmp_path / "big.safetensors")
    assert "head input is 768-d" in one_line_config_error(
        {"name": "aesthetic", "clip_path": tiny_clip, "head_path": str(tmp_path / "big.safetensors")}
    )


def test_aesthetic_head_reads_laion_layout_without_metadata(tmp_path):
    # LAION aesthetic predictor v2 layout: Linear at 0, 2, 4, 6, 7 (dropouts between), no activation
    g = torch.Generator().manual_seed(0)
    dims = [32, 64, 16, 8, 4, 1]
    state, ws = {}, []
    for i, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        w, bias = torch.randn(b, a, generator=g) * 0.3, torch.randn(b, generator=g) * 0.1
        state[f"layers.{i}.weight"], state[f"layers.{i}.bias"] = w, bias
        ws.append((w, bias))
    save_file(state, str(tmp_path / "laion.safetensors"))
    head = AestheticHead.load(tmp_path / "laion.safetensors")
    e = torch.randn(5, 32, generator=g)
    h = e / e.norm(dim=-1, keepdim=True)
    for w, bias in ws:
        h = h @ w.T + bias
    torch.testing.assert_close(head(e), h.squeeze(-1))


# ----------------------------------------------------------------------------- identity pool


def test_pool_similarity_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    frames, pool = torch.randn(3, 4, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    got = pool_similarity(frames, pool, mask)
    for b in range(3):
        best = [
            max(F.cosine_similarity(frames[b, f], pool[b, p], dim=0).item() for p in range(6) if mask[b, p])
            for f in range(4)
        ]
        assert abs(got[b].item() - sum(best) / 4) < 1e-6


def _augment(face: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n views of one (1, 25, 25) face: random shift (<= 2 px), horizontal flip, contrast, noise."""
    out = []
    pad = F.pad(face[None], (2, 2, 2, 2), mode="replicate")
    for _ in range(n):
        dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
        y = pad[..., dy : dy + 25, dx : dx + 25]
        if torch.rand(1, generator=g).item() < 0.5:
            y = y.flip(-1)
        y = y * (1 + 0.1 * (2 * torch.rand(1, generator=g) - 1)) + 0.05 * torch.randn(y.shape, generator=g)
        out.append(y.clamp(-1, 1))
    return torch.cat(out)


def test_identity_pool_reward_on_lfw_faces():
    """skimage's lfw_subset has 100 faces with no identity labels, so "same identity" = other
    augmented views of the same photo; "other identity" = views of the other faces. The HOG
    encoder is centred on 50 faces and evaluated on the other 50."""
    import skimage.data as sd

    faces = torch.from_numpy(sd.lfw_subset()[:100]).float()[:, None] * 2 - 1  # (100, 1, 25, 25)
    fit, test = faces[:50], faces[50:]
    enc = HOGEncoder(size=24, cell=4).fit_center(fit)
    reward = IdentityPoolReward(enc)
    g = torch.Generator().manual_seed(0)
    n, n_frames, n_pool = len(test), 4, 6
    videos = torch.stack([_augment(test[i], n_frames, g) for i in range(n)])  # (n, F, 1, 25, 25)
    pools = torch.stack([embed_references(enc, _augment(test[i], n_pool, g)) for i in range(n)])
    frame_emb = enc(videos.flatten(0, 1)).reshape(n, n_frames, -1)
    # scores[i, j] = reward of video i against pool j (all pairs at once)
    scores = torch.stack(
        [pool_similarity(frame_emb, pools[j : j + 1].expand(n, -1, -1)) for j in range(n)], 1
    )
    same = scores.diag()
    other = (scores.sum(1) - same) / (n - 1)
    top1 = (scores.argmax(1) == torch.arange(n)).float().mean().item()
    print(
        f"identity pool (HOG): same {same.mean():.3f}+-{same.std():.3f}, other {other.mean():.3f}"
        f"+-{other.std():.3f}, margin {(same - other).mean():.3f}, min margin {(same - other).min():.3f}, "
        f"top-1 {top1:.2f}"
    )
    assert (same > other).all()  # every face: own pool beats the average other pool
    assert (same - other).mean() > 0.25
    assert top1 >= 0.85  # own pool is the best of 50 pools for most faces
    # the reward itself: per-sample pools (B, P, D) in one call, and one shared pool (P, D)
    torch.testing.assert_close(reward(videos, pool=pools), same)
    torch.testing.assert_close(reward(videos, pool=pools[7]), scores[:, 7])
    # a single image is a one-frame video
    single = pool_similarity(enc(videos[:, 0])[:, None], pools)
    torch.testing.assert_close(reward(videos[:, 0], pool=pools), single)
    x = videos[:4].clone().requires_grad_(True)
    reward(x, pool=pools[:4]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_identity_pool_from_reference_folder_with_clip_encoder(tmp_path, tiny_clip):
    g = torch.Generator().manual_seed(0)
    refs = (torch.rand(3, 3, 40, 40, generator=g) * 255).round().to(torch.uint8)
    for i, r in enumerate(refs):
        Image.fromarray(r.permute(1, 2, 0).numpy()).save(tmp_path / f"ref{i}.png")
    reward = build_reward(
        {"name": "identity_pool", "encoder": "clip", "clip_path": tiny_clip, "reference_dir": str(tmp_path)}
    )
    assert reward.differentiable is True and reward.pool.shape == (3, 32)
    refs_pm1 = refs.float() / 127.5 - 1
    # a reference image is its own best match: cosine 1
    torch.testing.assert_close(reward(refs_pm1), torch.ones(3), rtol=0, atol=1e-5)
    video = torch.rand(2, 3, 3, 40, 40, generator=g) * 2 - 1
    check_grad(reward, video)
    direct = IdentityPoolReward.from_reference_images(reward.encoder, refs_pm1)
    torch.testing.assert_close(direct(video), reward(video))


# ----------------------------------------------------------------------------- digits


def test_digits_classifier_accuracy_and_target_reward(digits_path):
    _, _, x_te, y_te = load_digits_data()
    clf = load_digits_classifier(digits_path, train_if_missing=False)
    acc = accuracy(clf, x_te, y_te)
    assert acc > 0.95
    r = build_reward({"name": "digits", "target": 3, "classifier_path": digits_path})
    assert isinstance(r, DigitsClassReward) and r.differentiable is True
    s = r(x_te)
    threes, others = s[y_te == 3], s[y_te != 3]
    print(f"digits: acc {acc:.4f}; log p(3|x): real 3s {threes.mean():.3f}, others {others.mean():.3f}")
    assert threes.mean() > np.log(0.9) and others.mean() < np.log(0.1)
    # AUC of the reward for "is a 3" (fraction of (3, non-3) pairs ranked correctly)
    auc = (threes[:, None] > others[None, :]).float().mean().item()
    assert auc > 0.98
    # rewards are exactly log-probabilities
    torch.testing.assert_close(r(x_te[:5]), torch.log_softmax(clf(x_te[:5]), 1)[:, 3])
    # prompt-driven targets, RGB and upsampled inputs
    rp = build_reward({"name": "digits", "target": None, "classifier_path": digits_path})
    labels = [str(int(c)) for c in y_te[:6]]
    torch.testing.assert_close(rp(x_te[:6], labels), torch.log_softmax(clf(x_te[:6]), 1)[range(6), y_te[:6]])
    big = F.interpolate(x_te[:6], scale_factor=4, mode="nearest").expand(-1, 3, -1, -1)
    torch.testing.assert_close(rp(big, labels), rp(x_te[:6], labels), rtol=1e-5, atol=1e-5)
    auto, fd = directional_fd(r.double(), x_te[:4])
    assert abs(auto - fd) <= 1e-4 * max(1.0, abs(fd))


def test_digits_classifier_cache_is_reused_and_training_is_deterministic(digits_path):
    import os

    before = os.stat(digits_path).st_mtime_ns
    load_digits_classifier(digits_path)
    assert os.stat(digits_path).st_mtime_ns == before  # loaded, not retrained
    (a, acc_a), (b, acc_b) = train_digits_classifier(epochs=2), train_digits_classifier(epochs=2)
    assert acc_a == acc_b
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# ----------------------------------------------------------------------------- callables


def test_callable_reward_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "import torch\n"
        "from diffdiv.rewards import Reward\n"
        "def brightness(images, prompts, scale=1.0):\n"
        "    return scale * images.flatten(1).mean(1)\n"
        "def bad(images, prompts):\n"
        "    return images.mean()\n"
        "class Red(Reward):\n"
        "    name = 'red'\n"
        "    differentiable = True\n"
        "    def score(self, images, prompts):\n"
        "        return images[:, 0].flatten(1).mean(1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r = build_reward({"name": "callable", "target": "my_rewards_mod:brightness", "kwargs": {"scale": 2.0}})
    assert r.differentiable is False
    torch.testing.assert_close(r(x), 2 * x.flatten(1).mean(1))
    r2 = build_reward({"name": "callable", "target": "my_rewards_mod.brightness", "differentiable": True})
    assert r2.differentiable is True
    torch.testing.assert_close(r2(x), x.flatten(1).mean(1))
    torch.testing.assert_close(build_reward("my_rewards_mod:brightness")(x), x.flatten(1).mean(1))
    red = build_reward({"name": "callable", "target": "my_rewards_mod:Red"})
    assert red.name == "red" and red.differentiable
    torch.testing.assert_close(red(x), x[:, 0].flatten(1).mean(1))
    with pytest.raises(ValueError, match="shape"):
        build_reward("my_rewards_mod:bad")(x)


def test_rewards_are_frozen_and_stay_in_eval(digits_path):
    r = build_reward({"name": "digits", "classifier_path": digits_path})
    r.train()
    assert not r.training and not any(m.training for m in r.modules())
    assert not any(p.requires_grad for p in r.parameters())


def test_tiny_clip_config_has_matching_special_tokens(tiny_clip):
    from transformers import CLIPTokenizer

    cfg = json.loads((Path(tiny_clip) / "config.json").read_text())

    tok = CLIPTokenizer.from_pretrained(tiny_clip)
    assert cfg["text_config"]["eos_token_id"] == tok.eos_token_id
    assert cfg["text_config"]["vocab_size"] == len(tok)
