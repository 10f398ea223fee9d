"""Digits-classifier reward ("make it a 3"): log p(target | image) under a small CNN trained on
sklearn's bundled 8x8 digits, images scaled to [-1, 1] (pixel / 8 - 1).

`train_digits_classifier()` trains it deterministically in a few seconds on CPU;
`load_digits_classifier(path)` reads a cached safetensors file or trains and writes one
(default `~/.cache/diffdiv/digits_classifier.safetensors`, or `$DIFFDIV_CACHE/...`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from diffdiv.config import ConfigError
from diffdiv.rewards.base import Reward, at_least_fp32, register_reward

CLASSIFIER_FORMAT = "diffdiv.digits_classifier.v1"


def default_cache_dir() -> Path:
    """`$DIFFDIV_CACHE` or `~/.cache/diffdiv`."""
    return Path(os.environ.get("DIFFDIV_CACHE", Path.home() / ".cache" / "diffdiv")).expanduser()


def load_digits_data() -> tuple[torch.Tensor, ...]:
    """The project's fixed stratified digits split (diffdiv.data.digits): (x_train, y_train, x_test, y_test).

    x in [-1, 1] (pixel / 8 - 1), shape (N, 1, 8, 8).
    """
    from diffdiv.data.digits import load_digits_tensor

    x_tr, y_tr = load_digits_tensor("train", return_labels=True)
    x_te, y_te = load_digits_tensor("test", return_labels=True)
    return x_tr, y_tr, x_te, y_te


class DigitsCNN(nn.Module):
    """Small CNN for (N, 1, 8, 8) digits in [-1, 1] -> 10 logits. Other sizes / RGB are converted."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),  # 4x4
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(8 * width, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            x = F.adaptive_avg_pool2d(x, 8)
        return self.net(x.to(self.net[0].weight.dtype))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of `model` on (x, y)."""
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train_digits_classifier(
    seed: int = 0,
    epochs: int = 40,
    width: int = 32,
    noise: float = 0.2,
    batch_size: int = 128,
    lr: float = 1e-2,
) -> tuple[DigitsCNN, float]:
    """Train `DigitsCNN` on the project's digits train split; returns (model, test-split accuracy).

    Inputs get Gaussian noise (std `noise`) during training so the classifier (and its gradient) is
    sensible slightly off the data manifold, where generated samples live.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread is as fast, and much faster on a busy CPU
    try:
        return _train(seed, epochs, width, noise, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(
    seed: int, epochs: int, width: int, noise: float, batch_size: int, lr: float
) -> tuple[DigitsCNN, float]:
    x_tr, y_tr, x_te, y_te = load_digits_data()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * ((len(y_tr) + batch_size - 1) // batch_size)
    )
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(y_tr), batch_size):
            idx = perm[i : i + batch_size]
            xb = x_tr[idx] + noise * torch.randn(x_tr[idx].shape, generator=g)
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, accuracy(model, x_te, y_te)


def save_digits_classifier(model: DigitsCNN, path: str | Path, test_accuracy: float | None = None) -> None:
    """Write the classifier as safetensors (weights + width/accuracy metadata)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": CLASSIFIER_FORMAT, "width": str(model.width)}
    if test_accuracy is not None:
        meta["test_accuracy"] = f"{test_accuracy:.6f}"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = Path(str(path) + f".tmp{os.getpid()}")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: concurrent readers never see a partial file


def load_digits_classifier(path: str | Path | None = None, train_if_missing: bool = True) -> DigitsCNN:
    """Load the cached classifier from `path` (default cache dir); train and cache it if missing."""
    path = (
        Path(path).expanduser() if path is not None else default_cache_dir() / "digits_classifier.safetensors"
    )
    if not path.is_file():
        if not train_if_missing:
            raise ConfigError(f"reward 'digits': classifier file not found: {path}")
        model, acc = train_digits_classifier()
        save_digits_classifier(model, path, acc)
        return model
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ConfigError(f"reward 'digits': {path} is not a diffdiv digits classifier")
    model = DigitsCNN(int(meta["width"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _check_target(target: object) -> None:
    ok = target is None or (isinstance(target, int) and not isinstance(target, bool) and 0 <= target <= 9)
    if not ok:
        raise ConfigError(f"reward 'digits': target must be an integer 0..9 or null, got {target!r}")


class DigitsClassReward(Reward):
    """log p(target | image) under the digits classifier. Differentiable.

    `target` is a class 0..9; with `target=None` each prompt must be a digit ("3") naming its target.
    """

    name = "digits"
    differentiable = True

    def __init__(self, classifier: nn.Module, target: int | None = 3):
        super().__init__()
        _check_target(target)
        self.classifier = classifier
        self.target = target
        self.needs_prompts = target is None
        self.freeze()

    def targets(self, n: int, prompts: list[str] | None, device: torch.device) -> torch.Tensor:
        """Target class per image: the fixed target, or parsed from the prompts."""
        if self.target is not None:
            return torch.full((n,), self.target, dtype=torch.long, device=device)
        assert prompts is not None
        bad = [p for p in prompts if str(p).strip() not in [str(i) for i in range(10)]]
        if bad:
            raise ValueError(f"reward 'digits': prompt {bad[0]!r} is not a digit 0..9")
        return torch.tensor([int(str(p).strip()) for p in prompts], dtype=torch.long, device=device)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        logp = F.log_softmax(at_least_fp32(self.classifier(images)), dim=1)
        t = self.targets(images.shape[0], prompts, images.device)
        return logp.gather(1, t[:, None]).squeeze(1)


@register_reward("digits")
def _build_digits(
    target: int | None = 3, classifier_path: str | None = None, train_if_missing: bool = True
) -> Reward:
    _check_target(target)
    return DigitsClassReward(load_digits_classifier(classifier_path, train_if_missing), target)
