"""A small CNN trained on sklearn's digits: the feature space for digits Fréchet distances."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CACHE_VERSION = "v1"


def cache_dir() -> Path:
    """DIFFDIV_CACHE or ~/.cache/diffdiv."""
    return Path(os.environ.get("DIFFDIV_CACHE", Path.home() / ".cache" / "diffdiv"))


class DigitsCNN(nn.Module):
    """8x8x1 -> 10 classes; `features` is the 64-d penultimate layer."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.SiLU(),  # 4x4
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.SiLU(),  # 2x2
            nn.Flatten(), nn.Linear(256, 64), nn.SiLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.float().clamp(-1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DigitsFeatures(nn.Module):
    """Feature module for torchmetrics' FID: images in [-1, 1] -> 64-d features."""

    num_features = 64

    def __init__(self, cnn: DigitsCNN):
        super().__init__()
        self.cnn = cnn.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.cnn.features(x)


def train_digits_cnn(epochs: int = 30, seed: int = 0) -> DigitsCNN:
    """Train on the fixed train split (deterministic, a few seconds on 2 cores)."""
    from diffdiv.data.digits import load_digits_tensor

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = load_digits_tensor("train", return_labels=True)
    net = DigitsCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            xb = x[idx] + 0.05 * torch.randn(len(idx), 1, 8, 8, generator=g)  # mild noise: smoother features
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def load_digits_cnn(path: str | Path | None = None, seed: int = 0) -> DigitsCNN:
    """The cached digits CNN (trained and cached on first use)."""
    path = Path(path) if path else cache_dir() / f"digits_cnn-{CACHE_VERSION}-s{seed}.safetensors"
    net = DigitsCNN()
    if path.is_file():
        net.load_state_dict(load_file(str(path)))
        return net.eval()
    net = train_digits_cnn(seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return net


def digits_accuracy(net: DigitsCNN) -> float:
    """Held-out accuracy on the test split."""
    from diffdiv.data.digits import load_digits_tensor

    x, y = load_digits_tensor("test", return_labels=True)
    with torch.no_grad():
        return float((net(x).argmax(-1) == y).float().mean())
